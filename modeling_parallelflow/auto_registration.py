"""Register `parallelflow` with AutoConfig, AutoModel and AutoModelForCausalLM in this process."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_parallelflow import PFlowConfig
from .modeling_parallelflow import PFlowForCausalLM, PFlowModel


def register() -> None:
    AutoConfig.register(PFlowConfig.model_type, PFlowConfig, exist_ok=True)
    AutoModel.register(PFlowConfig, PFlowModel, exist_ok=True)
    AutoModelForCausalLM.register(PFlowConfig, PFlowForCausalLM, exist_ok=True)
