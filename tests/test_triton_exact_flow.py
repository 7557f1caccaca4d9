"""The fused exact-flow drivers (triton_exact_flow.py) against an independent float64 oracle: phi(G) as the
top-right block of torch.linalg.matrix_exp([[G, I], [0, 0]]), gradients by autograd through it.

Tier 2 (`triton_interpret`): small fp32 / fp16 cases under TRITON_INTERPRET=1 on the CPU (also run on a GPU).
Tier 3 (`gpu`): bf16 / fp32 across ranks 1-8 and head sizes 16-256, a token count that leaves a partial block,
forward and every gradient.
"""

import pytest
import torch

from modeling_parallelflow.ops_exact_flow import exact_flow_drivers
from tests.oracles import phi_by_matrix_exp

triton_exact_flow = pytest.importorskip("modeling_parallelflow.triton_exact_flow")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(lead, rank, k_dim, v_dim, beta_max, dtype):
    """a = -beta k, b = k (unit keys) [*lead, R, K], u [*lead, R, V] in float64 and in `dtype` (leaves)."""
    k = torch.nn.functional.normalize(torch.randn(*lead, rank, k_dim, dtype=torch.float64), dim=-1)
    beta = beta_max * torch.rand(*lead, rank, 1, dtype=torch.float64)
    u = torch.randn(*lead, rank, v_dim, dtype=torch.float64)
    exact = [x.to(DEVICE).requires_grad_() for x in (-beta * k, k, u)]
    cast = [x.detach().to(dtype).requires_grad_() for x in exact]
    return exact, cast


def matrix_exp_drivers(a, b, u, mode):
    """(phi(G) a, phi(G) u), G = a b^T [..., R, R] (product mode: per component, 1 x 1), float64."""
    if mode == "product":
        a2, u2 = matrix_exp_drivers(a.unsqueeze(-2), b.unsqueeze(-2), u.unsqueeze(-2), "sum")
        return a2.squeeze(-2), u2.squeeze(-2)
    p = phi_by_matrix_exp(a @ b.transpose(-1, -2))
    return p @ a, p @ u


def relative_errors(lead, rank, k_dim, v_dim, beta_max, dtype, mode="sum"):
    """Largest error over |max| of a', u', da, db, du: Triton backend in `dtype` against the oracle."""
    exact, cast = inputs(lead, rank, k_dim, v_dim, beta_max, dtype)
    want = matrix_exp_drivers(*exact, mode)
    got = exact_flow_drivers(*cast, mode, backend="triton")
    grads = [torch.randn_like(x) for x in want]
    torch.autograd.backward(want, grads)
    torch.autograd.backward(got, [g.to(dtype) for g in grads])
    pairs = [*zip(got, want, strict=True), *((c.grad, e.grad) for c, e in zip(cast, exact, strict=True))]
    for x, _ in pairs:
        assert x.dtype == dtype and torch.isfinite(x).all()
    return [((x.double() - y).abs().max() / y.abs().max()).item() for x, y in pairs]


@pytest.mark.triton_interpret
@pytest.mark.parametrize(
    "rank, k_dim, v_dim, beta_max",
    [
        (1, 16, 16, 1.0),  # DeltaNet: a' = (1 - exp(-beta)) / beta a
        (2, 32, 16, 2.0),  # negative eigenvalues' beta range
        (3, 24, 40, 3.0),  # R, K, V not powers of two
        (4, 16, 32, 8.0),  # norms up to 32: several halvings and doublings
        (2, 16, 16, 40.0),
        (5, 8, 12, 2.0),
    ],
)
def test_matches_matrix_exp_oracle_interpreted(rank, k_dim, v_dim, beta_max):
    # 2 x 5 x 3 = 30 token-heads: one partial block (BLOCK_N >= 32 at these sizes)
    errors = relative_errors((2, 5, 3), rank, k_dim, v_dim, beta_max, torch.float32)
    assert max(errors) < 2e-6, errors  # measured at most 1.9e-7


@pytest.mark.triton_interpret
def test_half_precision_interpreted():
    errors = relative_errors((3, 7), 2, 32, 32, 2.0, torch.float16)
    assert max(errors) < 3e-3, errors  # fp16 inputs and outputs: measured at most 8.4e-4


@pytest.mark.triton_interpret
def test_empty_input_interpreted():
    a, b, u = (torch.zeros(0, 4, 2, 16, device=DEVICE) for _ in range(3))
    assert all(x.shape == (0, 4, 2, 16) for x in exact_flow_drivers(a, b, u, "sum", backend="triton"))


@pytest.mark.triton_interpret
@pytest.mark.parametrize("rank, beta_max", [(2, 2.0), (3, 40.0)])
def test_product_mode_interpreted(rank, beta_max):
    """Product mode runs the kernels at R = 1 per component."""
    errors = relative_errors((2, 5, 3), rank, 16, 24, beta_max, torch.float32, mode="product")
    assert max(errors) < 2e-6, errors


GPU_CASES = [
    (r, k, v, dtype)
    for dtype in (torch.bfloat16, torch.float32)
    for r, k, v in [
        (1, 64, 64),
        (2, 64, 64),
        (2, 128, 128),
        (3, 48, 80),
        (4, 128, 128),
        (5, 32, 32),
        (8, 64, 64),
        (8, 256, 256),
        (2, 256, 32),
        (4, 16, 16),
    ]
]


@pytest.mark.gpu
@pytest.mark.parametrize("rank, k_dim, v_dim, dtype", GPU_CASES)
def test_matches_matrix_exp_oracle_gpu(rank, k_dim, v_dim, dtype):
    # 2 x 301 x 3 token-heads: many programs and a partial last block; betas up to 2 (negative eigenvalues)
    errors = relative_errors((2, 301, 3), rank, k_dim, v_dim, 2.0, dtype)
    assert max(errors) < (2e-2 if dtype == torch.bfloat16 else 2e-5), errors
