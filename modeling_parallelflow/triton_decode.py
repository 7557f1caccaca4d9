"""Triton: one decode token of a pflow mixer in one kernel (the CUDA-graph decode step's mixer).

Between its projections and its output projection, a pflow mixer's decode step is, per (sequence, head):

    q   = l2norm(silu(conv(q_proj, q tail)))                      [K]     (the tail shifts by one token)
    k_r = l2norm(silu(conv(k_proj_r, k tail)))                    [R, K]
    v_r = silu(conv(v_proj_r, v tail))                            [R, V]
    beta_r = sigmoid(b_proj_r) * beta_scale * keep                [R]     (keep = 0 for a pad token)
    h  += sum_r k_r ((v_r - h^T k_r) beta_r)^T                    [K, V]  (product form: one r at a time)
    o   = RMSNorm(scale h^T q) * norm weight * silu(g)            [V]

The unfused path runs that as ~25 launches per layer (three conv kernels and their tail updates, beta's
elementwise ops, the drivers a = -beta k and u = beta v, the recurrent kernel, state copies, the gated
norm); under a CUDA graph the decode step is bound by its launch count, so here it is one program per
(sequence, head) holding the fp32 state [K, V] in registers, tails and state updated in place. Values are
rounded to the model dtype where the unfused path stores them (features, beta, drivers, o), so the two paths
agree to rounding. K, V <= 128 (one tile); larger heads, and every head with PFLOW_FUSED_DECODE=0 in the
environment (an A/B switch for benchmarks), take the unfused path (`fits`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_conv import L2_EPS
from .triton_utils import new_tensor, next_pow2

MAX_DIM = 128
ENABLED = os.environ.get("PFLOW_FUSED_DECODE", "1") != "0"
_L2_EPS = tl.constexpr(L2_EPS)


def fits(k_dim: int, v_dim: int) -> bool:
    """Whether a head of key width k_dim and value width v_dim takes the kernel (one tile, and not switched
    off by PFLOW_FUSED_DECODE=0)."""
    return ENABLED and k_dim <= MAX_DIM and v_dim <= MAX_DIM


@triton.jit
def _feature(
    x_ptr,
    w_ptr,
    tail_ptr,
    b,
    c,
    cmask,
    keep,
    C: tl.constexpr,
    W: tl.constexpr,
    BW: tl.constexpr,
    HAS_CONV: tl.constexpr,
    NORM: tl.constexpr,
):
    """silu(conv) (+ L2 norm) of channels c [BC] of sequence b's new token, rounded to x's dtype, as fp32
    [BC]; shifts the tail [C, W-1] of those channels by one token in place."""
    x = tl.load(x_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32) * keep
    if HAS_CONV:
        j = tl.arange(0, BW)
        taps = cmask[:, None] & (j < W - 1)[None, :]
        tail = tail_ptr + (b * C + c)[:, None] * (W - 1) + j[None, :]
        old = tl.load(tail, mask=taps, other=0.0)  # [BC, BW]: the last W-1 inputs, oldest first
        weights = tl.load(w_ptr + c[:, None] * W + j[None, :], mask=taps, other=0.0).to(tl.float32)
        last = tl.load(w_ptr + c * W + (W - 1), mask=cmask, other=0.0).to(tl.float32)
        conv = tl.sum(old.to(tl.float32) * weights, axis=1) + x * last
        tl.debug_barrier()  # every thread has read the tail before any shifts it
        tl.store(tail - 1, old, mask=taps & (j > 0)[None, :])
        tl.store(tail_ptr + (b * C + c) * (W - 1) + (W - 2), x.to(tail_ptr.dtype.element_ty), mask=cmask)
        x = conv
    y = x * tl.sigmoid(x)
    if NORM:
        y = y * tl.rsqrt(tl.sum(y * y, axis=0) + _L2_EPS)
    return y.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _mixer_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    beta_ptr,
    g_ptr,
    wq_ptr,
    wk_ptr,
    wv_ptr,
    tq_ptr,
    tk_ptr,
    tv_ptr,
    keep_ptr,
    state_ptr,
    nw_ptr,
    out_ptr,
    scale,
    beta_scale,
    eps,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    R: tl.constexpr,
    W: tl.constexpr,
    BW: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRODUCT: tl.constexpr,
    HAS_CONV: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    GATE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    kk = tl.arange(0, BK)
    vv = tl.arange(0, BV)
    kmask = kk < K
    vmask = vv < V
    dtype = v_ptr.dtype.element_ty
    keep = 1.0
    if HAS_KEEP:
        keep = tl.load(keep_ptr + b).to(tl.float32)
    st = state_ptr + (b * H + h) * K * V + kk[:, None] * V + vv[None, :]
    hv_mask = kmask[:, None] & vmask[None, :]
    hst = tl.load(st, mask=hv_mask, other=0.0)
    q = _feature(q_ptr, wq_ptr, tq_ptr, b, h * K + kk, kmask, keep, H * K, W, BW, HAS_CONV, True)
    delta = tl.zeros((BK, BV), tl.float32)
    for r in tl.static_range(R):
        k_r = _feature(
            k_ptr, wk_ptr, tk_ptr, b, (h * R + r) * K + kk, kmask, keep, H * R * K, W, BW, HAS_CONV, True
        )
        v_r = _feature(
            v_ptr, wv_ptr, tv_ptr, b, (h * R + r) * V + vv, vmask, keep, H * R * V, W, BW, HAS_CONV, False
        )
        logit = tl.load(beta_ptr + b * H * R + h * R + r).to(tl.float32)
        beta = (tl.sigmoid(logit) * beta_scale * keep).to(dtype).to(tl.float32)
        a_r = (-beta * k_r).to(dtype).to(tl.float32)
        u_r = (beta * v_r).to(dtype).to(tl.float32)
        x = tl.sum(a_r[:, None] * hst, axis=0) + u_r
        if PRODUCT:
            hst += k_r[:, None] * x[None, :]
        else:
            delta += k_r[:, None] * x[None, :]
    if not PRODUCT:
        hst += delta
    tl.store(st, hst, mask=hv_mask)
    o = (tl.sum(q[:, None] * hst, axis=0) * scale).to(dtype).to(tl.float32)
    norm_weight = tl.load(nw_ptr + vv, mask=vmask, other=0.0).to(tl.float32)
    y = o * tl.rsqrt(tl.sum(o * o, axis=0) / V + eps) * norm_weight
    if GATE:
        g = tl.load(g_ptr + b * H * V + h * V + vv, mask=vmask, other=0.0).to(tl.float32)
        y = y * g * tl.sigmoid(g)
    tl.store(out_ptr + b * H * V + h * V + vv, y.to(out_ptr.dtype.element_ty), mask=vmask)


def mixer_decode_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta_logits: torch.Tensor,
    gate: torch.Tensor | None,
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    tails: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    state: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    rank: int,
    product: bool,
    beta_scale: float,
    norm_eps: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per sequence through a pflow mixer, between its projections and o_proj.

    q [B, H*K], k [B, H*R*K], v [B, H*R*V] (the projections' outputs, one dtype), beta_logits [B, H*R],
    gate [B, H*V] or None; conv_weights: nn.Conv1d weights [C, 1, W] of q, k, v (None without short convs);
    tails [B, C, W-1] of q, k, v, contiguous, shifted IN PLACE; state [B, H, K, V] fp32 contiguous, updated
    IN PLACE; norm_weight [V]; keep [B] bool (False: a pad token, which leaves the state untouched) or None.
    Returns the gated RMSNorm of the output, [B, H*V] in v's dtype.
    """
    batch, n_heads, k_dim, v_dim = state.shape
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("state must be a contiguous float32 tensor [B, H, K, V]")
    if k_dim > MAX_DIM or v_dim > MAX_DIM:
        raise ValueError(f"head dims K = {k_dim}, V = {v_dim}: the decode kernel takes at most {MAX_DIM}")
    expected = {"q": n_heads * k_dim, "k": n_heads * rank * k_dim, "v": n_heads * rank * v_dim}
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape != (batch, expected[name]) or not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous [{batch}, {expected[name]}], got {tuple(x.shape)}")
    width = 1
    if conv_weights is not None:
        width = conv_weights[0].shape[-1]
        for x, t in zip((q, k, v), tails, strict=True):
            if t.shape != (batch, x.shape[1], width - 1) or not t.is_contiguous():
                raise ValueError(f"conv tail must be contiguous [{batch}, {x.shape[1]}, {width - 1}]")
    bk, bv = max(16, next_pow2(k_dim)), max(16, next_pow2(v_dim))
    out = new_tensor((batch, n_heads * v_dim), dtype=v.dtype, device=v.device)
    weights = [w.reshape(w.shape[0], -1) for w in conv_weights] if conv_weights is not None else (q, k, v)
    tq, tk, tv = tails if conv_weights is not None else (q, k, v)  # unread without convs
    _mixer_decode_kernel[(batch * n_heads,)](
        q,
        k,
        v,
        beta_logits.contiguous(),
        gate.contiguous() if gate is not None else v,
        *weights,
        tq,
        tk,
        tv,
        keep.contiguous().view(torch.uint8) if keep is not None else state,
        state,
        norm_weight,
        out,
        k_dim**-0.5,
        beta_scale,
        norm_eps,
        H=n_heads,
        K=k_dim,
        V=v_dim,
        R=rank,
        W=width,
        BW=max(2, next_pow2(width - 1)),
        BK=bk,
        BV=bv,
        PRODUCT=product,
        HAS_CONV=conv_weights is not None,
        HAS_KEEP=keep is not None,
        GATE=gate is not None,
        num_warps=8 if bk * bv >= 128 * 128 else 4,
    )
    return out
