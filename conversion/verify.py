"""`--verify`: run the source and the converted checkpoint on the same sample tokens, in float64, on CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from .fla_reference import fla_logits
from .io import load_state_dict, read_config


def sample_ids(vocab_size: int, batch: int = 2, length: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


@torch.no_grad()
def logits(fmt: str, path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Float64 logits [B, T, vocab] of the checkpoint at `path` in format `fmt`."""
    if fmt == "pflow":
        from modeling_parallelflow import PFlowForCausalLM

        model = PFlowForCausalLM.from_pretrained(path, dtype=torch.float64, kernel_backend="torch")
        return model.eval()(input_ids, use_cache=False).logits
    if fmt == "llama":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
        return model.eval()(input_ids, use_cache=False).logits
    return fla_logits(
        read_config(path), load_state_dict(path), input_ids
    )  # fla formats: our float64 reference


def max_logit_difference(
    source_format: str,
    src: Path,
    target_format: str,
    dst: Path,
    vocab_size: int,
    length: int = 64,
    seed: int = 0,
) -> float:
    ids = sample_ids(vocab_size, length=length, seed=seed)
    return float((logits(source_format, src, ids) - logits(target_format, dst, ids)).abs().max())
