"""What fla's DeltaNet-family causal LMs share: the block layout (pre-norm, GatedMLP), hybrid `attn` layers,
global config fields, and the key map around the delta-rule layer.

fla block: x + attn(attn_norm(x)), then + mlp(mlp_norm(.)); GatedMLP = down(silu(gate(x)) * up(x)) with
intermediate_size defaulting to 256 * ceil(int(hidden * hidden_ratio * 2/3) / 256). Hybrid `attn` layers
(fla.layers.attn.Attention): q/k/v/o projections, head_dim = hidden // num_heads, grouped KV heads, RoPE with
halves rotated (theta `rope_theta`), causal, optional window (query sees keys q - k < window_size). That is
PFlow's "attention"/"sliding_attention" layer, as long as qkv_bias is off.
"""

from __future__ import annotations

from .keymap import ConversionError, Rule

BLOCK = (
    ("model.layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("model.layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
ATTENTION = tuple(
    (f"model.layers.{{i}}.attn.{name}.weight", f"model.layers.{{i}}.self_attn.{name}.weight")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj")
)
GLOBAL = (
    ("model.embeddings.weight", "model.embed_tokens.weight"),
    ("model.norm.weight", "model.norm.weight"),
)
LM_HEAD = ("lm_head.weight", "lm_head.weight")

# Fields every fla DeltaNet-family config shares, with their defaults, and their PFlow names.
SHARED_DEFAULTS = dict(
    hidden_size=2048,
    num_hidden_layers=24,
    vocab_size=32000,
    max_position_embeddings=2048,
    hidden_ratio=4,
    intermediate_size=None,
    hidden_act="swish",
    norm_eps=1e-6,
    attn=None,
    use_cache=True,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    initializer_range=0.02,
    use_short_conv=True,
    conv_size=4,
)
SAME_NAME = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "max_position_embeddings",
    "norm_eps",
    "initializer_range",
    "tie_word_embeddings",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "use_short_conv",
    "conv_size",
)
# PFlow fields fla cannot express; carried in the fla config under this key so a round trip is exact.
EXTRA_KEY = "parallelflow"


def with_defaults(config: dict, defaults: dict) -> dict:
    return {**defaults, **config}


def refuse(option: str, value, why: str) -> None:
    raise ConversionError(f"fla option {option}={value!r} is not supported: {why}")


def attention_specs(fla: dict) -> list[dict]:
    """fla's hybrid `attn` setting (None, one dict, or a list of dicts in fla >= 0.6) as a list of specs with
    fla's defaults filled."""
    attn = fla["attn"]
    specs = [] if attn is None else [attn] if isinstance(attn, dict) else list(attn)
    return [
        {
            **spec,
            "num_kv_heads": spec.get("num_kv_heads") or spec["num_heads"],
            "qkv_bias": spec.get("qkv_bias", False),
            "window_size": spec.get("window_size"),
            "rope_theta": spec.get("rope_theta", 10000.0),
        }
        for spec in specs
    ]


def fla_intermediate_size(fla: dict) -> int:
    if fla["intermediate_size"] is not None:
        return fla["intermediate_size"]
    ratio = fla["hidden_ratio"] if fla["hidden_ratio"] is not None else 4
    return 256 * ((int(fla["hidden_size"] * ratio * 2 / 3) + 255) // 256)


def pflow_fields(fla: dict) -> dict:
    """PFlow config fields from the shared fla fields (block, MLP, hybrid attention layers)."""
    if fla["hidden_act"] not in ("swish", "silu"):
        refuse("hidden_act", fla["hidden_act"], "PFlow's MLP is SwiGLU (swish)")
    fields = {name: fla[name] for name in SAME_NAME}
    fields["intermediate_size"] = fla_intermediate_size(fla)
    fields["layer_types"] = ["pflow"] * fla["num_hidden_layers"]
    if fla.get("attnres_block_size") is not None:
        refuse("attnres_block_size", fla["attnres_block_size"], "PFlow has plain residual connections")
    specs = attention_specs(fla)
    if not specs:
        return fields
    for option in ("num_heads", "num_kv_heads", "rope_theta"):
        if len({spec[option] for spec in specs}) > 1:
            refuse("attn", fla["attn"], f"PFlow's attention layers share one {option}")
    windows = {spec["window_size"] for spec in specs} - {None}
    if len(windows) > 1:
        refuse("attn", fla["attn"], "PFlow's sliding-attention layers share one window")
    for spec in specs:
        if spec["qkv_bias"]:
            refuse("attn.qkv_bias", True, "PFlow's attention layers have no q/k/v bias")
        if spec.get("qk_norm", False):
            refuse("attn.qk_norm", True, "PFlow's attention layers have no q/k norm")
        if fla["hidden_size"] % spec["num_heads"]:
            refuse("attn.num_heads", spec["num_heads"], f"hidden_size={fla['hidden_size']} is not a multiple")
        for i in spec["layers"]:
            if not 0 <= i < fla["num_hidden_layers"]:
                refuse("attn.layers", spec["layers"], f"layer {i} does not exist")
            fields["layer_types"][i] = "attention" if spec["window_size"] is None else "sliding_attention"
    fields.update(
        num_attention_heads=specs[0]["num_heads"],
        num_key_value_heads=specs[0]["num_kv_heads"],
        attention_head_dim=fla["hidden_size"] // specs[0]["num_heads"],
        sliding_window=windows.pop() if windows else None,
        rope_theta=specs[0]["rope_theta"],
    )
    return fields


def fla_fields(config) -> dict:
    """The shared fla config fields from a PFlowConfig (the inverse of `pflow_fields`)."""
    fla = {name: getattr(config, name) for name in SAME_NAME}
    fla.update(intermediate_size=config.intermediate_size, hidden_ratio=4, hidden_act="swish", attn=None)
    attn_layers = [i for i, kind in enumerate(config.layer_types) if kind != "pflow"]
    if attn_layers:
        kinds = {config.layer_types[i] for i in attn_layers}
        if len(kinds) > 1:
            raise ConversionError(
                "fla's `attn` layers share one window: PFlow layer_types mixing 'attention' and "
                "'sliding_attention' cannot be expressed"
            )
        if config.attention_head_dim * config.num_attention_heads != config.hidden_size:
            raise ConversionError(
                f"fla's attention layers use head_dim = hidden_size // num_heads; PFlow attention_head_dim="
                f"{config.attention_head_dim} with num_attention_heads={config.num_attention_heads} and "
                f"hidden_size={config.hidden_size} cannot be expressed"
            )
        fla["attn"] = dict(
            layers=attn_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            qkv_bias=False,
            window_size=config.sliding_window if kinds == {"sliding_attention"} else None,
            rope_theta=config.rope_theta,
        )
    return fla


def block_rules(num_layers: int, layer_types: list[str], mixer_rules) -> list[Rule]:
    """Rules for every block: norms and MLP, then the mixer: `mixer_rules(i)` for delta-rule layers, copies
    of q/k/v/o for attention layers."""
    rules: list[Rule] = []
    for i in range(num_layers):
        rules += [Rule(src.format(i=i), dst.format(i=i)) for src, dst in BLOCK]
        if layer_types[i] == "pflow":
            rules += mixer_rules(i)
        else:
            rules += [Rule(src.format(i=i), dst.format(i=i)) for src, dst in ATTENTION]
    return rules


def global_rules(tied: bool) -> list[Rule]:
    return [Rule(src, dst) for src, dst in (GLOBAL if tied else (*GLOBAL, LM_HEAD))]
