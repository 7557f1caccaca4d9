"""Tier 1 (CPU): input validation of the public op (ValueErrors naming the argument) and backend dispatch."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from modeling_parallelflow import ops
from modeling_parallelflow.ops import delta_rule, delta_rule_drivers
from modeling_parallelflow.ops_exact_flow import exact_flow_drivers

H, K, V = 2, 6, 5
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def changed(**changes) -> dict:
    """Valid delta_rule arguments (B = 2, T = 6, R = 2), `changes` applied (a callable maps the valid one)."""
    x = dict(
        q=torch.randn(2, 6, H, K),
        k=F.normalize(torch.randn(2, 6, H, 2, K), dim=-1),
        v=torch.randn(2, 6, H, 2, V),
        beta=torch.rand(2, 6, H, 2),
    )
    for name, change in changes.items():
        x[name] = change(x.get(name)) if callable(change) else change
    return x


BAD_ARGUMENTS = {
    "q-rank": (changed(q=lambda q: q[0]), "q"),
    "q-int": (changed(q=lambda q: q.long()), "q"),
    "k-rank": (changed(k=lambda k: k[..., 0, :]), "k"),
    "k-key-width": (changed(k=lambda k: k[..., :-1]), "k"),
    "v-seq-len": (changed(v=lambda v: v[:, :-1]), "v"),
    "v-rank": (changed(v=lambda v: v[..., :1, :]), "v"),
    "beta-shape": (changed(beta=lambda b: b[..., 0]), "beta"),
    "beta-int": (changed(beta=lambda b: b.long()), "beta"),
    "k-dtype": (changed(k=lambda k: k.double()), "q, k, v"),
    "empty-T": (changed(**{n: (lambda t: t[:, :0]) for n in ("q", "k", "v", "beta")}), "q"),
    "mode": (changed(mode="diag"), "mode"),
    "algorithm": (changed(algorithm="fast"), "algorithm"),
    "backend": (changed(backend="cuda"), "backend"),
    "scale-negative": (changed(scale=-1.0), "scale"),
    "scale-nan": (changed(scale=float("nan")), "scale"),
    "scale-string": (changed(scale="1"), "scale"),
    "chunk_size-zero": (changed(chunk_size=0), "chunk_size"),
    "chunk_size-float": (changed(chunk_size=16.0), "chunk_size"),
    "chunk_size-bool": (changed(chunk_size=True), "chunk_size"),
    "chunk_size-below-16": (changed(chunk_size=8), "chunk_size"),
    "chunk_size-not-pow2": (changed(chunk_size=48), "chunk_size"),
    "cu_seqlens-device": (changed(cu_seqlens=torch.tensor([0, 6], device="meta")), "cu_seqlens"),
    "output_final_state": (changed(output_final_state=1), "output_final_state"),
    "cu_seqlens-batch": (changed(cu_seqlens=torch.tensor([0, 6])), "cu_seqlens"),
    "cu_seqlens-float": (changed(cu_seqlens=torch.tensor([0.0, 6.0])), "cu_seqlens"),
    "cu_seqlens-2d": (changed(cu_seqlens=torch.tensor([[0, 6]])), "cu_seqlens"),
    "initial_state-shape": (changed(initial_state=torch.zeros(2, H, K + 1, V)), "initial_state"),
    "initial_state-int": (changed(initial_state=torch.zeros(2, H, K, V, dtype=torch.long)), "initial_state"),
    "initial_state-device": (changed(initial_state=torch.zeros(2, H, K, V, device="meta")), "initial_state"),
    "beta-device": (changed(beta=lambda b: b.to("meta")), "beta"),
}
PACKED, CU3 = {name: lambda t: t[:1] for name in ("q", "k", "v", "beta")}, torch.tensor([0, 2, 6])
BAD_ARGUMENTS |= {
    "cu_seqlens-start": (changed(**PACKED, cu_seqlens=torch.tensor([1, 6])), "cu_seqlens"),
    "cu_seqlens-end": (changed(**PACKED, cu_seqlens=torch.tensor([0, 5])), "cu_seqlens"),
    "cu_seqlens-decreasing": (changed(**PACKED, cu_seqlens=torch.tensor([0, 4, 3, 6])), "cu_seqlens"),
    "initial_state-N": (
        changed(**PACKED, cu_seqlens=CU3, initial_state=torch.zeros(3, H, K, V)),
        "initial_state",
    ),
}


@pytest.mark.parametrize("arguments, argument", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_validation_errors_name_the_argument(arguments, argument):
    with pytest.raises(ValueError, match=rf"^{argument}\b"):  # messages start with the argument's name
        delta_rule(**arguments)


@pytest.mark.parametrize("name", ["a", "b", "u"])
def test_drivers_validation(name):
    x = changed()
    valid = dict(a=-x["k"], b=x["k"], u=x["v"])
    with pytest.raises(ValueError, match=rf"^{name} has H"):
        delta_rule_drivers(x["q"], **(valid | {name: valid[name][:, :, :1]}))  # H mismatch
    with pytest.raises(ValueError, match="^q, a, b, u must share one dtype"):
        delta_rule_drivers(x["q"], **(valid | {name: valid[name].double()}))


def test_exact_flow_rejects_unknown_mode():
    x = changed()
    with pytest.raises(ValueError, match="mode"):
        exact_flow_drivers(x["k"], x["k"], x["v"], "diag")


def without_triton(monkeypatch):
    monkeypatch.setattr(ops, "_load_triton", lambda: (None, ImportError("no module triton_dispatch")))


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("PFLOW_KERNEL_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors may ask for the Triton kernels
    monkeypatch.setattr(ops, "_load_triton", lambda: (None, ImportError("no module triton_dispatch")))
    monkeypatch.setattr(ops, "_warned_fallback", False)
    assert ops._resolve_backend("auto", CPU) == "torch"
    with pytest.warns(UserWarning, match="torch backend"):
        assert ops._resolve_backend("auto", CUDA) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert ops._resolve_backend("auto", CUDA) == "torch"
    with pytest.raises(RuntimeError, match="backend='triton'"):
        delta_rule(**changed(), backend="triton")
    for env, error in [("gpu", ValueError), ("triton", RuntimeError)]:
        monkeypatch.setenv("PFLOW_KERNEL_BACKEND", env)
        with pytest.raises(error, match="PFLOW_KERNEL_BACKEND"):
            delta_rule(**changed())
    monkeypatch.setattr(ops, "_load_triton", lambda: (object(), None))
    assert ops._resolve_backend("auto", CUDA) == "triton"  # PFLOW_KERNEL_BACKEND=triton
    monkeypatch.setenv("PFLOW_KERNEL_BACKEND", "torch")
    assert ops._resolve_backend("auto", CUDA) == "torch"
    monkeypatch.delenv("PFLOW_KERNEL_BACKEND")
    assert ops._resolve_backend("auto", CUDA) == "triton"


@pytest.mark.parametrize("interpret", ["0", "", "1"])
def test_triton_backend_needs_cuda_tensors(monkeypatch, interpret):
    """backend="triton" (or PFLOW_KERNEL_BACKEND=triton) with CPU tensors: a ValueError saying so, unless the
    kernels run in Triton's CPU interpreter."""
    monkeypatch.setattr(ops, "_load_triton", lambda: (lambda *args, **kw: "ran", None))
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.delenv("PFLOW_KERNEL_BACKEND", raising=False)
    if interpret == "1":
        assert delta_rule(**changed(), backend="triton") == "ran"
        return
    with pytest.raises(ValueError, match=r"^backend='triton' needs CUDA tensors, but the tensors are on cpu"):
        delta_rule(**changed(), backend="triton")
    monkeypatch.setenv("PFLOW_KERNEL_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"^PFLOW_KERNEL_BACKEND='triton' needs CUDA tensors"):
        delta_rule(**changed())


def test_triton_backend_receives_drivers_and_options(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors reach the (stub) kernels
    calls = []
    monkeypatch.setattr(
        ops, "_load_triton", lambda: (lambda *args, **kw: calls.append((args, kw)) or "ok", None)
    )
    x, options = changed(), dict(mode="product", chunk_size=32, algorithm="sigdelta")
    assert delta_rule(**x, **options, backend="triton") == "ok"
    (q, a, b, u), kwargs = calls[0]  # the beta form: the kernels build the drivers themselves
    assert q is x["q"] and a is None and b is x["k"] and u is x["v"] and kwargs.pop("beta") is x["beta"]
    defaults = dict(scale=K**-0.5, initial_state=None, output_final_state=False, cu_seqlens=None)
    assert kwargs == options | defaults
    calls.clear()
    a, u = -x["beta"][..., None] * x["k"], x["beta"][..., None] * x["v"]
    assert delta_rule_drivers(x["q"], a, x["k"], u, **options, backend="triton") == "ok"
    (q, a2, b, u2), kwargs = calls[0]
    assert a2 is a and u2 is u and kwargs.pop("beta") is None and kwargs == options | defaults
