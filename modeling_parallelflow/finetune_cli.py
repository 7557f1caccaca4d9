"""`parallelflow finetune` arguments; the run is `finetune.run_finetune`, imported only when it runs."""

from __future__ import annotations

import argparse

from .loading import add_trust_remote_code_argument
from .peft_support import LORA_TARGET_MODULES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="base checkpoint: a local folder or a Hub repo id")
    parser.add_argument("data", help="training data: a text file, or .jsonl with text or prompt/completion")
    parser.add_argument("--output-dir", "-o", required=True, help="where the adapter (or model) is saved")
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    parser.add_argument("--checkpoint-dir", help="Trainer checkpoints (default: OUTPUT_DIR-checkpoints)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="resume from the newest complete checkpoint in --checkpoint-dir, or PATH (when PATH lacks its "
        "trainer state: the newest complete checkpoint next to it)",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder or repo id (default: the base checkpoint)")
    parser.add_argument("--eval-file", help="held-out data in the same format (default: split --data)")
    parser.add_argument(
        "--eval-fraction", type=float, default=0.1, help="held-out share of the data (default 0.1)"
    )
    parser.add_argument("--full", action="store_true", help="train every weight instead of a LoRA adapter")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument(
        "--target-modules",
        nargs="+",
        help=f"LoRA target module names (default: {' '.join(LORA_TARGET_MODULES)}; b_proj, g_proj optional)",
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument(
        "--epochs", type=float, default=1.0, help="training epochs (ignored with --max-steps)"
    )
    parser.add_argument("--max-steps", type=int, default=0, help="optimizer steps (default: from --epochs)")
    parser.add_argument("--learning-rate", type=float, help="default 2e-4 with LoRA, 2e-5 with --full")
    parser.add_argument("--lr-scheduler", default="cosine", help="Trainer lr_scheduler_type (default cosine)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument(
        "--eval-steps", type=int, default=0, help="evaluate every N steps (default: at the end)"
    )
    parser.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps; 0: none")
    parser.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (default 2)")
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on a GPU, else fp32"
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_trust_remote_code_argument(parser, "BASE")


def run(args: argparse.Namespace) -> int:
    from .finetune import run_finetune

    return run_finetune(args)
