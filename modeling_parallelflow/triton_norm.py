"""Triton: the pflow mixer's gated output RMSNorm, forward and backward, in fp32 registers.

Rows of o [N, V] (N = B * T * H, one head's output per row), weight [V], optional gate g [N, V]:

    y = (o * rstd) * weight * silu(g)          rstd = 1 / sqrt(mean(o^2) + eps)   (no gate: drop silu(g))

Backward recomputes rstd (saved: o, g, weight only). With xhat = o * rstd, a = xhat * weight and
da = dy * silu(g): dg = dy * a * silu'(g), dweight = sum_rows da * xhat (per-program partial sums),
do = rstd * (da * weight - xhat * mean(da * weight * xhat)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import new_tensor, next_pow2

ROWS = 16  # rows per program


@triton.jit
def _fwd_kernel(
    o_ptr,
    g_ptr,
    w_ptr,
    y_ptr,
    N,
    V: tl.constexpr,
    BV: tl.constexpr,
    BR: tl.constexpr,
    EPS: tl.constexpr,
    GATE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # N * V may pass 2**31
    cols = tl.arange(0, BV)
    m = (rows < N)[:, None] & (cols < V)[None, :]
    off = rows[:, None] * V + cols[None, :]
    o = tl.load(o_ptr + off, mask=m, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(o * o, axis=1) / V + EPS)
    y = o * rstd[:, None] * tl.load(w_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    if GATE:
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        y = y * g * tl.sigmoid(g)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(
    o_ptr,
    g_ptr,
    w_ptr,
    dy_ptr,
    do_ptr,
    dg_ptr,
    dw_ptr,
    N,
    V: tl.constexpr,
    BV: tl.constexpr,
    BR: tl.constexpr,
    EPS: tl.constexpr,
    GATE: tl.constexpr,
):
    i = tl.program_id(0)
    rows = i.to(tl.int64) * BR + tl.arange(0, BR)  # N * V may pass 2**31
    cols = tl.arange(0, BV)
    m = (rows < N)[:, None] & (cols < V)[None, :]
    off = rows[:, None] * V + cols[None, :]
    o = tl.load(o_ptr + off, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(o * o, axis=1) / V + EPS)[:, None]
    xhat = o * rstd
    if GATE:
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        dg = dy * xhat * w * sig * (1.0 + g * (1.0 - sig))
        tl.store(dg_ptr + off, dg.to(dg_ptr.dtype.element_ty), mask=m)
        dy = dy * g * sig
    tl.store(dw_ptr + i * V + cols, tl.sum(dy * xhat, axis=0), mask=cols < V)
    dxhat = dy * w
    do = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / V)[:, None])
    tl.store(do_ptr + off, do.to(do_ptr.dtype.element_ty), mask=m)


class GatedRMSNorm(torch.autograd.Function):
    """Saves o, g, weight; the backward recomputes rstd and silu(g)."""

    @staticmethod
    def forward(ctx, o, g, weight, eps: float):
        n, v = o.shape
        y = new_tensor(o.shape, dtype=o.dtype, device=o.device)
        grid = (triton.cdiv(n, ROWS),)
        _fwd_kernel[grid](o, g, weight, y, n, V=v, BV=next_pow2(v), BR=ROWS, EPS=eps, GATE=g is not None)
        ctx.save_for_backward(o, g, weight)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        o, g, weight = ctx.saved_tensors
        n, v = o.shape
        grid = (triton.cdiv(n, ROWS),)
        do = new_tensor(o.shape, dtype=o.dtype, device=o.device)
        dg = new_tensor(g.shape, dtype=g.dtype, device=g.device) if g is not None else None
        partial = new_tensor((grid[0], v), dtype=torch.float32, device=o.device)
        _bwd_kernel[grid](
            o,
            g,
            weight,
            dy.contiguous(),
            do,
            dg,
            partial,
            n,
            V=v,
            BV=next_pow2(v),
            BR=ROWS,
            EPS=ctx.eps,
            GATE=g is not None,
        )
        return do, dg, partial.sum(0).to(weight.dtype), None


def gated_rms_norm(
    o: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """o [..., V], weight [V], gate [..., V] or None -> RMSNorm(o) * weight (* silu(gate)), as o."""
    v = o.shape[-1]
    flat_gate = gate.reshape(-1, v).contiguous() if gate is not None else None
    y = GatedRMSNorm.apply(o.reshape(-1, v).contiguous(), flat_gate, weight, eps)
    return y.view(o.shape)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    sum_ptr,
    D: tl.constexpr,
    BD: tl.constexpr,
    EPS: tl.constexpr,
    ADD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    m = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    if ADD:  # the block's residual sum, rounded to its dtype before the norm reads it (as in torch)
        x = x + tl.load(res_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * D + cols, x, mask=m)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + EPS)
    xhat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (w * xhat).to(y_ptr.dtype.element_ty), mask=m)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Forward only (no autograd: inference and decoding). x [..., D], weight [D] -> weight * (x * rstd)
    cast to x's dtype, in the dtype torch promotes weight and x to (modeling_parallelflow's torch RMSNorm).
    With residual [..., D]: (s, rms_norm(s)) for s = x + residual, the add fused into the norm's launch."""
    d = x.shape[-1]
    flat = x.reshape(-1, d).contiguous()
    y = new_tensor(flat.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = None
    if residual is not None:
        residual = residual.reshape(-1, d).contiguous()
        total = new_tensor(flat.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    _rms_norm_kernel[(flat.shape[0],)](
        flat,
        residual,
        weight,
        y,
        total,
        D=d,
        BD=next_pow2(d),
        EPS=eps,
        ADD=residual is not None,
        num_warps=4 if d <= 2048 else 8,
    )
    if residual is None:
        return y.view(x.shape)
    return total.view(x.shape), y.view(x.shape)
