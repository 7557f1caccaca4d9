"""Readable results of an lm-eval run: `results.json`, `results.md` (a table) and `results.png` (a plot).

Every file is written to a temporary name in the output folder and renamed into place, so a reader never
sees a half-written file and an interrupted run leaves the previous files intact.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

JSON_KEYS = (
    "run",
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
    "config",
    "git_hash",
    "date",
    "total_evaluation_time_seconds",
)


def metric_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task or group, metric, filter) with its value, stderr, n and higher_is_better."""
    rows = []
    groups = set(results.get("groups", {}))
    for name, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        better = results.get("higher_is_better", {}).get(name, {})
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                {
                    "name": name,
                    "group": name in groups,
                    "metric": metric,
                    "filter": filter_name,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "n": n,
                    "higher_is_better": better.get(metric),
                }
            )
    return rows


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.4f}"


def markdown_table(results: dict[str, Any]) -> str:
    """A markdown table of every metric, groups first, then tasks; arrows mark the better direction."""
    run = results.get("run", {})
    lines = []
    if run:
        lines += [
            f"Model: `{run.get('model')}`  ",
            f"model_args: `{', '.join(f'{k}={v}' for k, v in run.get('model_args', {}).items())}`  ",
            f"device: {run.get('device')}, batch size: {run.get('batch_size')}, limit: {run.get('limit')}, "
            f"lm-eval {run.get('lm_eval_version')}, {run.get('seconds')} s",
            "",
        ]
    lines += ["| task | metric | filter | value | ± stderr | n |", "|---|---|---|---:|---:|---:|"]
    rows = sorted(metric_rows(results), key=lambda r: (not r["group"], r["name"], r["metric"]))
    for row in rows:
        arrow = {True: " ↑", False: " ↓"}.get(row["higher_is_better"], "")
        name = f"**{row['name']}**" if row["group"] else row["name"]
        lines.append(
            f"| {name} | {row['metric']}{arrow} | {row['filter']} | {_fmt(row['value'])} | "
            f"{_fmt(row['stderr'])} | {row['n'] if row['n'] is not None else ''} |"
        )
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) for a temporary file next to `path`, then rename it to `path`."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(text: str) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    return write


def plot(results: dict[str, Any], title: str = ""):
    """A matplotlib Figure: one panel per metric, a bar per task (groups left out), stderr as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in metric_rows(results) if not row["group"]]
    metrics = sorted({row["metric"] for row in rows})
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(8, 1.2 + 0.35 * max(1, len(rows))), squeeze=False, constrained_layout=True
    )
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        chosen = sorted((r for r in rows if r["metric"] == metric), key=lambda r: r["name"])
        labels = [r["name"] if r["filter"] == "none" else f"{r['name']} [{r['filter']}]" for r in chosen]
        errors = [r["stderr"] or 0.0 for r in chosen]
        ax.barh(labels, [r["value"] for r in chosen], xerr=errors, color="tab:blue", alpha=0.8)
        arrow = {True: " (higher is better)", False: " (lower is better)"}.get(
            chosen[0]["higher_is_better"], ""
        )
        ax.set_title(metric + arrow, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
    if not metrics:
        axes[0, 0].text(0.5, 0.5, "no metrics", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def write_report(results: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, results.md and results.png into `output_dir`; returns {kind: path}."""
    from lm_eval.utils import handle_non_serializable

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    payload = {key: results[key] for key in JSON_KEYS if key in results}
    text = json.dumps(payload, indent=2, default=handle_non_serializable, ensure_ascii=False)
    _atomic_write(paths["json"], _write_text(text + "\n"))
    _atomic_write(paths["markdown"], _write_text(markdown_table(results)))
    if "samples" in results:
        paths["samples"] = out / "samples.jsonl"
        lines = [
            json.dumps({"task": task, **sample}, default=handle_non_serializable, ensure_ascii=False)
            for task, samples in results["samples"].items()
            for sample in samples
        ]
        _atomic_write(paths["samples"], _write_text("\n".join(lines) + "\n"))

    fig = plot(results, title=str(results.get("run", {}).get("model", "")))
    try:
        _atomic_write(paths["plot"], lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return paths
