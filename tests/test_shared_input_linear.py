"""Projections of one input with the input gradient summed inside the GEMMs (`shared_input_linear.py`):
values and gradients against separate nn.Linear layers, when the fused backward is taken and when each layer's
own forward must run instead, and that the model's blocks route through it."""

import peft
import pytest
import torch
import torch.nn as nn

from modeling_parallelflow import modeling_parallelflow as modeling
from modeling_parallelflow import shared_input_linear
from modeling_parallelflow.shared_input_linear import plain_linears, project
from tests.model_helpers import random_ids, tiny_model


def _layers(widths, dtype=torch.float64):
    torch.manual_seed(0)
    return tuple(nn.Linear(12, n, bias=False, dtype=dtype) for n in widths)


@pytest.mark.parametrize("used", [(0, 1, 2, 3), (0, 2), (3,)])
def test_values_and_gradients_equal_separate_layers_float64(used):
    """Every output, the input gradient and the weight gradients of the layers whose outputs are used (the
    unused ones get none, as separate layers would), against separate nn.Linear calls."""
    layers = _layers((5, 7, 7, 2))
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    weights = [torch.randn(3, 4, n, dtype=torch.float64) for n in (5, 7, 7, 2)]

    def run(fused: bool):
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        outs = project(xx, layers) if fused else tuple(layer(xx) for layer in layers)
        sum((outs[i] * weights[i]).sum() for i in used).backward()
        return outs, xx.grad, [layer.weight.grad for layer in layers]

    calls = []
    original = shared_input_linear._SharedInputLinear.apply
    shared_input_linear._SharedInputLinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        fused = run(True)
    finally:
        shared_input_linear._SharedInputLinear.apply = original
    assert calls == [1]
    separate = run(False)
    for a, b in zip(fused[0], separate[0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(fused[1], separate[1], rtol=1e-12, atol=1e-12)
    for index, (a, b) in enumerate(zip(fused[2], separate[2], strict=True)):
        if index in used:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        else:
            assert a is None and b is None


def test_gradcheck():
    layers = _layers((3, 4))
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    fused = shared_input_linear._SharedInputLinear.apply
    assert torch.autograd.gradcheck(lambda x, *w: fused(x, *w), (x, *(layer.weight for layer in layers)))


def test_layers_that_are_not_plain_keep_their_own_forward():
    """A bias, a hook, a replaced forward (accelerate) or a PEFT wrapper each change what the layer computes:
    `project` then calls the layers themselves."""
    assert plain_linears(_layers((3, 4)))
    assert not plain_linears((nn.Linear(12, 3),))  # bias
    hooked = _layers((3, 4))
    seen = []
    hooked[1].register_forward_hook(lambda module, args, out: seen.append(1))
    assert not plain_linears(hooked)
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    project(x, hooked)
    assert seen == [1]
    replaced = _layers((3, 4))
    replaced[0].forward = lambda x: torch.zeros(2, 3, dtype=x.dtype)
    assert not plain_linears(replaced)
    assert project(x, replaced)[0].abs().sum() == 0

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _layers((3, 4))

    block = peft.get_peft_model(Block(), peft.LoraConfig(r=2, target_modules=["a"], init_lora_weights=False))
    wrapped = (block.base_model.model.a, block.base_model.model.b)
    assert not plain_linears(wrapped)
    torch.testing.assert_close(project(x, wrapped)[0], wrapped[0](x), rtol=0, atol=0)
    assert not torch.allclose(project(x, wrapped)[0], wrapped[0].base_layer(x))


def test_not_taken_without_autograd_or_under_autocast(monkeypatch):
    layers = _layers((3, 4), dtype=torch.float32)
    monkeypatch.setattr(
        shared_input_linear._SharedInputLinear, "apply", lambda *a: pytest.fail("fused path taken")
    )
    x = torch.randn(2, 12, requires_grad=True)
    with torch.no_grad():
        project(x, layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert project(x, layers)[0].dtype == torch.bfloat16


def test_model_blocks_route_through_it_and_train_alike(monkeypatch):
    """Every mixer (q, k, v, beta) and MLP (gate, up) of the model takes the fused backward, and the model's
    gradients equal those with separate layers."""
    model = tiny_model().double()
    ids = random_ids(2, 9)
    groups = []
    original = shared_input_linear._SharedInputLinear.apply

    def counting(x, *weights):
        groups.append(len(weights))
        return original(x, *weights)

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setattr(shared_input_linear._SharedInputLinear, "apply", counting)
    fused = grads()
    layers = model.config.num_hidden_layers
    assert sorted(groups) == sorted([4] * layers + [2] * layers)
    monkeypatch.setattr(modeling, "project", lambda x, mods: tuple(m(x) for m in mods))
    separate = grads()
    assert fused.keys() == separate.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], separate[name], rtol=1e-10, atol=1e-12, msg=name)


def test_frozen_weights_get_no_gradient_and_the_input_still_does():
    """A frozen projection (as the base layers of adapter training) gets no weight gradient, and the input's
    gradient still sums every projection's part."""
    layers = _layers((3, 4))
    layers[0].weight.requires_grad_(False)
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    a, b = project(x, layers)
    (a.sum() + b.sum()).backward()
    assert layers[0].weight.grad is None
    expected = layers[0].weight.sum(0) + layers[1].weight.sum(0)
    torch.testing.assert_close(x.grad, expected.expand(2, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_model_under_torch_compile_trains_alike():
    """torch.compile (aot_eager: dynamo and the autograd graph, no code generation) traces the custom
    backward; loss and every gradient equal the eager model's."""
    eager = tiny_model().train()
    compiled_model = tiny_model().train()
    compiled_model.load_state_dict(eager.state_dict())
    ids = random_ids(2, 16)
    eager(ids, labels=ids).loss.backward()
    loss = torch.compile(compiled_model, backend="aot_eager")(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager(ids, labels=ids).loss.detach(), rtol=0, atol=0)
    for (name, a), b in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
