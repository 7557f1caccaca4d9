"""sigDelta W/U stage in Triton (algorithm.md section 4): a drop-in for the tensorInv W/U stage.

`sigdelta_wu(a, b, u, mode=..., chunk_size=..., cu_seqlens=None) -> (w, uu)` has the signature and the
result of `tensor_inv_wu`: per chunk of C tokens, rows (t, r) flattened t-major,

    (I - M * A B^T) [W | U] = [A | U~]       M: sum s < t, product (s, j) < (t, i) lexicographic

but W and U are built by the one-sided sigDelta sweep instead of a triangular inverse. With grid tokens
(the C tokens in the sum form; the C*R rows, each of rank 1, in the product form) and G(k, m) = A_k B_m^T:

    W(0, k) = A_k,     W(m + 1, k) = W(m, k) + G(k, m) W(m, m)   for all k > m,     W_k = W(k, k)

(U the same from U(0, k) = U~_k with the same coefficients). Depth C steps (C*R in product form), each
a rank-R (rank-1) update of every later row. The kernel runs this sweep blocked, one program per
(chunk, head) and one launch per right-hand side (A -> W, then U~ -> U; same coefficients):

- blocks of BT tokens (BR = BT * RP rows, rank padded to a power of two RP with zero rows);
- entering block i, the BT*i sweep steps of the earlier blocks are applied at once (they only add
  G(k, m) W(m, m) terms whose W(m, m) are final): acc_i = X_i + sum_{j<i} (A_i B_j^T) Y_j, a
  tensor-core product; Y_j are the rows this program already stored (read back from w or uu);
- inside the block the sweep runs step by step (s = 0..steps-1, N_s = N_ii masked to the columns of
  step s, so one step is the rank-R update G(k, s) W(s, s) of every later row, kept on tensor cores):
  `solve="direct"`: acc += N_s @ acc on the W (or U) rows themselves (the literal recursion);
  `solve="blockinv"`: the same sweep on the block's identity, E += N_s @ E, which gives
  E = (I - N_ii)^-1 (W(m, k) is linear in its boundary data), then acc = E @ acc once: the steps work
  on [BR, BR] instead of [BR, K + V];
  `solve="parallel"`: the blockinv sweeps of all NB blocks of the chunk run together before the chain
  (batched [NB, BR, BR] products; they do not depend on it), so one program makes steps + NB
  sequential moves instead of NB * steps.

All three are forward substitution, so as stable as the token loop. A power-series shortcut
(I - N)^-1 = prod_s (I + N^(2^s)) (log2 depth) was measured and dropped: with correlated keys its
terms grow like binomials before cancelling (fp32 relative error 3e4 at 64 rows, 1e-3 at 16 rows
with beta near 2; benchmarks/SIGDELTA.md). tests/test_triton_sigdelta.py checks correlated keys.

Products run at `triton_utils.dot_precision` (3xTF32 for fp32 inputs, TF32 for the fp32 products of
bf16/fp16 inputs); rows Y_j of earlier blocks are read back in the output dtype. Backward: the
tensorInv backward (W, U are the same; it recomputes T). Measurements, the variant table and the
crossover: benchmarks/SIGDELTA.md.
"""

from torch import Tensor

try:
    import triton
    import triton.language as tl

    from .triton_utils import dot_precision, new_like, next_pow2, varlen_layout
except ImportError:  # the torch backend works without triton
    triton = None

MODES = ("sum", "product")
SOLVES = ("direct", "blockinv", "parallel")
# Forward: the smallest C * R from which sigDelta's W/U stage (and the op's forward) beats tensorInv's, per
# padded rank; tensorInv does not run at all from C * R = 256 (shared memory). First measured on an H100
# (benchmarks/SIGDELTA.md: 32 / 32 / 64 / 128). Since tensorInv's W/U kernel reads the rows of N from
# scratch and forms W, U with bf16 dots (e5d05c2), on an H200 at 2048 x 16, H = 16, K = V = 128, bf16
# (benchmarks/results/h200_e5d05c2): R = 1 forward 1.03 ms with tensorInv against 1.54 with sigDelta;
# at R = 4 tensorInv's W/U + scan kernels take 2.22 + 1.96 ms against sigDelta's whole forward of 4.56
# (h200_a3c6c3c, h200_e109a40). R = 2 runs the same 64-row tiles; not timed. R = 8 (128 rows) not re-timed.
SIGDELTA_FROM_CR: dict[int, int] = {1: 128, 2: 128, 4: 128, 8: 128}
# Forward+backward: the backward needs T = (I - N)^-1, which tensorInv keeps from its forward and sigDelta
# recomputes, so tensorInv won at every shape measured (by 6 to 12 %): training keeps tensorInv.
# Fastest (block_rows, solve) per (mode, padded rank RP, C * R), same run; else 16 / 32 rows, blockinv.
BLOCK_CONFIG: dict[tuple[str, int, int], tuple[int, str]] = {
    ("product", 1, 256): (16, "parallel"),
    ("product", 2, 64): (16, "parallel"),
    ("product", 2, 256): (16, "parallel"),
    ("product", 4, 64): (16, "parallel"),
    ("product", 4, 256): (16, "blockinv"),
    ("product", 8, 256): (16, "blockinv"),
    ("sum", 1, 16): (32, "blockinv"),
    ("sum", 1, 32): (16, "parallel"),
    ("sum", 1, 64): (16, "parallel"),
    ("sum", 1, 128): (16, "parallel"),
    ("sum", 1, 256): (16, "blockinv"),
    ("sum", 2, 32): (16, "blockinv"),
    ("sum", 2, 64): (16, "parallel"),
    ("sum", 2, 128): (16, "blockinv"),
    ("sum", 2, 256): (32, "blockinv"),
    ("sum", 2, 512): (32, "blockinv"),
    ("sum", 4, 64): (16, "blockinv"),
    ("sum", 4, 128): (16, "blockinv"),
    ("sum", 4, 256): (32, "blockinv"),
    ("sum", 4, 512): (32, "blockinv"),
    ("sum", 8, 128): (32, "direct"),
    ("sum", 8, 256): (32, "direct"),
    ("sum", 8, 512): (32, "direct"),
}


def choose_wu_solver(rank: int, chunk_size: int, k_dim: int, v_dim: int, training: bool = False) -> str:
    """The faster W/U stage for this shape, "sigdelta" or "tensor_inv", from the measured crossovers.

    training: the op will run its backward (then tensorInv, whose forward already holds T, is faster).
    """
    if triton is None or training or max(k_dim, v_dim) > 256:
        return "tensor_inv"
    return "sigdelta" if chunk_size * rank >= SIGDELTA_FROM_CR[min(next_pow2(rank), 8)] else "tensor_inv"


def block_config(rank: int, chunk_size: int, mode: str = "sum") -> tuple[int, str]:
    """(block_rows, solve) the kernel uses by default: the measured table, else blockinv on 16 rows up to
    C * R = 128 and 32 rows beyond (fewer re-reads of earlier blocks)."""
    rows = next_pow2(chunk_size * rank)
    return BLOCK_CONFIG.get((mode, next_pow2(rank), rows), (16 if rows <= 128 else 32, "blockinv"))


if triton is not None:

    @triton.jit
    def _block_solve(acc, n_ii, rows, step, SOLVE: tl.constexpr, NSTEP: tl.constexpr, PREC: tl.constexpr):
        """(I - n_ii) Y = acc by the sweep, n_ii [BR, BR] strictly lower in step; acc [BR, BD]."""
        if SOLVE == 0:
            for s in range(NSTEP):  # one sigDelta step: every later row takes G(k, s) W(s, s)
                acc += tl.dot(tl.where(step[None, :] == s, n_ii, 0.0), acc, input_precision=PREC)
        else:
            e_ii = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)  # boundary data: the identity
            for s in range(NSTEP):
                e_ii += tl.dot(tl.where(step[None, :] == s, n_ii, 0.0), e_ii, input_precision=PREC)
            acc = tl.dot(e_ii, acc, input_precision=PREC)
        return acc

    @triton.jit
    def _row_offsets(
        n_tok,
        tok0,
        H: tl.constexpr,
        R: tl.constexpr,
        D: tl.constexpr,
        BT: tl.constexpr,
        RP: tl.constexpr,
        BD: tl.constexpr,
    ):
        """int32 offsets [BT*RP, BD] of rows (tok0 + t, r) from the chunk-and-head base, and their mask."""
        rows = tl.arange(0, BT * RP)
        tok, rank = tok0 + rows // RP, rows % RP
        cols = tl.arange(0, BD)
        offs = (tok * (H * R) + rank)[:, None] * D + cols[None, :]
        return offs, ((tok < n_tok) & (rank < R))[:, None] & (cols < D)[None, :]

    @triton.jit
    def _load_rows(
        base,
        n_tok,
        tok0,
        H: tl.constexpr,
        R: tl.constexpr,
        D: tl.constexpr,
        BT: tl.constexpr,
        RP: tl.constexpr,
        BD: tl.constexpr,
    ):
        """Rows (t, r) of BT tokens as [BT * RP, BD]; rows past the chunk end or r >= R read as zero."""
        offs, mask = _row_offsets(n_tok, tok0, H, R, D, BT, RP, BD)
        return tl.load(base + offs, mask=mask, other=0.0)

    @triton.jit
    def _store_rows(
        base,
        x,
        n_tok,
        tok0,
        H: tl.constexpr,
        R: tl.constexpr,
        D: tl.constexpr,
        BT: tl.constexpr,
        RP: tl.constexpr,
        BD: tl.constexpr,
    ):
        offs, mask = _row_offsets(n_tok, tok0, H, R, D, BT, RP, BD)
        tl.store(base + offs, x.to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _all_block_inverses(
        a_ptr,
        b_ptr,
        t0,
        n_tok,
        i_h,
        blk,
        rows,
        r_tok,
        r_rank,
        step,
        H: tl.constexpr,
        R: tl.constexpr,
        K: tl.constexpr,
        BT: tl.constexpr,
        BR: tl.constexpr,
        NB: tl.constexpr,
        BK: tl.constexpr,
        KB: tl.constexpr,
        NSTEP: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """(I - N_ii)^-1 of every block of the chunk [NB, BR, BR]: the sweep on all identities at once."""
        tok3 = blk[:, None, None] * BT + r_tok[None, :, None]  # [NB, BR, 1]
        m3 = (tok3 < n_tok) & (r_rank[None, :, None] < R)
        row3 = ((t0 + tok3) * H + i_h) * R + r_rank[None, :, None]
        g3 = tl.zeros((NB, BR, BR), tl.float32)
        for k0 in tl.static_range(0, BK, KB):
            kk = k0 + tl.arange(0, KB)
            off, msk = row3 * K + kk[None, None, :], m3 & (kk < K)[None, None, :]
            a3 = tl.load(a_ptr + off, mask=msk, other=0.0)
            b3 = tl.load(b_ptr + off, mask=msk, other=0.0)
            g3 += tl.dot(a3, tl.permute(b3, (0, 2, 1)), input_precision=PREC)  # diagonal Gram blocks
        n3 = tl.where(step[None, None, :] < step[None, :, None], g3, 0.0)
        e3 = (
            tl.zeros((NB, BR, BR), tl.float32)
            + tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)[None, :, :]
        )
        for s in range(NSTEP):
            e3 += tl.dot(tl.where(step[None, None, :] == s, n3, 0.0), e3, input_precision=PREC)
        return e3

    @triton.jit
    def _sigdelta_wu_kernel(
        a_ptr,
        b_ptr,
        x_ptr,
        y_ptr,
        chunk_seq,
        chunk_tok,
        cu,
        H: tl.constexpr,
        R: tl.constexpr,
        K: tl.constexpr,
        D: tl.constexpr,
        C: tl.constexpr,
        RP: tl.constexpr,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BD: tl.constexpr,
        PRODUCT: tl.constexpr,
        SOLVE: tl.constexpr,
        NSTEP: tl.constexpr,
        NB: tl.constexpr,
        KB: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """One program per (chunk, head): (I - N) Y = X for the chunk's rows, block of BT tokens after block.

        X, Y [B*T*H*R, D] are A, W (D = K) or U~, U (D = V): one launch each, same coefficients N.
        """
        i_c = tl.program_id(0)
        i_h = tl.program_id(1)
        t0 = tl.load(chunk_tok + i_c).to(tl.int64)
        eos = tl.load(cu + tl.load(chunk_seq + i_c) + 1).to(tl.int64)
        n_tok = tl.maximum(tl.minimum(eos - t0, C), 0).to(tl.int32)  # surplus chunks: 0
        BR: tl.constexpr = BT * RP
        rows = tl.arange(0, BR)
        r_tok = rows // RP
        r_rank = rows % RP
        if PRODUCT:
            step = rows  # product form: each (token, rank) row is one grid token
        else:
            step = r_tok
        blk = tl.arange(0, NB)
        if SOLVE == 2:  # the in-block sweeps of all NB blocks at once, on their identities
            args = (a_ptr, b_ptr, t0, n_tok, i_h, blk, rows, r_tok, r_rank, step)
            e3 = _all_block_inverses(*args, H, R, K, BT, BR, NB, BK, KB, NSTEP, PREC)
        off = (t0 * H + i_h) * R  # first row of this chunk and head in [B*T*H*R]
        a_base, b_base, x_base, y_base = a_ptr + off * K, b_ptr + off * K, x_ptr + off * D, y_ptr + off * D
        for i in range(0, tl.cdiv(n_tok, BT)):
            a_i = _load_rows(a_base, n_tok, i * BT, H, R, K, BT, RP, BK)
            if SOLVE != 2:
                b_i = _load_rows(b_base, n_tok, i * BT, H, R, K, BT, RP, BK)
                n_ii = tl.dot(a_i, tl.trans(b_i), input_precision=PREC)
                n_ii = tl.where(step[None, :] < step[:, None], n_ii, 0.0)  # mask M inside the block
            acc = _load_rows(x_base, n_tok, i * BT, H, R, D, BT, RP, BD).to(tl.float32)
            for j in range(0, i):  # the sweep steps of earlier blocks, applied at once
                b_j = _load_rows(b_base, n_tok, j * BT, H, R, K, BT, RP, BK)
                n_ij = tl.dot(a_i, tl.trans(b_j), input_precision=PREC)  # G(k, m), k in block i, m in j
                y_j = _load_rows(y_base, n_tok, j * BT, H, R, D, BT, RP, BD)  # final W(m, m), stored
                acc += tl.dot(n_ij, y_j.to(tl.float32), input_precision=PREC)
            if SOLVE == 2:
                e_ii = tl.sum(tl.where(blk[:, None, None] == i, e3, 0.0), axis=0)  # (I - N_ii)^-1
                acc = tl.dot(e_ii, acc, input_precision=PREC)
            else:
                acc = _block_solve(acc, n_ii, rows, step, SOLVE, NSTEP, PREC)
            _store_rows(y_base, acc, n_tok, i * BT, H, R, D, BT, RP, BD)
            tl.debug_barrier()  # the next blocks read these rows back (other threads of this program)


def sigdelta_wu(
    a: Tensor,
    b: Tensor,
    u: Tensor,
    *,
    mode: str,
    chunk_size: int,
    cu_seqlens: Tensor | None = None,
    block_rows: int | None = None,
    solve: str | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunk-local W and U by the sigDelta sweep (same contract as `tensor_inv_wu`).

    a, b [B, T, H, R, K]; u [B, T, H, R, V]; cu_seqlens int [N + 1] or a PackedSequences (B == 1) restarts
    chunks per sequence.
    Returns w [B, T, H, R, K], uu [B, T, H, R, V] in the inputs' dtype (float32 arithmetic).
    block_rows: rows per block (tokens per block = block_rows / RP, at least 16 rows); solve: "direct" or
    "blockinv" (see the module docstring); None takes `block_config`. num_warps None: 4, or 8 for
    blocks of more than 8K fp32 accumulator values.
    """
    if triton is None:
        raise ImportError("sigdelta_wu needs triton")
    if block_rows is None or solve is None:
        default_rows, default_solve = block_config(a.shape[3], chunk_size, mode)
        block_rows = default_rows if block_rows is None else block_rows
        solve = default_solve if solve is None else solve
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if solve not in SOLVES:
        raise ValueError(f"solve must be one of {SOLVES}, got {solve!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if a.dim() != 5 or b.shape != a.shape or u.dim() != 5 or u.shape[:4] != a.shape[:4]:
        raise ValueError(
            f"a, b must be [B, T, H, R, K] and u [B, T, H, R, V], got a {list(a.shape)}, "
            f"b {list(b.shape)}, u {list(u.shape)}"
        )
    bsz, seq_len, heads, rank, key_dim = a.shape
    val_dim = u.shape[-1]
    if max(key_dim, val_dim) > 256:
        raise ValueError(f"K and V must be at most 256, got K = {key_dim}, V = {val_dim}")
    if cu_seqlens is not None and bsz != 1:
        raise ValueError(f"cu_seqlens needs B == 1, got B = {bsz}")
    a, b, u = a.contiguous(), b.contiguous(), u.contiguous()
    w, uu = new_like(a), new_like(u)
    rank_p = next_pow2(rank)
    tokens = max(1, min(block_rows // rank_p, next_pow2(chunk_size)))
    tokens = max(tokens, 16 // rank_p)  # tl.dot needs 16 rows
    steps = tokens * rank_p if mode == "product" else tokens
    rows = tokens * rank_p
    bk = max(16, next_pow2(key_dim))
    n_blocks = next_pow2(-(-chunk_size // tokens))
    if num_warps is None:
        big = rows * max(bk, next_pow2(val_dim)) > 4096 or (
            solve == "parallel" and n_blocks * rows * rows > 4096
        )
        num_warps = 8 if big else 4
    cu, cmap = varlen_layout(bsz, seq_len, cu_seqlens, chunk_size, a.device)
    for x, y, dim in ((a, w, key_dim), (u, uu, val_dim)):  # W then U: same sweep, other right-hand side
        _sigdelta_wu_kernel[(cmap[0].numel(), heads)](
            a,
            b,
            x,
            y,
            cmap[0],
            cmap[1],
            cu,
            H=heads,
            R=rank,
            K=key_dim,
            D=dim,
            C=chunk_size,
            RP=rank_p,
            BT=tokens,
            BK=bk,
            BD=max(16, next_pow2(dim)),
            PRODUCT=mode == "product",
            SOLVE=SOLVES.index(solve),
            NSTEP=steps,
            NB=n_blocks,
            KB=min(bk, 32),
            PREC=dot_precision(a.dtype),
            num_warps=num_warps,
        )
    return w, uu
