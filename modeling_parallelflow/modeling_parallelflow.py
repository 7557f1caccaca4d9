"""ParallelFlow language model: rank-R delta-rule mixers (optionally mixed with softmax attention layers),
Llama-style blocks with SwiGLU MLPs.

Shapes: B batch, T new tokens, S attended key positions, D hidden, H heads, R rank, K key width,
V value width.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils.generic import can_return_tuple

from .cache_parallelflow import PFlowCache, PFlowLayerState, PFlowStaticCache, PFlowStaticLayerState
from .compat_transformers import (
    CACHE_FIELD,
    cache_of,
    cached_prefix_length,
    output_with_cache,
    resolve_cache_argument,
)
from .configuration_parallelflow import PFlowConfig
from .glue_parallelflow import liger_layers, triton_glue
from .loss_parallelflow import linear_cross_entropy
from .ops import beta_drivers, delta_rule, delta_rule_drivers
from .ops_exact_flow import exact_flow_drivers
from .packed import PackedSequences
from .shared_input_linear import project

DECODE_MAX_TOKENS = 8  # cached continuations this short run the recurrent algorithm (same maths, less work)
# model -> (decode context, PFlowStaticCache): the static cache a model's last generate() made, for the next
# one to reuse (PFlowForCausalLM._prepare_cache_for_generation). Kept beside the model, not on it, so it is
# never in a state_dict, saved, deep-copied or pickled with it (CUDA graphs cannot be); dies with the model.
_KEPT_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# A peft tuner layer's state that decides its forward but moves no weight (PFlowForCausalLM._decode_context).
ADAPTER_STATE = ("disable_adapters", "active_adapters", "merged_adapters", "scaling")


def gated_rms_norm_torch(
    o: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """The torch path of `triton_norm.gated_rms_norm`: o [..., V] -> RMSNorm(o) (fp32 inside) * weight,
    times silu(gate [..., V]) when a gate is given."""
    dtype = o.dtype
    x = o.float()
    y = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return y * F.silu(gate) if gate is not None else y


class PFlowRMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32. Given the model's config, where the delta rule runs on
    the Triton backend: without autograd our one-launch kernel (`triton_norm.rms_norm`), under autograd
    Liger-Kernel's fused RMSNorm where `glue_parallelflow.liger_layers` allows (CUDA, liger installed)."""

    def __init__(self, dim: int, eps: float = 1e-6, config: PFlowConfig | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.config = config

    def _inference_kernel(self, x: torch.Tensor):
        if self.config is None or torch.is_grad_enabled():
            return None
        glue = triton_glue(self.config.kernel_backend, x.device)
        return glue.rms_norm if glue is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._inference_kernel(x)
        if kernel is not None:
            return kernel(x, self.weight, self.eps)
        liger = liger_layers(self.config.kernel_backend, x.device) if self.config is not None else None
        if liger is not None:
            return liger.rms_norm(x, self.weight, self.eps)
        return gated_rms_norm_torch(x, self.weight, None, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, norm(s)) for s = residual + x [..., D]: one launch on the Triton backend, without autograd our
        kernel, under autograd Liger-Kernel's fused add + RMSNorm where `liger_layers` allows and x and the
        residual share a dtype (under autocast they may not, and the sum then keeps the wider one)."""
        kernel = self._inference_kernel(x)
        if kernel is not None:
            return kernel(x, self.weight, self.eps, residual=residual)
        liger = liger_layers(self.config.kernel_backend, x.device) if self.config is not None else None
        if liger is not None and x.dtype == residual.dtype:
            return liger.add_rms_norm(x, residual, self.weight, self.eps)
        total = residual + x
        return total, self(total)


class PFlowMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); where `glue_parallelflow.liger_layers` allows, the product
    through Liger-Kernel's fused kernel and, with a plain nn.Linear down projection (not a PEFT-wrapped
    one), recomputed in the backward (`swiglu_down.py`): keeps gate and up, not silu(gate) or the product."""

    def __init__(self, config: PFlowConfig):
        super().__init__()
        self.config = config
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj))
        liger = liger_layers(self.config.kernel_backend, x.device)
        if liger is None:
            return self.down_proj(F.silu(gate) * up)
        if type(self.down_proj) is nn.Linear:
            return liger.swiglu_down(gate, up, self.down_proj.weight)
        return self.down_proj(liger.silu_mul(gate, up))


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim (fla's l2norm: bounded gradient at x = 0)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[N + 1] boundaries -> [total] sequence index of every packed token."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None, segments: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv of x [B, T, C] with weight [C, 1, W] continuing from tail [B, C, W-1].

    Returns (y [B, T, C], new tail [B, C, W-1]). With `segments` [T] (packed sequences, B = 1) no tap
    crosses a sequence boundary.
    """
    batch, length, channels = x.shape
    width = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(batch, channels, width - 1)
    xx = torch.cat([tail.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, W-1+T]
    if segments is None:
        y = F.conv1d(xx, weight.to(x.dtype), groups=channels)
    else:
        windows = xx.unfold(-1, width, 1)  # [B, C, T, W]: taps t-W+1 .. t
        tap = (
            torch.arange(length, device=x.device)[:, None]
            + torch.arange(width, device=x.device)
            - (width - 1)
        )
        same = (tap >= 0) & (segments[tap.clamp(min=0)] == segments[:, None])  # [T, W]
        y = (windows * same.to(x.dtype) * weight.to(x.dtype)[:, 0, None, :]).sum(-1)
    return y.transpose(1, 2), xx[:, :, xx.shape[-1] - (width - 1) :]


def short_conv_silu_torch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    group: int,
    normalize: bool,
    tail: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    pad_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch path of `triton_conv.short_conv_silu` (and its reference): pads zeroed -> causal depthwise
    conv (skipped when weight is None) -> SiLU -> L2 norm per group of `group` channels if `normalize`.

    x [B, T, C]; weight [C, 1, W] or None; tail [B, C, W-1] or None; segments [T] (packed, B = 1) or None;
    pad_mask [B, T] bool or None. Returns (y [B, T, C], new tail [B, C, W-1] or None without a conv).
    """
    new_tail = None
    if pad_mask is not None:
        x = torch.where(pad_mask[..., None], x, torch.zeros_like(x))
    if weight is not None:
        x, new_tail = causal_depthwise_conv(x, weight, tail, segments)
    y = F.silu(x)
    if normalize:
        y = l2_normalize(y.unflatten(-1, (-1, group))).flatten(-2)
    return y, new_tail


class PFlowMixer(nn.Module):
    """The rank-R delta-rule token mixer (a DeltaNet layer with R keys, values and betas per head)."""

    def __init__(self, config: PFlowConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        h, r, k, v = config.num_heads, config.rank, config.head_k_dim, config.head_v_dim
        self.num_heads, self.rank, self.head_k_dim, self.head_v_dim = h, r, k, v
        d = config.hidden_size
        self.q_proj = nn.Linear(d, h * k, bias=False)
        self.k_proj = nn.Linear(d, h * r * k, bias=False)
        self.v_proj = nn.Linear(d, h * r * v, bias=False)
        self.b_proj = nn.Linear(d, h * r, bias=False)
        if config.use_short_conv:
            w = config.conv_size
            self.q_conv1d = nn.Conv1d(h * k, h * k, w, groups=h * k, bias=False)
            self.k_conv1d = nn.Conv1d(h * r * k, h * r * k, w, groups=h * r * k, bias=False)
            self.v_conv1d = nn.Conv1d(h * r * v, h * r * v, w, groups=h * r * v, bias=False)
        if config.use_gate:
            self.g_proj = nn.Linear(d, h * v, bias=False)
        self.o_norm = PFlowRMSNorm(v, eps=config.norm_eps)
        self.o_proj = nn.Linear(h * v, d, bias=False)

    @property
    def beta_scale(self) -> float:
        """Steps in (0, 1), or (0, 2) with negative eigenvalues; sum mode divides by R so that the R steps
        together never expand the state. One multiply of sigmoid(b_proj(x))."""
        scale = 2.0 if self.config.allow_neg_eigval else 1.0
        return scale / self.rank if self.config.rank_mode == "sum" else scale

    def _fused_decode(self, glue, state: PFlowLayerState | None, length: int) -> bool:
        """Whether this forward is one token on a static cache without autograd that the one-kernel decode
        step (`triton_decode`) takes: its tails and state are updated in place, as a static cache's are."""
        return (
            glue is not None
            and length == 1
            and isinstance(state, PFlowStaticLayerState)
            and not torch.is_grad_enabled()
            and self.config.flow != "exact"
            and (not self.config.use_short_conv or self.config.conv_size >= 2)
            and glue.decode_fits(self.head_k_dim, self.head_v_dim)
        )

    def _project(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, T, D] -> {"q": [B, T, H*K], "k", "v": [B, T, H*R*K or V], "b": [B, T, H*R], "g": [B, T, H*V]
        with the gate}: the input projections, their input gradient summed inside the GEMMs
        (`shared_input_linear.project`)."""
        names = "qkvbg" if self.config.use_gate else "qkvb"
        return dict(zip(names, project(x, tuple(getattr(self, f"{n}_proj") for n in names)), strict=True))

    def _decode_token(self, x, pad_mask, state: PFlowStaticLayerState, glue) -> torch.Tensor:
        """x [B, 1, D] -> [B, 1, D] through `triton_decode.mixer_decode_step_` (what `forward` computes)."""
        batch = x.shape[0]
        projected = {name: y.view(batch, -1) for name, y in self._project(x).items()}
        q, k, v, beta_logits = (projected[n] for n in "qkvb")
        gate = projected.get("g")
        conv = self.config.use_short_conv
        o = glue.mixer_decode_step_(
            q,
            k,
            v,
            beta_logits,
            gate,
            tuple(getattr(self, f"{n}_conv1d").weight for n in "qkv") if conv else None,
            tuple(state.conv[n] for n in "qkv") if conv else None,
            state.recurrent,
            self.o_norm.weight,
            rank=self.rank,
            product=self.config.rank_mode == "product",
            beta_scale=self.beta_scale,
            norm_eps=self.o_norm.eps,
            keep=pad_mask[:, 0] if pad_mask is not None else None,
        )
        return self.o_proj(o.view(batch, 1, -1))

    def _features(self, name: str, y, state: PFlowLayerState | None, segments, pad_mask, positions, glue):
        """The projection y [B, T, C] -> (pads zeroed) -> short causal conv -> SiLU -> (q, k: L2 norm per head
        and rank) [B, T, C].

        Triton glue (`glue` not None): one fused kernel, unless a cache tail needs a gradient (the kernel
        treats tails as constants); `positions` [T] int32: the packed tokens' positions in their sequences.
        """
        group = self.head_v_dim if name == "v" else self.head_k_dim
        normalize = name != "v"
        tail = state.conv.get(name) if state is not None and self.config.use_short_conv else None
        if glue is not None and self.config.use_short_conv and (tail is None or not tail.requires_grad):
            y, new_tail = glue.short_conv_silu(
                y,
                getattr(self, f"{name}_conv1d").weight,
                group=group,
                normalize=normalize,
                tail=tail,
                pos=positions,
                pad_mask=pad_mask,
                keep_tail=state is not None,
            )
        else:
            weight = getattr(self, f"{name}_conv1d").weight if self.config.use_short_conv else None
            y, new_tail = short_conv_silu_torch(
                y, weight, group=group, normalize=normalize, tail=tail, segments=segments, pad_mask=pad_mask
            )
        if state is not None and new_tail is not None:
            state.conv[name] = new_tail
        return y

    def forward(
        self,
        x: torch.Tensor,
        pad_mask: torch.Tensor | None = None,
        state: PFlowLayerState | None = None,
        cu_seqlens: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        segment_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, D], pad_mask [B, T] bool (True = real token) -> [B, T, D]; updates `state` in place.
        Packed inputs: cu_seqlens [N + 1], segments [T] (sequence of each token), segment_positions [T] int32
        (position of each token in its sequence)."""
        batch, length, _ = x.shape
        h, r, k, v = self.num_heads, self.rank, self.head_k_dim, self.head_v_dim
        glue = triton_glue(self.config.kernel_backend, x.device)
        if self._fused_decode(glue, state, length):
            return self._decode_token(x, pad_mask, state, glue)
        projected = self._project(x)
        features = [
            self._features(n, projected[n], state, segments, pad_mask, segment_positions, glue) for n in "qkv"
        ]
        q = features[0].view(batch, length, h, k)
        keys = features[1].view(batch, length, h, r, k)
        values = features[2].view(batch, length, h, r, v)
        q, keys = q.to(values.dtype), keys.to(values.dtype)  # under autocast the L2 norm returns fp32
        beta = torch.sigmoid(projected["b"].float()).view(batch, length, h, r)
        beta_scale = self.beta_scale
        if beta_scale != 1.0:
            beta = beta * beta_scale
        if pad_mask is not None:
            beta = beta * pad_mask[..., None, None]  # pads leave the state untouched
        beta = beta.to(values.dtype)

        initial_state = state.recurrent if state is not None else None
        algorithm = self.config.algorithm
        if initial_state is not None and length <= DECODE_MAX_TOKENS and not torch.is_grad_enabled():
            algorithm = "recurrent"
        op_kwargs = dict(
            mode=self.config.rank_mode,
            initial_state=initial_state,
            output_final_state=state is not None,
            cu_seqlens=cu_seqlens,
            chunk_size=self.config.chunk_size,
            algorithm=algorithm,
            backend=self.config.kernel_backend,
        )
        if self.config.flow == "exact":
            a, u = beta_drivers(keys, values, beta)
            a, u = exact_flow_drivers(a, keys, u, self.config.rank_mode, backend=self.config.kernel_backend)
            o, final_state = delta_rule_drivers(q, a, keys, u, **op_kwargs)
        else:
            o, final_state = delta_rule(q, keys, values, beta, **op_kwargs)
        if state is not None:
            state.recurrent = final_state

        gate = projected["g"].view(batch, length, h, v) if self.config.use_gate else None
        if glue is not None:
            o = glue.gated_rms_norm(o, self.o_norm.weight, gate, self.o_norm.eps)  # [B, T, H, V]
        else:
            o = gated_rms_norm_torch(o, self.o_norm.weight, gate, self.o_norm.eps)
        return self.o_proj(o.reshape(batch, length, h * v))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama RoPE (halves rotated) of x [B, N, T, D] at positions [B, T]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = positions[:, None, :, None].float() * inv_freq  # [B, 1, T, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    return (x.float() * angles.cos() + rotate_half(x.float()) * angles.sin()).to(x.dtype)


class PFlowAttention(nn.Module):
    """Softmax attention (full or sliding window) with RoPE and grouped KV heads, through SDPA."""

    def __init__(self, config: PFlowConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        self.window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        d = config.hidden_size
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=config.attention_output_bias)
        if config.attention_qk_norm:
            self.q_norm = PFlowRMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = PFlowRMSNorm(self.head_dim, eps=config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor | None,
        cache: PFlowCache | None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, D], positions [B, T], key_valid [B, past + T] bool (static caches: [B, max_len]) or None
        -> [B, T, D]."""
        batch, length, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.config.attention_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, self.config.rope_theta)
        k = apply_rope(k, positions, self.config.rope_theta)
        if cache is not None:
            k, v, key_slot, query_slot, key_valid = cache.update_attention(self.layer_idx, k, v, key_valid)
        else:
            key_slot = query_slot = torch.arange(length, device=x.device)
        allowed = key_slot[None, :] <= query_slot[:, None]  # [T, S]
        if self.window is not None:
            allowed = allowed & (query_slot[:, None] - key_slot[None, :] < self.window)
        if segments is not None:
            allowed = allowed & (segments[:, None] == segments[None, :])
        allowed = allowed[None, None].expand(batch, 1, length, k.shape[2])
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, :]
        allowed = allowed | (key_slot[None, :] == query_slot[:, None])  # a pad query sees itself: no NaN rows
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(o.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class PFlowDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: PFlowConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.layer_idx = layer_idx
        self.input_layernorm = PFlowRMSNorm(config.hidden_size, eps=config.norm_eps, config=config)
        if self.layer_type == "pflow":
            self.linear_attn = PFlowMixer(config, layer_idx)
        else:
            self.self_attn = PFlowAttention(config, layer_idx)
        self.post_attention_layernorm = PFlowRMSNorm(config.hidden_size, eps=config.norm_eps, config=config)
        self.mlp = PFlowMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        pad_mask: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache: PFlowCache | None = None,
        cu_seqlens: torch.Tensor | PackedSequences | None = None,
        segments: torch.Tensor | None = None,
        segment_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, T, D], positions [B, T]; pad_mask [B, T] (new tokens) and key_valid [B, past + T]
        bool (True = real token) or None; packed inputs as in PFlowMixer.forward."""
        residual = hidden_states
        x = self.input_layernorm(hidden_states)
        if self.layer_type == "pflow":
            state = cache.layers[self.layer_idx] if cache is not None else None
            x = self.linear_attn(x, pad_mask, state, cu_seqlens, segments, segment_positions)
        else:
            x = self.self_attn(x, positions, key_valid, cache, segments)
        hidden_states, x = self.post_attention_layernorm.add_and_norm(x, residual)
        return hidden_states + self.mlp(x)


class PFlowPreTrainedModel(PreTrainedModel):
    config_class = PFlowConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PFlowDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            bound = 1.0 / math.sqrt(module.kernel_size[0])  # depthwise: fan_in = kernel width
            init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, PFlowRMSNorm):
            init.ones_(module.weight)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward() builds its own PFlowCache

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As PreTrainedModel's, and `auto_map` names both AutoModel and AutoModelForCausalLM."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoConfig", "configuration_parallelflow.PFlowConfig")
        auto_map.setdefault("AutoModel", "modeling_parallelflow.PFlowModel")
        auto_map.setdefault("AutoModelForCausalLM", "modeling_parallelflow.PFlowForCausalLM")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


def _validate_packed(
    cu_seqlens: torch.Tensor | PackedSequences, batch: int, length: int, cache, device: torch.device
) -> PackedSequences:
    """A forward's packed sequences, validated once and shared by all its layers: a cu_seqlens tensor [N + 1]
    is read to the host here (the forward's only host read), a PackedSequences is only checked (none)."""
    if batch != 1:
        raise ValueError(f"cu_seqlens needs packed inputs of batch size 1, got batch size {batch}")
    if cache is not None:
        raise ValueError("cu_seqlens (packed sequences) cannot be combined with a cache")
    if not isinstance(cu_seqlens, PackedSequences):
        return PackedSequences(cu_seqlens, total=length, device=device)
    if cu_seqlens.total_tokens != length or cu_seqlens.device != device:
        raise ValueError(
            f"cu_seqlens {cu_seqlens!r} must pack the {length} tokens of the inputs, on their device {device}"
        )
    return cu_seqlens


class PFlowModel(PFlowPreTrainedModel):
    def __init__(self, config: PFlowConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(PFlowDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = PFlowRMSNorm(config.hidden_size, eps=config.norm_eps, config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: PFlowCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.Tensor | PackedSequences | None = None,
        cache: PFlowCache | None = None,
        **ignored,
    ) -> BaseModelOutputWithPast:
        """input_ids [B, T] (or inputs_embeds [B, T, D]); attention_mask [B, past + T] with 1 = token, 0 = pad
        (left padding for batched generation); cu_seqlens [N + 1] packs N sequences into a batch of one (a
        tensor, validated with one host read per forward, or a `packed.PackedSequences`: no host read).

        The cache comes as `cache` (transformers >= 5.24) or `past_key_values` (older). A cache that is
        passed is always read and updated; `use_cache` (default: config.use_cache outside training) only
        decides whether a new one is made. `ignored` may hold only IGNORED_KWARGS.
        """
        _check_kwargs("PFlowModel", ignored, IGNORED_KWARGS)
        step = self.prepare_step(
            input_ids, attention_mask, position_ids, inputs_embeds, use_cache, output_attentions,
            cu_seqlens, resolve_cache_argument(cache, past_key_values),
        )  # fmt: skip
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        hidden_states, all_hidden_states = self.run_layers(hidden_states, step, output_hidden_states)
        return output_with_cache(
            BaseModelOutputWithPast,
            step.cache,
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
        )

    def prepare_step(
        self,
        input_ids,
        attention_mask,
        position_ids,
        inputs_embeds,
        use_cache,
        output_attentions,
        cu_seqlens,
        cache,
    ) -> StepInputs:
        """Validate a forward's inputs and resolve its cache, masks and positions (nothing is computed)."""
        _check_no_attention_weights(output_attentions, self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            _check_input_ids(input_ids)
            batch, length = input_ids.shape
            device = input_ids.device
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape [batch, tokens, {self.config.hidden_size}], "
                    f"got {tuple(inputs_embeds.shape)}"
                )
            batch, length = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        if length == 0:
            raise ValueError("the inputs hold no tokens (sequence length 0)")
        if cache is not None:
            if not isinstance(cache, PFlowCache):
                raise ValueError(f"the cache must be a PFlowCache, got {type(cache).__name__}")
            cache.check_compatible(self.config, batch)
        elif use_cache if use_cache is not None else (self.config.use_cache and not self.training):
            cache = PFlowCache(self.config)
        static = isinstance(cache, PFlowStaticCache)
        if static:
            cache.check_room(length)
        past = cache.get_seq_length() if cache is not None else 0

        packed = segments = segment_positions = None
        if cu_seqlens is not None:
            packed = _validate_packed(cu_seqlens, batch, length, cache, device)  # the forward's one host read
            segments = segment_ids_from_cu_seqlens(packed.cu_seqlens, length)
            starts = packed.cu_seqlens[segments]
            segment_positions = (torch.arange(length, device=segments.device) - starts).to(torch.int32)
        key_valid = pad_mask = None
        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape[0] != batch:
                raise ValueError(
                    "attention_mask must be 2D [batch, past + new tokens], "
                    f"got shape {tuple(attention_mask.shape)}"
                )
            if attention_mask.shape[1] != past + length:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} positions; it must cover the "
                    f"{past} cached and {length} new ones ({past + length})"
                )
            key_valid = attention_mask.bool()  # no host-side all() check: it would sync every decode step
            pad_mask = key_valid[:, -length:]
        if position_ids is not None:
            if (
                position_ids.ndim != 2
                or position_ids.shape[1] != length
                or position_ids.shape[0] not in (1, batch)
            ):
                raise ValueError(
                    f"position_ids must have shape [{batch} or 1, {length}] (one per new token), "
                    f"got {tuple(position_ids.shape)}"
                )
        elif segments is not None:
            position_ids = segment_positions.long()[None]
        elif static:
            pass  # from the cache's device-side mask, inside the step (run_layers)
        elif key_valid is not None:
            position_ids = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        else:
            position_ids = torch.arange(past, past + length, device=device)[None].expand(batch, -1)
        return StepInputs(
            length,
            position_ids,
            pad_mask,
            None if static else key_valid,
            cache,
            packed,
            segments,
            segment_positions,
        )

    def run_layers(
        self, hidden_states: torch.Tensor, step: StepInputs, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """hidden_states [B, T, D] through the layers and the final norm; advances the cache. On a static
        cache it only touches preallocated tensors and syncs nothing with the host (CUDA-graph safe).
        Returns the normed hidden states and, if asked, the num_layers + 1 hidden states."""
        cache, key_valid, position_ids = step.cache, step.key_valid, step.position_ids
        all_hidden_states = []
        with cache.transaction() if cache is not None else contextlib.nullcontext():
            if isinstance(cache, PFlowStaticCache):
                key_valid, new_positions = cache.record_new_tokens(step.pad_mask, step.length)
                if position_ids is None:
                    position_ids = new_positions
            for layer in self.layers:
                if output_hidden_states:
                    all_hidden_states.append(hidden_states)
                hidden_states = layer(
                    hidden_states,
                    position_ids,
                    pad_mask=step.pad_mask,
                    key_valid=key_valid,
                    cache=cache,
                    cu_seqlens=step.cu_seqlens,
                    segments=step.segments,
                    segment_positions=step.segment_positions,
                )
            if cache is not None:
                cache.advance(step.length)
        hidden_states = self.norm(hidden_states)
        if not output_hidden_states:
            return hidden_states, None
        return hidden_states, (*all_hidden_states, hidden_states)


@dataclass
class StepInputs:
    """A forward's resolved inputs: T new tokens, position_ids [B, T] (None on a static cache: computed in
    the step), pad_mask [B, T] and key_valid [B, past + T] bool (True = real token) or None; packed inputs:
    cu_seqlens (a PackedSequences: validated, one host read), segments [T] and segment_positions [T] int32
    (computed once per forward, shared by all layers)."""

    length: int
    position_ids: torch.Tensor | None
    pad_mask: torch.Tensor | None
    key_valid: torch.Tensor | None
    cache: PFlowCache | None
    cu_seqlens: PackedSequences | None = None
    segments: torch.Tensor | None = None
    segment_positions: torch.Tensor | None = None


def _check_input_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2D tensor [batch, tokens] (add a batch dim), got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")


def _check_no_attention_weights(output_attentions: bool | None, config: PFlowConfig) -> None:
    if output_attentions if output_attentions is not None else getattr(config, "output_attentions", False):
        raise ValueError(
            "output_attentions=True is not supported: pflow layers have no attention weights (their state is "
            "a recurrent matrix), and the attention layers run through SDPA"
        )


# Keyword arguments that PFlowForCausalLM.forward passes on to `self.loss_function`.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Accepted and ignored on purpose: `cache_position` (older callers) - positions follow from the cache's token
# count and the attention mask. Not a named parameter: transformers >= 5.24 would then make one per step.
IGNORED_KWARGS = ("cache_position",)


def _check_kwargs(model: str, kwargs: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{model}.forward got unexpected keyword arguments {unknown}")


class PFlowForCausalLM(PFlowPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PFlowConfig):
        super().__init__(config)
        self.model = PFlowModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _graph_step(self, cache, input_ids, pad_mask, position_ids) -> torch.Tensor:
        """One decode step on a static cache, as decode_graph.DecodeGraphs captures it: logits [B, 1, V]."""
        step = StepInputs(input_ids.shape[1], position_ids, pad_mask, None, cache)
        hidden_states, _ = self.model.run_layers(self.model.embed_tokens(input_ids), step)
        return self.lm_head(hidden_states[:, -1:, :])

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ):
        """As GenerationMixin's, and `cache_implementation="static"` makes a PFlowStaticCache (CUDA graphs
        on a GPU unless PFLOW_CUDA_GRAPHS=0), which transformers would otherwise ignore for this model.
        `prefill_chunk_size=N` (transformers' chunked prefill: the prompt goes through the model N tokens at a
        time, so prefill activations stay those of N tokens) gets a PFlowCache up front on the dynamic path.

        The model keeps the static cache it made and the next such generate() reuses it, reset in place, if
        it holds as many rows (batch x beams) and at least as many positions and nothing its decode graphs
        depend on changed (`_decode_context`): the graphs captured on its tensors then replay again instead
        of being captured anew. Otherwise a new cache replaces it. A cache passed in is used as it is and
        never kept. A cache returned by generate() (return_dict_in_generate) is the kept one: the next
        static generate() resets it."""
        wants_static = generation_config.cache_implementation == "static"
        if (
            not wants_static
            or model_kwargs.get(CACHE_FIELD) is not None
            or generation_config.use_cache is False
        ):
            super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
            if (
                generation_config.prefill_chunk_size
                and model_kwargs.get(CACHE_FIELD) is None
                and generation_config.use_cache is not False
            ):  # transformers' chunked prefill wants a cache before the first forward, which builds this one
                model_kwargs[CACHE_FIELD] = PFlowCache(self.config)
            return
        if generation_config.max_cache_len is not None:
            max_cache_length = max(max_cache_length, generation_config.max_cache_len)
        rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
        context = self._decode_context(rows)
        cache = self._kept_static_cache(context, max_cache_length)
        if cache is None:
            cache = PFlowStaticCache(
                self.config, rows, max_cache_length, dtype=self.dtype, device=self.device
            )
        _KEPT_STATIC_CACHES[self] = context, cache
        model_kwargs[CACHE_FIELD] = cache

    def _decode_context(self, rows: int) -> tuple:
        """What a static cache of `rows` rows and its captured decode graphs depend on besides the cache's
        own tensors: dtype, device, the config, autocast, train / eval mode, the weights by address (a graph
        reads them there) and the Python-side state of adapter layers (peft's disable_adapter, set_adapter,
        merge / unmerge and scaling change what a layer computes, not where its weights are)."""
        device = self.device
        autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
        weights = tuple(p.data_ptr() for p in self.parameters())
        adapters = tuple(  # peft's tuner layers (a PreTrainedModel's active_adapters is a method)
            (name, *(repr(getattr(module, field, None)) for field in ADAPTER_STATE))
            for name, module in self.named_modules()
            if hasattr(module, "active_adapters") and not isinstance(module, PreTrainedModel)
        )
        return rows, self.dtype, device, autocast, self.training, self.config.to_dict(), weights, adapters

    def _kept_static_cache(self, context: tuple, max_cache_length: int) -> PFlowStaticCache | None:
        """The static cache kept from this model's last generate(), reset in place, if it was made in
        `context` and holds max_cache_length positions; else None (and the kept cache is let go)."""
        kept_context, cache = _KEPT_STATIC_CACHES.pop(self, (None, None))
        if kept_context != context or cache.capacity < max_cache_length:
            return None
        cache.reset()
        return cache

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """As GenerationMixin's, and never re-feeds prompt tokens that a passed cache has already seen."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cache = resolve_cache_argument(model_inputs.get("cache"), model_inputs.get("past_key_values"))
        ids = model_inputs.get("input_ids")
        if isinstance(cache, PFlowCache) and ids is not None:
            drop = cached_prefix_length(ids, cache, model_inputs.get("attention_mask"))
            for name in ("input_ids", "position_ids"):
                if model_inputs.get(name) is not None and drop:
                    model_inputs[name] = model_inputs[name][:, drop:]
        return model_inputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: PFlowCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seqlens: torch.Tensor | PackedSequences | None = None,
        cache: PFlowCache | None = None,
        **loss_kwargs,
    ) -> CausalLMOutputWithPast:
        """Labels [B, T] are the input ids (not shifted; -100 is ignored); logits_to_keep = n keeps the
        last n positions. `loss_kwargs` (from Trainer) may be LOSS_KWARGS or IGNORED_KWARGS; the rest as in
        PFlowModel."""
        _check_kwargs("PFlowForCausalLM", loss_kwargs, LOSS_KWARGS + IGNORED_KWARGS)
        loss_kwargs = {k: v for k, v in loss_kwargs.items() if k in LOSS_KWARGS}
        cache = resolve_cache_argument(cache, past_key_values)
        if _uses_decode_graph(cache, input_ids, labels, output_hidden_states, cu_seqlens):
            step = self.model.prepare_step(
                input_ids, attention_mask, position_ids, None, use_cache, output_attentions, None, cache
            )
            logits = cache.graphs.run(
                functools.partial(self._graph_step, cache),
                owner=self,
                length=step.length,
                input_ids=input_ids,
                pad_mask=step.pad_mask,
                position_ids=step.position_ids,
            )
            return output_with_cache(CausalLMOutputWithPast, cache, logits=logits)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cu_seqlens=cu_seqlens,
            cache=cache,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        loss = logits = None
        # A plain nn.Linear head only: a PEFT or quantized head computes its logits its own way.
        fused = self.training and self.config.fused_loss and type(self.lm_head) is nn.Linear
        if labels is not None and fused:
            loss = linear_cross_entropy(hidden_states[:, keep, :], self.lm_head.weight, labels, **loss_kwargs)
        else:
            logits = self.lm_head(hidden_states[:, keep, :])
            if labels is not None:
                loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs
                )
        return output_with_cache(
            CausalLMOutputWithPast,
            cache_of(outputs),
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
        )


def _uses_decode_graph(cache, input_ids, labels, output_hidden_states, cu_seqlens) -> bool:
    """Replay a CUDA graph for this forward: a token-by-token decode step on a static cache with graphs."""
    return (
        isinstance(cache, PFlowStaticCache)
        and cache.graphs is not None
        and input_ids is not None
        and input_ids.ndim == 2
        and input_ids.shape[1] == 1
        and labels is None
        and not output_hidden_states
        and cu_seqlens is None
        and not torch.is_grad_enabled()
    )


# save_pretrained copies this file and its relative imports next to the weights and writes `auto_map`, so a
# checkpoint loads with trust_remote_code=True where this package is not installed.
PFlowConfig.register_for_auto_class()
PFlowModel.register_for_auto_class("AutoModel")
PFlowForCausalLM.register_for_auto_class("AutoModelForCausalLM")

from .peft_support import register_lora_target_modules  # noqa: E402  (copied into saved checkpoints)

register_lora_target_modules()  # peft's default LoRA targets, also when this file runs as remote code
