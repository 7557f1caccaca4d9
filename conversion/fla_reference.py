"""A float64 implementation of fla's DeltaNet and gated DeltaProduct (no forget gate) causal LMs, written from
fla's layer maths (not from PFlow's code): the ground truth for fla -> PFlow conversions on machines without
fla (fla's kernels need a GPU).

Covers the options the converters accept plus the hybrid `attn` layers. Token loop; small inputs only.
Shapes: B batch, T time, H heads, K key width, V value width, n householder steps, D hidden, W conv width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fla_deltanet, fla_deltaproduct
from .fla_common import attention_specs

L2_EPS = 1e-6  # fla's l2norm: x / sqrt(sum(x^2) + eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _short_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv of x [B, T, C]: y_t = sum_j weight[:, 0, j] x_{t-W+1+j}, zeros before t = 0."""
    width, length = weight.shape[-1], x.shape[1]
    y = torch.zeros_like(x)
    for j in range(width):
        shift = width - 1 - j
        if shift < length:
            y[:, shift:] += weight[:, 0, j] * x[:, : length - shift]
    return y


def _delta_rule(q, k, v, beta, heads: int) -> torch.Tensor:
    """q [B, T, H, K]; k [B, T, n, H, K]; v [B, T, n, H, V]; beta [B, T, n, H] -> o [B, T, H, V].

    Per token the n steps S <- S + beta_j k_j (v_j - S^T k_j)^T run in order (S [K, V]); then
    o = S^T q K^-1/2.
    """
    batch, length, steps, _, width_k = k.shape
    state = q.new_zeros(batch, heads, width_k, v.shape[-1])
    out = []
    for t in range(length):
        for j in range(steps):
            kj, vj, bj = k[:, t, j], v[:, t, j], beta[:, t, j]  # [B, H, K], [B, H, V], [B, H]
            error = vj - torch.einsum("bhkv,bhk->bhv", state, kj)
            state = state + bj[..., None, None] * kj[..., :, None] * error[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]) * width_k**-0.5)
    return torch.stack(out, 1)


def _output(o, x, w, prefix: str, eps: float, gated: bool) -> torch.Tensor:
    """Per-head RMSNorm (times SiLU(g_proj(x)) when gated), then o_proj: o [B, T, H, V] -> [B, T, D]."""
    o = _rms_norm(o, w[prefix + "o_norm.weight"], eps)
    if gated:
        o = o * F.silu(x @ w[prefix + "g_proj.weight"].T).view(o.shape)
    return o.flatten(2) @ w[prefix + "o_proj.weight"].T


def _deltanet_layer(x, w, prefix: str, fla: dict, l2_eps: float | None) -> torch.Tensor:
    batch, length, _ = x.shape
    heads = fla["num_heads"]
    feats = {}
    for name in ("q", "k", "v"):
        y = x @ w[f"{prefix}{name}_proj.weight"].T
        if fla["use_short_conv"]:
            y = _short_conv(y, w[f"{prefix}{name}_conv1d.weight"])
        feats[name] = F.silu(y).view(batch, length, heads, -1)
    eps = L2_EPS if l2_eps is None else l2_eps
    q, k = _l2_norm(feats["q"], eps), _l2_norm(feats["k"], eps)
    beta = torch.sigmoid(x @ w[prefix + "b_proj.weight"].T) * (2.0 if fla["allow_neg_eigval"] else 1.0)
    o = _delta_rule(q, k[:, :, None], feats["v"][:, :, None], beta[:, :, None], heads)
    return _output(o, x, w, prefix, fla["norm_eps"], fla["use_gate"])


def _deltaproduct_layer(x, w, prefix: str, fla: dict, l2_eps: float | None) -> torch.Tensor:
    batch, length, _ = x.shape
    heads, steps = fla["num_heads"], fla["num_householder"]
    eps = L2_EPS if l2_eps is None else l2_eps  # fla 0.6 L2-normalises q and k in the kernel
    feats = {}
    for name in ("q", "k", "v"):
        y = x @ w[f"{prefix}{name}_proj.weight"].T
        if fla["use_short_conv"]:
            y = _short_conv(y, w[f"{prefix}{name}_conv1d.weight"])
        feats[name] = F.silu(y)
    q = _l2_norm(feats["q"].view(batch, length, heads, -1), eps)
    k = _l2_norm(feats["k"].view(batch, length, steps, heads, -1), eps)  # rows (n, h, d)
    v = feats["v"].view(batch, length, steps, heads, -1)
    beta = torch.sigmoid(x @ w[prefix + "b_proj.weight"].T).view(batch, length, steps, heads)
    beta = beta * (2.0 if fla["allow_neg_eigval"] else 1.0)
    o = _delta_rule(q, k, v, beta, heads)
    return _output(o, x, w, prefix, fla["norm_eps"], fla["use_output_gate"])


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, halves rotated (fla's RotaryEmbedding, interleaved=False); x [B, T, H, d]."""
    dim, length = x.shape[-1], x.shape[1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=x.dtype) / dim)
    angles = torch.arange(length, dtype=x.dtype)[:, None] * inv_freq  # [T, d/2]
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _attention_layer(x, w, prefix: str, attn: dict) -> torch.Tensor:
    batch, length, hidden = x.shape
    heads, kv_heads = attn["num_heads"], attn["num_kv_heads"]
    dim = hidden // heads
    q = (x @ w[prefix + "q_proj.weight"].T).view(batch, length, heads, dim)
    k = (x @ w[prefix + "k_proj.weight"].T).view(batch, length, kv_heads, dim)
    v = (x @ w[prefix + "v_proj.weight"].T).view(batch, length, kv_heads, dim)
    q, k = _rope(q, attn["rope_theta"]), _rope(k, attn["rope_theta"])
    k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * dim**-0.5
    gap = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # query - key
    allowed = gap >= 0
    if attn["window_size"] is not None:
        allowed &= gap < attn["window_size"]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    o = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return o.reshape(batch, length, hidden) @ w[prefix + "o_proj.weight"].T


def fla_logits(
    config: dict, state_dict: dict[str, torch.Tensor], input_ids: torch.Tensor, l2_eps: float | None = None
) -> torch.Tensor:
    """Logits [B, T, vocab] (float64) of the fla checkpoint (config.json dict + weights) on input_ids [B, T].

    `l2_eps` replaces fla's epsilon in the q/k L2 norms (tests use 0 to isolate the mapping from that detail).
    """
    if config.get("model_type") == fla_deltanet.MODEL_TYPE:
        fla, layer_fn = fla_deltanet.fla_config(config), _deltanet_layer
    elif config.get("model_type") == fla_deltaproduct.MODEL_TYPE:
        fla, layer_fn = fla_deltaproduct.fla_config(config, state_dict), _deltaproduct_layer
    else:
        raise ValueError(f"no fla reference for model_type {config.get('model_type')!r}")
    w = {key: tensor.double() for key, tensor in state_dict.items()}
    attn_layers = {i: spec for spec in attention_specs(fla) for i in spec["layers"]}
    eps = fla["norm_eps"]
    x = w["model.embeddings.weight"][input_ids]
    for i in range(fla["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        h = _rms_norm(x, w[prefix + "attn_norm.weight"], eps)
        if i in attn_layers:
            x = x + _attention_layer(h, w, prefix + "attn.", attn_layers[i])
        else:
            x = x + layer_fn(h, w, prefix + "attn.", fla, l2_eps)
        h = _rms_norm(x, w[prefix + "mlp_norm.weight"], eps)
        gate, up = h @ w[prefix + "mlp.gate_proj.weight"].T, h @ w[prefix + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[prefix + "mlp.down_proj.weight"].T
    x = _rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embeddings.weight"] if fla["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T
