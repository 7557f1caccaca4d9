"""How the `parallelflow` commands read a checkpoint: no code from it unless asked, every tensor checked.

`trust_remote_code=False` (the default) never runs Python files shipped with a checkpoint: PFlow checkpoints
load through this installed package (registered with the Auto classes), other architectures through
transformers' own classes, and a checkpoint that needs its own code is refused. Loading is strict: a missing,
unexpected or wrongly shaped tensor is a CheckpointError naming the keys, never a random initialisation.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import CheckpointError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_LISTED = 10


def add_trust_remote_code_argument(parser, checkpoint: str) -> None:
    """The `--trust-remote-code` flag (off by default) of every command that loads `checkpoint`."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help=f"run Python code shipped with {checkpoint} (only architectures this package does not provide "
        "need it)",
    )


def check_source(source: str | Path) -> None:
    """FileNotFoundError unless `source` is an existing path or could be a Hub repo id ("owner/name")."""
    text = str(source)
    if not Path(text).exists() and not REPO_ID.match(text):
        raise FileNotFoundError(f"no such checkpoint folder (and not a Hub repo id owner/name): {text}")


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def check_loading_info(source: str | Path, info: dict) -> None:
    """Raise CheckpointError when transformers' `output_loading_info` reports missing, unexpected or
    mismatched tensors (a tied lm_head is not reported missing)."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {_listed(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected {_listed(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        shapes = [
            f"{key} {tuple(saved)} (model {tuple(model)})" for key, saved, model in info["mismatched_keys"]
        ]
        problems.append(f"wrongly shaped {_listed(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not fit its config: " + "; ".join(problems))


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """transformers logs a table of missing/unexpected keys as a warning; CheckpointError names them."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def load_causal_lm(source: str | Path, *, trust_remote_code: bool = False, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(source, **kwargs)`, strict, with code from `source` only when
    `trust_remote_code`."""
    from transformers import AutoModelForCausalLM

    from . import register

    check_source(source)
    register()
    with _without_load_report():
        model, info = AutoModelForCausalLM.from_pretrained(
            source,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported in `info` and refused below, with the shapes
            **kwargs,
        )
    check_loading_info(source, info)
    return model


def load_tokenizer(source: str | Path, *, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained(source)`, with code from `source` only when `trust_remote_code`."""
    from transformers import AutoTokenizer

    from . import register

    check_source(source)
    register()
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
