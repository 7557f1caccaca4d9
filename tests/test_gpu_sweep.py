"""Tier 3 (`gpu`): the shape sweep of the Triton kernels and a model-level check, on a CUDA GPU.

The sweep itself is `benchmarks/gpu_sweep.py` (cases in child processes, so a crash hides no other case);
this test runs it and requires every case to pass. Set PFLOW_SWEEP_OUT to keep its JSON.
The model check trains tiny PFlow models of head dim 32 and 16 at R = 2 and 4 on the Triton kernels and
compares their gradients with the torch backend's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.model_helpers import random_ids, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.triton_interpret
def test_sweep_runs_glue_cases_in_the_interpreter(tmp_path):
    """The sweep's machinery end to end on the CPU: the fused layer kernels' sanitizer cases under Triton's
    interpreter, in child processes, each against its float64 torch path."""
    out = tmp_path / "sweep.json"
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_sweep.py"),
        "--out",
        str(out),
        "--subset",
        "sanitizer",
    ]
    proc = subprocess.run(
        cmd + ["--filter", "^(conv|norm)", "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    assert report["summary"]["counts"] == {"pass": 7}, (report["summary"], proc.stdout[-2000:])
    assert {c["algo"] for c in report["cases"]} == {"conv", "norm"}


@pytest.mark.gpu
def test_shape_sweep_matches_float64_loop(tmp_path):
    out = Path(os.environ.get("PFLOW_SWEEP_OUT", tmp_path / "gpu_sweep.json"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_sweep.py"), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["counts"].get("pass", 0) == summary["n_cases"], (
        summary["not_passed"][:20],
        proc.stdout[-3000:],
    )


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


MODEL_CASES = [(32, 2), (32, 4), (16, 2), (16, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,rank", MODEL_CASES, ids=[f"d{d}-R{r}" for d, r in MODEL_CASES])
def test_tiny_model_triton_gradients_match_torch_and_it_trains(head_dim, rank):
    heads = 64 // head_dim  # configs/tiny.json: hidden size 64
    model = tiny_model(num_heads=heads, head_k_dim=head_dim, head_v_dim=head_dim, rank=rank).cuda().train()
    ids = random_ids(4, 128).cuda()
    model.config.kernel_backend = "torch"
    loss_torch, grads_torch = _grads(model, ids)
    model.config.kernel_backend = "triton"
    loss_triton, grads_triton = _grads(model, ids)
    flat = lambda g: torch.cat([x.flatten().double() for x in g.values()])  # noqa: E731
    rel = ((flat(grads_triton) - flat(grads_torch)).norm() / flat(grads_torch).norm()).item()
    worst = max(
        ((grads_triton[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in grads_torch.items()
    )
    print(
        f"d{head_dim} R{rank}: loss {loss_triton.item():.5f} vs {loss_torch.item():.5f}, grad rel {rel:.2e}, "
        f"worst parameter {worst:.2e}"
    )
    # Both paths see the same bf16 activations under autocast; the kernels also keep states in bf16. Measured
    # on an H200 at 8214020 (tests/README.md): losses within 2e-5 relative, gradients 1.7e-2 to 2.1e-2
    # relative (worst single parameter 2.7e-2); the bounds are about 2x that.
    assert abs(loss_triton - loss_torch).item() < 1e-3 * loss_torch.item(), (loss_triton, loss_torch)
    assert rel < 4e-2 and worst < 6e-2, (rel, worst)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses))), losses
    print(f"d{head_dim} R{rank}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 50 steps")
    assert losses[-1] < 0.7 * losses[0], losses  # it learns the fixed batch
