"""ParallelFlow: the rank-R delta rule as a Hugging Face architecture.

Importing the package is cheap (no torch, no transformers), so the `parallelflow` command starts fast; each
name below loads on first use. The first use of a model name (`PFlowConfig`, `PFlowForCausalLM`, ...) or
`register()` registers model_type `parallelflow` with AutoConfig, AutoModel and AutoModelForCausalLM, and
peft's default LoRA targets when peft is installed. `delta_rule` (the kernels) needs torch only.
"""

from __future__ import annotations

import importlib
from typing import Any

_OPS = {"delta_rule": ".ops", "delta_rule_drivers": ".ops", "PackedSequences": ".packed"}
_MODEL = {
    "PFlowCache": ".cache_parallelflow",
    "PFlowStaticCache": ".cache_parallelflow",
    "PFlowConfig": ".configuration_parallelflow",
    "PFlowForCausalLM": ".modeling_parallelflow",
    "PFlowModel": ".modeling_parallelflow",
    "PFlowPreTrainedModel": ".modeling_parallelflow",
}

__all__ = [*_OPS, *_MODEL, "register"]


def register() -> None:
    """Register `parallelflow` with the transformers Auto classes (and peft's LoRA defaults); idempotent."""
    from .auto_registration import register as register_auto
    from .peft_support import register_lora_target_modules

    register_auto()
    register_lora_target_modules()  # no-op without peft


def __getattr__(name: str) -> Any:
    if name in _MODEL:
        register()
        module = _MODEL[name]
    elif name in _OPS:
        module = _OPS[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
