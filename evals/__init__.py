"""Evaluation of ParallelFlow checkpoints with EleutherAI's lm-evaluation-harness.

`evals.runner.evaluate` wraps `lm_eval.simple_evaluate`; `evals.report.write_report` writes JSON, a markdown
table and a plot; `evals/tasks/` is the bundled offline task suite (`--include_path evals/tasks`).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = ["TASKS_DIR"]
