"""Failures a user can cause and fix, with the one-line messages the `parallelflow` command prints for them.

Importing this module is cheap (standard library only): the CLI imports it before any subcommand runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# optional dependency (top-level module) -> the pyproject extra that installs it
EXTRAS = {"lm_eval": "eval", "peft": "peft", "triton": "triton"}


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not fit: the message names the files, keys or fields."""


class HubError(RuntimeError):
    """The Hugging Face Hub could not be reached or refused the request."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message gives the install command."""

    def __init__(self, module: str, purpose: str):
        extra = EXTRAS[module]
        super().__init__(
            f'{purpose} needs {module}, which is not installed: pip install -e ".[{extra}]" in a checkout, '
            f'or pip install "parallelflow[{extra}]"',
            name=module,
        )


def require(module: str, purpose: str) -> ModuleType:
    """`import module`, or MissingExtraError naming the extra to install (`purpose`: what needs it)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:  # the module is there but one of its own imports is missing
            raise
        raise MissingExtraError(module, purpose) from None


def one_line(error: BaseException) -> str:
    """The message of `error` on one line, as the CLI prints it."""
    if (
        isinstance(error, ModuleNotFoundError)
        and error.name in EXTRAS
        and not isinstance(error, MissingExtraError)
    ):
        return str(MissingExtraError(error.name, "this command"))
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text ({error.reason} at byte {error.start})"
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return f"{error.strerror}: {error.filename}"
    return " ".join(str(error).split()) or type(error).__name__
