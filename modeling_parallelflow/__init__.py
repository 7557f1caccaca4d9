"""ParallelFlow: the rank-R delta rule as a Hugging Face architecture.

`modeling_parallelflow.ops` (the kernels) imports without transformers. When transformers is installed,
importing the package registers model_type `parallelflow` with AutoConfig, AutoModel and AutoModelForCausalLM.
"""

from .ops import delta_rule, delta_rule_drivers

__all__ = ["delta_rule", "delta_rule_drivers"]

try:
    import transformers  # noqa: F401
except ImportError:  # kernels only
    pass
else:
    from .auto_registration import register as _register
    from .cache_parallelflow import PFlowCache
    from .configuration_parallelflow import PFlowConfig
    from .modeling_parallelflow import PFlowForCausalLM, PFlowModel, PFlowPreTrainedModel
    from .peft_support import register_lora_target_modules

    _register()
    register_lora_target_modules()  # no-op without peft
    __all__ += ["PFlowCache", "PFlowConfig", "PFlowForCausalLM", "PFlowModel", "PFlowPreTrainedModel"]
