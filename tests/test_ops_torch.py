"""Tier 1 (CPU): the torch paths of the public op against a float64 token loop and independent recurrences."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from modeling_parallelflow.ops import delta_rule, delta_rule_drivers
from modeling_parallelflow.ops_chunk_torch import chunk_wu
from modeling_parallelflow.ops_exact_flow import exact_flow_drivers, phi
from modeling_parallelflow.ops_reference import delta_rule_reference
from modeling_parallelflow.ops_sigdelta_torch import sigdelta_wu
from tests.oracles import phi_by_matrix_exp

F64 = torch.float64
H, K, V, C = 2, 6, 5, 16
SCALE = K**-0.5
TOL64 = dict(atol=1e-10, rtol=1e-10)
MODES = ["sum", "product"]
RANKS = [1, 2, 3]
CHUNKED = ["tensor_inv", "sigdelta"]


def make_inputs(batch: int, seq_len: int, rank: int, mode: str, dtype: torch.dtype = F64) -> dict:
    """Unit keys, beta in (0, 1) / R (sum) or (0, 1.5) (product): a contracting state, as in the model."""
    beta_max = 1.0 / rank if mode == "sum" else 1.5
    return dict(
        q=torch.randn(batch, seq_len, H, K, dtype=dtype),
        k=F.normalize(torch.randn(batch, seq_len, H, rank, K, dtype=dtype), dim=-1),
        v=torch.randn(batch, seq_len, H, rank, V, dtype=dtype),
        beta=torch.rand(batch, seq_len, H, rank, dtype=dtype) * beta_max,
    )


def drivers(k, v, beta):
    """a = -beta k, b = k, u = beta v."""
    return -beta[..., None] * k, k, beta[..., None] * v


def loop64(q, k, v, beta, mode, initial_state=None, cu_seqlens=None):
    """Ground truth: the token loop in float64."""
    h0 = None if initial_state is None else initial_state.to(F64)
    kwargs = dict(mode=mode, scale=SCALE, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    return delta_rule_reference(q, *drivers(k.double(), v.double(), beta.double()), dtype=F64, **kwargs)


def torch_op(x: dict, mode: str, algorithm: str, chunk_size: int = C, **kwargs):
    """delta_rule on the torch backend, final state returned."""
    options = dict(mode=mode, algorithm=algorithm, chunk_size=chunk_size, backend="torch")
    return delta_rule(**x, **options, output_final_state=True, **kwargs)


def s_form_loop(q, k, v, beta, mode, plain_deltanet=False):
    """Independent recurrence on S = h^T [V, K]: matrices I - sum beta k k^T (sum) or Householder sub-steps
    (product); with plain_deltanet, DeltaNet's S <- S - beta (S k - v) k^T (R = 1)."""
    batch, seq_len, heads, rank, _ = k.shape
    o = torch.zeros(batch, seq_len, heads, V, dtype=F64)
    eye = torch.eye(K, dtype=F64)
    for n, hd in itertools.product(range(batch), range(heads)):
        s = torch.zeros(V, K, dtype=F64)
        for t in range(seq_len):
            kk, vv, bb = k[n, t, hd], v[n, t, hd], beta[n, t, hd]
            if plain_deltanet:
                s = s - bb[0] * torch.outer(s @ kk[0] - vv[0], kk[0])
            elif mode == "sum":
                p = eye - sum(bb[r] * torch.outer(kk[r], kk[r]) for r in range(rank))
                s = s @ p + sum(bb[r] * torch.outer(vv[r], kk[r]) for r in range(rank))
            else:
                for r in range(rank):
                    s = s @ (eye - bb[r] * torch.outer(kk[r], kk[r])) + bb[r] * torch.outer(vv[r], kk[r])
            o[n, t, hd] = SCALE * s @ q[n, t, hd]
    return o


# float32 rounding: measured max error 5e-6 against the float64 loop (outputs and states of size ~1).
TOLERANCES = {F64: TOL64, torch.float32: dict(atol=2e-5, rtol=2e-5)}
LENGTHS = [(15, F64), (16, F64), (17, F64), (33, F64), (33, torch.float32)]


@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=none", "h0=given"])
@pytest.mark.parametrize("algorithm", ["recurrent", *CHUNKED])
@pytest.mark.parametrize(
    "seq_len, dtype", LENGTHS, ids=lambda x: f"T={x}" if isinstance(x, int) else str(x)[6:]
)
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"R={r}")
@pytest.mark.parametrize("mode", MODES)
def test_torch_backend_matches_float64_loop(mode, rank, seq_len, dtype, algorithm, with_h0):
    x = make_inputs(2, seq_len, rank, mode, dtype)
    h0 = torch.randn(2, H, K, V, dtype=dtype) if with_h0 else None
    o_ref, h_ref = loop64(**x, mode=mode, initial_state=h0)
    o, h = torch_op(x, mode, algorithm, initial_state=h0)
    assert o.dtype == dtype and h.dtype == dtype
    torch.testing.assert_close(o, o_ref.to(dtype), **TOLERANCES[dtype])
    torch.testing.assert_close(h, h_ref.to(dtype), **TOLERANCES[dtype])


def test_bfloat16_inputs_keep_dtypes():
    x = make_inputs(1, 20, 2, "sum", dtype=torch.bfloat16)
    o, h = torch_op(x, "sum", "auto")
    assert o.dtype == torch.bfloat16 and h.dtype == torch.float32
    o_ref, _ = loop64(**x, mode="sum")
    # bf16 inputs and bf16 output rounding: measured max error 6e-3 for |o| up to 1.4.
    torch.testing.assert_close(o.double(), o_ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("algorithm", ["recurrent", *CHUNKED])
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"R={r}")
@pytest.mark.parametrize("mode", MODES)
def test_varlen_equals_separate_sequences(mode, rank, algorithm):
    cu = torch.tensor([0, 5, 5, 21, 40], dtype=torch.int32)  # lengths 5, 0, 16, 19
    x = make_inputs(1, 40, rank, mode)
    h0 = torch.randn(4, H, K, V, dtype=F64)
    o, h = torch_op(x, mode, algorithm, initial_state=h0, cu_seqlens=cu)
    for n in range(4):
        span = slice(int(cu[n]), int(cu[n + 1]))
        if span.start == span.stop:
            torch.testing.assert_close(h[n], h0[n], **TOL64)
            continue
        o_n, h_n = loop64(
            **{name: t[:, span] for name, t in x.items()}, mode=mode, initial_state=h0[n : n + 1]
        )
        torch.testing.assert_close(o[:, span], o_n, **TOL64)
        torch.testing.assert_close(h[n : n + 1], h_n, **TOL64)


@pytest.mark.parametrize("algorithm", CHUNKED)
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"R={r}")
@pytest.mark.parametrize("mode", MODES)
def test_chunked_gradients_match_loop(mode, rank, algorithm):
    x = make_inputs(2, 17, rank, mode) | dict(initial_state=torch.randn(2, H, K, V, dtype=F64))
    x = {name: t.requires_grad_() for name, t in x.items()}
    proj_o, proj_h = torch.randn(2, 17, H, V, dtype=F64), torch.randn(2, H, K, V, dtype=F64)

    def grads(fn):
        o, h = fn()
        return torch.autograd.grad((o * proj_o).sum() + (h * proj_h).sum(), list(x.values()))

    ref = grads(lambda: loop64(**x, mode=mode))
    got = grads(lambda: torch_op(x, mode, algorithm))
    for name, g, g_ref in zip(x, got, ref, strict=True):
        torch.testing.assert_close(g, g_ref, **TOL64, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("chunk", [16, 32], ids=lambda c: f"C={c}")
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"R={r}")
@pytest.mark.parametrize("mode", MODES)
def test_sigdelta_wu_equals_chunk_wu(mode, rank, chunk):
    a = -0.5 * F.normalize(torch.randn(2, 3, chunk, rank, K, dtype=F64), dim=-1)
    b = F.normalize(torch.randn(2, 3, chunk, rank, K, dtype=F64), dim=-1)
    u = torch.randn(2, 3, chunk, rank, V, dtype=F64)
    w_ref, u_ref = chunk_wu(a, b, u, mode)
    w, u_out = sigdelta_wu(a, b, u, mode)
    assert w.shape == a.shape and u_out.shape == u.shape
    torch.testing.assert_close(w, w_ref, **TOL64)
    torch.testing.assert_close(u_out, u_ref, **TOL64)


@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"R={r}")
def test_phi_gives_matrix_exp(rank):
    a = torch.randn(4, K, rank, dtype=F64)  # column form: A, B [K, R]
    b = torch.randn(4, K, rank, dtype=F64)
    expected = torch.linalg.matrix_exp(a @ b.transpose(-1, -2))
    got = torch.eye(K, dtype=F64) + a @ phi(b.transpose(-1, -2) @ a) @ b.transpose(-1, -2)
    torch.testing.assert_close(got, expected, **TOL64)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
@pytest.mark.parametrize("norm", [0.0, 1e-3, 0.5, 3.0, 20.0, 100.0])
def test_phi_matches_matrix_exp_across_norms(size, norm):
    """Halving counts 0 to 7, float64 values and gradients, float32 values."""
    x = torch.randn(32, size, size, dtype=F64)
    x = (x * norm / torch.linalg.matrix_norm(x)[:, None, None]).requires_grad_()
    expected = phi_by_matrix_exp(x)
    weights = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    got = phi(x)
    (grad,) = torch.autograd.grad((got * weights).sum(), x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=1e-13 * scale, rtol=1e-12)
    torch.testing.assert_close(grad, grad_expected, atol=1e-12 * grad_expected.abs().max().item(), rtol=1e-11)
    if norm <= 20:  # phi(100) = (e^100 - 1) / 100 is past float32's range
        got32 = phi(x.detach().float()).double()
        torch.testing.assert_close(got32, expected.detach(), atol=3e-6 * scale, rtol=3e-6)


@pytest.mark.parametrize("mode", MODES)
def test_exact_flow_under_autocast_computes_in_float32(mode):
    """bf16 autocast must not reach the series: it turned the drivers into NaN (MQAR on the GPU, 794bcb6)."""
    x = make_inputs(2, 16, 2, mode, dtype=torch.float32)
    a, b, u = (t.bfloat16() for t in drivers(x["k"], x["v"], x["beta"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = exact_flow_drivers(a, b, u, mode)
    expected = exact_flow_drivers(a.double(), b.double(), u.double(), mode)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), e, atol=1e-2, rtol=1e-2)


def exact_flow_loop(q, a, b, u, mode):
    """Each (sub-)step integrated exactly: [h; I] <- exp([[B A^T, B U^T], [0, 0]]) [h; I]."""
    batch, seq_len, heads, rank, _ = a.shape
    o = torch.zeros(batch, seq_len, heads, V, dtype=F64)
    groups = [list(range(rank))] if mode == "sum" else [[r] for r in range(rank)]
    for n, hd in itertools.product(range(batch), range(heads)):
        h = torch.zeros(K, V, dtype=F64)
        for t in range(seq_len):
            for rs in groups:
                at, bt, ut = a[n, t, hd, rs], b[n, t, hd, rs], u[n, t, hd, rs]
                top = torch.cat([bt.T @ at, bt.T @ ut], 1)  # [K, K + V]
                e = torch.linalg.matrix_exp(torch.cat([top, torch.zeros(V, K + V, dtype=F64)]))
                h = e[:K, :K] @ h + e[:K, K:]
            o[n, t, hd] = SCALE * h.T @ q[n, t, hd]
    return o


@pytest.mark.parametrize("algorithm", ["recurrent", "tensor_inv"])
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"R={r}")
@pytest.mark.parametrize("mode", MODES)
def test_exact_flow_equals_matrix_exp_steps(mode, rank, algorithm):
    x = make_inputs(1, C + 1, rank, mode)  # two chunks
    a, b, u = drivers(x["k"], x["v"], x["beta"])
    a2, u2 = exact_flow_drivers(a, b, u, mode)
    o, _ = delta_rule_drivers(
        x["q"], a2, b, u2, mode=mode, chunk_size=C, algorithm=algorithm, backend="torch"
    )
    torch.testing.assert_close(o, exact_flow_loop(x["q"], a, b, u, mode), **TOL64)


@pytest.mark.parametrize("mode", MODES)
def test_exact_flow_gradcheck(mode):
    a, b, u = (torch.randn(2, 3, d, dtype=F64, requires_grad=True) for d in (K, K, V))
    assert torch.autograd.gradcheck(lambda a, b, u: exact_flow_drivers(a, b, u, mode), (a, b, u))


def test_exact_flow_rank1_is_one_minus_exp():
    x = make_inputs(1, 5, 1, "sum")
    a2, u2 = exact_flow_drivers(*drivers(x["k"], x["v"], x["beta"]), "sum")
    beta_eff = -torch.expm1(-x["beta"])[..., None]
    torch.testing.assert_close(a2, -beta_eff * x["k"], **TOL64)
    torch.testing.assert_close(u2, beta_eff * x["v"], **TOL64)


@pytest.mark.parametrize("algorithm", ["recurrent", *CHUNKED])
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"R={r}")
@pytest.mark.parametrize("mode", MODES)
def test_equals_independent_recurrence(mode, rank, algorithm):
    """R = 1: plain DeltaNet; sum: S (I - sum beta k k^T) + sum beta v k^T; product: Householder sub-steps."""
    x = make_inputs(2, C + 3, rank, mode)  # two chunks
    o, _ = torch_op(x, mode, algorithm)
    torch.testing.assert_close(o, s_form_loop(**x, mode=mode, plain_deltanet=rank == 1), **TOL64)
