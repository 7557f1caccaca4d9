"""`parallelflow demo` arguments; the run itself is `demo.run_demo` (imported only when the command runs)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", help="checkpoint folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    parser.add_argument("--max-steps", type=int, default=450, help="optimizer steps (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is much faster on a CPU busy with other work",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")
    parser.add_argument("--rank", type=int, default=2, help="R, keys/values per head per token (default: 2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--corpus-bytes", type=int, default=4_000_000, help="stdlib source text to read")
    parser.add_argument("--prompt", default="def", help="prompt for the generated samples")
    parser.add_argument("--max-new-tokens", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)
