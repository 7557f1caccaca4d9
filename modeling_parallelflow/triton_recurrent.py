"""Token-by-token delta rule in Triton: the decode kernel (algorithm="recurrent").

One program per (sequence, head, V block) keeps h [K, BV] in fp32 registers and walks the tokens of
its sequence; the state tensor is read at the start and overwritten at the end (in place). Per token,
sum form: x_r = a_r^T h + u_r for all r from the same h, then h += sum_r b_r x_r^T; product form: the
R updates one after another; then o = scale h^T q. Grid and shapes depend only on tensor shapes (no
host sync), so a decode step can be captured in a CUDA graph.
"""

import triton
import triton.language as tl

from .triton_utils import new_tensor, next_pow2


@triton.jit
def _recurrent_kernel(
    q,
    a,
    b,
    u,
    o,
    state,
    cu,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    R: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRODUCT: tl.constexpr,
):
    vb = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // H
    h = nh % H
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    kk = tl.arange(0, BK)
    vv = vb * BV + tl.arange(0, BV)
    kmask = kk < K
    vmask = vv < V
    hv_mask = kmask[:, None] & vmask[None, :]
    st_ptr = state + nh.to(tl.int64) * K * V + kk[:, None] * V + vv[None, :]
    hst = tl.load(st_ptr, mask=hv_mask, other=0.0)
    for i in range(eos - bos):
        base = (bos + i).to(tl.int64) * H + h
        delta = tl.zeros((BK, BV), tl.float32)
        for r in tl.static_range(R):
            a_r = tl.load(a + (base * R + r) * K + kk, mask=kmask, other=0.0).to(tl.float32)
            b_r = tl.load(b + (base * R + r) * K + kk, mask=kmask, other=0.0).to(tl.float32)
            u_r = tl.load(u + (base * R + r) * V + vv, mask=vmask, other=0.0).to(tl.float32)
            x = tl.sum(a_r[:, None] * hst, axis=0) + u_r
            if PRODUCT:
                hst += b_r[:, None] * x[None, :]
            else:
                delta += b_r[:, None] * x[None, :]
        if not PRODUCT:
            hst += delta
        q_t = tl.load(q + base * K + kk, mask=kmask, other=0.0).to(tl.float32)
        o_t = tl.sum(q_t[:, None] * hst, axis=0) * scale
        tl.store(o + base * V + vv, o_t.to(o.dtype.element_ty), mask=vmask)
    tl.store(st_ptr, hst, mask=hv_mask)


def launch_recurrent_(q, a, b, u, state, cu, *, scale: float, product: bool, out_dtype):
    """q [TT, H, K], a, b [TT, H, R, K], u [TT, H, R, V]; state [N, H, K, V] fp32, updated in place.

    Returns o [TT, H, V].
    """
    total, n_heads, rank, k_dim = a.shape
    v_dim = u.shape[-1]
    n_seq = cu.numel() - 1
    o = new_tensor((total, n_heads, v_dim), dtype=out_dtype, device=q.device)
    bk = max(16, next_pow2(k_dim))
    bv = min(max(16, next_pow2(v_dim)), 32 if bk > 128 else 64)
    _recurrent_kernel[(triton.cdiv(v_dim, bv), n_seq * n_heads)](
        q,
        a,
        b,
        u,
        o,
        state,
        cu,
        scale,
        H=n_heads,
        K=k_dim,
        V=v_dim,
        R=rank,
        BK=bk,
        BV=bv,
        PRODUCT=product,
        num_warps=4,
    )
    return o
