"""Backward of the chunked tensorInv delta rule in Triton, three launches.

Per chunk (h0 entering state, h1 leaving state, T = (I - N)^-1, X = W h0 + U, P = (Q B^T) * M_out):
    dX  = scale P^T dO + B dh1                   dh0 = dh1 + scale Q^T dO + W^T dX
    dP  = scale (dO X^T) * M_out                 dQ  = scale dO h0^T + dP B
    dW  = dX h0^T;  dA~ = T^T dW;  dU~ = T^T dX   dN  = M * (dA~ W^T + dU~ U^T)
    dA  = dA~ + dN B;  du = dU~                   dB  = dP^T Q + X dh1^T + dN^T A

1. `_bwd_dh_kernel`: sequential over chunks in reverse (per sequence, head, V block): dh in registers,
   writes dh1 of every chunk and dX; returns the initial-state gradient.
2. `_bwd_dq_kernel`: chunk-parallel, loops over V blocks: dQ and the first two terms of dB (fp32).
3. `_bwd_dab_kernel`: chunk-parallel: du, dA and the last term of dB.
"""

import torch
import triton
import triton.language as tl

from .triton_chunk_fwd import scan_block_v, solve_mask
from .triton_utils import chunk_rows, dot_precision, next_pow2


@triton.jit
def _bwd_dh_kernel(
    q,
    b,
    w,
    do,
    dx,
    dh0,
    dht,
    dstates,
    cu,
    chunk_off,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    CRP: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DH0: tl.constexpr,
    HAS_DHT: tl.constexpr,
    PREC: tl.constexpr,
):
    vb = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // H
    h = nh % H
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    g0 = tl.load(chunk_off + n)
    kk = tl.arange(0, BK)
    vv = vb * BV + tl.arange(0, BV)
    kmask = kk < K
    vmask = vv < V
    hv_mask = kmask[:, None] & vmask[None, :]
    hv_off = kk[:, None] * V + vv[None, :]
    if HAS_DHT:
        dstate = tl.load(dht + nh.to(tl.int64) * K * V + hv_off, mask=hv_mask, other=0.0).to(tl.float32)
    else:
        dstate = tl.zeros((BK, BV), tl.float32)
    cidx = tl.arange(0, C)
    n_chunks = tl.cdiv(eos - bos, C)
    for ii in range(n_chunks):
        i = n_chunks - 1 - ii
        t0 = bos + i * C
        tl.store(
            dstates + ((g0 + i).to(tl.int64) * H + h) * K * V + hv_off,
            dstate.to(dstates.dtype.element_ty),
            mask=hv_mask,
        )
        t, row, valid = chunk_rows(t0, eos, h, H, R, C, CRP)
        w_t = tl.load(w + row[:, None] * K + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        b_t = tl.load(b + row[:, None] * K + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        qtok = t0 + cidx
        qrow = qtok.to(tl.int64) * H + h
        qmask = (qtok < eos)[:, None]
        q_t = tl.load(q + qrow[:, None] * K + kk[None, :], mask=qmask & kmask[None, :], other=0.0)
        do_t = tl.load(do + qrow[:, None] * V + vv[None, :], mask=qmask & vmask[None, :], other=0.0)
        p = tl.dot(q_t, tl.trans(b_t), input_precision=PREC)
        p = tl.where(cidx[:, None] >= t[None, :], p, 0.0).to(w_t.dtype)
        dx_t = scale * tl.dot(tl.trans(p), do_t, input_precision=PREC)
        dx_t += tl.dot(b_t, dstate.to(w_t.dtype), input_precision=PREC)  # [CRP, BV]
        dx_in = dx_t.to(w_t.dtype)
        tl.store(dx + row[:, None] * V + vv[None, :], dx_in, mask=valid[:, None] & vmask[None, :])
        dstate += scale * tl.dot(tl.trans(q_t), do_t, input_precision=PREC)
        dstate += tl.dot(tl.trans(w_t), dx_in, input_precision=PREC)
    if HAS_DH0:
        tl.store(dh0 + nh.to(tl.int64) * K * V + hv_off, dstate, mask=hv_mask)


@triton.jit
def _bwd_dq_kernel(
    q,
    b,
    w,
    uu,
    do,
    states,
    dstates,
    dq,
    db,
    chunk_seq,
    chunk_tok,
    cu,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    CRP: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    g = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(chunk_seq + g)
    t0 = tl.load(chunk_tok + g)
    eos = tl.load(cu + n + 1)
    t, row, valid = chunk_rows(t0, eos, h, H, R, C, CRP)
    kk = tl.arange(0, BK)
    kmask = kk < K
    rkmask = valid[:, None] & kmask[None, :]
    w_t = tl.load(w + row[:, None] * K + kk[None, :], mask=rkmask, other=0.0)
    b_t = tl.load(b + row[:, None] * K + kk[None, :], mask=rkmask, other=0.0)
    cidx = tl.arange(0, C)
    qtok = t0 + cidx
    qrow = qtok.to(tl.int64) * H + h
    qmask = (qtok < eos)[:, None]
    q_t = tl.load(q + qrow[:, None] * K + kk[None, :], mask=qmask & kmask[None, :], other=0.0)
    st_base = (g.to(tl.int64) * H + h) * K * V
    dq_acc = tl.zeros((C, BK), tl.float32)
    dox = tl.zeros((C, CRP), tl.float32)
    db_acc = tl.zeros((CRP, BK), tl.float32)
    for v0 in tl.static_range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        vmask = vv < V
        hv = kmask[:, None] & vmask[None, :]
        s0 = tl.load(states + st_base + kk[:, None] * V + vv[None, :], mask=hv, other=0.0).to(w_t.dtype)
        ds1 = tl.load(dstates + st_base + kk[:, None] * V + vv[None, :], mask=hv, other=0.0).to(w_t.dtype)
        u_t = tl.load(uu + row[:, None] * V + vv[None, :], mask=valid[:, None] & vmask[None, :], other=0.0)
        do_t = tl.load(do + qrow[:, None] * V + vv[None, :], mask=qmask & vmask[None, :], other=0.0)
        x = (tl.dot(w_t, s0, input_precision=PREC) + u_t.to(tl.float32)).to(w_t.dtype)
        dq_acc += tl.dot(do_t, tl.trans(s0), input_precision=PREC)
        dox += tl.dot(do_t, tl.trans(x), input_precision=PREC)
        db_acc += tl.dot(x, tl.trans(ds1), input_precision=PREC)
    dp = tl.where(cidx[:, None] >= t[None, :], dox * scale, 0.0).to(w_t.dtype)
    dq_acc = dq_acc * scale + tl.dot(dp, b_t, input_precision=PREC)
    db_acc += tl.dot(tl.trans(dp), q_t, input_precision=PREC)
    tl.store(
        dq + qrow[:, None] * K + kk[None, :], dq_acc.to(dq.dtype.element_ty), mask=qmask & kmask[None, :]
    )
    tl.store(db + row[:, None] * K + kk[None, :], db_acc, mask=rkmask)


@triton.jit
def _bwd_dab_kernel(
    a,
    b,
    w,
    uu,
    dx,
    states,
    tmat,
    da,
    db,
    du,
    chunk_seq,
    chunk_tok,
    cu,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    CRP: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRODUCT: tl.constexpr,
    PREC: tl.constexpr,
):
    g = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(chunk_seq + g)
    t0 = tl.load(chunk_tok + g)
    eos = tl.load(cu + n + 1)
    t, row, valid = chunk_rows(t0, eos, h, H, R, C, CRP)
    j = tl.arange(0, CRP)
    t_inv = tl.load(tmat + ((g.to(tl.int64) * H + h) * CRP + j[:, None]) * CRP + j[None, :])
    kk = tl.arange(0, BK)
    kmask = kk < K
    rkmask = valid[:, None] & kmask[None, :]
    w_t = tl.load(w + row[:, None] * K + kk[None, :], mask=rkmask, other=0.0)
    st_base = (g.to(tl.int64) * H + h) * K * V
    dw = tl.zeros((CRP, BK), tl.float32)
    dn = tl.zeros((CRP, CRP), tl.float32)
    for v0 in tl.static_range(0, V, BV):
        vv = v0 + tl.arange(0, BV)
        vmask = vv < V
        rvmask = valid[:, None] & vmask[None, :]
        s0 = tl.load(
            states + st_base + kk[:, None] * V + vv[None, :], mask=kmask[:, None] & vmask[None, :], other=0.0
        ).to(w_t.dtype)
        dx_t = tl.load(dx + row[:, None] * V + vv[None, :], mask=rvmask, other=0.0)
        u_t = tl.load(uu + row[:, None] * V + vv[None, :], mask=rvmask, other=0.0)
        dw += tl.dot(dx_t, tl.trans(s0), input_precision=PREC)
        du_t = tl.dot(tl.trans(t_inv), dx_t.to(tl.float32), input_precision=PREC)  # [CRP, BV]
        tl.store(du + row[:, None] * V + vv[None, :], du_t.to(du.dtype.element_ty), mask=rvmask)
        dn += tl.dot(du_t, tl.trans(u_t.to(tl.float32)), input_precision=PREC)
    da_t = tl.dot(tl.trans(t_inv), dw, input_precision=PREC)  # T^T dW [CRP, BK]
    dn += tl.dot(da_t, tl.trans(w_t.to(tl.float32)), input_precision=PREC)
    dn = tl.where(solve_mask(t, CRP, PRODUCT), dn, 0.0)
    a_t = tl.load(a + row[:, None] * K + kk[None, :], mask=rkmask, other=0.0).to(tl.float32)
    b_t = tl.load(b + row[:, None] * K + kk[None, :], mask=rkmask, other=0.0).to(tl.float32)
    da_t += tl.dot(dn, b_t, input_precision=PREC)
    db_t = tl.load(db + row[:, None] * K + kk[None, :], mask=rkmask, other=0.0)
    db_t += tl.dot(tl.trans(dn), a_t, input_precision=PREC)
    tl.store(da + row[:, None] * K + kk[None, :], da_t.to(da.dtype.element_ty), mask=rkmask)
    tl.store(db + row[:, None] * K + kk[None, :], db_t, mask=rkmask)


def launch_chunk_bwd(
    q,
    a,
    b,
    w,
    uu,
    do,
    states,
    tmat,
    cu,
    cmap,
    dht,
    *,
    chunk: int,
    scale: float,
    product: bool,
    need_dh0: bool,
):
    """Gradients of the chunked forward. Shapes as in the forward ([TT, H, ...] flattened tokens).

    Returns dq, da, du (input dtype), db (fp32), dh0 [N, H, K, V] fp32 or None.
    """
    total, n_heads, rank, k_dim = a.shape
    v_dim = uu.shape[-1]
    n_seq = cu.numel() - 1
    seq, tok, off = cmap
    n_chunks = seq.numel()
    crp = max(16, next_pow2(chunk * rank))
    bk = max(16, next_pow2(k_dim))
    prec = dot_precision(a.dtype)
    dstates = torch.empty_like(states)
    dx = torch.empty_like(uu)
    dh0 = (
        torch.empty(n_seq, n_heads, k_dim, v_dim, device=q.device, dtype=torch.float32) if need_dh0 else None
    )
    bv = scan_block_v(n_seq * n_heads, v_dim, k_dim)
    _bwd_dh_kernel[(triton.cdiv(v_dim, bv), n_seq * n_heads)](
        q,
        b,
        w,
        do,
        dx,
        dh0 if need_dh0 else dx,
        dht if dht is not None else dx,
        dstates,
        cu,
        off,
        scale,
        H=n_heads,
        K=k_dim,
        V=v_dim,
        R=rank,
        C=chunk,
        CRP=crp,
        BK=bk,
        BV=bv,
        HAS_DH0=need_dh0,
        HAS_DHT=dht is not None,
        PREC=prec,
        num_warps=4,
    )
    dq = torch.empty_like(q)
    db = torch.empty(a.shape, device=a.device, dtype=torch.float32)
    bv_par = min(64, max(16, next_pow2(v_dim)))
    _bwd_dq_kernel[(n_chunks, n_heads)](
        q,
        b,
        w,
        uu,
        do,
        states,
        dstates,
        dq,
        db,
        seq,
        tok,
        cu,
        scale,
        H=n_heads,
        K=k_dim,
        V=v_dim,
        R=rank,
        C=chunk,
        CRP=crp,
        BK=bk,
        BV=bv_par,
        PREC=prec,
        num_warps=8,
    )
    da = torch.empty_like(a)
    du = torch.empty_like(uu)
    _bwd_dab_kernel[(n_chunks, n_heads)](
        a,
        b,
        w,
        uu,
        dx,
        states,
        tmat,
        da,
        db,
        du,
        seq,
        tok,
        cu,
        H=n_heads,
        K=k_dim,
        V=v_dim,
        R=rank,
        C=chunk,
        CRP=crp,
        BK=bk,
        BV=bv_par,
        PRODUCT=product,
        PREC=prec,
        num_warps=8,
    )
    return dq, da, db, du, dh0
