"""Chunked "tensorInv" algorithm (algorithm.md section 3) in torch: CPU fallback, differentiable by autograd.

Per chunk of C tokens the (token, rank) rows are flattened t-major (row t * R + r) into C * R rows:

    (I - M * A B^T) [W | U] = [A | U~]          unit lower-triangular solve, done for all chunks at once
    X = U + W h0                                corrected values          [C*R, V]
    o = scale * (Q h0 + ((Q B^T) * M_out) X)    M_out[t, (s, j)] = s <= t [C, V]
    h1 = h0 + B^T X                             state after the chunk     [K, V]

then a sequential loop over chunks carries h. See OPS.md for the derivation.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .packed import PackedSequences, host_bounds

WUSolver = Callable[[Tensor, Tensor, Tensor, str], tuple[Tensor, Tensor]]


def chunk_masks(chunk: int, rank: int, mode: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """Boolean masks of one chunk: M [C*R, C*R] (who feeds whom in the solve) and M_out [C, C*R].

    sum: row (t, i) sees (s, j) iff s < t; product: iff (s, j) < (t, i) lexicographically.
    """
    token = torch.arange(chunk, device=device).repeat_interleave(rank)  # token of each row
    if mode == "sum":
        m = token[:, None] > token[None, :]
    else:
        row = torch.arange(chunk * rank, device=device)
        m = row[:, None] > row[None, :]
    m_out = torch.arange(chunk, device=device)[:, None] >= token[None, :]
    return m, m_out


def chunk_wu(a_rows: Tensor, b_rows: Tensor, u_rows: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """W and U of every chunk by a unit lower-triangular solve (Proposition 3.4).

    a_rows, b_rows [..., C, R, K]; u_rows [..., C, R, V] (any leading dims, e.g. [B, H, n_chunks]).
    Returns W [..., C, R, K] and U [..., C, R, V]: row (t, r) is the driver of row (t, r) pushed
    through the flow of every row that precedes it in the chunk (mask M of `chunk_masks`).
    """
    chunk, rank, key_dim = a_rows.shape[-3:]
    a = a_rows.flatten(-3, -2)  # [..., C*R, K]
    b = b_rows.flatten(-3, -2)
    u = u_rows.flatten(-3, -2)  # [..., C*R, V]
    m, _ = chunk_masks(chunk, rank, mode, a.device)
    n = (a @ b.transpose(-1, -2)) * m  # N = M * G, [..., C*R, C*R]
    eye = torch.eye(chunk * rank, dtype=a.dtype, device=a.device)
    sol = torch.linalg.solve_triangular(eye - n, torch.cat([a, u], -1), upper=False, unitriangular=True)
    w, u_out = sol.split([key_dim, u.shape[-1]], -1)
    return w.unflatten(-2, (chunk, rank)), u_out.unflatten(-2, (chunk, rank))


def _to_chunks(x: Tensor, chunk: int) -> Tensor:
    """[B, T, H, ...] -> [B, H, n_chunks, C, ...], zero-padding T up to a multiple of C."""
    pad = -x.shape[1] % chunk
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.unflatten(1, (x.shape[1] // chunk, chunk))  # [B, n, C, H, ...]
    return x.movedim(3, 1)


def _chunk_sequences(
    q: Tensor, a: Tensor, b: Tensor, u: Tensor, h: Tensor, mode: str, chunk: int, wu_solver: WUSolver
) -> tuple[Tensor, Tensor]:
    """Equal-length batch. q (already scaled) [B, T, H, K], a, b [B, T, H, R, K], u [B, T, H, R, V],
    h [B, H, K, V] -> o [B, T, H, V], final h [B, H, K, V]. Padded tokens have zero drivers: no effect."""
    seq_len = q.shape[1]
    q_c = _to_chunks(q, chunk)  # [B, H, n, C, K]
    w, u_c = wu_solver(_to_chunks(a, chunk), _to_chunks(b, chunk), _to_chunks(u, chunk), mode)
    w, u_c = w.flatten(-3, -2), u_c.flatten(-3, -2)  # [B, H, n, C*R, K], [B, H, n, C*R, V]
    b_c = _to_chunks(b, chunk).flatten(-3, -2)  # [B, H, n, C*R, K]
    _, m_out = chunk_masks(chunk, a.shape[3], mode, q.device)
    attn = (q_c @ b_c.transpose(-1, -2)) * m_out  # [B, H, n, C, C*R]
    outputs = []
    for i in range(q_c.shape[2]):
        x = u_c[:, :, i] + w[:, :, i] @ h  # [B, H, C*R, V]
        outputs.append(q_c[:, :, i] @ h + attn[:, :, i] @ x)  # [B, H, C, V]
        h = h + b_c[:, :, i].transpose(-1, -2) @ x
    o = torch.stack(outputs, 2).movedim(1, 3).flatten(1, 2)  # [B, n*C, H, V]
    return o[:, :seq_len], h


def chunk_delta_rule(
    q: Tensor,
    a: Tensor,
    b: Tensor,
    u: Tensor,
    *,
    mode: str,
    scale: float,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | PackedSequences | None = None,
    chunk_size: int = 64,
    wu_solver: WUSolver = chunk_wu,
) -> tuple[Tensor, Tensor | None]:
    """Chunked delta rule on general drivers (no validation: `ops.delta_rule_drivers` does it).

    q [B, T, H, K]; a, b [B, T, H, R, K]; u [B, T, H, R, V]; initial_state [N, H, K, V] or None;
    cu_seqlens [N + 1] or a PackedSequences (B == 1): each sequence runs separately from its own initial
    state (a tensor's bounds are read to the host, a PackedSequences' are not).
    Computes in float64 when u is float64, else float32. `wu_solver` is `chunk_wu` or `sigdelta_wu`.
    Returns o [B, T, H, V] in u's dtype and the final state [N, H, K, V] in the compute dtype (or None).
    """
    out_dtype = u.dtype
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    bsz, _, heads, _, key_dim = a.shape
    bounds = None if cu_seqlens is None else host_bounds(cu_seqlens)
    n_seq = bsz if bounds is None else len(bounds) - 1
    if initial_state is None:
        h0 = q.new_zeros(n_seq, heads, key_dim, u.shape[-1], dtype=dtype)
    else:
        h0 = initial_state.to(dtype)
    q, a, b, u = (x.to(dtype) for x in (q, a, b, u))
    q = q * scale
    if bounds is None:
        o, h = _chunk_sequences(q, a, b, u, h0, mode, chunk_size, wu_solver)
    else:
        outs, finals = [], []
        for n in range(n_seq):
            span = slice(bounds[n], bounds[n + 1])
            if span.start == span.stop:
                finals.append(h0[n])
                continue
            o_n, h_n = _chunk_sequences(
                q[:, span], a[:, span], b[:, span], u[:, span], h0[n : n + 1], mode, chunk_size, wu_solver
            )
            outs.append(o_n)
            finals.append(h_n[0])
        o, h = torch.cat(outs, 1), torch.stack(finals)
    return o.to(out_dtype), (h if output_final_state else None)
