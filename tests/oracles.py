"""Independent float64 oracles shared by the tests (no code path of the package behind them)."""

import torch


def phi_by_matrix_exp(x: torch.Tensor) -> torch.Tensor:
    """phi(X) = sum_n X^n / (n + 1)! for X [..., n, n]: the top-right block of exp([[X, I], [0, 0]])
    (torch.linalg.matrix_exp; accurate in float64, differentiable)."""
    n = x.shape[-1]
    eye = torch.eye(n, dtype=x.dtype, device=x.device).expand_as(x)
    top = torch.cat([x, eye], -1)
    return torch.linalg.matrix_exp(torch.cat([top, torch.zeros_like(top)], -2))[..., :n, n:]
