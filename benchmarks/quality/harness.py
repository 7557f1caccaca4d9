"""What the quality benchmarks (mqar.py, text_lm.py) share: the models compared, built at a shape with their
non-embedding parameters matched to PFlow R = 1's, the optimiser and schedule, and the commit a results file
records.

A model is named as in `MODELS` (`pflow-r1`, ..., `llama`); `build_model(name, shape, intermediate)` makes it,
and `matched_intermediate(name, shape)` is the MLP width that brings its non-embedding parameter count
closest to `pflow-r1`'s with its default MLP at that shape (R = 4 has wider key/value projections, so a
narrower MLP).
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class LlamaBaseline:
    """transformers' Llama (SDPA, RoPE). learned_positions: Zoology's attention baseline on top, learned
    absolute positions added to the token embeddings and the LM head tied to them (without both it does not
    learn MQAR at vocabulary 8,192: README.md). Such a model does not reload from save_pretrained (the
    positions are a hook), so text_lm.py does not offer it."""

    learned_positions: bool = False


# name -> PFlowConfig fields, or the Llama baseline
MODELS: dict[str, dict | LlamaBaseline] = {
    "pflow-r1": {"rank": 1},
    "pflow-r2-sum": {"rank": 2, "rank_mode": "sum"},
    "pflow-r4-sum": {"rank": 4, "rank_mode": "sum"},
    "pflow-r2-product": {"rank": 2, "rank_mode": "product"},
    "pflow-r2-exact": {"rank": 2, "rank_mode": "sum", "flow": "exact"},
    "pflow-r1-negeig": {"rank": 1, "allow_neg_eigval": True},
    "llama": LlamaBaseline(),
    "llama-abspos": LlamaBaseline(learned_positions=True),
}
REFERENCE_MODEL = "pflow-r1"


@dataclasses.dataclass(frozen=True)
class Shape:
    """One model shape: heads = width // head_dim (at least one) for PFlow and Llama alike."""

    vocab_size: int
    width: int
    layers: int
    max_len: int  # position embeddings (Llama's RoPE table, PFlow's attention layers if any)
    head_dim: int = 64

    @property
    def heads(self) -> int:
        return max(1, self.width // self.head_dim)


def build_model(
    name: str, shape: Shape, intermediate: int | None = None, fused_loss: bool = False
) -> torch.nn.Module:
    """The model `name` at `shape`, embeddings and LM head untied (tied in llama-abspos); intermediate=None:
    the config's default. fused_loss: PFlow's chunked linear cross-entropy (no full logits in training)."""
    variant = MODELS[name]
    if isinstance(variant, LlamaBaseline):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=shape.vocab_size,
            hidden_size=shape.width,
            intermediate_size=intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.heads,
            max_position_embeddings=shape.max_len,
            tie_word_embeddings=variant.learned_positions,
            attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config)
        if variant.learned_positions:
            add_learned_positions(model.model, shape.max_len)
        return model
    from modeling_parallelflow import PFlowConfig, PFlowForCausalLM

    config = PFlowConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.width,
        num_hidden_layers=shape.layers,
        num_heads=shape.heads,
        intermediate_size=intermediate,
        max_position_embeddings=shape.max_len,
        fused_loss=fused_loss,
        tie_word_embeddings=False,
        **variant,
    )
    return PFlowForCausalLM(config)


def add_learned_positions(decoder: torch.nn.Module, max_len: int) -> None:
    """Learned absolute positions [max_len, width] (`decoder.embed_positions`), added to the output of
    `decoder.embed_tokens` [B, T, width] for positions 0 .. T - 1."""
    table = torch.nn.Embedding(max_len, decoder.config.hidden_size)
    torch.nn.init.normal_(table.weight, std=decoder.config.initializer_range)
    decoder.embed_positions = table
    decoder.embed_tokens.register_forward_hook(lambda _module, _args, out: out + table.weight[: out.shape[1]])


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside the token and position embeddings and the LM head (tied or not)."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if "embed_tokens" not in n and "embed_positions" not in n and not n.startswith("lm_head")
    )


def matched_intermediate(name: str, shape: Shape) -> int:
    """The MLP width (a multiple of 8) that brings `name`'s non-embedding parameters closest to PFlow R = 1's
    with its default MLP at `shape`. The count is linear in the MLP width; measured on the meta device."""
    with torch.device("meta"):
        target = non_embedding_params(build_model(REFERENCE_MODEL, shape))
        at8, at16 = (non_embedding_params(build_model(name, shape, i)) for i in (8, 16))
    size = 8 * round((8 + (target - at8) / ((at16 - at8) / 8)) / 8)
    if size < 8:
        raise ValueError(
            f"{name} at width {shape.width} has more non-MLP parameters than {REFERENCE_MODEL} in all"
        )
    return size


def adamw(
    model: torch.nn.Module, lr: float, cuda: bool, betas=(0.9, 0.98), capturable: bool = False
) -> torch.optim.AdamW:
    """AdamW with weight decay 0.1 on matrices and none on vectors (norms, biases); fused on CUDA, and
    `capturable` for a step captured in a CUDA graph (graph_step.py)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        fused=cuda,
        capturable=capturable,
    )


def lr_lambda(steps: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine to zero at `steps`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def git_commit() -> dict:
    """This checkout's HEAD and whether tracked files differ; $PFLOW_COMMIT when set (on the device machine
    the tree is a copy whose git metadata may be older than the code)."""
    if os.environ.get("PFLOW_COMMIT"):
        return {"commit": os.environ["PFLOW_COMMIT"], "dirty": False}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "-uno"))}
