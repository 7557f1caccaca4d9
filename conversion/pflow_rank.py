"""PFlow -> PFlow: rank expansion R -> R' (and, with the orchestrator's cast, a dtype change).

Exact construction (sum form). With R' = c R, component r becomes c identical copies (keys, values, their
short-conv channels and b_proj rows duplicated). Each copy gets beta' = s sigmoid(x_r) / R' (s = 1, or 2 with
allow_neg_eigval) from the same logit x_r, so the c copies together contribute c * s sigmoid(x_r) / (c R) =
s sigmoid(x_r) / R, which is the old component's step: the transition I - sum beta k k^T and the write
sum beta v k^T are unchanged token by token, so are the state, the outputs and the logits (up to float
rounding of the sum). The exact flow depends on the drivers only through A B^T and U B^T, which are unchanged
too. Attention layers and every other tensor are copied.

Refused: R' not a multiple of R (sigmoid(x)/R' summed over a whole number of copies reproduces sigmoid(x)/R
only when R'/R is an integer; an uneven split would need a beta that is not a sigmoid), R' < R, and product
mode (an extra Householder step must be the identity: beta = 0, impossible for a sigmoid; a zero key would
be exact but its L2 norm has a 1/eps gradient, a broken start for fine-tuning; duplicated steps compose to
(I - b k k^T)^2, not the old step).

`init_noise` > 0 perturbs the copies' k/v projection rows (all but the first copy of each component), so
fine-tuning can tell them apart; the result is then no longer exact.
"""

from __future__ import annotations

import copy
import functools

import torch

from modeling_parallelflow import PFlowConfig
from modeling_parallelflow.configuration_parallelflow import MAX_RANK

from .keymap import ConversionError, KeyMap, Rule
from .shapes import pflow_shapes
from .surgery import expand_components

EXPANDED = ("k_proj", "v_proj", "b_proj", "k_conv1d", "v_conv1d")
PERTURBED = ("k_proj", "v_proj")


def to_rank(
    config: PFlowConfig, rank: int, *, init_noise: float = 0.0, seed: int = 0
) -> tuple[PFlowConfig, KeyMap]:
    """(PFlowConfig with `rank`, key map old -> new)."""
    old = config.rank
    if rank < old:
        raise ConversionError(
            f"--rank {rank} is below the checkpoint's rank {old}: rank reduction is not supported"
        )
    if rank > MAX_RANK:
        raise ConversionError(f"--rank must be at most {MAX_RANK}, got {rank}")
    if rank > old and config.rank_mode != "sum":
        raise ConversionError(
            "rank expansion of rank_mode='product' has no exact construction: an added Householder step "
            "must be the identity (beta = 0, impossible with a sigmoid); duplicating a step squares it"
        )
    if rank % old:
        raise ConversionError(
            f"--rank {rank} is not a multiple of the checkpoint's rank {old}: the exact construction "
            f"duplicates every component {rank}/{old} times, which must be a whole number"
        )
    copies = rank // old
    new = copy.deepcopy(config)
    new.rank = rank
    new.validate_pflow()
    generator = torch.Generator().manual_seed(seed)
    rules = []
    for key in pflow_shapes(config):
        parts = key.split(".")
        name = parts[-2] if len(parts) > 2 and parts[-3] == "linear_attn" else None
        forward = None
        if name in EXPANDED and copies > 1:
            noise = init_noise if name in PERTURBED else 0.0
            forward = functools.partial(
                expand_components,
                heads=config.num_heads,
                rank=old,
                copies=copies,
                noise_std=noise,
                generator=generator,
            )
        rules.append(Rule(key, key, forward=forward))
    return new, KeyMap(rules, name=f"pflow rank {old} -> {rank}")
