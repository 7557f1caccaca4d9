"""Projections of one input, with the input's gradient summed inside the GEMMs.

`shared_input_linear(x, weights)` = tuple(F.linear(x, w) for w in weights). Separate nn.Linear calls on one
input leave autograd to sum their input gradients with elementwise adds: three per mixer (q, k, v, beta),
one per MLP (gate, up), each a full pass over a [tokens, hidden] tensor. Here the backward accumulates them in
the GEMMs themselves (addmm with beta = 1) and launches no add. The outputs, the saved tensors (x and the
weights themselves, no copies) and the weight gradients are those of the separate layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _SharedInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor):
        ctx.save_for_backward(x, *weights)
        ctx.set_materialize_grads(False)  # an unused output costs no GEMM
        return tuple(F.linear(x, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dx = None
        dweights = []
        for index, (grad, weight) in enumerate(zip(grads, weights, strict=True)):
            if grad is None:
                dweights.append(None)
                continue
            grad2 = grad.reshape(-1, grad.shape[-1])
            if ctx.needs_input_grad[0]:
                dx = grad2 @ weight if dx is None else dx.addmm_(grad2, weight)
            dweights.append(grad2.t() @ x2 if ctx.needs_input_grad[1 + index] else None)
        if dx is not None:
            dx = dx.view(x.shape)
        return dx, *dweights


def plain_linears(layers: tuple[nn.Module, ...]) -> bool:
    """Whether every layer is a bias-free nn.Linear that its own forward would not change: no PEFT or
    quantised wrapper, no module hook (DeepSpeed, activation capture), no replaced forward (accelerate)."""
    return all(
        type(layer) is nn.Linear
        and layer.bias is None
        and not (layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks)
        and "forward" not in layer.__dict__
        for layer in layers
    )


def project(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """x [..., D] -> one output [..., N_i] per layer, what `layer(x)` gives. Under autograd, without autocast,
    with plain layers (`plain_linears`): `_SharedInputLinear`, whose backward sums the input gradient inside
    the GEMMs; otherwise each layer's own forward."""
    if (
        torch.is_grad_enabled()
        and len(layers) > 1
        and not torch.is_autocast_enabled(x.device.type)
        and plain_linears(layers)
    ):
        return _SharedInputLinear.apply(x, *(layer.weight for layer in layers))
    return tuple(layer(x) for layer in layers)
