"""`parallelflow eval`: evaluate a checkpoint with lm-eval and write results.json, results.md, results.png."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modeling_parallelflow.loading import add_trust_remote_code_argument

from .runner import DEFAULT_TASKS, TaskUnavailableError


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--batch-size must be a positive integer or 'auto', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--batch-size must be a positive integer or 'auto', got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder or Hub id")
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help="comma-separated lm-eval tasks or groups, bundled or standard (default: %(default)s)",
    )
    parser.add_argument("--peft", help="LoRA/PEFT adapter folder or Hub id applied on top of MODEL")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: MODEL's)")
    parser.add_argument("--revision", help="Hub revision of MODEL")
    parser.add_argument("--batch-size", type=_batch_size, default=1, help="int or 'auto' (default: 1)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="(default: auto)"
    )
    parser.add_argument("--limit", type=float, help="docs per task: a count (>= 1) or a fraction (< 1)")
    parser.add_argument(
        "--max-length",
        type=int,
        help="context tokens before lm-eval truncates from the left (default: max_position_embeddings)",
    )
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        help="extra task folder (repeatable); evals/tasks is always in",
    )
    parser.add_argument(
        "--log-samples", action="store_true", help="also write every request to samples.jsonl"
    )
    parser.add_argument("--seed", type=int, default=1234)
    add_trust_remote_code_argument(parser, "MODEL")
    parser.add_argument(
        "--output-dir", help="where results.{json,md,png} go (default: runs/eval/<model folder name>)"
    )


def run(args: argparse.Namespace) -> int:
    from .report import markdown_table, write_report
    from .runner import evaluate

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    output_dir = Path(args.output_dir or Path("runs") / "eval" / Path(args.model.rstrip("/")).name)
    try:
        results = evaluate(
            args.model,
            tasks,
            peft=args.peft,
            tokenizer=args.tokenizer,
            revision=args.revision,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            limit=args.limit,
            max_length=args.max_length,
            num_fewshot=args.num_fewshot,
            include_paths=args.include_path,
            log_samples=args.log_samples,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
        )
    except TaskUnavailableError as err:
        print(f"parallelflow eval: {err}", file=sys.stderr)
        return 2
    paths = write_report(results, output_dir)
    print(markdown_table(results))
    for kind, path in paths.items():
        print(f"[eval] wrote {kind}: {path}")
    return 0
