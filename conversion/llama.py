"""Llama-family transformers (Llama, Mistral, Qwen2, Qwen3; grouped-query attention) -> PFlow.

"Linearise a pretrained transformer, then fine-tune": embeddings, norms, MLPs and the final head are copied.
Every attention layer becomes a PFlow mixer initialised from it: q_proj and o_proj copied, k_proj/v_proj
with each key/value head repeated for the query heads it serves (H = num_attention_heads heads, K = V =
head_dim); for R > 1 every component starts as a copy of that key/value (components beyond the first get
Gaussian noise of `init_noise` times the weight's std, so training can tell them apart: exact copies would
get identical gradients forever, and with equal copies the sum form equals R = 1). Short convs start as the
identity (last tap = 1), so each feature starts as SiLU(source projection); b_proj starts at zero (beta =
1/2, split over the R components); o_norm weights start at one. No output gate.

Layers listed in `keep_attention_layers` stay softmax attention ("attention", or "sliding_attention" where
the source layer slides) with the source weights: their outputs equal the source layers exactly. That needs
the source's attention maths to be PFlow's: default RoPE (halves rotated, theta from the config); q/k/v and o
biases (Llama attention_bias, Qwen2) and q/k norms (Qwen3) map to PFlow's attention_bias,
attention_output_bias and attention_qk_norm. Otherwise keeping a layer is refused. Biases and q/k norms of
linearised layers are dropped (listed in the report): the linearised layer is an initialisation.
"""

from __future__ import annotations

import functools

import torch

from modeling_parallelflow import PFlowConfig

from .keymap import ConversionError, KeyMap, Rule
from .surgery import expand_components, identity_conv, repeat_kv_heads

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
BLOCK = ("input_layernorm.weight", "post_attention_layernorm.weight") + tuple(
    f"mlp.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")
)
# Source tensors a linearised layer cannot use, and why.
DROPPABLE = {
    "self_attn.q_proj.bias": "PFlow's mixer has no projection bias",
    "self_attn.k_proj.bias": "PFlow's mixer has no projection bias",
    "self_attn.v_proj.bias": "PFlow's mixer has no projection bias",
    "self_attn.o_proj.bias": "PFlow's mixer has no projection bias",
    "self_attn.q_norm.weight": "PFlow L2-normalises q instead",
    "self_attn.k_norm.weight": "PFlow L2-normalises k instead",
    "self_attn.rotary_emb.inv_freq": "a buffer recomputed from rope_theta",
}
# Source tensors a kept attention layer carries over (when the source has them).
KEPT_EXTRAS = tuple(name for name in DROPPABLE if "rotary_emb" not in name)


def _token_id(config, name: str):
    """A special-token id of the source config, or None where it lies outside the vocabulary (some Llama
    configs use pad_token_id = -1 for "no padding token"); eos may be a list."""
    value = getattr(config, name, None)
    ids = value if isinstance(value, list) else [value]
    kept = [i for i in ids if isinstance(i, int) and 0 <= i < config.vocab_size]
    if isinstance(value, list):
        return kept or None
    return kept[0] if kept else None


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(
            f"kept attention layers need default RoPE; the source uses rope_type={rope_type!r}, "
            "which PFlow's attention does not implement"
        )
    if getattr(config, "partial_rotary_factor", None) not in (None, 1.0):
        raise ConversionError(
            "kept attention layers need full RoPE; the source has "
            f"partial_rotary_factor={config.partial_rotary_factor}"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ConversionError("the source config names no rope_theta")
    return float(theta)


def _source_layer_types(config) -> list[str]:
    """'attention' or 'sliding_attention' per source layer."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral slides in every layer when sliding_window is set
        sliding = config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None
        layer_types = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
    kinds = {"full_attention": "attention", "sliding_attention": "sliding_attention"}
    for kind in layer_types:
        if kind not in kinds:
            raise ConversionError(f"source layer type {kind!r} is not supported (only {sorted(kinds)})")
    return [kinds[kind] for kind in layer_types]


def to_pflow(
    config,
    source_keys,
    *,
    rank: int = 1,
    keep_attention_layers: tuple[int, ...] = (),
    init_noise: float = 1e-2,
    seed: int = 0,
) -> tuple[PFlowConfig, KeyMap]:
    """A transformers config of a Llama-family model -> (PFlowConfig, key map source -> PFlow)."""
    if config.model_type not in MODEL_TYPES:
        raise ConversionError(f"--from llama takes model_type in {MODEL_TYPES}, got {config.model_type!r}")
    if config.hidden_act not in ("silu", "swish"):
        raise ConversionError(f"source hidden_act={config.hidden_act!r}: PFlow's MLP is SwiGLU (silu)")
    if any(
        key.startswith("model.layers.") and ".mlp." in key and key.endswith(".bias") for key in source_keys
    ):
        raise ConversionError("source MLP has biases (mlp_bias=True): PFlow's MLP has none")
    layers = config.num_hidden_layers
    if bad := [i for i in keep_attention_layers if not 0 <= i < layers]:
        raise ConversionError(f"--keep-attention-layers {bad}: the source has layers 0..{layers - 1}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    source_types = _source_layer_types(config)
    layer_types = ["pflow"] * layers
    for i in keep_attention_layers:
        layer_types[i] = source_types[i]
    kept_extras = [
        name
        for name in KEPT_EXTRAS
        if any(f"model.layers.{i}.{name}" in source_keys for i in keep_attention_layers)
    ]
    for i in keep_attention_layers:
        if missing := [name for name in kept_extras if f"model.layers.{i}.{name}" not in source_keys]:
            raise ConversionError(
                f"cannot keep layer {i} as attention: other kept layers have {missing}, it has not"
            )
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=layers,
        num_heads=heads,
        head_k_dim=head_dim,
        head_v_dim=head_dim,
        rank=rank,
        rank_mode="sum",
        use_short_conv=True,
        use_gate=False,
        layer_types=layer_types,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attention_head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        norm_eps=config.rms_norm_eps,
        initializer_range=getattr(config, "initializer_range", 0.02),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        **{name: _token_id(config, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")},
    )
    if keep_attention_layers:
        fields["rope_theta"] = _rope_theta(config)
        fields["attention_bias"] = "self_attn.q_proj.bias" in kept_extras
        fields["attention_output_bias"] = "self_attn.o_proj.bias" in kept_extras
        fields["attention_qk_norm"] = "self_attn.q_norm.weight" in kept_extras
        if {"self_attn.k_proj.bias", "self_attn.v_proj.bias"} & set(kept_extras) and not fields[
            "attention_bias"
        ]:
            raise ConversionError("kept attention layers have k/v biases without a q bias: not supported")
        if "sliding_attention" in layer_types:
            fields["sliding_window"] = config.sliding_window
    pflow = PFlowConfig(**fields)

    generator = torch.Generator().manual_seed(seed)
    groups = heads // kv_heads
    expand = functools.partial(expand_components, heads=heads, rank=1, copies=rank, generator=generator)

    def kv(weight: torch.Tensor) -> torch.Tensor:
        return expand(repeat_kv_heads(weight, kv_heads, groups), noise_std=init_noise)

    conv_channels = {"q": heads * head_dim, "k": heads * rank * head_dim, "v": heads * rank * head_dim}
    rules = [
        Rule("model.embed_tokens.weight", "model.embed_tokens.weight"),
        Rule("model.norm.weight", "model.norm.weight"),
    ]
    if not pflow.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", "lm_head.weight"))
    for i in range(layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        rules += [Rule(src + name, dst + name) for name in BLOCK]
        if layer_types[i] != "pflow":
            rules += [
                Rule(f"{src}self_attn.{p}.weight", f"{dst}self_attn.{p}.weight") for p in ATTENTION_PROJ
            ]
            rules += [Rule(src + name, dst + name) for name in kept_extras]
        else:
            mix = dst + "linear_attn."
            rules += [
                Rule(src + "self_attn.q_proj.weight", mix + "q_proj.weight"),
                Rule(src + "self_attn.k_proj.weight", mix + "k_proj.weight", forward=kv),
                Rule(src + "self_attn.v_proj.weight", mix + "v_proj.weight", forward=kv),
                Rule(src + "self_attn.o_proj.weight", mix + "o_proj.weight"),
                Rule(
                    None,
                    mix + "b_proj.weight",
                    make=functools.partial(torch.zeros, heads * rank, config.hidden_size),
                    note="beta = 1/2 (split over R) for every token",
                ),
                Rule(
                    None,
                    mix + "o_norm.weight",
                    make=functools.partial(torch.ones, head_dim),
                    note="RMSNorm weight 1",
                ),
            ]
            rules += [
                Rule(
                    None,
                    f"{mix}{name}_conv1d.weight",
                    make=functools.partial(identity_conv, channels, pflow.conv_size),
                    note="identity short conv",
                )
                for name, channels in conv_channels.items()
            ]
        rules += [
            Rule(src + name, None, note=why)
            for name, why in DROPPABLE.items()
            if src + name in source_keys and not (layer_types[i] != "pflow" and name in kept_extras)
        ]
    return pflow, KeyMap(rules, name="llama -> pflow")
