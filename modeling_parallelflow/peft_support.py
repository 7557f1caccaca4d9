"""Default PEFT LoRA targets for model_type "parallelflow", so `LoraConfig(target_modules=None)` works.

`register_lora_target_modules()` adds the entry to peft's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`
(the dict `get_peft_model` reads); it is a no-op returning False when peft is not installed. The defaults
are the q/k/v/o projections of both the pflow mixers and the softmax-attention layers plus the MLP; the
depthwise short convolutions (`*_conv1d`, grouped convs that LoRA cannot wrap) are never targeted. The small
`b_proj` (step sizes) and `g_proj` (output gate) projections are opt-in: OPTIONAL_LORA_TARGET_MODULES.
"""

from __future__ import annotations

MODEL_TYPE = "parallelflow"
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIONAL_LORA_TARGET_MODULES = ("b_proj", "g_proj")


def register_lora_target_modules() -> bool:
    """Register LORA_TARGET_MODULES as peft's default for "parallelflow"; False when peft is missing."""
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        return False
    mapping[MODEL_TYPE] = list(LORA_TARGET_MODULES)
    return True
