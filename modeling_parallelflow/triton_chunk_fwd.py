"""Forward of the chunked tensorInv delta rule in Triton (algorithm.md section 3), two launches.

1. `_wu_kernel`, one program per (chunk, head), all chunks in parallel: Gram N = M * (A B^T) and the
   inverse T = (I - N)^-1 (16 x 16 diagonal blocks by forward substitution, then block doubling with
   tensor-core dots) in fp32, written to HBM in the input dtype. W = T A and U = T U~ are formed only for
   `tensor_inv_wu` and where a chunk has 128 rows.
2. `_fwd_scan_kernel`, one program per (sequence, head, V block), sequential over chunks: the fp32
   state h [K, BV] stays in registers; each chunk computes X = T (A h + U~) (= W h + U; in beta form
   A h + U~ = beta (v - k h), from k, v and beta as given), o = scale (Q h + P X) with P = (Q B^T) * M_out,
   then h += B^T X. Reading T [CRP, CRP] instead of W [CRP, K] costs no more bytes at K >= CRP and saves
   writing W and U and reading them back, in the forward and in the backward's rerun. Outputs are written in
   the same pass, so per-chunk states and X go to HBM only when the backward asks for them (STORE_STATES).
   The backward's rerun of the scan (recomputed states) skips o (WRITE_O off).
   Measured against a split (a states-only scan, then a chunk-parallel output kernel, as fla does): on an
   H200 at 2048 x 16, H = 16, R = 1 the split scan took 0.53 ms and its output kernel 0.26, the fused
   scan 0.70; forward 1.63 ms split against 1.54 fused (benchmarks/results/h200_e109a40).

The W/U stage is swappable: `tensor_inv_wu` here, `sigdelta_wu` in triton_sigdelta.py, same signature; the
scan takes sigdelta's W and U as they come (FROM_T off).
"""

import torch
import triton
import triton.language as tl

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
    token_tile,
    varlen_layout,
)


@triton.jit
def unit_lower_inverse(scr, CRP: tl.constexpr, LOG_NB: tl.constexpr, PREC: tl.constexpr):
    """(I - N)^-1 for a strictly lower-triangular N [CRP, CRP] (fp32) that this program stored at scr.

    The 16 x 16 diagonal blocks are inverted by forward substitution on a [NB, 16, 16] tile, row i of N
    read from scr at step i (measured faster than extracting it from a register tile with a reduction:
    R = 1 forward + backward 3.09 -> 2.91 ms on an H200), written back over the diagonal, then the blocks
    are merged pairwise (m -> 2m) with tensor-core products: D <- D + D E D, E the sub-diagonal m-blocks
    of N. scr holds N again except on its diagonal blocks on return. Going through scr (L1/L2) keeps no
    large tile alive.
    """
    NB: tl.constexpr = CRP // 16
    bi = tl.arange(0, NB)
    ii = tl.arange(0, 16)
    diag = (
        scr + (bi[:, None, None] * 16 + ii[None, :, None]) * CRP + bi[:, None, None] * 16 + ii[None, None, :]
    )
    td = tl.where(ii[:, None] == ii[None, :], 1.0, 0.0)[None, :, :] + tl.zeros((NB, 16, 16), tl.float32)
    for i in tl.static_range(1, 16):  # row i of each block: e_i + sum_{j<i} N[i, j] T[j, :]
        sel = ii[None, :, None] == i
        n_i = tl.load(scr + (bi[:, None] * 16 + i) * CRP + bi[:, None] * 16 + ii[None, :])  # [NB, 16]
        new = tl.sum(n_i[:, :, None] * td, axis=1)  # [NB, 16]
        td = tl.where(sel, td + new[:, None, :], td)
    tl.debug_barrier()
    tl.store(diag, td)
    tl.debug_barrier()
    rows = tl.arange(0, CRP)
    grid = scr + rows[:, None] * CRP + rows[None, :]
    inv = tl.load(grid, mask=(rows[:, None] // 16) == (rows[None, :] // 16), other=0.0)
    for lvl in tl.static_range(LOG_NB):  # merge m-blocks into 2m-blocks
        blk = rows // (16 << lvl)
        sub = ((blk[:, None] % 2) == 1) & (blk[None, :] == blk[:, None] - 1)
        e_mat = tl.load(grid, mask=sub, other=0.0)
        inv = inv + tl.dot(tl.dot(inv, e_mat, input_precision=PREC), inv, input_precision=PREC)
    return inv


@triton.jit
def solve_mask(t, CRP: tl.constexpr, PRODUCT: tl.constexpr):
    """M of algorithm.md: sum form row (t,i) sees (s,j) iff s < t; product form iff (s,j) < (t,i)."""
    if PRODUCT:
        j = tl.arange(0, CRP)
        return j[:, None] > j[None, :]
    else:
        return t[:, None] > t[None, :]


@triton.jit
def _wu_kernel(
    a,
    b,
    u,
    beta,
    w,
    uu,
    scratch,
    tmat,
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
    BKS: tl.constexpr,
    BV: tl.constexpr,
    LOG_NB: tl.constexpr,
    PRODUCT: tl.constexpr,
    COMPUTE_WU: tl.constexpr,
    BETA: tl.constexpr,
    PREC: tl.constexpr,
    INV_PREC: tl.constexpr,
    LOW_DOTS: tl.constexpr,
):
    """One (chunk, head): N = M * (A B^T) -> T = (I - N)^-1, formed in fp32 through `scratch` and kept in
    tmat (input dtype; tmat may be scratch) -> with COMPUTE_WU, W = T A and U = T U~ (the forward scan forms
    X from T itself: `_fwd_scan_kernel` FROM_T).

    BETA: the drivers come as b = k, u = v and beta [TT, H, R]; a = -beta k and U~ = beta v are built
    in registers (`scale_rows`), never in HBM. LOW_DOTS: W and U dots in the input dtype (bf16 / fp16)."""
    g = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(chunk_seq + g)
    t0 = tl.load(chunk_tok + g)
    eos = tl.load(cu + n + 1)
    t, row, valid = chunk_rows(t0, eos, h, H, R, C, CRP)
    beta_r = tl.zeros((CRP,), tl.float32)
    if BETA:
        beta_r = tl.load(beta + row, mask=valid, other=0.0).to(tl.float32)
    j = tl.arange(0, CRP)
    tile = (g.to(tl.int64) * H + h) * CRP * CRP
    scr = scratch + tile
    gram = tl.zeros((CRP, CRP), tl.float32)
    for k0 in tl.static_range(0, BK, BKS):  # K in slices keeps the register tiles small
        kk = k0 + tl.arange(0, BKS)
        kmask = valid[:, None] & (kk[None, :] < K)
        b_t = tl.load(b + row[:, None] * K + kk[None, :], mask=kmask, other=0.0)
        if BETA:
            a_t = scale_rows(b_t, -beta_r)
        else:
            a_t = tl.load(a + row[:, None] * K + kk[None, :], mask=kmask, other=0.0)
        gram += tl.dot(a_t, tl.trans(b_t), input_precision=PREC)
    tl.store(scr + j[:, None] * CRP + j[None, :], tl.where(solve_mask(t, CRP, PRODUCT), gram, 0.0))
    tl.debug_barrier()
    t_inv = unit_lower_inverse(scr, CRP, LOG_NB, INV_PREC)
    tl.debug_barrier()
    tl.store(tmat + tile + j[:, None] * CRP + j[None, :], t_inv.to(tmat.dtype.element_ty))
    if COMPUTE_WU:
        for k0 in tl.static_range(0, BK, BKS):
            kk = k0 + tl.arange(0, BKS)
            kmask = valid[:, None] & (kk[None, :] < K)
            if BETA:
                a_t = scale_rows(tl.load(b + row[:, None] * K + kk[None, :], mask=kmask, other=0.0), -beta_r)
            else:
                a_t = tl.load(a + row[:, None] * K + kk[None, :], mask=kmask, other=0.0)
            if LOW_DOTS:
                w_t = tl.dot(t_inv.to(a_t.dtype), a_t)  # [CRP, BKS]
            else:
                w_t = tl.dot(t_inv, a_t.to(tl.float32), input_precision=PREC)  # [CRP, BKS]
            tl.store(w + row[:, None] * K + kk[None, :], w_t.to(w.dtype.element_ty), mask=kmask)
        for v0 in tl.static_range(0, V, BV):
            vv = v0 + tl.arange(0, BV)
            vmask = valid[:, None] & (vv[None, :] < V)
            u_t = tl.load(u + row[:, None] * V + vv[None, :], mask=vmask, other=0.0)
            if BETA:
                u_t = scale_rows(u_t, beta_r)
            if LOW_DOTS:
                uu_t = tl.dot(t_inv.to(u_t.dtype), u_t)
            else:
                uu_t = tl.dot(t_inv, u_t.to(tl.float32), input_precision=PREC)
            tl.store(uu + row[:, None] * V + vv[None, :], uu_t.to(uu.dtype.element_ty), mask=vmask)


@triton.jit
def local_scores(
    q,
    b,
    t0,
    eos,
    h,
    t,
    row,
    valid,
    k_len,
    H: tl.constexpr,
    K: tl.constexpr,
    C: tl.constexpr,
    CQ: tl.constexpr,
    CRP: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """P = (Q B^T) * M_out [CQ, CRP] fp32 of the chunk starting at token t0, whose rows (t, row, valid) come
    from `chunk_rows`; K in tiles of BK up to the run-time bound k_len = K. Also returns the query rows [CQ]
    and their mask [CQ, 1]."""
    cidx = tl.arange(0, CQ)
    qrow = (t0 + cidx).to(tl.int64) * H + h
    qmask = ((t0 + cidx < eos) & (cidx < C))[:, None]
    p = tl.zeros((CQ, CRP), tl.float32)
    for k0 in range(0, k_len, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        q_t = tl.load(q + qrow[:, None] * K + kk[None, :], mask=qmask & kmask[None, :], other=0.0)
        b_t = tl.load(b + row[:, None] * K + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        p += tl.dot(q_t, tl.trans(b_t), input_precision=PREC)
    return tl.where(cidx[:, None] >= t[None, :], p, 0.0), qrow, qmask


@triton.jit
def _fwd_local_p_kernel(
    q,
    b,
    pmat,
    chunk_seq,
    chunk_tok,
    cu,
    k_len,
    H: tl.constexpr,
    K: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
    CQ: tl.constexpr,
    CRP: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """pmat [G, H, CQ, CRP] (input dtype) = P of every chunk, for the scan's LOAD_P."""
    g = tl.program_id(0)
    h = tl.program_id(1)
    t0 = tl.load(chunk_tok + g)
    eos = tl.load(cu + tl.load(chunk_seq + g) + 1)
    t, row, valid = chunk_rows(t0, eos, h, H, R, C, CRP)
    p, _, _ = local_scores(q, b, t0, eos, h, t, row, valid, k_len, H, K, C, CQ, CRP, BK, PREC)
    cidx = tl.arange(0, CQ)
    j = tl.arange(0, CRP)
    tl.store(
        pmat + ((g.to(tl.int64) * H + h) * CQ + cidx[:, None]) * CRP + j[None, :], p.to(pmat.dtype.element_ty)
    )


@triton.jit
def _fwd_scan_kernel(
    q,
    b,
    w,
    uu,
    tmat,
    beta,
    o,
    h0,
    ht,
    states,
    xs,
    pmat,
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
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    STORE_STATES: tl.constexpr,
    WRITE_O: tl.constexpr,
    LOAD_P: tl.constexpr,
    QUERY_AHEAD: tl.constexpr,
    FROM_T: tl.constexpr,
    BETA: tl.constexpr,
    PREC: tl.constexpr,
):
    """One (V block, sequence, head), sequential over its chunks: X = W h + U, h += B^T X; writes the
    entering state of every chunk and X with STORE_STATES, o = scale (Q h + P X) with WRITE_O, P read
    from pmat (`_fwd_local_p_kernel`) with LOAD_P instead of computed here for every V block.
    QUERY_AHEAD: Q is loaded one chunk ahead into registers, not through the pipeline (`scan_launch`).
    FROM_T: X = T (A h + U~) from the inverses T [G, H, CRP, CRP] of `_wu_kernel`, so W and U are never
    formed: w holds A and uu holds U~; BETA: a = -beta k is not read (w unused, uu = v, beta [TT, H, R]) and
    A h + U~ = beta (v - k h)."""
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
    if HAS_H0:
        state = tl.load(h0 + nh.to(tl.int64) * K * V + hv_off, mask=hv_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BK, BV), tl.float32)
    cidx = tl.arange(0, CQ)  # query rows, padded to 16 for tl.dot when C = 8
    if WRITE_O and QUERY_AHEAD:
        q_next = token_tile(q, bos, eos, h, kk, kmask, H, K, C, CQ)
    for i in range(tl.cdiv(eos - bos, C)):
        t0 = bos + i * C
        if WRITE_O and QUERY_AHEAD:  # Q one chunk ahead, in registers
            q_t = q_next
            q_next = token_tile(q, t0 + C, eos, h, kk, kmask, H, K, C, CQ)
        if STORE_STATES:
            st_ptr = states + ((g0 + i).to(tl.int64) * H + h) * K * V + hv_off
            tl.store(st_ptr, state.to(states.dtype.element_ty), mask=hv_mask)
        t, row, valid = chunk_rows(t0, eos, h, H, R, C, CRP)
        rk_mask = valid[:, None] & kmask[None, :]
        b_t = tl.load(b + row[:, None] * K + kk[None, :], mask=rk_mask, other=0.0)
        u_t = tl.load(uu + row[:, None] * V + vv[None, :], mask=valid[:, None] & vmask[None, :], other=0.0)
        s_in = state.to(b_t.dtype)
        if FROM_T:
            jj = tl.arange(0, CRP)
            t_mat = tl.load(tmat + (((g0 + i).to(tl.int64) * H + h) * CRP + jj[:, None]) * CRP + jj[None, :])
            if BETA:
                beta_r = tl.load(beta + row, mask=valid, other=0.0).to(tl.float32)
                y = beta_r[:, None] * (u_t.to(tl.float32) - tl.dot(b_t, s_in, input_precision=PREC))
            else:
                a_t = tl.load(w + row[:, None] * K + kk[None, :], mask=rk_mask, other=0.0)
                y = tl.dot(a_t, s_in, input_precision=PREC) + u_t.to(tl.float32)
            x = tl.dot(t_mat, y.to(b_t.dtype), input_precision=PREC)  # corrected values [CRP, BV]
        else:
            w_t = tl.load(w + row[:, None] * K + kk[None, :], mask=rk_mask, other=0.0)
            x = tl.dot(w_t, s_in, input_precision=PREC) + u_t.to(tl.float32)
        x_in = x.to(b_t.dtype)
        if STORE_STATES:
            tl.store(xs + row[:, None] * V + vv[None, :], x_in, mask=valid[:, None] & vmask[None, :])
        if WRITE_O:
            qtok = t0 + cidx
            qrow = qtok.to(tl.int64) * H + h
            qmask = ((qtok < eos) & (cidx < C))[:, None]
            if not QUERY_AHEAD:
                q_t = token_tile(q, t0, eos, h, kk, kmask, H, K, C, CQ)
            if LOAD_P:
                jj = tl.arange(0, CRP)
                p_off = (((g0 + i).to(tl.int64) * H + h) * CQ + cidx[:, None]) * CRP + jj[None, :]
                p = tl.load(pmat + p_off).to(b_t.dtype)
            else:
                p = tl.dot(q_t, tl.trans(b_t), input_precision=PREC)
                p = tl.where(cidx[:, None] >= t[None, :], p, 0.0).to(b_t.dtype)  # (Q B^T) * M_out [CQ, CRP]
            o_t = tl.dot(q_t, s_in, input_precision=PREC) + tl.dot(p, x_in, input_precision=PREC)
            tl.store(
                o + qrow[:, None] * V + vv[None, :],
                (o_t * scale).to(o.dtype.element_ty),
                mask=qmask & vmask[None, :],
            )
        state += tl.dot(tl.trans(b_t), x_in, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + nh.to(tl.int64) * K * V + hv_off, state, mask=hv_mask)


def low_dots_ok(dtype: torch.dtype, k_dim: int, v_dim: int) -> bool:
    """W = T A and U = T U~ as bf16 / fp16 dots: not for fp32 inputs, and not with 16-wide K or V slices,
    which Triton 3.6 on an H200 compiled into NaNs and illegal memory accesses (gpu_sweep at a3c6c3c)."""
    return dtype != torch.float32 and min(next_pow2(k_dim), next_pow2(v_dim)) >= 32


def scan_block_v(n_programs_nh: int, v_dim: int, k_dim: int) -> int:
    """V block of the sequential kernels: split V further when few (sequence, head) pairs fill the GPU."""
    bv = min(TUNE["scan_bv"], 64 if next_pow2(k_dim) <= 128 else 32)
    while bv > 16 and n_programs_nh * triton.cdiv(v_dim, bv) < TUNE["scan_min_programs"]:
        bv //= 2
    return min(bv, next_pow2(v_dim))


def launch_wu(a, b, u, cu, cmap, *, chunk: int, product: bool, compute_wu=True, beta=None):
    """a, b [TT, H, R, K], u [TT, H, R, V] (contiguous) -> (w, uu, t), t = T [G, H, CRP, CRP] (input dtype,
    rounded from fp32).

    Beta form: a None, b = k, u = v and beta [TT, H, R] (a = -beta k and U~ = beta v built in the kernel).
    compute_wu False: only T (w and uu None; u may be None)."""
    total, n_heads, rank, k_dim = b.shape
    v_dim = u.shape[-1] if u is not None else k_dim
    crp = max(16, next_pow2(chunk * rank))
    seq, tok, _ = cmap
    w = new_like(b) if compute_wu else None
    uu = new_like(u) if compute_wu else None
    scratch = new_tensor((seq.numel(), n_heads, crp, crp), dtype=torch.float32, device=b.device)
    tmat = scratch if b.dtype == torch.float32 else new_tensor(scratch.shape, dtype=b.dtype, device=b.device)
    _wu_kernel[(seq.numel(), n_heads)](
        b if a is None else a,
        b,
        u if compute_wu else b,
        b if beta is None else beta,
        w if compute_wu else b,
        uu if compute_wu else b,
        scratch,
        tmat,
        seq,
        tok,
        cu,
        H=n_heads,
        K=k_dim,
        V=v_dim,
        R=rank,
        C=chunk,
        CRP=crp,
        BK=max(16, next_pow2(k_dim)),
        BKS=min(32, max(16, next_pow2(k_dim))),
        BV=min(32, max(16, next_pow2(v_dim))),
        LOG_NB=(crp // 16).bit_length() - 1,
        PRODUCT=product,
        COMPUTE_WU=compute_wu,
        BETA=beta is not None,
        PREC=dot_precision(b.dtype),
        INV_PREC=dot_precision(b.dtype),
        LOW_DOTS=low_dots_ok(b.dtype, k_dim, v_dim),
        num_warps=TUNE["wu_warps"] if crp <= 64 else 8,
    )
    return w, uu, tmat


def launch_fwd_scan(
    q,
    b,
    w,
    uu,
    cu,
    cmap,
    h0,
    *,
    chunk: int,
    scale: float,
    out_dtype,
    store_ht: bool,
    store_states: bool,
    write_o: bool,
    n_chunks: int,
    states_dtype=None,
    tmat=None,
    beta=None,
):
    """q [TT, H, K]; b, w [TT, H, R, K]; uu [TT, H, R, V]; cmap = (chunk_seq, chunk_tok, chunk_off) ->
    o [TT, H, V] (None unless write_o), ht [N, H, K, V] fp32 or None, and with store_states the entering
    state of every chunk [G, H, K, V] and X [TT, H, R, V]. With TUNE["fwd_local_p"] and write_o, P comes
    from one chunk-parallel launch first (`_fwd_local_p_kernel`).

    With tmat (the inverses T [G, H, CRP, CRP] of `launch_wu`): w and uu are the drivers A and U~, and
    X = T (A h + U~); with beta [TT, H, R] too, w is None and uu = v (a = -beta k, U~ = beta v)."""
    total, n_heads, rank, k_dim = b.shape
    v_dim = uu.shape[-1]
    n_seq = cu.numel() - 1
    o = new_tensor((total, n_heads, v_dim), dtype=out_dtype, device=q.device) if write_o else None
    ht = (
        new_tensor((n_seq, n_heads, k_dim, v_dim), dtype=torch.float32, device=q.device) if store_ht else None
    )
    states = xs = None
    if store_states:
        states = new_tensor((n_chunks, n_heads, k_dim, v_dim), dtype=states_dtype, device=q.device)
        xs = new_like(uu)
    bv = scan_block_v(n_seq * n_heads, v_dim, k_dim)
    crp, bk = max(16, next_pow2(chunk * rank)), max(16, next_pow2(k_dim))
    chunk_seq, chunk_tok, chunk_off = cmap
    load_p = write_o and bool(TUNE["fwd_local_p"])
    pmat = None
    if load_p:
        cq = max(16, chunk)
        pmat = new_tensor((chunk_seq.numel(), n_heads, cq, crp), dtype=q.dtype, device=q.device)
        _fwd_local_p_kernel[(chunk_seq.numel(), n_heads)](
            q,
            b,
            pmat,
            chunk_seq,
            chunk_tok,
            cu,
            k_dim,
            H=n_heads,
            K=k_dim,
            R=rank,
            C=chunk,
            CQ=cq,
            CRP=crp,
            BK=max(32, min(64, bk)),
            PREC=dot_precision(b.dtype),
            num_warps=TUNE["par_warps"],
        )
    grid = (triton.cdiv(v_dim, bv), n_seq * n_heads)
    query_rows = max(16, chunk) if write_o else 0  # Q, read for o
    tiles = ScanTiles(crp, query_rows, 0, bk, bv, b.dtype, from_t=tmat is not None)
    stages, ahead = scan_launch(tiles, grid[0] * grid[1], multiprocessors(b.device), TUNE["scan_ahead"])
    _fwd_scan_kernel[grid](
        q,
        b,
        b if w is None else w,
        uu,
        b if tmat is None else tmat,
        b if beta is None else beta,
        o if write_o else b,
        h0 if h0 is not None else b,
        ht if store_ht else b,
        states if store_states else b,
        xs if store_states else b,
        pmat if load_p else b,
        cu,
        chunk_off,
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
        HAS_H0=h0 is not None,
        STORE_HT=store_ht,
        STORE_STATES=store_states,
        WRITE_O=write_o,
        LOAD_P=load_p,
        QUERY_AHEAD=ahead,
        FROM_T=tmat is not None,
        BETA=beta is not None,
        PREC=dot_precision(b.dtype),
        num_warps=TUNE["scan_warps"],
        num_stages=stages,
    )
    return o, ht, states, xs


def tensor_inv_wu(a, b, u, *, mode: str, chunk_size: int, cu_seqlens=None):
    """Chunk-local W and U (algorithm.md section 3): (I - N) W = A_rows, (I - N) U = U_rows per chunk.

    a, b [B, T, H, R, K], u [B, T, H, R, V]; chunks of `chunk_size` tokens (a power of two >= 16)
    restart at every sequence of `cu_seqlens` (a tensor [N + 1] or a PackedSequences; then B = 1).
    Returns w [B, T, H, R, K] and uu [B, T, H, R, V] in the input dtype (fp32 arithmetic inside).
    """
    batch, seq_len, n_heads, rank, k_dim = a.shape
    cu, cmap = varlen_layout(batch, seq_len, cu_seqlens, chunk_size, a.device)
    flat = [x.reshape(batch * seq_len, n_heads, rank, -1).contiguous() for x in (a, b, u)]
    w, uu, _ = launch_wu(*flat, cu, cmap, chunk=chunk_size, product=mode == "product")
    return w.view(a.shape), uu.view(u.shape)
