"""Backward of the chunked tensorInv delta rule in Triton, two launches.

Per chunk (h0 entering state, h1 leaving state, T = (I - N)^-1, X = W h0 + U saved by the forward,
P = (Q B^T) * M_out):
    dX = scale P^T dO + B dh1             dh0 = dh1 + scale Q^T dO + W^T dX  (W^T dX = A^T dU)
    dU = T^T dX  (= du)                   dP  = scale (dO X^T) * M_out
    dN = M * (dU X^T)                     dQ  = scale dO h0^T + dP B
    dA = dU h0^T + dN B                   dB  = dP^T Q + X dh1^T + dN^T A
(dN: the solve's gradient M * (T^T dW W^T + dU U^T) with dW = dX h0^T collapses to M * (dU X^T)
because W h0 + U = X; so the backward needs neither W h0 nor U, nor W itself: W = T A.)

1. `_bwd_dh_kernel`: sequential over chunks in reverse (per sequence, head, V block): dh in registers,
   writes dh1 of every chunk and dU = T^T dX; returns the initial-state gradient.
2. `_bwd_chunk_kernel`: chunk-parallel: dq, da, db (and dv = beta du, dbeta in beta form), K and V in
   slices of BK / BV.
With TUNE["bwd_local_dx"], a chunk-parallel `_bwd_local_dx_kernel` first writes dX's local part
scale P^T dO, and the sequential kernel adds B dh1 to it: P = (Q B^T) * M_out, a [C, C*R] product over
all of K, leaves the sequential loop, where every V block of a (sequence, head) recomputed it.
"""

import torch
import triton
import triton.language as tl

from .triton_chunk_fwd import local_scores, scan_block_v, solve_mask
from .triton_utils import (
    TUNE,
    ScanTiles,
    chunk_rows,
    dot_precision,
    multiprocessors,
    new_like,
    new_tensor,
    next_pow2,
    scale_rows,
    scan_launch,
)


@triton.jit
def _bwd_dh_kernel(
    q,
    a,
    b,
    beta,
    tmat,
    do,
    dx,
    du,
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
    CQ: tl.constexpr,
    CRP: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DH0: tl.constexpr,
    HAS_DHT: tl.constexpr,
    LOCAL_DX: tl.constexpr,
    BETA: tl.constexpr,
    PREC: tl.constexpr,
):
    # Writes du = T^T dX [CRP, BV] per chunk, not dX, and takes W^T dX as A^T du, so W is not needed
    # (BETA: A^T du = -k^T (beta du), a unused). LOCAL_DX: dx holds scale P^T dO already
    # (`_bwd_local_dx_kernel`); this kernel adds B dh1 to it.
    # Q and dO go through the pipeline. Loaded one chunk ahead into registers, as the forward scan's Q can be
    # (`scan_launch`), at 2048 x 16 they took its shared memory from 139 to 113 KB (two programs per
    # multiprocessor) but spilled registers: 0.30 -> 0.42 ms (H200, benchmarks/results/h200_query_ahead).
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
    cidx = tl.arange(0, CQ)  # query rows, padded to 16 for tl.dot when C = 8
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
        jj = tl.arange(0, CRP)
        t_mat = tl.load(tmat + (((g0 + i).to(tl.int64) * H + h) * CRP + jj[:, None]) * CRP + jj[None, :])
        b_t = tl.load(b + row[:, None] * K + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        qtok = t0 + cidx
        qrow = qtok.to(tl.int64) * H + h
        qmask = ((qtok < eos) & (cidx < C))[:, None]
        q_t = tl.load(q + qrow[:, None] * K + kk[None, :], mask=qmask & kmask[None, :], other=0.0)
        do_t = tl.load(do + qrow[:, None] * V + vv[None, :], mask=qmask & vmask[None, :], other=0.0)
        rv_mask = valid[:, None] & vmask[None, :]
        if LOCAL_DX:
            dx_t = tl.load(dx + row[:, None] * V + vv[None, :], mask=rv_mask, other=0.0).to(tl.float32)
        else:
            p = tl.dot(q_t, tl.trans(b_t), input_precision=PREC)
            p = tl.where(cidx[:, None] >= t[None, :], p, 0.0).to(b_t.dtype)
            dx_t = scale * tl.dot(tl.trans(p), do_t, input_precision=PREC)
        dx_t += tl.dot(b_t, dstate.to(b_t.dtype), input_precision=PREC)  # [CRP, BV]
        # T in the input dtype: a tf32 dot on a pipelined fp32 T, transposed, read garbage (NaN dk, dv, dbeta,
        # dh0 for bf16 at C * R = 64, K = 48 and 128: Triton 3.6, H200 sweep at a286d9a) and was slow
        du_t = tl.dot(tl.trans(t_mat), dx_t.to(b_t.dtype), input_precision=PREC)
        tl.store(du + row[:, None] * V + vv[None, :], du_t.to(du.dtype.element_ty), mask=rv_mask)
        dstate += scale * tl.dot(tl.trans(q_t), do_t, input_precision=PREC)
        if BETA:
            beta_r = tl.load(beta + row, mask=valid, other=0.0).to(tl.float32)
            dstate -= tl.dot(tl.trans(b_t), (beta_r[:, None] * du_t).to(b_t.dtype), input_precision=PREC)
        else:
            a_t = tl.load(a + row[:, None] * K + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
            dstate += tl.dot(tl.trans(a_t), du_t.to(b_t.dtype), input_precision=PREC)
    if HAS_DH0:
        tl.store(dh0 + nh.to(tl.int64) * K * V + hv_off, dstate, mask=hv_mask)


@triton.jit
def _bwd_local_dx_kernel(
    q,
    b,
    do,
    dx,
    chunk_seq,
    chunk_tok,
    cu,
    scale,
    k_len,
    v_len,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    CQ: tl.constexpr,
    CRP: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """dx [TT, H, R, V] = scale P^T dO per chunk, P = (Q B^T) * M_out [CQ, CRP]: the local part of dX.
    Loop bounds k_len = K, v_len = V at run time (see `_bwd_chunk_kernel` on one-trip loops)."""
    g = tl.program_id(0)
    h = tl.program_id(1)
    t0 = tl.load(chunk_tok + g)
    eos = tl.load(cu + tl.load(chunk_seq + g) + 1)
    t, row, valid = chunk_rows(t0, eos, h, H, R, C, CRP)
    p, qrow, qmask = local_scores(q, b, t0, eos, h, t, row, valid, k_len, H, K, C, CQ, CRP, BK, PREC)
    p = p.to(q.dtype.element_ty)
    for v0 in range(0, v_len, BV):
        vv = v0 + tl.arange(0, BV)
        vmask = vv < V
        do_t = tl.load(do + qrow[:, None] * V + vv[None, :], mask=qmask & vmask[None, :], other=0.0)
        dx_t = scale * tl.dot(tl.trans(p), do_t, input_precision=PREC)
        tl.store(
            dx + row[:, None] * V + vv[None, :],
            dx_t.to(dx.dtype.element_ty),
            mask=valid[:, None] & vmask[None, :],
        )


@triton.jit
def _bwd_chunk_kernel(
    q,
    a,
    b,
    v,
    beta,
    xs,
    do,
    states,
    dstates,
    du,
    dq,
    da,
    db,
    dbeta,
    chunk_seq,
    chunk_tok,
    cu,
    scale,
    v_len,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    CQ: tl.constexpr,
    CRP: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRODUCT: tl.constexpr,
    BETA: tl.constexpr,
    PREC: tl.constexpr,
):
    # du = T^T dX comes from `_bwd_dh_kernel` (input dtype) and is read in the first V loop and for every K
    # tile; in beta form a last pass turns it into dv = beta du, in place.
    # BETA: beta form (b = k, v and beta [TT, H, R] given, a = -beta k rebuilt in registers): writes
    # dk = db - beta da into db, dv = beta du into du and dbeta = sum_V v du - sum_K k da; a and da unused.
    # v_len = V, a run-time bound, keeps the V loops as loops: with a constexpr bound a one-trip loop
    # (V <= BV) is unrolled, and Triton 3.6 compiles that straight-line form for sm_90 so that a wgmma reads
    # past its shared memory (NaN dk / dbeta or an illegal address at K = V <= 32, R >= 2; issue #18).
    g = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(chunk_seq + g)
    t0 = tl.load(chunk_tok + g)
    eos = tl.load(cu + n + 1)
    t, row, valid = chunk_rows(t0, eos, h, H, R, C, CRP)
    cidx = tl.arange(0, CQ)
    qrow = (t0 + cidx).to(tl.int64) * H + h
    qmask = ((t0 + cidx < eos) & (cidx < C))[:, None]
    st_base = (g.to(tl.int64) * H + h) * K * V
    dox = tl.zeros((CQ, CRP), tl.float32)
    dn = tl.zeros((CRP, CRP), tl.float32)
    beta_r = tl.zeros((CRP,), tl.float32)
    dbeta_r = tl.zeros((CRP,), tl.float32)
    if BETA:
        beta_r = tl.load(beta + row, mask=valid, other=0.0).to(tl.float32)
    for v0 in tl.range(0, v_len, BV):  # K-free part: du, dO X^T, dU X^T
        vv = v0 + tl.arange(0, BV)
        rvmask = valid[:, None] & (vv[None, :] < V)
        x_t = tl.load(xs + row[:, None] * V + vv[None, :], mask=rvmask, other=0.0)
        du_t = tl.load(du + row[:, None] * V + vv[None, :], mask=rvmask, other=0.0)  # [CRP, BV]
        do_t = tl.load(do + qrow[:, None] * V + vv[None, :], mask=qmask & (vv[None, :] < V), other=0.0)
        if BETA:
            v_t = tl.load(v + row[:, None] * V + vv[None, :], mask=rvmask, other=0.0).to(tl.float32)
            dbeta_r += tl.sum(v_t * du_t.to(tl.float32), axis=1)
        dox += tl.dot(do_t, tl.trans(x_t), input_precision=PREC)
        dn += tl.dot(du_t, tl.trans(x_t), input_precision=PREC)
    dp = tl.where(cidx[:, None] >= t[None, :], dox * scale, 0.0).to(q.dtype.element_ty)
    dn = tl.where(solve_mask(t, CRP, PRODUCT), dn, 0.0).to(q.dtype.element_ty)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        live = (t0 + 0 * kk) < eos  # surplus chunks of the map (no state written) read zeros
        rkmask = valid[:, None] & kmask[None, :]
        b_t = tl.load(b + row[:, None] * K + kk[None, :], mask=rkmask, other=0.0)
        if BETA:
            a_t = scale_rows(b_t, -beta_r)
        else:
            a_t = tl.load(a + row[:, None] * K + kk[None, :], mask=rkmask, other=0.0)
        q_t = tl.load(q + qrow[:, None] * K + kk[None, :], mask=qmask & kmask[None, :], other=0.0)
        dq_t = tl.zeros((CQ, BK), tl.float32)
        da_t = tl.dot(dn, b_t, input_precision=PREC)
        db_t = tl.dot(tl.trans(dp), q_t, input_precision=PREC) + tl.dot(
            tl.trans(dn), a_t, input_precision=PREC
        )
        for v0 in range(0, v_len, BV):
            vv = v0 + tl.arange(0, BV)
            vmask = vv < V
            rvmask = valid[:, None] & vmask[None, :]
            hv = (live & kmask)[:, None] & vmask[None, :]
            s0 = tl.load(states + st_base + kk[:, None] * V + vv[None, :], mask=hv, other=0.0).to(a_t.dtype)
            ds1 = tl.load(dstates + st_base + kk[:, None] * V + vv[None, :], mask=hv, other=0.0).to(a_t.dtype)
            x_t = tl.load(xs + row[:, None] * V + vv[None, :], mask=rvmask, other=0.0)
            do_t = tl.load(do + qrow[:, None] * V + vv[None, :], mask=qmask & vmask[None, :], other=0.0)
            du_t = tl.load(du + row[:, None] * V + vv[None, :], mask=rvmask, other=0.0).to(a_t.dtype)
            dq_t += tl.dot(do_t, tl.trans(s0), input_precision=PREC)
            da_t += tl.dot(du_t, tl.trans(s0), input_precision=PREC)
            db_t += tl.dot(x_t, tl.trans(ds1), input_precision=PREC)
        dq_t = dq_t * scale + tl.dot(dp, b_t, input_precision=PREC)
        tl.store(
            dq + qrow[:, None] * K + kk[None, :], dq_t.to(dq.dtype.element_ty), mask=qmask & kmask[None, :]
        )
        if BETA:
            dbeta_r -= tl.sum(b_t.to(tl.float32) * da_t, axis=1)
            db_t -= beta_r[:, None] * da_t
        else:
            tl.store(da + row[:, None] * K + kk[None, :], da_t.to(da.dtype.element_ty), mask=rkmask)
        tl.store(db + row[:, None] * K + kk[None, :], db_t.to(db.dtype.element_ty), mask=rkmask)
    if BETA:
        tl.store(dbeta + row, dbeta_r, mask=valid)
    if BETA:  # dv = beta du over du, once every thread has read it above
        tl.debug_barrier()
        for v0 in range(0, v_len, BV):
            vv = v0 + tl.arange(0, BV)
            rvmask = valid[:, None] & (vv[None, :] < V)
            du_t = tl.load(du + row[:, None] * V + vv[None, :], mask=rvmask, other=0.0).to(tl.float32)
            tl.store(
                du + row[:, None] * V + vv[None, :],
                (beta_r[:, None] * du_t).to(du.dtype.element_ty),
                mask=rvmask,
            )


def launch_chunk_bwd(
    q,
    a,
    b,
    xs,
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
    beta=None,
    v=None,
):
    """Gradients of the chunked forward. Shapes as in the forward ([TT, H, ...] flattened tokens);
    xs = X [TT, H, R, V] and states [G, H, K, V] as saved by the forward scan, tmat = T [G, H, CRP, CRP].

    Returns (dq, da, db, du, dh0): input dtype, dh0 [N, H, K, V] fp32 or None. Beta form (a None, b = k,
    v [TT, H, R, V] and beta [TT, H, R] given): (dq, dk, dv, dbeta, dh0), dbeta fp32.
    """
    total, n_heads, rank, k_dim = b.shape
    v_dim = xs.shape[-1]
    n_seq = cu.numel() - 1
    seq, tok, off = cmap
    crp = max(16, next_pow2(chunk * rank))
    bk = max(16, next_pow2(k_dim))
    prec = dot_precision(b.dtype)
    dstates = new_like(states)
    du = new_like(xs)  # du = T^T dX from the dh kernel; dv = beta du in beta form, from the chunk kernel
    local_dx = bool(TUNE["bwd_local_dx"])
    dx = new_like(xs) if local_dx else None  # its local part scale P^T dO
    dh0 = (
        new_tensor((n_seq, n_heads, k_dim, v_dim), dtype=torch.float32, device=q.device) if need_dh0 else None
    )
    bv = scan_block_v(n_seq * n_heads, v_dim, k_dim)
    if local_dx:
        _bwd_local_dx_kernel[(seq.numel(), n_heads)](
            q,
            b,
            do,
            dx,
            seq,
            tok,
            cu,
            scale,
            k_dim,
            v_dim,
            H=n_heads,
            K=k_dim,
            V=v_dim,
            R=rank,
            C=chunk,
            CQ=max(16, chunk),
            CRP=crp,
            BK=max(32, min(64, bk)),
            BV=max(32, min(64, next_pow2(v_dim))),
            PREC=prec,
            num_warps=TUNE["par_warps"],
        )
    grid = (triton.cdiv(v_dim, bv), n_seq * n_heads)
    cq = max(16, chunk)  # Q and dO rows
    with_beta = beta is not None
    stages, _ = scan_launch(
        ScanTiles(crp, cq, cq, bk, bv, b.dtype, from_t=True), grid[0] * grid[1], multiprocessors(b.device)
    )
    _bwd_dh_kernel[grid](
        q,
        b if a is None else a,
        b,
        beta if with_beta else b,
        tmat,
        do,
        du if dx is None else dx,
        du,
        dh0 if need_dh0 else du,
        dht if dht is not None else du,
        dstates,
        cu,
        off,
        scale,
        H=n_heads,
        K=k_dim,
        V=v_dim,
        R=rank,
        C=chunk,
        CQ=max(16, chunk),
        CRP=crp,
        BK=bk,
        BV=bv,
        HAS_DH0=need_dh0,
        HAS_DHT=dht is not None,
        LOCAL_DX=local_dx,
        BETA=with_beta,
        PREC=prec,
        num_warps=TUNE["scan_warps"],
        num_stages=stages,
    )
    dq, db = new_like(q), new_like(b)
    da = new_like(b) if not with_beta else None
    dbeta = new_tensor(beta.shape, dtype=torch.float32, device=b.device) if with_beta else None
    _bwd_chunk_kernel[(seq.numel(), n_heads)](
        q,
        b if a is None else a,
        b,
        v if with_beta else b,
        beta if with_beta else b,
        xs,
        do,
        states,
        dstates,
        du,
        dq,
        db if da is None else da,
        db,
        dbeta if with_beta else db,
        seq,
        tok,
        cu,
        scale,
        v_dim,
        H=n_heads,
        K=k_dim,
        V=v_dim,
        R=rank,
        C=chunk,
        CQ=max(16, chunk),
        CRP=crp,
        BK=max(32, min(TUNE["par_bk"], bk)),  # tiles of at least 32: K, V = 16 compile as the 32-wide case
        BV=max(32, min(TUNE["par_bv"], next_pow2(v_dim))),
        PRODUCT=product,
        BETA=with_beta,
        PREC=prec,
        num_warps=TUNE["par_warps"],
        num_stages=TUNE["par_stages"],
    )
    if with_beta:
        return dq, db, du, dbeta, dh0
    return dq, da, db, du, dh0
