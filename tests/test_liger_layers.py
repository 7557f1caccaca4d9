"""Liger-Kernel's fused RMSNorm (also with the residual add) and SwiGLU product for the standard parts of a
block (`glue_parallelflow.liger_layers`), and the down projection that recomputes the product
(`swiglu_down.py`): where they are taken, that the model routes through them, and (GPU) that they equal the
torch path, values and gradients."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from modeling_parallelflow import glue_parallelflow
from modeling_parallelflow import modeling_parallelflow as modeling
from modeling_parallelflow.swiglu_down import TORCH_KERNELS, swiglu_down
from tests.model_helpers import random_ids, tiny_model


def test_not_taken_on_cpu_or_on_the_torch_backend(monkeypatch):
    assert glue_parallelflow.liger_layers("auto", torch.device("cpu")) is None
    assert glue_parallelflow.liger_layers("torch", torch.device("cuda")) is None
    fake = SimpleNamespace(rms_norm=None, silu_mul=None)
    monkeypatch.setattr(glue_parallelflow, "_load_liger", lambda: fake)
    monkeypatch.setattr(glue_parallelflow, "_resolve_backend", lambda backend, device: "triton")
    assert glue_parallelflow.liger_layers("auto", torch.device("cuda")) is fake
    with torch.no_grad():  # decoding too: one SwiGLU launch instead of two (norms: triton_norm.rms_norm)
        assert glue_parallelflow.liger_layers("auto", torch.device("cuda")) is fake


def test_not_taken_without_liger(monkeypatch):
    glue_parallelflow._load_liger.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "liger_kernel", None)  # import fails
    try:
        assert glue_parallelflow._load_liger() is None
    finally:
        glue_parallelflow._load_liger.cache_clear()


def test_model_routes_block_norms_and_mlp_through_liger(monkeypatch):
    """With Liger available, every block norm, the final norm and every MLP product take it (here a counting
    torch stand-in), and the model's output is unchanged."""
    model = tiny_model().eval()
    ids = random_ids(2, 9)
    expected = model(ids).logits  # under autograd, where Liger's kernels are taken
    calls = {"rms_norm": 0, "add_rms_norm": 0, "silu_mul": 0, "swiglu_down": 0}

    def rms_norm(x, weight, eps):
        calls["rms_norm"] += 1
        return modeling.gated_rms_norm_torch(x, weight, None, eps)

    def add_rms_norm(x, residual, weight, eps):
        calls["add_rms_norm"] += 1
        total = residual + x
        return total, modeling.gated_rms_norm_torch(total, weight, None, eps)

    def silu_mul(gate, up):
        calls["silu_mul"] += 1
        return F.silu(gate) * up

    def fake_swiglu_down(gate, up, weight):
        calls["swiglu_down"] += 1
        return swiglu_down(gate, up, weight)

    fake = SimpleNamespace(
        rms_norm=rms_norm, add_rms_norm=add_rms_norm, silu_mul=silu_mul, swiglu_down=fake_swiglu_down
    )
    monkeypatch.setattr(modeling, "liger_layers", lambda backend, device: fake)
    got = model(ids).logits
    layers = model.config.num_hidden_layers
    assert calls == {"rms_norm": layers + 1, "add_rms_norm": layers, "silu_mul": 0, "swiglu_down": layers}
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # A wrapped down projection (as PEFT's LoRA wraps it) keeps its own forward: the product alone is fused.
    for layer in model.model.layers:
        layer.mlp.down_proj = torch.nn.Sequential(layer.mlp.down_proj)
    calls.update(silu_mul=0, swiglu_down=0)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert (calls["silu_mul"], calls["swiglu_down"]) == (layers, 0)


def test_swiglu_down_gradients_float64_and_nothing_but_gate_and_up_kept():
    """The recomputing down projection against autograd through the plain formula (float64 gradcheck), and
    what it keeps for the backward: gate, up and the weight, not the product."""
    torch.manual_seed(0)
    gate, up = (torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_down, (gate, up, weight))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = swiglu_down(gate, up, weight, TORCH_KERNELS)
    torch.testing.assert_close(out, F.linear(F.silu(gate) * up, weight))
    assert sorted(tuple(t.shape) for t in saved) == [(2, 5, 12), (2, 5, 12), (7, 12)]


@pytest.mark.gpu
def test_liger_layers_match_torch_path_bf16():
    """bf16 at a model-like shape against the torch path in float64 on the same inputs and upstream
    gradient (the bf16 rounding of the outputs remains)."""
    liger = glue_parallelflow.liger_layers("auto", torch.device("cuda"))
    if liger is None:
        pytest.skip("liger_kernel is not installed")
    torch.manual_seed(0)
    x = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(1024, device="cuda")).to(torch.bfloat16)
    g, u = (torch.randn(4, 512, 2816, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    residual = torch.randn_like(x)
    cases = {
        "add_rms_norm": (  # both outputs: the sum (the residual stream) and its norm
            lambda x, r, w: torch.stack(liger.add_rms_norm(x, r, w, 1e-6)),
            lambda x, r, w: torch.stack((r + x, modeling.gated_rms_norm_torch(r + x, w, None, 1e-6))),
            (x, residual, w),
        ),
        "rms_norm": (
            lambda x, w: liger.rms_norm(x, w, 1e-6),
            lambda x, w: modeling.gated_rms_norm_torch(x, w, None, 1e-6),
            (x, w),
        ),
        "silu_mul": (liger.silu_mul, lambda g, u: F.silu(g) * u, (g, u)),
        "swiglu_down": (
            liger.swiglu_down,
            lambda g, u, w: F.linear(F.silu(g) * u, w),
            (g, u, (torch.randn(1024, 2816, device="cuda") / 2816**0.5).to(torch.bfloat16)),
        ),
    }
    for name, (fused, reference, inputs) in cases.items():
        a = [t.clone().requires_grad_() for t in inputs]
        b = [t.double().requires_grad_() for t in inputs]
        ya, yb = fused(*a), reference(*b)
        dy = torch.randn_like(ya)
        (ya * dy).sum().backward()
        (yb * dy.double()).sum().backward()
        for ours, ref in [(ya, yb)] + [(p.grad, q.grad) for p, q in zip(a, b, strict=True)]:
            rel = ((ours.float() - ref.float()).norm() / ref.float().norm()).item()
            assert rel < 1e-2, (name, rel)
