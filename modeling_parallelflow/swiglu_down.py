"""SwiGLU's down projection with the product recomputed in the backward.

`swiglu_down(gate, up, weight, kernels)` = F.linear(silu(gate) * up, weight), keeping gate and up for the
backward but not the product: one [..., I] activation less per layer (5.5 KiB per token at the 340M shape,
I = 2816, bf16) for one more elementwise pass in the backward. `kernels` computes the product and its
gradient: Liger-Kernel's fused SwiGLU kernels on a GPU (`glue_parallelflow.liger_layers`), `TORCH_KERNELS`
(the reference formulas) elsewhere.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


def _silu_mul_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _silu_mul_grads_torch(gate: torch.Tensor, up: torch.Tensor, dproduct: torch.Tensor):
    """(dgate, dup) of silu(gate) * up, in gate's / up's dtypes."""
    g, dp = gate.float(), dproduct.float()
    sig = torch.sigmoid(g)
    dgate = dp * up.float() * sig * (1 + g * (1 - sig))
    return dgate.to(gate.dtype), (dp * g * sig).to(up.dtype)


TORCH_KERNELS = SimpleNamespace(forward=_silu_mul_torch, backward=_silu_mul_grads_torch)


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, gate, up, weight, kernels):
        ctx.save_for_backward(gate, up, weight)
        ctx.kernels = kernels
        return F.linear(kernels.forward(gate, up), weight)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        gate, up, weight = ctx.saved_tensors
        dweight = None
        if ctx.needs_input_grad[2]:
            product = ctx.kernels.forward(gate, up)
            dweight = dout.reshape(-1, dout.shape[-1]).t() @ product.reshape(-1, product.shape[-1])
        dproduct = (dout @ weight.to(dout.dtype)).contiguous()
        dgate, dup = ctx.kernels.backward(gate, up, dproduct)
        return dgate, dup, dweight, None


def swiglu_down(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, kernels: SimpleNamespace = TORCH_KERNELS
) -> torch.Tensor:
    """gate, up [..., I] (contiguous), weight [D, I] -> F.linear(silu(gate) * up, weight) [..., D].

    kernels.forward(gate, up) -> product; kernels.backward(gate, up, dproduct) -> (dgate, dup). A backward
    kernel may overwrite gate and up with their gradients (Liger's does): the graph is then good for one
    backward (no retain_graph)."""
    return _SwiGLUDown.apply(gate, up, weight, kernels)
