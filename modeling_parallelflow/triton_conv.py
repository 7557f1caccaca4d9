"""Triton: short causal depthwise conv + SiLU (+ L2 norm per group of channels), forward and backward.

The pflow mixer's q / k / v features in one pass each. x [B, T, C] is a projection's output, C = G * K
channels in G contiguous groups of K (a head, or a head's rank-r slot); weight [C, W]:

    c[t]  = sum_j weight[:, j] * x[t - (W - 1) + j]       (taps before the sequence start: cache tail or 0)
    y[t]  = silu(c[t])                                      (normalize: y / sqrt(|y|^2 + eps) per group)

Pads (pad_mask False) are zeroed inputs; packed sequences (`pos` [T], each token's position within its
sequence, B = 1) never read across a boundary; `tail` [B, C, W-1] (a cache's last W-1 inputs) feeds the
first taps and is a constant (no gradient flows into a cache). The new tail (prefill writes it, decode
reads it) is the last W-1 inputs, cut on the host.

Backward recomputes c, y and the norm from x (saved: x, weight, tail, pos, pad_mask; nothing per token
beyond the inputs): `_dc_kernel` writes dc = dL/dc [B, T, C] fp32, `_dx_kernel` turns it into dx and
per-block partial sums of dweight. Launch settings: TUNE["conv_block_t"], "conv_dc_warps", "conv_dx_warps".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import TUNE, new_tensor, next_pow2

L2_EPS = 1e-6  # modeling_parallelflow.l2_normalize's eps


@triton.jit
def _conv_tile(
    x_ptr,
    w_ptr,
    tail_ptr,
    pos_ptr,
    mask_ptr,
    i_b,
    t,
    c,
    mt,
    mk,
    T,
    C,
    W: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Pre-activation c [BT, BK] fp32 of rows t, channels c of batch row i_b."""
    if HAS_POS:
        p = tl.load(pos_ptr + t, mask=mt, other=0)
    else:
        p = t
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    for j in tl.static_range(W):
        back = W - 1 - j  # tap j reads the input `back` tokens earlier
        src = t - back
        inside = mt & (p >= back)
        xv = tl.load(
            x_ptr + (i_b * T + src)[:, None] * C + c[None, :], mask=inside[:, None] & mk[None, :], other=0.0
        ).to(tl.float32)
        if HAS_MASK:
            keep = tl.load(mask_ptr + i_b * T + src, mask=inside, other=0).to(tl.float32)
            xv = xv * keep[:, None]
        if HAS_TAIL:  # taps before the start read tail[b, c, W-1+src] (src < 0)
            before = mt & (p < back)
            tv = tl.load(
                tail_ptr + (i_b * C + c[None, :]) * (W - 1) + (W - 1 + src)[:, None],
                mask=before[:, None] & mk[None, :],
                other=0.0,
            ).to(tl.float32)
            xv = xv + tv
        wj = tl.load(w_ptr + c * W + j, mask=mk, other=0.0).to(tl.float32)
        acc += xv * wj[None, :]
    return acc


@triton.jit
def _fwd_kernel(
    x_ptr,
    w_ptr,
    tail_ptr,
    pos_ptr,
    mask_ptr,
    y_ptr,
    T,
    C,
    K: tl.constexpr,
    W: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NORM: tl.constexpr,
    EPS: tl.constexpr,
):
    i_t, i_g, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # B*T*C > 2**31
    t = i_t * BT + tl.arange(0, BT)
    k = tl.arange(0, BK)
    c = i_g * K + k
    mt, mk = t < T, k < K
    pre = _conv_tile(
        x_ptr,
        w_ptr,
        tail_ptr,
        pos_ptr,
        mask_ptr,
        i_b,
        t,
        c,
        mt,
        mk,
        T,
        C,
        W,
        BT,
        BK,
        HAS_TAIL,
        HAS_POS,
        HAS_MASK,
    )
    y = pre * tl.sigmoid(pre)
    if NORM:
        y = y * tl.rsqrt(tl.sum(y * y, axis=1) + EPS)[:, None]
    off = (i_b * T + t)[:, None] * C + c[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mt[:, None] & mk[None, :])


@triton.jit
def _dc_kernel(
    x_ptr,
    w_ptr,
    tail_ptr,
    pos_ptr,
    mask_ptr,
    dy_ptr,
    dc_ptr,
    T,
    C,
    K: tl.constexpr,
    W: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NORM: tl.constexpr,
    EPS: tl.constexpr,
):
    """dc = dL/dc: through the norm (ds = r (dy - n (n . dy)), n = s r) and SiLU (sig (1 + c (1 - sig)))."""
    i_t, i_g, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # B*T*C > 2**31
    t = i_t * BT + tl.arange(0, BT)
    k = tl.arange(0, BK)
    c = i_g * K + k
    mt, mk = t < T, k < K
    m2 = mt[:, None] & mk[None, :]
    pre = _conv_tile(
        x_ptr,
        w_ptr,
        tail_ptr,
        pos_ptr,
        mask_ptr,
        i_b,
        t,
        c,
        mt,
        mk,
        T,
        C,
        W,
        BT,
        BK,
        HAS_TAIL,
        HAS_POS,
        HAS_MASK,
    )
    off = (i_b * T + t)[:, None] * C + c[None, :]
    dy = tl.load(dy_ptr + off, mask=m2, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    if NORM:
        s = pre * sig
        r = tl.rsqrt(tl.sum(s * s, axis=1) + EPS)
        n = s * r[:, None]
        dy = r[:, None] * (dy - n * tl.sum(n * dy, axis=1)[:, None])
    dc = dy * sig * (1.0 + pre * (1.0 - sig))
    tl.store(dc_ptr + off, dc, mask=m2)


@triton.jit
def _dx_kernel(
    x_ptr,
    w_ptr,
    tail_ptr,
    pos_ptr,
    mask_ptr,
    dc_ptr,
    dx_ptr,
    dw_ptr,
    T,
    C,
    NT,
    K: tl.constexpr,
    W: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """dx[t] = sum_j w_j dc[t + back_j] (same sequence, zero at pads); dw partial [B * NT, C, W]."""
    i_t, i_g, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # B*T*C > 2**31
    t = i_t * BT + tl.arange(0, BT)
    k = tl.arange(0, BK)
    c = i_g * K + k
    mt, mk = t < T, k < K
    if HAS_POS:
        p = tl.load(pos_ptr + t, mask=mt, other=0)
    else:
        p = t
    dc_here = tl.load(
        dc_ptr + (i_b * T + t)[:, None] * C + c[None, :], mask=mt[:, None] & mk[None, :], other=0.0
    )
    dx = tl.zeros([BT, BK], dtype=tl.float32)
    for j in tl.static_range(W):
        back = W - 1 - j
        wj = tl.load(w_ptr + c * W + j, mask=mk, other=0.0).to(tl.float32)
        # dx: the output `back` tokens later read this token through tap j, if in the same sequence.
        dst = t + back
        if HAS_POS:
            p_dst = tl.load(pos_ptr + dst, mask=mt & (dst < T), other=0)
        else:
            p_dst = dst
        reach = mt & (dst < T) & (p_dst >= back)
        if back == 0:  # the tile's own rows (reach = mt)
            dcv = dc_here
        else:
            dcv = tl.load(
                dc_ptr + (i_b * T + dst)[:, None] * C + c[None, :],
                mask=reach[:, None] & mk[None, :],
                other=0.0,
            )
        dx += dcv * wj[None, :]
        # dw[:, j] = sum_t dc[t] * input[t - back] (masked input, or the tail before the start).
        src = t - back
        inside = mt & (p >= back)
        xv = tl.load(
            x_ptr + (i_b * T + src)[:, None] * C + c[None, :], mask=inside[:, None] & mk[None, :], other=0.0
        ).to(tl.float32)
        if HAS_MASK:
            xv = xv * tl.load(mask_ptr + i_b * T + src, mask=inside, other=0).to(tl.float32)[:, None]
        if HAS_TAIL:
            before = mt & (p < back)
            xv += tl.load(
                tail_ptr + (i_b * C + c[None, :]) * (W - 1) + (W - 1 + src)[:, None],
                mask=before[:, None] & mk[None, :],
                other=0.0,
            ).to(tl.float32)
        tl.store(dw_ptr + ((i_b * NT + i_t) * C + c) * W + j, tl.sum(dc_here * xv, axis=0), mask=mk)
    if HAS_MASK:
        dx = dx * tl.load(mask_ptr + i_b * T + t, mask=mt, other=0).to(tl.float32)[:, None]
    tl.store(
        dx_ptr + (i_b * T + t)[:, None] * C + c[None, :],
        dx.to(dx_ptr.dtype.element_ty),
        mask=mt[:, None] & mk[None, :],
    )


def _launch_args(x: torch.Tensor, group: int) -> tuple[int, int, tuple[int, int, int]]:
    batch, length, channels = x.shape
    block_k = next_pow2(group)
    block_t = TUNE["conv_block_t"] or max(16, min(64, 4096 // block_k))
    return block_t, block_k, (triton.cdiv(length, block_t), channels // group, batch)


def _flags(tail, pos, mask) -> dict:
    return dict(HAS_TAIL=tail is not None, HAS_POS=pos is not None, HAS_MASK=mask is not None)


def conv_fwd(x, weight, tail, pos, mask, group: int, normalize: bool) -> torch.Tensor:
    """x [B, T, C], weight [C, W] -> y [B, T, C] in x's dtype (launcher; no autograd)."""
    batch, length, channels = x.shape
    block_t, block_k, grid = _launch_args(x, group)
    y = new_tensor(x.shape, dtype=x.dtype, device=x.device)
    _fwd_kernel[grid](
        x,
        weight,
        tail,
        pos,
        mask,
        y,
        length,
        channels,
        K=group,
        W=weight.shape[1],
        BT=block_t,
        BK=block_k,
        NORM=normalize,
        EPS=L2_EPS,
        **_flags(tail, pos, mask),
    )
    return y


def conv_bwd(
    dy, x, weight, tail, pos, mask, group: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx [B, T, C] in x's dtype, dweight [C, W] fp32) (launcher; no autograd)."""
    batch, length, channels = x.shape
    width = weight.shape[1]
    block_t, block_k, grid = _launch_args(x, group)
    common = dict(K=group, W=width, BT=block_t, BK=block_k, **_flags(tail, pos, mask))
    dc = new_tensor(x.shape, dtype=torch.float32, device=x.device)
    _dc_kernel[grid](
        x, weight, tail, pos, mask, dy, dc, length, channels,
        NORM=normalize, EPS=L2_EPS, num_warps=TUNE["conv_dc_warps"], **common,
    )  # fmt: skip
    dx = new_tensor(x.shape, dtype=x.dtype, device=x.device)
    partial = new_tensor((batch * grid[0], channels, width), dtype=torch.float32, device=x.device)
    _dx_kernel[grid](
        x, weight, tail, pos, mask, dc, dx, partial, length, channels, grid[0],
        num_warps=TUNE["conv_dx_warps"], **common,
    )  # fmt: skip
    return dx, partial.sum(0)


class ShortConvSiLU(torch.autograd.Function):
    """Saves the inputs only; the backward recomputes the conv, SiLU and norm (`conv_bwd`)."""

    @staticmethod
    def forward(ctx, x, weight, tail, pos, mask, group: int, normalize: bool):
        ctx.save_for_backward(x, weight, tail, pos, mask)
        ctx.group, ctx.normalize = group, normalize
        return conv_fwd(x, weight, tail, pos, mask, group, normalize)

    @staticmethod
    def backward(ctx, dy):
        x, weight, tail, pos, mask = ctx.saved_tensors
        dx, dweight = conv_bwd(dy.contiguous(), x, weight, tail, pos, mask, ctx.group, ctx.normalize)
        return dx, dweight.to(weight.dtype), None, None, None, None, None


def short_conv_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    group: int,
    normalize: bool,
    tail: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    pad_mask: torch.Tensor | None = None,
    keep_tail: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """silu(causal depthwise conv(x)), optionally L2-normalised per group of `group` channels.

    x [B, T, C] (C a multiple of `group` <= 256); weight [C, 1, W] (nn.Conv1d's); tail [B, C, W-1] or None
    (zeros); pos [T] int32 positions within packed sequences (B = 1) or None; pad_mask [B, T] bool or None.
    Returns (y [B, T, C] in x's dtype, new tail [B, C, W-1], contiguous: the last W-1 inputs, pads zeroed;
    None unless keep_tail, so training builds no tail).
    """
    batch, length, channels = x.shape
    width = weight.shape[-1]
    if channels % group or group > 256:
        raise ValueError(f"channels {channels} must be a multiple of group {group} (at most 256)")
    x = x.contiguous()
    mask = pad_mask.contiguous().view(torch.uint8) if pad_mask is not None else None
    if tail is not None:
        tail = tail.to(x.dtype).contiguous()
    y = ShortConvSiLU.apply(x, weight.view(channels, width), tail, pos, mask, group, normalize)
    if not keep_tail:
        return y, None
    taken = min(length, width - 1)
    recent = x[:, length - taken :]
    if pad_mask is not None:
        recent = recent * pad_mask[:, length - taken :, None]
    if taken == width - 1:
        return y, recent.transpose(1, 2).contiguous()
    previous = tail if tail is not None else x.new_zeros(batch, channels, width - 1)
    return y, torch.cat([previous[..., taken:], recent.transpose(1, 2)], dim=-1)
