"""Which implementation runs the pflow mixer's glue (short conv + SiLU + L2 norm, gated output RMSNorm).

The fused Triton kernels (`triton_conv`, `triton_norm`) run exactly when the delta rule itself runs on the
Triton backend (config.kernel_backend, or $PFLOW_KERNEL_BACKEND for "auto": `ops._resolve_backend`);
otherwise the torch code in modeling_parallelflow, which stays the reference.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from .ops import _resolve_backend


@functools.cache
def _load_triton_glue() -> SimpleNamespace | None:
    # `from .x import y` form inside a guard: saved checkpoints carry these files and load without triton.
    try:
        from .triton_conv import short_conv_silu
        from .triton_norm import gated_rms_norm
    except ImportError:
        return None
    return SimpleNamespace(short_conv_silu=short_conv_silu, gated_rms_norm=gated_rms_norm)


def triton_glue(kernel_backend: str, device: torch.device) -> SimpleNamespace | None:
    """The Triton glue kernels (`short_conv_silu`, `gated_rms_norm`) when the delta rule resolves to the
    Triton backend for tensors on `device`, else None (the torch path)."""
    if _resolve_backend(kernel_backend, device) != "triton":
        return None
    return _load_triton_glue()
