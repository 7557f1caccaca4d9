"""Tiny random checkpoints in the source formats of `parallelflow convert`, laid out as their libraries save
them.

fla is not installed on CPU machines: its DeltaNet / gated DeltaProduct checkpoints are written here by hand
(config.json + model.safetensors with fla's key names and shapes, spelled out independently of conversion/).
Weights are scaled so features are O(1) and every tensor matters in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_FILES = {
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": '{"model_max_length": 128}',
}


class _Weights:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def linear(self, rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=self.generator) / cols**0.5

    def norm(self, size: int) -> torch.Tensor:
        return 1 + 0.2 * torch.randn(size, generator=self.generator)

    def conv(self, channels: int, width: int) -> torch.Tensor:
        return 0.6 * torch.randn(channels, 1, width, generator=self.generator)

    def embedding(self, vocab: int, dim: int) -> torch.Tensor:
        return torch.randn(vocab, dim, generator=self.generator)


def _write(path: Path, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {k: v.contiguous() for k, v in state_dict.items()},
        path / "model.safetensors",
        metadata={"format": "pt"},
    )
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    return path


def _fla_block(w: _Weights, sd: dict, i: int, d: int, inter: int | None, attn) -> bool:
    """Norms, MLP and (hybrid `attn` layers) fla's attention weights of block i; True for attention."""
    if inter is None:  # fla's GatedMLP: 2/3 of 4 * hidden, rounded up to a multiple of 256
        inter = 256 * ((int(d * 4 * 2 / 3) + 255) // 256)
    prefix = f"model.layers.{i}."
    sd[prefix + "attn_norm.weight"] = w.norm(d)
    sd[prefix + "mlp_norm.weight"] = w.norm(d)
    sd[prefix + "mlp.gate_proj.weight"] = w.linear(inter, d)
    sd[prefix + "mlp.up_proj.weight"] = w.linear(inter, d)
    sd[prefix + "mlp.down_proj.weight"] = w.linear(d, inter)
    specs = [] if attn is None else [attn] if isinstance(attn, dict) else attn  # fla 0.6 takes a list too
    spec = next((spec for spec in specs if i in spec["layers"]), None)
    if spec is None:
        return False
    kv = (d // spec["num_heads"]) * spec.get("num_kv_heads", spec["num_heads"])
    for name, rows in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
        sd[f"{prefix}attn.{name}.weight"] = w.linear(rows, d)
    sd[prefix + "attn.o_proj.weight"] = w.linear(d, d)
    return True


def _fla_globals(w: _Weights, sd: dict, config: dict) -> None:
    d, vocab = config["hidden_size"], config["vocab_size"]
    sd["model.embeddings.weight"] = w.embedding(vocab, d)
    sd["model.norm.weight"] = w.norm(d)
    if not config.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = w.linear(vocab, d)


def fla_deltanet_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """An fla DeltaNetForCausalLM checkpoint (model_type delta_net), hidden 32, 2 heads, K = 16, V = 32."""
    config = dict(
        model_type="delta_net",
        architectures=["DeltaNetForCausalLM"],
        hidden_size=32,
        num_heads=2,
        expand_k=1.0,
        expand_v=2.0,
        num_hidden_layers=2,
        vocab_size=64,
        conv_size=4,
        use_short_conv=True,
        use_gate=False,
        use_beta=True,
        qk_norm="l2",
        qk_activation="silu",
        norm_eps=1e-6,
        hidden_ratio=4,
        intermediate_size=48,
        hidden_act="swish",
        tie_word_embeddings=False,
        attn=None,
    )
    config.update(overrides)
    w, sd = _Weights(seed), {}
    d, heads = config["hidden_size"], config["num_heads"]
    key_dim, value_dim = int(d * config["expand_k"]), int(d * config["expand_v"])
    _fla_globals(w, sd, config)
    for i in range(config["num_hidden_layers"]):
        if _fla_block(w, sd, i, d, config["intermediate_size"], config["attn"]):
            continue
        prefix = f"model.layers.{i}.attn."
        sd[prefix + "q_proj.weight"] = w.linear(key_dim, d)
        sd[prefix + "k_proj.weight"] = w.linear(key_dim, d)
        sd[prefix + "v_proj.weight"] = w.linear(value_dim, d)
        sd[prefix + "b_proj.weight"] = w.linear(heads, d)
        if config["use_short_conv"]:
            for name, channels in (("q", key_dim), ("k", key_dim), ("v", value_dim)):
                sd[f"{prefix}{name}_conv1d.weight"] = w.conv(channels, config["conv_size"])
        if config["use_gate"]:
            sd[prefix + "g_proj.weight"] = w.linear(value_dim, d)
        sd[prefix + "o_norm.weight"] = w.norm(value_dim // heads)
        sd[prefix + "o_proj.weight"] = w.linear(d, value_dim)
    return _write(path, config, sd)


def fla_deltaproduct_checkpoint(path: Path, seed: int = 0, forget_gate: bool = False, **overrides) -> Path:
    """An fla GatedDeltaProductForCausalLM checkpoint; k/v/b rows ordered (householder, head, d)."""
    config = dict(
        model_type="gated_deltaproduct",
        architectures=["GatedDeltaProductForCausalLM"],
        hidden_size=32,
        head_dim=8,
        num_heads=2,
        expand_v=2.0,
        num_householder=3,
        allow_neg_eigval=True,
        use_output_gate=True,
        use_forget_gate=forget_gate,
        use_short_conv=True,
        conv_size=4,
        num_hidden_layers=2,
        vocab_size=64,
        norm_eps=1e-6,
        intermediate_size=48,
        hidden_act="swish",
        tie_word_embeddings=True,
        attn=None,
    )
    config.update(overrides)
    w, sd = _Weights(seed), {}
    d, heads, n = config["hidden_size"], config["num_heads"], config["num_householder"]
    key_dim = heads * config["head_dim"]
    head_v = int(config["head_dim"] * config["expand_v"])
    value_dim = heads * head_v
    _fla_globals(w, sd, config)
    for i in range(config["num_hidden_layers"]):
        if _fla_block(w, sd, i, d, config["intermediate_size"], config["attn"]):
            continue
        prefix = f"model.layers.{i}.attn."
        sd[prefix + "q_proj.weight"] = w.linear(key_dim, d)
        sd[prefix + "k_proj.weight"] = w.linear(key_dim * n, d)
        sd[prefix + "v_proj.weight"] = w.linear(value_dim * n, d)
        sd[prefix + "b_proj.weight"] = w.linear(heads * n, d)
        if config["use_short_conv"]:
            for name, channels in (("q", key_dim), ("k", key_dim * n), ("v", value_dim * n)):
                sd[f"{prefix}{name}_conv1d.weight"] = w.conv(channels, config["conv_size"])
        if config["use_output_gate"]:
            sd[prefix + "g_proj.weight"] = w.linear(value_dim, d)
        if forget_gate:
            sd[prefix + "a_proj.weight"] = w.linear(heads, d)
            sd[prefix + "A_log"] = torch.zeros(heads)
            sd[prefix + "dt_bias"] = torch.zeros(heads)
        sd[prefix + "o_norm.weight"] = w.norm(head_v)
        sd[prefix + "o_proj.weight"] = w.linear(d, value_dim)
    return _write(path, config, sd)


def llama_family_checkpoint(path: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """A tiny random Llama / Mistral / Qwen2 / Qwen3 saved by transformers' classes (GQA: 4 heads, 2 KV)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    if model_type == "qwen3":
        fields["head_dim"] = 8
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and larger weights: every tensor shows in the outputs
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif param.ndim == 2:
                param.copy_(torch.randn_like(param) / param.shape[1] ** 0.5)
            else:
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    for name, text in TOKENIZER_FILES.items():
        (Path(path) / name).write_text(text)
    return Path(path)
