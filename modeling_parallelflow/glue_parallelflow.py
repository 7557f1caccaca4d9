"""Which implementation runs the fused parts of a PFlow block.

- The pflow mixer's glue (short conv + SiLU + L2 norm, gated output RMSNorm), the whole mixer of a decode
  token between its projections (`triton_decode`) and, without autograd, the blocks' RMSNorm with the
  residual add fused: our Triton kernels (`triton_conv`, `triton_norm`, `triton_decode`), `triton_glue`.
- The standard parts (the blocks' RMSNorm, the SwiGLU product and its down projection): Liger-Kernel's fused
  kernels (optional extra `liger`), `liger_layers`.

Both run exactly when the delta rule itself runs on the Triton backend (config.kernel_backend, or
$PFLOW_KERNEL_BACKEND for "auto": `ops._resolve_backend`), Liger's on CUDA tensors and when it imports;
otherwise the torch code in modeling_parallelflow runs, which stays the reference.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from .ops import _resolve_backend
from .swiglu_down import swiglu_down


@functools.cache
def _load_triton_glue() -> SimpleNamespace | None:
    # `from .x import y` form inside a guard: saved checkpoints carry these files and load without triton.
    try:
        from .triton_conv import short_conv_silu
        from .triton_decode import fits, mixer_decode_step_
        from .triton_norm import gated_rms_norm, rms_norm
    except ImportError:
        return None
    return SimpleNamespace(
        short_conv_silu=short_conv_silu,
        gated_rms_norm=gated_rms_norm,
        rms_norm=rms_norm,
        mixer_decode_step_=mixer_decode_step_,
        decode_fits=fits,
    )


def triton_glue(kernel_backend: str, device: torch.device) -> SimpleNamespace | None:
    """The Triton glue kernels (`short_conv_silu`, `gated_rms_norm`, `rms_norm`, `mixer_decode_step_`,
    `decode_fits`) when the delta rule resolves to the Triton backend for tensors on `device`, else None (the
    torch path)."""
    if _resolve_backend(kernel_backend, device) != "triton":
        return None
    return _load_triton_glue()


@functools.cache
def _load_liger() -> SimpleNamespace | None:
    # Guarded `from x import y` of an optional dependency: a checkpoint's remote code loads without it.
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction, swiglu_backward, swiglu_forward
    except ImportError:
        return None
    swiglu = SimpleNamespace(forward=lambda g, u: swiglu_forward(g, u)[2], backward=swiglu_backward)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # "llama" casting: fp32 inside, the normalised x cast to x's dtype, then times weight (as the torch
        # path); not in place: the incoming gradient also feeds the residual branch.
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)

    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        # (residual + x, rms_norm(residual + x)) in one launch; the backward adds the sum's incoming gradient
        # to the norm's in the same kernel (no add of the residual branch's gradients).
        normed, total = LigerFusedAddRMSNormFunction.apply(x, residual, weight, eps, 0.0, "llama", False)
        return total, normed

    return SimpleNamespace(
        rms_norm=rms_norm,
        add_rms_norm=add_rms_norm,
        silu_mul=LigerSiLUMulFunction.apply,
        swiglu_down=lambda gate, up, weight: swiglu_down(gate, up, weight, swiglu),
    )


def liger_layers(kernel_backend: str, device: torch.device) -> SimpleNamespace | None:
    """Liger-Kernel's `rms_norm(x [..., D], weight [D], eps)`, `add_rms_norm(x, residual, weight, eps)` ->
    (s, rms_norm(s)) for s = residual + x, `silu_mul(gate, up)` (silu(gate) * up) and
    `swiglu_down(gate, up, weight [D, I])` (down projection of that product, recomputed in the backward:
    `swiglu_down.py`) for CUDA tensors when the delta rule resolves to the Triton backend and liger_kernel
    imports, else None. Under autograd what they save is what the backward keeps (no fp32 copy of the norm's
    input, no silu(gate), no product); without it the SwiGLU product is one launch instead of two (a CUDA
    graph's decode step is bound by its launch count), and the RMSNorm is `triton_norm.rms_norm`'s."""
    if device.type != "cuda":
        return None
    if _resolve_backend(kernel_backend, device) != "triton":
        return None
    return _load_liger()
