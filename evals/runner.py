"""Run lm-eval's `simple_evaluate` on a PFlow checkpoint (local folder or Hub id), with the bundled suite.

The model is loaded by lm-eval's own `hf` backend (`HFLM`) from the same arguments the harness CLI takes
(`pretrained=...,peft=...`), so `parallelflow eval` and `lm_eval --model hf` score a checkpoint the same way.
PFlow checkpoints load through this installed package; code shipped with a checkpoint runs only with
`trust_remote_code=True`. Task names pass through to the harness; names that need a Hub dataset which is not
cached (offline, or no network) fail up front with `TaskUnavailableError`, naming every such task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import TASKS_DIR

DEFAULT_TASKS = ("parallelflow_offline",)


class TaskUnavailableError(RuntimeError):
    """A requested task is unknown or its dataset cannot be loaded (e.g. a Hub dataset while offline)."""


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_args(
    model: str,
    *,
    peft: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "auto",
    max_length: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """The `--model_args` of `lm_eval --model hf` for this checkpoint, as a dict."""
    args: dict[str, Any] = {"pretrained": model, "trust_remote_code": trust_remote_code, "dtype": dtype}
    optional = {"peft": peft, "tokenizer": tokenizer, "max_length": max_length, "revision": revision}
    args.update({key: value for key, value in optional.items() if value is not None})
    return args


def model_args_string(args: dict[str, Any]) -> str:
    """`key=value,...` as the harness CLI's `--model_args` takes it."""
    return ",".join(f"{key}={value}" for key, value in args.items())


def task_manager(tasks: Sequence[str] = (), include_paths: Sequence[str | Path] = ()):
    """An lm-eval TaskManager for the bundled suite and `include_paths`, plus lm-eval's standard tasks unless
    every name in `tasks` is found without them (indexing the standard tasks' YAML takes seconds)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include_paths)]
    local = TaskManager(include_path=paths, include_defaults=False)
    if tasks and set(tasks) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=paths)


def check_tasks(tasks: Sequence[str], manager) -> None:
    """Build every task once; raise TaskUnavailableError listing each unknown task or missing dataset."""
    problems = []
    for name in tasks:
        try:
            manager.load([name])
        except KeyError:
            problems.append(f"  {name}: not a task, group or tag known to lm-eval or {TASKS_DIR}")
        except (ConnectionError, OSError) as err:  # Hub unreachable / offline and not cached
            problems.append(
                f"  {name}: its dataset is not available offline ({err}). Run once with network access "
                "to cache it (unset HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), or use the bundled tasks"
            )
    if problems:
        raise TaskUnavailableError(
            "cannot evaluate these tasks:\n"
            + "\n".join(problems)
            + f"\nbundled offline tasks: parallelflow_offline (group) and the tasks in {TASKS_DIR}"
        )


def evaluate(
    model: str,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    peft: str | None = None,
    tokenizer: str | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    dtype: str = "auto",
    limit: float | None = None,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    revision: str | None = None,
    include_paths: Sequence[str | Path] = (),
    log_samples: bool = False,
    seed: int = 1234,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate `model` (a folder or Hub id) on `tasks`; returns lm-eval's results dict plus `"run"` info.

    `limit` < 1 is a fraction of each task's docs, >= 1 a count (as in lm-eval). `batch_size` may be "auto".
    Python files shipped with `model` run only with `trust_remote_code=True`.
    """
    if not tasks:
        raise ValueError("tasks must name at least one task or group")
    if isinstance(batch_size, int) and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or 'auto', got {batch_size}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    from modeling_parallelflow import register
    from modeling_parallelflow.errors import require
    from modeling_parallelflow.loading import check_source

    lm_eval = require("lm_eval", "evaluation")
    check_source(model)
    # PFlow with the Auto classes: this package's code (Triton kernels included) serves PFlow checkpoints.
    register()

    device = device or default_device()
    args = model_args(
        model,
        peft=peft,
        tokenizer=tokenizer,
        dtype=dtype,
        max_length=max_length,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    manager = task_manager(tasks, include_paths)
    log(f"[eval] checking tasks: {', '.join(tasks)}")
    check_tasks(tasks, manager)
    log(f"[eval] model_args: {model_args_string(args)}")
    log(f"[eval] device={device} batch_size={batch_size} limit={limit} num_fewshot={num_fewshot}")
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=args,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    elapsed = time.perf_counter() - start
    log(f"[eval] done in {elapsed:.1f} s")
    results["run"] = {
        "model": model,
        "model_args": args,
        "tasks": list(tasks),
        "device": device,
        "batch_size": batch_size,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "seconds": round(elapsed, 3),
        "lm_eval_version": lm_eval.__version__,
    }
    return results
