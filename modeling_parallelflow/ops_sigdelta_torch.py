"""sigDelta (algorithm.md section 4): the W and U of `chunk_wu`, computed on the two-parameter grid.

Readable torch reference and the oracle of the Triton sigDelta kernel. Schedule: the anti-diagonal
wavefront of Theorem 3.5 (the Goursat-PDE sweep of signature kernels), vectorised over the leading
dims and over all cells of a wave; about 2L waves for a grid of L "grid tokens".

Row form (rows are drivers): for grid tokens 0 <= m <= k < L with R x R blocks G(k, m) = A_k B_m^T,

    F(0, k)         = [A_k | U~_k]                                           boundary
    F(m, m)         = F(m-1, m) + G(m, m-1) F(m-1, m-1)                       diagonal
    F(m, k)         = F(m-1, k) + F(m, k-1) - F(m-1, k-1)
                      + (G(k, m-1) - G(k-1, m-1)) F(m-1, m-1)                 interior, m < k

and the diagonal F(k, k) = [W_k | U_k]. Sum mode: grid tokens are the C tokens (blocks R x R).
Product mode: the C*R rows themselves, each a rank-1 grid token (the lexicographic mask of section 3).
"""

import torch
from torch import Tensor


def _wavefront(rhs: Tensor, gram: Tensor) -> Tensor:
    """Solve the grid. rhs [L, Z, r, F] (boundary F(0, k)); gram [L, L, Z, r, r] with gram[k, m] = G(k, m).

    Wave p holds the cells (m, p - m), stored at index m of a length-L tensor (zero elsewhere).
    Returns the diagonal F(k, k) for every k, [L, Z, r, F].
    """
    length = rhs.shape[0]
    diag = [rhs[0]]
    before, last = rhs[:1], rhs[:1]  # waves p - 2 and p - 1; wave 0 is the single cell (0, 0)
    for p in range(1, 2 * length - 1):
        wave = torch.zeros_like(rhs)
        if p < length:
            wave = wave.index_copy(0, torch.tensor([0], device=rhs.device), rhs[p : p + 1])
        ms = torch.arange(max(1, p - length + 1), p // 2 + 1, device=rhs.device)
        if ms.numel() > 0:
            ks = p - ms
            prev_diag = torch.stack(diag)[ms - 1]  # F(m-1, m-1)
            interior = (ms < ks).to(rhs.dtype)[:, None, None, None]
            coef = gram[ks, ms - 1] - interior * gram[ks - 1, ms - 1]  # [cells, Z, r, r]
            corner = interior * (last[ms] - before[ms - 1])
            cells = last[ms - 1] + corner + coef @ prev_diag
            wave = wave.index_copy(0, ms, cells)
            if p % 2 == 0:
                diag.append(cells[-1])  # the cell (p/2, p/2) is the last of its wave
        before, last = last, wave
    return torch.stack(diag)


def sigdelta_wu(a_rows: Tensor, b_rows: Tensor, u_rows: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Drop-in replacement of `ops_chunk_torch.chunk_wu` (same signature, same result).

    a_rows, b_rows [..., C, R, K]; u_rows [..., C, R, V]. Returns W [..., C, R, K], U [..., C, R, V].
    """
    *lead, chunk, rank, key_dim = a_rows.shape
    grid_rank = rank if mode == "sum" else 1
    length = chunk * rank // grid_rank

    def grid(x: Tensor) -> Tensor:  # [..., C, R, D] -> [L, Z, r, D]
        return x.reshape(-1, length, grid_rank, x.shape[-1]).movedim(1, 0)

    a, b = grid(a_rows), grid(b_rows)
    rhs = torch.cat([a, grid(u_rows)], -1)  # [L, Z, r, K + V]
    gram = torch.einsum("kzix,mzjx->kmzij", a, b)  # G(k, m) = A_k B_m^T
    sol = _wavefront(rhs, gram).movedim(0, 1).reshape(*lead, chunk, rank, -1)
    return sol[..., :key_dim], sol[..., key_dim:]
