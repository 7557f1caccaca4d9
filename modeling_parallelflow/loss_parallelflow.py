"""Causal-LM cross-entropy of a linear head without full-vocabulary logits.

`linear_cross_entropy(hidden, weight, labels, ...)` equals transformers' `ForCausalLMLoss` applied to
`hidden @ weight.T` (labels shifted inside, ignore_index tokens skipped, mean over the kept tokens, or
sum / num_items_in_batch when Trainer passes it), value and gradients, but never holds more than one
chunk of logits. Implementations:

- "liger": Liger-Kernel's fused linear cross-entropy (optional extra `liger`; CUDA tensors only).
- "torch": `ChunkedLinearCrossEntropy`, chunks of tokens; the backward recomputes each chunk's logits
  from the saved inputs and per-token log-sum-exp (saved: hidden, weight, targets, lse [N] fp32).

"auto" (default) takes liger for CUDA tensors when it imports, else torch; `$PFLOW_LINEAR_CE` ("auto",
"liger", "torch") overrides it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

LINEAR_CE_ENV = "PFLOW_LINEAR_CE"
LINEAR_CE_CHOICES = ("auto", "liger", "torch")
CHUNK_ELEMENTS = 1 << 26  # fp32 logits per chunk: 256 MiB (2,097 tokens at a 32,000-token vocabulary)


@functools.cache
def _load_liger() -> Callable | None:
    # `from x import y` of an optional dependency, guarded: a checkpoint's remote code loads without it.
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def resolve_linear_ce(device: torch.device) -> str:
    """ "liger" or "torch" for tensors on `device`, following $PFLOW_LINEAR_CE (default "auto")."""
    choice = os.environ.get(LINEAR_CE_ENV, "").strip().lower() or "auto"
    if choice not in LINEAR_CE_CHOICES:
        raise ValueError(
            f"environment variable {LINEAR_CE_ENV} must be one of {LINEAR_CE_CHOICES}, got {choice!r}"
        )
    if choice == "torch":
        return "torch"
    if choice == "liger":
        if _load_liger() is None:
            raise RuntimeError(
                f"{LINEAR_CE_ENV}=liger, but liger_kernel does not import (pip install liger-kernel)"
            )
        if device.type != "cuda":
            raise ValueError(f"{LINEAR_CE_ENV}=liger needs CUDA tensors, got {device}")
        return "liger"
    return "liger" if device.type == "cuda" and _load_liger() is not None else "torch"


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid tokens of CE(hidden @ weight.T, targets) / divisor, chunk by chunk over tokens.

    hidden [N, D] and weight [V, D] in one dtype (logits are made in it, then upcast to fp32, as
    `lm_head` + `ForCausalLMLoss` do); targets [N] int64; divisor a 0-dim fp32 tensor.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, divisor):
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start : start + chunk] @ weight.T).float()  # [n, V]
            t = targets[start : start + chunk]
            valid = t != ignore_index
            lse_c = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
            total += torch.where(valid, lse_c - picked, 0.0).sum()
            lse[start : start + chunk] = lse_c
        ctx.save_for_backward(hidden, weight, targets, lse, divisor)
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, lse, divisor = ctx.saved_tensors
        scale = grad_loss / divisor
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start : start + ctx.chunk]
            t = targets[start : start + ctx.chunk]
            valid = t != ctx.ignore_index
            probs = (h @ weight.T).float().sub_(lse[start : start + ctx.chunk, None]).exp_()  # softmax [n, V]
            probs.scatter_add_(1, torch.where(valid, t, 0)[:, None], -valid[:, None].float())
            grad_logits = probs.mul_(torch.where(valid, scale, 0.0)[:, None]).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + ctx.chunk] = grad_logits @ weight
            if ctx.needs_input_grad[1]:
                grad_weight += (grad_logits.T @ h).float()
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss(hidden @ weight.T, labels, ...) without materialising the logits.

    hidden [B, T, D]; weight [V, D]; labels [B, T] (not shifted: position t is scored against labels t + 1;
    ignore_index skipped) or, instead, shift_labels [B, T] (already shifted). Mean over the kept tokens,
    or their sum / num_items_in_batch when given. Returns a 0-dim fp32 tensor.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        divisor = (targets != ignore_index).sum().float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    if resolve_linear_ce(hidden.device) == "liger":
        fused = _load_liger()
        return fused(hidden, weight, targets, ignore_index=ignore_index, reduction="sum").float() / divisor
    return ChunkedLinearCrossEntropy.apply(hidden, weight.to(hidden.dtype), targets, ignore_index, divisor)
