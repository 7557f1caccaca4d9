"""fla DeltaNet (`model_type` "delta_net") <-> PFlow with R = 1.

fla's DeltaNet layer (fla/layers/delta_net.py) with the options PFlow shares: q, k, v = SiLU(short causal
depthwise conv(proj(x))) (without short conv: SiLU(proj(x))), q and k L2-normalised in the kernel
(x / sqrt(|x|^2 + 1e-6)), beta = sigmoid(b_proj(x)) (x2 with allow_neg_eigval), the delta rule with
scale K^-1/2, per-head RMSNorm o_norm (times SiLU(g_proj(x)) with use_gate), o_proj. With R = 1 that is
PFlow's mixer exactly, parameter for parameter (rows ordered head-major in both).

Refused (PFlow cannot express them): qk_activation other than "silu" (fla then skips the SiLU after the q/k
conv), qk_norm other than "l2", use_beta=False, conv biases, hybrid `attn` layers with qkv_bias, and (for
the inverse) R > 1, flow="exact", and head sizes fla's expand_k/expand_v cannot produce.

Numerics: fla's L2 norm adds 1e-6 under the square root, PFlow's (F.normalize) divides by max(|x|, 1e-12);
the outputs differ by a relative 5e-7 / |x|^2, below fp32 resolution for keys of norm ~1.
`allow_neg_eigval` is a DeltaNetConfig field since fla 0.6 (older DeltaNetBlocks did not forward it to the
layer, so older checkpoints carrying it in config.json ran with beta in (0, 1) in stock fla); it is read from
and written to config.json. fla >= 0.6 options refused too: `attnres_block_size` (attention residuals).
"""

from __future__ import annotations

from modeling_parallelflow import PFlowConfig

from .fla_common import (
    EXTRA_KEY,
    SHARED_DEFAULTS,
    block_rules,
    fla_fields,
    global_rules,
    pflow_fields,
    refuse,
    with_defaults,
)
from .keymap import ConversionError, KeyMap, Rule

MODEL_TYPE = "delta_net"
DEFAULTS = dict(
    SHARED_DEFAULTS,
    attn_mode="chunk",
    expand_k=1.0,
    expand_v=1.0,
    use_gate=False,
    use_beta=True,
    use_output_norm=True,
    num_heads=16,
    qk_norm="l2",
    qk_activation="silu",
    allow_neg_eigval=False,
    fuse_norm=True,
    fuse_swiglu=True,
    fuse_cross_entropy=True,
    use_l2warp=False,
)
# PFlow fields that fla's config has no place for (carried under EXTRA_KEY).
EXTRA_FIELDS = (
    "rank_mode",
    "chunk_size",
    "algorithm",
    "kernel_backend",
    "hidden_act",
    "num_attention_heads",
    "num_key_value_heads",
    "attention_head_dim",
    "sliding_window",
    "rope_theta",
)


def fla_config(config: dict) -> dict:
    """config.json of an fla DeltaNet with fla's defaults filled in."""
    return with_defaults(config, DEFAULTS)


def mixer_names(use_short_conv: bool, use_gate: bool) -> list[str]:
    names = ["q_proj", "k_proj", "v_proj", "b_proj"]
    names += ["q_conv1d", "k_conv1d", "v_conv1d"] if use_short_conv else []
    names += ["g_proj"] if use_gate else []
    return names + ["o_norm", "o_proj"]


def mixer_shapes(fla: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of one fla DeltaNet layer."""
    d, heads, width = fla["hidden_size"], fla["num_heads"], fla["conv_size"]
    key_dim, value_dim = int(d * fla["expand_k"]), int(d * fla["expand_v"])
    shapes = {
        "q_proj": (key_dim, d),
        "k_proj": (key_dim, d),
        "v_proj": (value_dim, d),
        "b_proj": (heads, d),
        "q_conv1d": (key_dim, 1, width),
        "k_conv1d": (key_dim, 1, width),
        "v_conv1d": (value_dim, 1, width),
        "g_proj": (value_dim, d),
        "o_norm": (value_dim // heads,),
        "o_proj": (d, value_dim),
    }
    return {name: shapes[name] for name in mixer_names(fla["use_short_conv"], fla["use_gate"])}


def _keymap(config: PFlowConfig) -> KeyMap:
    """fla DeltaNet -> PFlow (R = 1): every tensor copied, only renamed."""
    names = mixer_names(config.use_short_conv, config.use_gate)

    def mixer(i: int) -> list[Rule]:
        return [
            Rule(f"model.layers.{i}.attn.{n}.weight", f"model.layers.{i}.linear_attn.{n}.weight")
            for n in names
        ]

    rules = global_rules(config.tie_word_embeddings)
    rules += block_rules(config.num_hidden_layers, config.layer_types, mixer)
    return KeyMap(rules, name="fla-deltanet -> pflow")


def check_source_keys(keys) -> None:
    if biases := sorted(key for key in keys if "_conv1d.bias" in key):
        refuse("conv_bias", True, f"PFlow's short convs have no bias (keys {biases[:3]}...)")


def to_pflow(config: dict) -> tuple[PFlowConfig, KeyMap]:
    """fla DeltaNet config.json -> (PFlowConfig with R = 1, key map fla -> PFlow)."""
    fla = fla_config(config)
    if fla["qk_activation"] != "silu":
        refuse("qk_activation", fla["qk_activation"], "PFlow applies SiLU to q and k after the short conv")
    if fla["qk_norm"] != "l2":
        refuse("qk_norm", fla["qk_norm"], "PFlow L2-normalises q and k")
    if not fla["use_beta"]:
        refuse("use_beta", False, "PFlow always learns beta = sigmoid(b_proj(x))")
    heads = fla["num_heads"]
    key_dim, value_dim = int(fla["hidden_size"] * fla["expand_k"]), int(fla["hidden_size"] * fla["expand_v"])
    if key_dim % heads or value_dim % heads:
        refuse(
            "num_heads", heads, f"key dim {key_dim} / value dim {value_dim} do not split into {heads} heads"
        )
    fields = pflow_fields(fla)
    fields.update(
        num_heads=heads,
        head_k_dim=key_dim // heads,
        head_v_dim=value_dim // heads,
        rank=1,
        flow="euler",
        allow_neg_eigval=bool(fla["allow_neg_eigval"]),
        use_gate=bool(fla["use_gate"]),
    )
    for key, value in (config.get(EXTRA_KEY) or {}).items():  # R = 1: "product" computes what "sum" does
        fields.setdefault(key, value)
    pflow = PFlowConfig(**fields)
    return pflow, _keymap(pflow)


def from_pflow(config: PFlowConfig) -> tuple[dict, KeyMap]:
    """PFlowConfig (R = 1) -> (fla DeltaNet config.json, key map PFlow -> fla)."""
    if config.rank != 1:
        raise ConversionError(f"fla DeltaNet is rank 1; this PFlow checkpoint has rank={config.rank}")
    if config.flow != "euler":
        raise ConversionError(
            f"fla DeltaNet takes one Euler step per token; this checkpoint has flow={config.flow!r}"
        )
    d, heads = config.hidden_size, config.num_heads
    expand_k, expand_v = heads * config.head_k_dim / d, heads * config.head_v_dim / d
    if int(d * expand_k) != heads * config.head_k_dim or int(d * expand_v) != heads * config.head_v_dim:
        raise ConversionError(
            f"fla derives head sizes as int(hidden_size * expand) // num_heads; "
            f"head_k_dim={config.head_k_dim}, head_v_dim={config.head_v_dim} with hidden_size={d} "
            "cannot be expressed"
        )
    fla = fla_fields(config)
    fla.update(
        model_type=MODEL_TYPE,
        architectures=["DeltaNetForCausalLM"],
        attn_mode="chunk",
        num_heads=heads,
        expand_k=expand_k,
        expand_v=expand_v,
        use_gate=config.use_gate,
        use_beta=True,
        use_output_norm=True,
        qk_norm="l2",
        qk_activation="silu",
        allow_neg_eigval=config.allow_neg_eigval,
        fuse_norm=True,
        fuse_swiglu=True,
        fuse_cross_entropy=True,
        use_l2warp=False,
    )
    fla[EXTRA_KEY] = {field: getattr(config, field) for field in EXTRA_FIELDS}
    return fla, _keymap(config).inverse()
