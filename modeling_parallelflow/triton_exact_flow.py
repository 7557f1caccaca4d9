"""Triton: the exact flow's drivers in sum mode, a' = P a and u' = P u with P = phi(G), G = a b^T, forward and
backward in one kernel each (ops_exact_flow.py holds the maths and the torch path, the reference; it runs
product mode here too, each component as R = 1).

a, b [N, R, K] and u [N, R, V] are N token-heads flattened. A program takes BLOCK_N of them and keeps
everything in registers: the R x R matrices as [BLOCK_N, RP, RP] tensors (RP = R rounded up to a power of
two; the padding is zero in G, so P is the identity there and mixes nothing in), their products as RP rank-1
updates. phi is the torch path's scaled and squared Taylor series: per matrix s halvings until the Frobenius
norm is at most 1, TERMS Horner steps, s doublings phi(2Y) = phi(Y) + phi(Y) Y phi(Y) / 2.

Backward: dP = da' a^T + du' u^T. The adjoint of phi's Frechet derivative at G is the derivative at G^T, so
the same series run in forward mode at X = G^T in the direction dP gives phi(X) = P^T and dG = L_phi(X, dP)
together; then da = P^T da' + dG b, db = dG^T a, du = P^T du'. Nothing is saved beyond a, b, u.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import new_tensor, next_pow2

TERMS = 10  # Horner steps: the series' next term after norm <= 1 is 1 / 12! = 2e-9 (float32 throughout)
MAX_SQUARINGS = 8  # as ops_exact_flow.MAX_SQUARINGS: Frobenius norms up to 2**8
REGISTER_BUDGET = 2048  # fp32 elements per program in one [BLOCK_N, RP, max(K, V)] tensor


@triton.jit
def _row(x, i, S: tl.constexpr):
    """x[:, i, :] of x [BN, S, C] -> [BN, C]."""
    pick = tl.arange(0, S)[None, :, None] == i
    return tl.sum(tl.where(pick, x, 0.0), axis=1)


@triton.jit
def _col(x, j, C: tl.constexpr):
    """x[:, :, j] of x [BN, S, C] -> [BN, S]."""
    pick = tl.arange(0, C)[None, None, :] == j
    return tl.sum(tl.where(pick, x, 0.0), axis=2)


@triton.jit
def _mm(x, y, RP: tl.constexpr):
    """x @ y for x [BN, RP, RP], y [BN, RP, C] -> [BN, RP, C]."""
    acc = _col(x, 0, RP)[:, :, None] * _row(y, 0, RP)[:, None, :]
    for m in tl.static_range(1, RP):
        acc += _col(x, m, RP)[:, :, None] * _row(y, m, RP)[:, None, :]
    return acc


@triton.jit
def _mm_tn(x, y, RP: tl.constexpr):
    """x^T @ y for x [BN, RP, RP], y [BN, RP, C] -> [BN, RP, C]."""
    acc = _row(x, 0, RP)[:, :, None] * _row(y, 0, RP)[:, None, :]
    for m in tl.static_range(1, RP):
        acc += _row(x, m, RP)[:, :, None] * _row(y, m, RP)[:, None, :]
    return acc


@triton.jit
def _abt(x, y, RP: tl.constexpr):
    """x @ y^T for x, y [BN, RP, C] -> [BN, RP, RP]."""
    cols = tl.arange(0, RP)[None, None, :]
    acc = tl.where(cols == 0, tl.sum(x * _row(y, 0, RP)[:, None, :], axis=2)[:, :, None], 0.0)
    for j in tl.static_range(1, RP):
        acc += tl.where(cols == j, tl.sum(x * _row(y, j, RP)[:, None, :], axis=2)[:, :, None], 0.0)
    return acc


@triton.jit
def _scaling(g, MAX_SQ: tl.constexpr):
    """Halvings s [BN] (float) of each matrix g [BN, RP, RP]: ceil(log2(|g|_F)), 0 below 1, at most MAX_SQ."""
    norm = tl.sqrt(tl.sum(tl.sum(g * g, axis=2), axis=1))
    return tl.minimum(tl.ceil(tl.log2(tl.maximum(norm, 1.0))), MAX_SQ)


@triton.jit
def _phi(g, RP: tl.constexpr, N_TERMS: tl.constexpr, MAX_SQ: tl.constexpr):
    """phi(g) of g [BN, RP, RP] fp32."""
    eye = (tl.arange(0, RP)[:, None] == tl.arange(0, RP)[None, :]).to(tl.float32)[None, :, :]
    halvings = _scaling(g, MAX_SQ)
    y = g * tl.exp2(-halvings)[:, None, None]
    p = eye + y / (N_TERMS + 1)
    for i in tl.static_range(N_TERMS - 1):  # m = N_TERMS .. 2
        p = eye + _mm(y, p, RP) / (N_TERMS - i)
    for j in range(tl.max(halvings, axis=0).to(tl.int32)):  # the block's most, masked per matrix
        doubling = (halvings > j)[:, None, None]
        p = tl.where(doubling, p + 0.5 * _mm(_mm(p, y, RP), p, RP), p)
        y = tl.where(doubling, 2.0 * y, y)
    return p


@triton.jit
def _phi_frechet(x, e, RP: tl.constexpr, N_TERMS: tl.constexpr, MAX_SQ: tl.constexpr):
    """(phi(x), L_phi(x, e)) of x, e [BN, RP, RP] fp32: the series of `_phi` in forward mode."""
    eye = (tl.arange(0, RP)[:, None] == tl.arange(0, RP)[None, :]).to(tl.float32)[None, :, :]
    halvings = _scaling(x, MAX_SQ)
    scale = tl.exp2(-halvings)[:, None, None]
    y = x * scale
    dy = e * scale
    p = eye + y / (N_TERMS + 1)
    dp = dy / (N_TERMS + 1)
    for i in tl.static_range(N_TERMS - 1):
        m = N_TERMS - i
        dp = (_mm(dy, p, RP) + _mm(y, dp, RP)) / m
        p = eye + _mm(y, p, RP) / m
    for j in range(tl.max(halvings, axis=0).to(tl.int32)):
        doubling = (halvings > j)[:, None, None]
        py = _mm(p, y, RP)
        p_new = p + 0.5 * _mm(py, p, RP)
        dp_new = dp + 0.5 * (_mm(_mm(dp, y, RP), p, RP) + _mm(_mm(p, dy, RP), p, RP) + _mm(py, dp, RP))
        p = tl.where(doubling, p_new, p)
        dp = tl.where(doubling, dp_new, dp)
        y = tl.where(doubling, 2.0 * y, y)
        dy = tl.where(doubling, 2.0 * dy, dy)
    return p, dp


@triton.jit
def _tile(n, N, R: tl.constexpr, C: tl.constexpr, RP: tl.constexpr, CP: tl.constexpr):
    """Offsets and mask of the [BN, RP, CP] tile of rows n of an [N, R, C] tensor."""
    r = tl.arange(0, RP)[None, :, None]
    c = tl.arange(0, CP)[None, None, :]
    offsets = n.to(tl.int64)[:, None, None] * (R * C) + r * C + c
    return offsets, (n < N)[:, None, None] & (r < R) & (c < C)


@triton.jit
def _exact_flow_fwd_kernel(
    a_ptr,
    b_ptr,
    u_ptr,
    a_out_ptr,
    u_out_ptr,
    N,
    R: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    RP: tl.constexpr,
    KP: tl.constexpr,
    VP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_TERMS: tl.constexpr,
    MAX_SQ: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok, mk = _tile(n, N, R, K, RP, KP)
    ov, mv = _tile(n, N, R, V, RP, VP)
    a = tl.load(a_ptr + ok, mask=mk, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + ok, mask=mk, other=0.0).to(tl.float32)
    p = _phi(_abt(a, b, RP), RP, N_TERMS, MAX_SQ)
    tl.store(a_out_ptr + ok, _mm(p, a, RP).to(a_out_ptr.dtype.element_ty), mask=mk)
    u = tl.load(u_ptr + ov, mask=mv, other=0.0).to(tl.float32)
    tl.store(u_out_ptr + ov, _mm(p, u, RP).to(u_out_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _exact_flow_bwd_kernel(
    a_ptr,
    b_ptr,
    u_ptr,
    da_out_ptr,
    du_out_ptr,
    da_ptr,
    db_ptr,
    du_ptr,
    N,
    R: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    RP: tl.constexpr,
    KP: tl.constexpr,
    VP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_TERMS: tl.constexpr,
    MAX_SQ: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok, mk = _tile(n, N, R, K, RP, KP)
    ov, mv = _tile(n, N, R, V, RP, VP)
    a = tl.load(a_ptr + ok, mask=mk, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + ok, mask=mk, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + ov, mask=mv, other=0.0).to(tl.float32)
    da_out = tl.load(da_out_ptr + ok, mask=mk, other=0.0).to(tl.float32)
    du_out = tl.load(du_out_ptr + ov, mask=mv, other=0.0).to(tl.float32)
    g = _abt(a, b, RP)
    g_t = tl.permute(g, (0, 2, 1))
    dp = _abt(da_out, a, RP) + _abt(du_out, u, RP)
    p_t, dg = _phi_frechet(g_t, dp, RP, N_TERMS, MAX_SQ)  # p_t = P^T
    tl.store(du_ptr + ov, _mm(p_t, du_out, RP).to(du_ptr.dtype.element_ty), mask=mv)
    tl.store(da_ptr + ok, (_mm(p_t, da_out, RP) + _mm(dg, b, RP)).to(da_ptr.dtype.element_ty), mask=mk)
    tl.store(db_ptr + ok, _mm_tn(dg, a, RP).to(db_ptr.dtype.element_ty), mask=mk)


def _launch_shape(a: torch.Tensor, u: torch.Tensor) -> dict:
    n, r, k = a.shape
    v = u.shape[-1]
    rp, kp, vp = next_pow2(r), next_pow2(k), next_pow2(v)
    block_n = max(1, min(64, REGISTER_BUDGET // (rp * max(kp, vp))))
    return dict(R=r, K=k, V=v, RP=rp, KP=kp, VP=vp, BLOCK_N=block_n, N_TERMS=TERMS, MAX_SQ=MAX_SQUARINGS)


def _grid(n: int, meta: dict) -> tuple[int]:
    return (triton.cdiv(n, meta["BLOCK_N"]),)


class _ExactFlowSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, u):
        meta = _launch_shape(a, u)
        a_out = new_tensor(a.shape, dtype=a.dtype, device=a.device)
        u_out = new_tensor(u.shape, dtype=u.dtype, device=u.device)
        if a.shape[0]:
            _exact_flow_fwd_kernel[_grid(a.shape[0], meta)](a, b, u, a_out, u_out, a.shape[0], **meta)
        ctx.save_for_backward(a, b, u)
        return a_out, u_out

    @staticmethod
    def backward(ctx, da_out, du_out):
        a, b, u = ctx.saved_tensors
        da_out = torch.zeros_like(a) if da_out is None else da_out.contiguous()
        du_out = torch.zeros_like(u) if du_out is None else du_out.contiguous()
        meta = _launch_shape(a, u)
        da, db, du = (new_tensor(x.shape, dtype=x.dtype, device=x.device) for x in (a, b, u))
        if a.shape[0]:
            _exact_flow_bwd_kernel[_grid(a.shape[0], meta)](
                a, b, u, da_out, du_out, da, db, du, a.shape[0], **meta
            )
        return da, db, du


def triton_exact_flow_sum(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sum-mode exact-flow drivers (a', u') of a, b [..., R, K] and u [..., R, V], in a's and u's dtypes.

    Shapes and dtypes are the caller's to check (`ops_exact_flow.exact_flow_drivers`); b gets a gradient
    where it requires one."""
    lead = a.shape[:-2]
    flat = [x.reshape(-1, *x.shape[-2:]).contiguous() for x in (a, b, u)]
    a_out, u_out = _ExactFlowSum.apply(*flat)
    return a_out.view(*lead, *a.shape[-2:]), u_out.view(*lead, *u.shape[-2:])
