"""Checkpoint conversion to and from the PFlow layout (`parallelflow convert`).

The pipeline (conversion/pipeline.py), one declarative key map per conversion (conversion/keymap.py), tensor
surgery in named helpers (conversion/surgery.py), one module per source family, and a float64 reference of
fla's models for checks.
"""

import importlib

from .formats import SOURCES, TARGETS

# torch-using names load on first use, so `parallelflow convert --help` starts fast
_LAZY = {name: ".pipeline" for name in ("Options", "Report", "convert")}
_LAZY.update({name: ".keymap" for name in ("ConversionError", "KeyMap", "Rule")})

__all__ = ["SOURCES", "TARGETS", "ConversionError", "KeyMap", "Options", "Report", "Rule", "convert"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
