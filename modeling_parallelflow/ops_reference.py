"""Token-by-token loop of the rank-R delta rule: the ground truth every other path is tested against.

State h = S^T, shape [K, V] per head. Per token, sum mode:  h <- h + B_t (A_t^T h + U_t^T);
product mode applies the R components one after another; then o_t = scale * h^T q_t.
"""

import torch
from torch import Tensor

from .packed import PackedSequences, host_bounds


def _token_step(h: Tensor, a: Tensor, b: Tensor, u: Tensor, mode: str) -> Tensor:
    """One token. h [H, K, V], a and b [H, R, K], u [H, R, V] -> new h [H, K, V]."""
    if mode == "sum":
        x = torch.einsum("hrk,hkv->hrv", a, h) + u  # [H, R, V]: all components read the same h
        return h + torch.einsum("hrk,hrv->hkv", b, x)
    for r in range(a.shape[1]):
        x = torch.einsum("hk,hkv->hv", a[:, r], h) + u[:, r]  # [H, V]
        h = h + b[:, r, :, None] * x[:, None, :]
    return h


def delta_rule_reference(
    q: Tensor,
    a: Tensor,
    b: Tensor,
    u: Tensor,
    *,
    mode: str,
    scale: float,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | PackedSequences | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor | None]:
    """Run the recurrence token by token in `dtype` (no validation: `ops.delta_rule_drivers` does it).

    q [B, T, H, K]; a, b [B, T, H, R, K]; u [B, T, H, R, V]; initial_state [N, H, K, V] or None;
    cu_seqlens [N + 1] or a PackedSequences (B == 1) restarts the state at each sequence start.
    Returns o [B, T, H, V] in `dtype` and the final state [N, H, K, V] in `dtype` (or None).
    """
    q, a, b, u = (x.to(dtype) for x in (q, a, b, u))
    bsz, seq_len, heads, _, key_dim = a.shape
    val_dim = u.shape[-1]
    if cu_seqlens is None:
        spans = [(n, 0, seq_len) for n in range(bsz)]
    else:
        bounds = host_bounds(cu_seqlens)
        spans = [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]
    outputs, finals = [], []
    for n, (row, bos, eos) in enumerate(spans):
        if initial_state is None:
            h = q.new_zeros(heads, key_dim, val_dim)
        else:
            h = initial_state[n].to(dtype)
        for t in range(bos, eos):
            h = _token_step(h, a[row, t], b[row, t], u[row, t], mode)
            outputs.append(scale * torch.einsum("hk,hkv->hv", q[row, t], h))
        finals.append(h)
    o = torch.stack(outputs).reshape(bsz, seq_len, heads, val_dim)
    return o, (torch.stack(finals) if output_final_state else None)
