"""Exact flow (algorithm.md section 5): rescale the drivers so the Euler kernels integrate each token exactly.

Column form: exp(A B^T) = I + A phi(G) B^T with G = B^T A and phi(X) = sum_n X^n / (n + 1)!, and the
exactly integrated constant-rate step is the Euler step on A' = A phi(G), U~' = U~ phi(G).
Row form (rows a_r, u_r as stored here): a' = phi(g) a, u' = phi(g) u with g = a b^T = G^T.
"""

import torch
from torch import Tensor


def phi(x: Tensor) -> Tensor:
    """phi(X) = sum_{n>=0} X^n / (n + 1)! of square matrices x [..., n, n].

    Top-right block of exp([[X, I], [0, 0]]) (torch.linalg.matrix_exp: accurate in float64, differentiable).
    """
    size = x.shape[-1]
    eye = torch.eye(size, dtype=x.dtype, device=x.device).expand_as(x)
    top = torch.cat([x, eye], -1)
    block = torch.cat([top, torch.zeros_like(top)], -2)  # [..., 2n, 2n]
    return torch.linalg.matrix_exp(block)[..., :size, size:]


def exact_flow_drivers(a: Tensor, b: Tensor, u: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Exact-flow drivers (a', u') for the kernels, b unchanged.

    a, b [..., R, K] (e.g. [B, T, H, R, K]); u [..., R, V]. Sum mode mixes the R components of a token
    (g = a b^T, [..., R, R]); product mode rescales each component alone (g = a_r . b_r, a scalar), so
    that each sub-step becomes exp(a_r b_r^T). Computes in float32 (float64 for float64 inputs) and
    returns a', u' in the dtypes of a and u. DeltaNet case (R = 1, unit key): beta_eff = 1 - exp(-beta).
    """
    if mode not in ("sum", "product"):
        raise ValueError(f"mode must be 'sum' or 'product', got {mode!r}")
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a32, b32, u32 = a.to(dtype), b.to(dtype), u.to(dtype)
    if mode == "sum":
        p = phi(a32 @ b32.transpose(-1, -2))  # [..., R, R]
        return (p @ a32).to(a.dtype), (p @ u32).to(u.dtype)
    g = (a32 * b32).sum(-1)[..., None, None]  # [..., R, 1, 1]
    p = phi(g)[..., 0]  # [..., R, 1]
    return (p * a32).to(a.dtype), (p * u32).to(u.dtype)
