"""The `parallelflow` command: a registry of subcommands, each a module imported only when it runs.

A subcommand module exposes `add_arguments(parser: argparse.ArgumentParser) -> None` and
`run(args: argparse.Namespace) -> int`, and imports nothing heavy (torch, transformers) at module level, so
`parallelflow --help` and `parallelflow COMMAND --help` start in well under a second. To add one, add a line
to COMMANDS; a command whose module is not present in this installation is not listed.

A failure the user can cause and fix (a bad argument or file, a missing optional dependency, no network, a
full disk) ends in one line on stderr, `parallelflow COMMAND: error: ...`, and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from .errors import HubError, one_line

# name -> (module path, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("modeling_parallelflow.demo_cli", "train a small PFlow model on Python stdlib source, offline"),
    "convert": ("conversion.cli", "convert checkpoints to and from the PFlow layout"),
    "eval": ("evals.cli", "evaluate a checkpoint with lm-eval on offline tasks"),
    "finetune": ("modeling_parallelflow.finetune_cli", "fine-tune a checkpoint (full or LoRA)"),
    "merge": ("modeling_parallelflow.finetune_merge", "merge a LoRA adapter into its base checkpoint"),
    "push": ("modeling_parallelflow.hub", "upload a checkpoint with its code to the Hugging Face Hub"),
    "train": (
        "modeling_parallelflow.pretrain",
        "pretrain on a token file: one process, or FSDP2/DDP under torchrun or accelerate launch",
    ),
}
# What a user can fix; anything else is a bug and keeps its traceback. CheckpointError and UnicodeDecodeError
# are ValueErrors, MissingExtraError an ImportError.
USER_ERRORS = (ValueError, OSError, ImportError, HubError)


def _module_present(module_path: str) -> bool:
    try:
        return importlib.util.find_spec(module_path) is not None
    except ImportError:  # the parent package itself is missing
        return False


def available_commands() -> dict[str, tuple[str, str]]:
    """The entries of COMMANDS whose module can be found (without importing it)."""
    return {name: entry for name, entry in COMMANDS.items() if _module_present(entry[0])}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s module is imported, to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="parallelflow", description="ParallelFlow: the rank-R delta rule as a Hugging Face model."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_path, help_text) in available_commands().items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_path)
            module.add_arguments(subparser)
            subparser.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as error:
        print(f"parallelflow {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"parallelflow {args.command}: interrupted", file=sys.stderr)
        return 130
