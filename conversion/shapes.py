"""Expected tensor shapes of a target checkpoint: PFlow's from the model itself, fla's from its layer
formulas."""

from __future__ import annotations

import torch

from .fla_common import attention_specs


def pflow_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every key PFlowForCausalLM(config) saves (no lm_head when tied), built on the meta device."""
    from modeling_parallelflow import PFlowForCausalLM

    with torch.device("meta"):
        model = PFlowForCausalLM(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def fla_shapes(fla: dict, mixer_shapes) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of an fla causal LM (DeltaNet family layout) with config `fla` (defaults filled).

    `mixer_shapes(fla)` gives the delta-rule layer's own {name: shape} under `model.layers.{i}.attn.`.
    """
    d, vocab, inter = fla["hidden_size"], fla["vocab_size"], fla["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embeddings.weight": (vocab, d), "model.norm.weight": (d,)}
    if not fla["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, d)
    attn_heads = {i: spec for spec in attention_specs(fla) for i in spec["layers"]}
    for i in range(fla["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        shapes[prefix + "attn_norm.weight"] = (d,)
        shapes[prefix + "mlp_norm.weight"] = (d,)
        shapes[prefix + "mlp.gate_proj.weight"] = (inter, d)
        shapes[prefix + "mlp.up_proj.weight"] = (inter, d)
        shapes[prefix + "mlp.down_proj.weight"] = (d, inter)
        if i in attn_heads:
            kv = (d // attn_heads[i]["num_heads"]) * attn_heads[i]["num_kv_heads"]
            layer = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d)}
        else:
            layer = mixer_shapes(fla)
        shapes.update({f"{prefix}attn.{name}.weight": shape for name, shape in layer.items()})
    return shapes
