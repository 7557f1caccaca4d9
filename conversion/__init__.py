"""Checkpoint conversion to and from the PFlow layout (`parallelflow convert`).

One declarative key map per conversion (conversion/keymap.py), tensor surgery in named helpers
(conversion/surgery.py), one module per source family, and a float64 reference of fla's models for checks.
"""

from .convert import SOURCES, TARGETS, Options, Report, convert
from .keymap import ConversionError, KeyMap, Rule

__all__ = ["SOURCES", "TARGETS", "ConversionError", "KeyMap", "Options", "Report", "Rule", "convert"]
