"""Tiny models for the model tests (CPU, torch path)."""

from pathlib import Path

import torch

from modeling_parallelflow import PFlowConfig, PFlowForCausalLM

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(name: str = "tiny", **overrides) -> PFlowConfig:
    """configs/<name>.json with overrides, on the torch backend."""
    config = PFlowConfig.from_json_file(str(CONFIG_DIR / f"{name}.json"))
    for key, value in {"kernel_backend": "torch", **overrides}.items():
        setattr(config, key, value)
    config.validate_pflow()
    return config


def tiny_model(name: str = "tiny", seed: int = 0, **overrides) -> PFlowForCausalLM:
    torch.manual_seed(seed)
    model = PFlowForCausalLM(tiny_config(name, **overrides)).eval()
    # Random init leaves betas near 1/2 and norms at 1; perturb norms so tests see every weight.
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if name_.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def random_ids(batch: int, length: int, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)
