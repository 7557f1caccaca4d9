"""Named tensor surgery for the key maps. Weights are [rows, ...]; rows group as described per helper.

Shapes: H heads, R rank (components per head), Hkv key/value heads, W conv width, w rows per component.
"""

from __future__ import annotations

import torch


def _split_rows(weight: torch.Tensor, *groups: int) -> torch.Tensor:
    """[prod(groups) * w, ...] -> [*groups, w, ...]."""
    count = 1
    for group in groups:
        count *= group
    if weight.shape[0] % count:
        raise ValueError(f"{weight.shape[0]} rows do not split into {groups} groups")
    return weight.reshape(*groups, weight.shape[0] // count, *weight.shape[1:])


def repeat_kv_heads(weight: torch.Tensor, num_kv_heads: int, groups: int) -> torch.Tensor:
    """Rows (Hkv, w) -> (Hkv * groups, w): key/value head j serves query heads j*groups .. (j+1)*groups - 1,
    as grouped-query attention shares them."""
    rows = _split_rows(weight, num_kv_heads)
    return rows.repeat_interleave(groups, dim=0).flatten(0, 1)


def expand_components(
    weight: torch.Tensor,
    heads: int,
    rank: int,
    copies: int,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rows (H, R, w) -> (H, R * copies, w): component r becomes components r*copies .. r*copies + copies - 1.

    With `noise_std` > 0 every copy but the first gets Gaussian noise of std `noise_std * weight.std()`, so
    the copies can drift apart under training (exact copies receive identical gradients forever).
    """
    rows = _split_rows(weight, heads, rank).repeat_interleave(copies, dim=1)  # [H, R*c, w, ...]
    if noise_std > 0 and copies > 1:
        scale = noise_std * float(weight.float().std())
        noise = torch.randn(rows.shape, generator=generator, dtype=torch.float32) * scale
        noise[:, ::copies] = 0  # component r*copies keeps the source weights exactly
        rows = (rows.float() + noise).to(weight.dtype)
    return rows.flatten(0, 2)


def rank_major_to_head_major(weight: torch.Tensor, heads: int, rank: int) -> torch.Tensor:
    """Rows (R, H, w) (fla DeltaProduct's k/v/b projections) -> (H, R, w) (PFlow's)."""
    return _split_rows(weight, rank, heads).transpose(0, 1).flatten(0, 2)


def head_major_to_rank_major(weight: torch.Tensor, heads: int, rank: int) -> torch.Tensor:
    """Rows (H, R, w) -> (R, H, w): the inverse of `rank_major_to_head_major`."""
    return _split_rows(weight, heads, rank).transpose(0, 1).flatten(0, 2)


def identity_conv(channels: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A depthwise causal conv weight [C, 1, W] passing its input through (last tap = 1)."""
    weight = torch.zeros(channels, 1, width, dtype=dtype)
    weight[..., -1] = 1
    return weight
