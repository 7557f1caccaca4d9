"""fla gated DeltaProduct (`model_type` "gated_deltaproduct") without forget gate -> PFlow product mode.

fla's GatedDeltaProduct layer (fla/layers/gated_deltaproduct.py): per token, n = num_householder keys, values
and betas; the n Householder steps S <- S (I - beta_j k_j k_j^T) + beta_j v_j k_j^T run in order j = 1..n,
then
o = S q (K^-1/2 scale). q, k, v = SiLU(short conv(proj(x))), q and k L2-normalised, beta = sigmoid(b_proj(x))
(x2 with allow_neg_eigval, no division by n), per-head RMSNorm o_norm (times SiLU(g_proj(x)) with the output
gate), o_proj. That is PFlow's product mode with R = n.

Layout: fla orders the rows of k_proj, v_proj, b_proj (and the k/v conv channels) householder-major
(n, h, d); PFlow orders them head-major (h, r, d): the key map permutes them.

Refused: the forget gate (use_forget_gate / a_proj, A_log, dt_bias: PFlow has no decay), num_v_heads !=
num_heads, beta convolutions, conv biases, hybrid `attn` layers with qkv_bias.
"""

from __future__ import annotations

import functools

from modeling_parallelflow import PFlowConfig

from .fla_common import SHARED_DEFAULTS, block_rules, global_rules, pflow_fields, refuse, with_defaults
from .keymap import KeyMap, Rule
from .surgery import head_major_to_rank_major, rank_major_to_head_major

MODEL_TYPE = "gated_deltaproduct"
DEFAULTS = dict(
    SHARED_DEFAULTS,
    attn_mode="chunk",
    head_dim=256,
    num_heads=6,
    num_v_heads=None,
    expand_v=2.0,
    use_output_gate=None,  # None: decided by the presence of g_proj weights
    use_forget_gate=False,
    allow_neg_eigval=False,
    num_householder=1,
    use_beta_conv=False,
)
FORGET_GATE_PARAMS = ("a_proj.weight", "A_log", "dt_bias")
# Mixer tensors whose rows are (householder, head, width) in fla.
RANK_MAJOR = ("k_proj", "v_proj", "b_proj", "k_conv1d", "v_conv1d")


def fla_config(config: dict, source_keys) -> dict:
    """config.json of an fla gated DeltaProduct with defaults filled; the output gate follows the weights."""
    fla = with_defaults(config, DEFAULTS)
    if "use_forget_gate" not in config and "use_decay_gate" in config:  # older fla name
        fla["use_forget_gate"] = config["use_decay_gate"]
    fla["use_output_gate"] = any(key.endswith(".attn.g_proj.weight") for key in source_keys)
    return fla


def to_pflow(config: dict, source_keys) -> tuple[PFlowConfig, KeyMap]:
    fla = fla_config(config, source_keys)
    forget_keys = [key for key in source_keys if key.split(".attn.")[-1] in FORGET_GATE_PARAMS]
    if fla["use_forget_gate"] or forget_keys:
        refuse(
            "use_forget_gate", True, "PFlow has no forget gate (decay); only DeltaProduct without it converts"
        )
    if fla["num_v_heads"] not in (None, fla["num_heads"]):
        refuse("num_v_heads", fla["num_v_heads"], "PFlow has as many value heads as key heads")
    if fla["use_beta_conv"]:
        refuse("use_beta_conv", True, "PFlow computes beta from x without a convolution")
    if biases := sorted(key for key in source_keys if "_conv1d.bias" in key):
        refuse("conv_bias", True, f"PFlow's short convs have no bias (keys {biases[:3]}...)")
    head_v = fla["head_dim"] * fla["expand_v"]
    if head_v != int(head_v):
        refuse("expand_v", fla["expand_v"], f"head_dim * expand_v = {head_v} is not an integer")
    fields = pflow_fields(fla)
    fields.update(
        num_heads=fla["num_heads"],
        head_k_dim=fla["head_dim"],
        head_v_dim=int(head_v),
        rank=fla["num_householder"],
        rank_mode="product",
        flow="euler",
        allow_neg_eigval=bool(fla["allow_neg_eigval"]),
        use_gate=fla["use_output_gate"],
    )
    pflow = PFlowConfig(**fields)
    names = ["q_proj", "k_proj", "v_proj", "b_proj"]
    names += ["q_conv1d", "k_conv1d", "v_conv1d"] if pflow.use_short_conv else []
    names += ["g_proj"] if pflow.use_gate else []
    names += ["o_norm", "o_proj"]
    permute = functools.partial(rank_major_to_head_major, heads=pflow.num_heads, rank=pflow.rank)
    unpermute = functools.partial(head_major_to_rank_major, heads=pflow.num_heads, rank=pflow.rank)

    def mixer(i: int) -> list[Rule]:
        return [
            Rule(
                f"model.layers.{i}.attn.{name}.weight",
                f"model.layers.{i}.linear_attn.{name}.weight",
                forward=permute if name in RANK_MAJOR else None,
                backward=unpermute if name in RANK_MAJOR else None,
            )
            for name in names
        ]

    rules = global_rules(pflow.tie_word_embeddings)
    rules += block_rules(pflow.num_hidden_layers, pflow.layer_types, mixer)
    return pflow, KeyMap(rules, name="fla-deltaproduct -> pflow")
