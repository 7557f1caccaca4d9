"""ParallelFlow: the rank-R delta rule as a Hugging Face architecture.

The kernels (`modeling_parallelflow.ops`) import without transformers; the model classes load lazily.
Importing a model class registers `parallelflow` with AutoConfig, AutoModel and AutoModelForCausalLM.
"""

import importlib

__all__ = [
    "PFlowCache",
    "PFlowConfig",
    "PFlowForCausalLM",
    "PFlowModel",
    "PFlowPreTrainedModel",
    "delta_rule",
    "delta_rule_drivers",
]

_LAZY = {
    "PFlowConfig": "configuration_parallelflow",
    "PFlowCache": "cache_parallelflow",
    "PFlowModel": "modeling_parallelflow",
    "PFlowForCausalLM": "modeling_parallelflow",
    "PFlowPreTrainedModel": "modeling_parallelflow",
    "delta_rule": "ops",
    "delta_rule_drivers": "ops",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'modeling_parallelflow' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name]}", __name__)
    if _LAZY[name] in ("configuration_parallelflow", "modeling_parallelflow", "cache_parallelflow"):
        importlib.import_module(".auto_registration", __name__).register()
    return getattr(module, name)
