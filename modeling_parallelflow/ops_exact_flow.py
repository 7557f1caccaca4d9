"""Exact flow (algorithm.md section 5): rescale the drivers so the Euler kernels integrate each token exactly.

Column form: exp(A B^T) = I + A phi(G) B^T with G = B^T A and phi(X) = sum_n X^n / (n + 1)!, and the
exactly integrated constant-rate step is the Euler step on A' = A phi(G), U~' = U~ phi(G).
Row form (rows a_r, u_r as stored here): a' = phi(g) a, u' = phi(g) u with g = a b^T = G^T.
"""

import torch
from torch import Tensor

from .ops import BACKENDS, _check_choice, _resolve_backend

# Halvings at most before the Taylor series: Frobenius norms up to 2**8 reach 1. Keys of unit length and
# betas at most 2 (negative eigenvalues) give norms at most 2 R <= 16, i.e. 4 halvings.
MAX_SQUARINGS = 8


def small_matmul(x: Tensor, y: Tensor) -> Tensor:
    """x [..., n, m] @ y [..., m, p] for tiny matrices: broadcast products summed over m.

    Batched GEMMs of R x R matrices (R <= 8) launch cuBLAS kernels built for large tiles; the broadcast form
    is two memory-bound elementwise kernels over [..., n, m, p].
    """
    return (x.unsqueeze(-1) * y.unsqueeze(-3)).sum(-2)


def phi(x: Tensor) -> Tensor:
    """phi(X) = sum_{n>=0} X^n / (n + 1)! of square matrices x [..., n, n], float32 or float64.

    Scaling and squaring without a host synchronisation (CUDA-graph capturable, unlike
    torch.linalg.matrix_exp): each matrix is halved s times (s <= MAX_SQUARINGS) until its Frobenius
    norm is at most 1, the series summed by Horner's rule to the term 1 / (N + 2)! below the dtype's
    precision, then doubled back with phi(2Y) = phi(Y) + phi(Y) Y phi(Y) / 2 (from exp(2Y) = exp(Y)^2).
    """
    terms = 17 if x.dtype == torch.float64 else 10  # 1 / 19! = 8e-18, 1 / 12! = 2e-9
    norm = torch.linalg.matrix_norm(x.detach())  # [...]
    halvings = torch.ceil(torch.log2(norm.clamp_min(1.0))).clamp(max=MAX_SQUARINGS)  # [...]
    y = x * torch.exp2(-halvings)[..., None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(x)
    p = eye
    for m in range(terms + 1, 1, -1):  # I + Y/2 (I + Y/3 (... (I + Y/(N + 1))))
        p = eye + small_matmul(y, p) / m
    for j in range(MAX_SQUARINGS):
        doubling = (halvings > j)[..., None, None]
        p = torch.where(doubling, p + 0.5 * small_matmul(small_matmul(p, y), p), p)
        y = torch.where(doubling, 2 * y, y)
    return p


def _triton_sum():
    """triton_exact_flow.triton_exact_flow_sum, or None where the kernels do not import."""
    # `from .x import y` form: transformers copies the modules imported this way into saved checkpoints.
    try:
        from .triton_exact_flow import triton_exact_flow_sum
    except ImportError:
        return None
    return triton_exact_flow_sum


def exact_flow_drivers(
    a: Tensor, b: Tensor, u: Tensor, mode: str, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Exact-flow drivers (a', u') for the kernels, b unchanged.

    a, b [..., R, K] (e.g. [B, T, H, R, K]); u [..., R, V]. Sum mode mixes the R components of a token
    (g = a b^T, [..., R, R]); product mode rescales each component alone (g = a_r . b_r, a scalar), so
    that each sub-step becomes exp(a_r b_r^T). Computes in float32 (float64 for float64 inputs) and
    returns a', u' in the dtypes of a and u. DeltaNet case (R = 1, unit key): beta_eff = 1 - exp(-beta).
    backend as the op's: on the Triton backend 16- and 32-bit inputs run one fused kernel each way
    (triton_exact_flow.py; product mode as R = 1 per component); float64 always runs here in torch.
    """
    if mode not in ("sum", "product"):
        raise ValueError(f"mode must be 'sum' or 'product', got {mode!r}")
    _check_choice("backend", backend, BACKENDS)
    if a.dtype != torch.float64 and _resolve_backend(backend, a.device) == "triton":
        fused = _triton_sum()
        if fused is not None:
            if mode == "sum":
                return fused(a, b, u)
            a2, u2 = fused(a.unsqueeze(-2), b.unsqueeze(-2), u.unsqueeze(-2))  # each component alone
            return a2.squeeze(-2), u2.squeeze(-2)
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    # autocast would run the products below in bf16 / fp16 (the series then gives NaN)
    with torch.autocast(a.device.type, enabled=False):
        a32, b32, u32 = a.to(dtype), b.to(dtype), u.to(dtype)
        if mode == "sum":
            p = phi(a32 @ b32.transpose(-1, -2))  # [..., R, R]
            return (p @ a32).to(a.dtype), (p @ u32).to(u.dtype)
        g = (a32 * b32).sum(-1)[..., None, None]  # [..., R, 1, 1]
        p = phi(g)[..., 0]  # [..., R, 1]
        return (p * a32).to(a.dtype), (p * u32).to(u.dtype)
