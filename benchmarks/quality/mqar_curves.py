"""Held-out MQAR accuracy along training, one line per run, from one or more mqar.py results files (runs made
with --eval-every), one panel per task; and the same as a markdown table.

    python benchmarks/quality/mqar_curves.py results/a.json results/b.json --out curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_runs(paths: list[Path]) -> list[dict]:
    """Every run of the files, with its learning rate, steps and tokens per step, in file order."""
    runs = []
    for path in paths:
        data = json.loads(path.read_text())
        if data.get("benchmark") != "mqar":
            raise SystemExit(f"{path} is not an mqar.py results file")
        for key, run in data["runs"].items():
            if not run.get("eval_curve"):
                raise SystemExit(f"{path}: run {key} has no accuracy curve (made without --eval-every)")
            config = data["config"]
            runs.append(
                run
                | {
                    "key": key,
                    "grid_steps": config["steps"],
                    "seed": config.get("seed", 0),
                    "vocab": config["vocab_size"],
                    "trained": [task["name"] for task in config["tasks"]],
                    "file": path.name,
                }
            )
    if not runs:
        raise SystemExit("no runs in " + ", ".join(map(str, paths)))
    return runs


def label(run: dict) -> str:
    schedule = f"{run['grid_steps']:,}-step schedule"
    mix = f", trained on {' + '.join(run['trained'])}" if len(run["trained"]) > 1 else ""
    model = f"{run['model']} w{run['width']} vocab {run['vocab']}"
    return f"{model} lr {run['lr']:g} seed {run['seed']} ({schedule}{mix})"


def table(runs: list[dict]) -> str:
    lines = [
        "run | task | accuracy % at each evaluation | final % | steps | ended by",
        "--- | --- | --- | --- | --- | ---",
    ]
    for run in runs:
        for task, final in run["accuracy"].items():
            points = " / ".join(f"{100 * acc[task]:.1f}" for _, acc in run["eval_curve"])
            lines.append(
                f"{label(run)} | {task} | {points} | {100 * final:.1f} | {run['steps_done']:,} | "
                f"{run.get('ended_by', '-')}"
            )
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(task for run in runs for task in run["accuracy"]))
    columns = 1 if len(tasks) < 2 else 2  # of the legend, below the panels
    legend_rows = -(-len(runs) // columns)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4 + 0.22 * legend_rows), squeeze=False)
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    lines = {}  # one color per run in every panel, one legend for the figure
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, run in enumerate(runs):
            if task not in run["accuracy"]:
                continue
            steps = [step for step, _ in run["eval_curve"]]
            accuracy = [100 * acc[task] for _, acc in run["eval_curve"]]
            (lines[label(run)],) = ax.plot(steps, accuracy, marker="o", ms=3, color=colors[i % len(colors)])
        ax.axhline(99, color="grey", ls=":", lw=1)
        ax.set_title(task)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    fig.legend(lines.values(), lines.keys(), loc="lower center", fontsize=8, ncol=columns)
    fig.tight_layout(rect=(0, 0.22 * legend_rows / (4 + 0.22 * legend_rows) + 0.02, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="mqar.py results files")
    p.add_argument("--out", required=True, type=Path, help="the plot (PNG)")
    args = p.parse_args(argv)
    missing = [str(path) for path in args.results if not path.is_file()]
    if missing:
        raise SystemExit(f"no such results file: {', '.join(missing)}")
    runs = load_runs(args.results)
    plot(runs, args.out)
    print(table(runs))
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
