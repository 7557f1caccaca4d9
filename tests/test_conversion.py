"""`parallelflow convert`: fla DeltaNet / DeltaProduct, Llama family and PFlow rank changes, on tiny random
checkpoints (CPU). Ground truths: conversion/fla_reference.py (float64 fla maths) and transformers' own
models.

Tolerances: PFlow computes its RMSNorms and betas in float32 even in a float64 model, so float64 comparisons
agree to ~4e-6 on logits of size ~5 (measured 3.7e-6; with those two steps in float64 the mapping agrees to
3e-7). PFlow's q/k L2 norm is fla's (1e-6 under the square root), so the reference runs with fla's epsilon.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conversion import ConversionError, Options, convert, fla_deltaproduct
from conversion.fla_reference import fla_logits
from conversion.io import load_state_dict, read_config
from conversion.shapes import pflow_shapes
from modeling_parallelflow import PFlowConfig, PFlowForCausalLM
from modeling_parallelflow.cli import main
from tests.conversion_helpers import (
    TOKENIZER_FILES,
    fla_deltanet_checkpoint,
    fla_deltaproduct_checkpoint,
    llama_family_checkpoint,
)
from tests.model_helpers import random_ids, tiny_model

QUIET = Options(progress=False)
FLOAT64_ATOL = 2e-5  # PFlow's float32 RMSNorm/beta in a float64 model (measured 3.7e-6)
FLA_EPS_ATOL = 2e-4  # plus fla's L2-norm epsilon (measured 1.0e-5 with K = 16, 6.4e-5 with K = 8)


def pflow_logits(path: Path, ids: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    model = PFlowForCausalLM.from_pretrained(path, dtype=dtype, kernel_backend="torch").eval()
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def fla_ref(path: Path, ids: torch.Tensor, l2_eps=None) -> torch.Tensor:
    return fla_logits(read_config(path), load_state_dict(path), ids, l2_eps=l2_eps)


def leftovers(parent: Path) -> list[str]:
    """Hidden staging folders a failed write would leave."""
    return [name for name in os.listdir(parent) if name.startswith(".")]


# fla DeltaNet -> PFlow (R = 1), exact

FLA_VARIANTS = {
    "plain": dict(),
    "gate": dict(use_gate=True),
    "neg-eigval": dict(allow_neg_eigval=True),
    "no-short-conv": dict(use_short_conv=False),
    "tied-gate-negeig": dict(tie_word_embeddings=True, use_gate=True, allow_neg_eigval=True),
    "hybrid-gqa-window": dict(
        num_hidden_layers=3,
        attn=dict(layers=[1], num_heads=4, num_kv_heads=2, window_size=5, rope_theta=500.0),
    ),
    "hybrid-spec-list": dict(  # fla >= 0.6: a list of attention specs (here one sliding, one full)
        num_hidden_layers=4,
        attn=[
            dict(layers=[0], num_heads=4, num_kv_heads=1, window_size=3),
            dict(layers=[2], num_heads=4, num_kv_heads=1),
        ],
    ),
    "default-mlp-size": dict(intermediate_size=None, expand_v=1.0),
}


@pytest.mark.parametrize("variant", list(FLA_VARIANTS))
def test_fla_deltanet_to_pflow_matches_fla_maths(tmp_path, variant):
    src = fla_deltanet_checkpoint(tmp_path / "fla", **FLA_VARIANTS[variant])
    report = convert("fla-deltanet", src, tmp_path / "pflow", options=QUIET)
    assert sorted(report.copied_files) == sorted(TOKENIZER_FILES)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pflow").config.rank == 1
    ids = random_ids(2, 37, vocab=64)
    ours = pflow_logits(tmp_path / "pflow", ids)
    torch.testing.assert_close(ours, fla_ref(src, ids, l2_eps=None), atol=FLOAT64_ATOL, rtol=0)
    torch.testing.assert_close(ours, fla_ref(src, ids), atol=FLA_EPS_ATOL, rtol=0)


def test_fla_deltanet_verify_and_rank_expansion_in_one_run(tmp_path):
    src = fla_deltanet_checkpoint(tmp_path / "fla", use_gate=True)
    report = convert(
        "fla-deltanet", src, tmp_path / "pflow", options=Options(rank=2, progress=False), verify=True
    )
    assert report.max_logit_diff < FLA_EPS_ATOL
    assert PFlowConfig.from_pretrained(tmp_path / "pflow").rank == 2


@pytest.mark.parametrize(
    "overrides, option",
    [
        (dict(qk_activation="relu"), "qk_activation='relu'"),
        (dict(qk_norm="sum"), "qk_norm='sum'"),
        (dict(use_beta=False), "use_beta=False"),
        (dict(attn=dict(layers=[0], num_heads=2, qkv_bias=True)), "attn.qkv_bias"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(attnres_block_size=2), "attnres_block_size=2"),
        (
            dict(
                attn=[
                    dict(layers=[0], num_heads=2, window_size=3),
                    dict(layers=[1], num_heads=2, window_size=4),
                ]
            ),
            "share one window",
        ),
    ],
)
def test_fla_deltanet_refuses_options_pflow_cannot_express(tmp_path, overrides, option):
    src = fla_deltanet_checkpoint(tmp_path / "fla", **overrides)
    with pytest.raises(ConversionError, match=option.replace("(", r"\(").replace("[", r"\[")):
        convert("fla-deltanet", src, tmp_path / "out", options=QUIET)
    assert not (tmp_path / "out").exists()


def test_fla_deltanet_refuses_conv_bias(tmp_path):
    src = fla_deltanet_checkpoint(tmp_path / "fla")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.0.attn.q_conv1d.bias"] = torch.zeros(32)
    save_file(weights, src / "model.safetensors")
    with pytest.raises(ConversionError, match="conv_bias"):
        convert("fla-deltanet", src, tmp_path / "out", options=QUIET)


# PFlow (R = 1) -> fla -> PFlow, bit-identical

ROUND_TRIP = {
    "plain": dict(rank=1),
    "gate-negeig-noconv": dict(rank=1, use_gate=True, allow_neg_eigval=True, use_short_conv=False),
    "product-r1-bf16": dict(rank=1, rank_mode="product", chunk_size=32),
    "hybrid": dict(
        rank=1,
        num_hidden_layers=3,
        layer_types=["pflow", "attention", "pflow"],
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_head_dim=16,
        rope_theta=1234.0,
    ),
}


def comparable(config: PFlowConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "dtype")}


@pytest.mark.parametrize("variant", list(ROUND_TRIP))
def test_round_trip_pflow_fla_pflow_is_bit_identical(tmp_path, variant):
    model = tiny_model(**ROUND_TRIP[variant])
    if variant.endswith("bf16"):
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "a")
    convert("pflow", tmp_path / "a", tmp_path / "fla", target="fla-deltanet", options=QUIET)
    fla_config = read_config(tmp_path / "fla")
    assert fla_config["model_type"] == "delta_net" and fla_config["architectures"] == ["DeltaNetForCausalLM"]
    assert "model.embeddings.weight" in load_state_dict(tmp_path / "fla")
    convert("fla-deltanet", tmp_path / "fla", tmp_path / "b", options=QUIET)
    first, second = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key
    assert comparable(PFlowConfig.from_pretrained(tmp_path / "b")) == comparable(model.config)
    if variant == "plain":  # the fla checkpoint itself computes what the PFlow model does
        ids = random_ids(1, 21)
        torch.testing.assert_close(
            fla_ref(tmp_path / "fla", ids, l2_eps=None),
            pflow_logits(tmp_path / "a", ids),
            atol=FLOAT64_ATOL,
            rtol=0,
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rank=2), "rank=2"),
        (dict(rank=1, flow="exact"), "flow='exact'"),
        (
            dict(
                rank=1,
                num_hidden_layers=3,
                layer_types=["pflow", "attention", "sliding_attention"],
                sliding_window=4,
            ),
            "mixing 'attention' and 'sliding_attention'",
        ),
    ],
)
def test_pflow_to_fla_refuses_what_fla_cannot_express(tmp_path, overrides, message):
    tiny_model(**overrides).save_pretrained(tmp_path / "a")
    with pytest.raises(ConversionError, match=message):
        convert("pflow", tmp_path / "a", tmp_path / "fla", target="fla-deltanet", options=QUIET)
    assert not (tmp_path / "fla").exists()


# fla gated DeltaProduct -> PFlow product mode


@pytest.mark.parametrize(
    "overrides", [dict(), dict(use_output_gate=False, allow_neg_eigval=False, num_householder=2)]
)
def test_fla_deltaproduct_to_pflow_product_matches_fla_maths(tmp_path, overrides):
    src = fla_deltaproduct_checkpoint(tmp_path / "fla", **overrides)
    convert("fla-deltaproduct", src, tmp_path / "pflow", options=QUIET)
    config = PFlowConfig.from_pretrained(tmp_path / "pflow")
    assert (config.rank_mode, config.rank) == ("product", read_config(src)["num_householder"])
    ids = random_ids(2, 29, vocab=64)
    ours = pflow_logits(tmp_path / "pflow", ids)
    torch.testing.assert_close(ours, fla_ref(src, ids, l2_eps=None), atol=FLOAT64_ATOL, rtol=0)
    torch.testing.assert_close(ours, fla_ref(src, ids), atol=FLA_EPS_ATOL, rtol=0)


def test_fla_deltaproduct_key_map_inverse_restores_fla_layout(tmp_path):
    src = fla_deltaproduct_checkpoint(tmp_path / "fla")
    fla = load_state_dict(src)
    pflow_config, keymap = fla_deltaproduct.to_pflow(read_config(src), set(fla))
    ours = keymap.apply(fla, pflow_shapes(pflow_config), progress=False)
    k_fla = fla["model.layers.0.attn.k_proj.weight"].view(3, 2, 8, 32)  # (householder, head, d)
    k_ours = ours["model.layers.0.linear_attn.k_proj.weight"].view(2, 3, 8, 32)  # (head, rank, d)
    assert torch.equal(k_ours[1, 2], k_fla[2, 1])
    back = keymap.inverse().apply(ours, {k: tuple(v.shape) for k, v in fla.items()}, progress=False)
    assert back.keys() == fla.keys() and all(torch.equal(back[k], fla[k]) for k in fla)


def test_fla_deltaproduct_with_forget_gate_is_refused(tmp_path):
    src = fla_deltaproduct_checkpoint(tmp_path / "fla", forget_gate=True)
    with pytest.raises(ConversionError, match="use_forget_gate"):
        convert("fla-deltaproduct", src, tmp_path / "out", options=QUIET)
    assert not (tmp_path / "out").exists()


# Llama family -> PFlow


def source_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("llama", dict()),
        ("llama", dict(attention_bias=True)),
        ("mistral", dict(sliding_window=5)),
        ("qwen2", dict()),
        ("qwen3", dict()),
    ],
    ids=["llama", "llama-bias", "mistral", "qwen2", "qwen3"],
)
def test_llama_with_every_layer_kept_equals_the_source(tmp_path, model_type, overrides):
    src = llama_family_checkpoint(tmp_path / "src", model_type, rope_theta=5000.0, **overrides)
    convert(
        "llama", src, tmp_path / "pflow", options=Options(keep_attention_layers=(0, 1, 2), progress=False)
    )
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "pflow").eval()
    assert isinstance(target, PFlowForCausalLM)
    expected_type = "sliding_attention" if model_type == "mistral" else "attention"
    assert target.config.layer_types == [expected_type] * 3 and target.config.rope_theta == 5000.0
    ids = random_ids(2, 23, vocab=64)
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, source_model(src)(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_llama_family_linearised_hybrid_keeps_its_attention_layers_exactly(tmp_path, model_type):
    src = llama_family_checkpoint(tmp_path / "src", model_type, tie_word_embeddings=model_type == "qwen2")
    keep = (1,)
    report = convert(
        "llama", src, tmp_path / "pflow", options=Options(rank=2, keep_attention_layers=keep, progress=False)
    )
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "pflow").eval()
    config = target.config
    assert (config.rank, config.num_heads, config.num_key_value_heads) == (2, 4, 2)
    assert [t == "pflow" for t in config.layer_types] == [i not in keep for i in range(3)]
    if model_type == "qwen2":  # biases carried by the kept layer, dropped by the linearised ones
        assert any("layers.0.self_attn.q_proj.bias" in line for line in report.dropped)
        assert not any("layers.1." in line for line in report.dropped)
        assert (config.attention_bias, config.attention_output_bias) == (True, False)
    if model_type == "qwen3":
        assert any("layers.0.self_attn.q_norm.weight" in line for line in report.dropped)
        assert config.attention_qk_norm
    source = source_model(src)
    ids = random_ids(2, 19, vocab=64)
    with torch.no_grad():
        hidden = source(ids, output_hidden_states=True).hidden_states  # input of layer i = hidden[i]
        positions = torch.arange(ids.shape[1])[None].expand(2, -1)
        for i in keep:
            ours = target.model.layers[i](hidden[i], positions)
            torch.testing.assert_close(ours, hidden[i + 1], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(target(ids).logits).all()
    # Key heads repeated for their query-head group; component 0 of every head is the source key exactly.
    source_k = source.model.layers[0].self_attn.k_proj.weight.view(2, 8, 32)
    ours_k = target.model.layers[0].linear_attn.k_proj.weight.view(4, 2, 8, 32)
    for head in range(4):
        assert torch.equal(ours_k[head, 0], source_k[head // 2])
    assert not torch.equal(ours_k[:, 1], ours_k[:, 0])  # copies carry noise: training can tell them apart
    conv = target.model.layers[0].linear_attn.k_conv1d.weight
    assert torch.equal(conv[..., -1], torch.ones_like(conv[..., -1])) and not conv[..., :-1].any()


def test_keeping_attention_with_scaled_rope_is_refused(tmp_path):
    src = llama_family_checkpoint(
        tmp_path / "src", rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)
    )
    with pytest.raises(ConversionError, match="rope_type='linear'"):
        convert("llama", src, tmp_path / "out", options=Options(keep_attention_layers=(0,), progress=False))
    convert("llama", src, tmp_path / "out", options=QUIET)  # no attention kept: RoPE does not matter


# PFlow rank change and dtype

RANK_CASES = {
    "r1-to-r2": (dict(rank=1), 2),
    "r2-to-r4-gate-negeig": (dict(rank=2, use_gate=True, allow_neg_eigval=True), 4),
    "r1-to-r3-exact-flow": (dict(rank=1, flow="exact"), 3),
    "r2-to-r6-no-conv": (dict(rank=2, use_short_conv=False), 6),
    "hybrid-r2-to-r4": ("tiny-hybrid", 4),
}


@pytest.mark.parametrize("case", list(RANK_CASES))
def test_rank_expansion_preserves_logits(tmp_path, case):
    overrides, rank = RANK_CASES[case]
    model = tiny_model("tiny-hybrid") if overrides == "tiny-hybrid" else tiny_model(**overrides)
    model.save_pretrained(tmp_path / "a")
    convert("pflow", tmp_path / "a", tmp_path / "b", options=Options(rank=rank, progress=False))
    assert PFlowConfig.from_pretrained(tmp_path / "b").rank == rank
    ids = random_ids(2, 41)
    # Betas are computed in float32 even in a float64 model: c * fl(s / (c R)) != fl(s / R) by ~6e-8 relative
    # when c is not a power of two (measured 1.3e-7 on logits for R' = 3); the maps are otherwise exact.
    torch.testing.assert_close(
        pflow_logits(tmp_path / "b", ids), pflow_logits(tmp_path / "a", ids), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        pflow_logits(tmp_path / "b", ids, torch.float32),
        pflow_logits(tmp_path / "a", ids, torch.float32),
        atol=2e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    "overrides, rank, message",
    [
        (dict(rank=2), 3, "not a multiple"),
        (dict(rank=2), 1, "rank reduction"),
        (dict(rank=2, rank_mode="product"), 4, "product"),
    ],
)
def test_rank_changes_without_exact_construction_are_refused(tmp_path, overrides, rank, message):
    tiny_model(**overrides).save_pretrained(tmp_path / "a")
    with pytest.raises(ConversionError, match=message):
        convert("pflow", tmp_path / "a", tmp_path / "b", options=Options(rank=rank, progress=False))
    assert not (tmp_path / "b").exists()


def test_rank_expansion_with_noise_perturbs_only_the_copies(tmp_path):
    tiny_model(rank=1).save_pretrained(tmp_path / "a")
    convert("pflow", tmp_path / "a", tmp_path / "b", options=Options(rank=2, init_noise=0.1, progress=False))
    old, new = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    k_old = old["model.layers.0.linear_attn.k_proj.weight"].view(2, 1, 32, 64)
    k_new = new["model.layers.0.linear_attn.k_proj.weight"].view(2, 2, 32, 64)
    assert torch.equal(k_new[:, 0], k_old[:, 0]) and not torch.equal(k_new[:, 1], k_old[:, 0])
    b_new = new["model.layers.0.linear_attn.b_proj.weight"].view(2, 2, 64)
    assert torch.equal(b_new[:, 0], b_new[:, 1])  # betas stay tied: only keys/values are perturbed


def test_dtype_change_and_sharded_output(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "a")
    convert(
        "pflow",
        tmp_path / "a",
        tmp_path / "b",
        options=Options(dtype="bfloat16", max_shard_size="40KB", progress=False),
    )
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    weights = load_state_dict(tmp_path / "b")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    reference = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "b").dtype == torch.bfloat16


# broken inputs fail cleanly, leave nothing


def _edit_weights(src: Path, edit) -> None:
    weights = load_file(src / "model.safetensors")
    edit(weights)
    save_file(weights, src / "model.safetensors")


BROKEN = {
    "missing key": (lambda w: w.pop("model.layers.1.attn.b_proj.weight"), "source keys missing"),
    "extra key": (
        lambda w: w.update({"model.layers.0.attn.extra.weight": torch.zeros(2)}),
        "no rule consumes",
    ),
    "wrong shape": (
        lambda w: w.update({"model.layers.0.attn.o_norm.weight": torch.ones(5)}),
        "shape mismatches",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_weights_fail_with_the_keys_named(tmp_path, case):
    edit, message = BROKEN[case]
    src = fla_deltanet_checkpoint(tmp_path / "fla")
    _edit_weights(src, edit)
    with pytest.raises(ConversionError, match=message) as error:
        convert("fla-deltanet", src, tmp_path / "out", options=QUIET)
    assert "model.layers." in str(error.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_wrong_model_type_missing_files_and_existing_destination(tmp_path):
    src = fla_deltanet_checkpoint(tmp_path / "fla")
    with pytest.raises(ConversionError, match="model_type 'delta_net'; --from llama expects"):
        convert("llama", src, tmp_path / "out", options=QUIET)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert("fla-deltanet", src, tmp_path / "taken", options=QUIET)
    with pytest.raises(ConversionError, match="not a directory"):
        convert("fla-deltanet", tmp_path / "nowhere", tmp_path / "out", options=QUIET)
    (src / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ConversionError, match="cannot read weights"):
        convert("fla-deltanet", src, tmp_path / "out", options=QUIET)
    (src / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="has no weights"):
        convert("fla-deltanet", src, tmp_path / "out", options=QUIET)
    (src / "config.json").unlink()
    with pytest.raises(ConversionError, match="no config.json"):
        convert("fla-deltanet", src, tmp_path / "out", options=QUIET)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    from conversion import pipeline

    src = fla_deltanet_checkpoint(tmp_path / "fla")

    def interrupted(*args, **kwargs):
        (args[2] / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "save_pflow", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert("fla-deltanet", src, tmp_path / "out", options=QUIET)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# the command line


def test_cli_convert_verify_and_errors(tmp_path, capsys):
    src = fla_deltanet_checkpoint(tmp_path / "fla", use_gate=True)
    assert (
        main(
            [
                "convert",
                "--from",
                "fla-deltanet",
                str(src),
                str(tmp_path / "out"),
                "--verify",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "wrote" in out and "copied tokenizer.json" in out
    diff = float(out.split("= ")[-1])
    assert diff < FLA_EPS_ATOL
    assert main(["convert", "--from", "fla-deltanet", str(src), str(tmp_path / "out")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--from", "llama", "--to", "fla-deltanet", str(src), str(tmp_path / "x")]) == 1
    assert "--from pflow" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "fla-deltaproduct" in capsys.readouterr().out


def test_no_progress_silences_transformers_bars_too(tmp_path, capsys):
    from transformers.utils import logging as transformers_logging

    src = tmp_path / "src"
    tiny_model("tiny").save_pretrained(src)
    capsys.readouterr()
    try:
        assert main(["convert", "--from", "pflow", str(src), str(tmp_path / "dst"), "--no-progress"]) == 0
    finally:
        transformers_logging.enable_progress_bar()
    err = capsys.readouterr().err
    assert "it/s" not in err and "Writing" not in err and "Loading" not in err, err


# the real fla model (GPU machines with fla)


def _fla_model_with(src: Path, config_class, model_class):
    """fla's own model (on the GPU, fp32) holding the weights of the hand-written checkpoint `src`.

    fla's chunk kernels refuse float32, so the model runs its fused recurrent kernels at every length."""
    config = {**read_config(src), "attn_mode": "fused_recurrent"}
    config.pop("model_type")
    model = model_class(config_class(**config)).cuda().float().eval()
    result = model.load_state_dict({k: v.cuda() for k, v in load_state_dict(src).items()}, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    return model


@pytest.mark.gpu
@pytest.mark.parametrize(
    "length", [30, 100]
)  # fla runs its fused recurrent kernel up to 64 tokens, chunks above
@pytest.mark.parametrize(
    "variant", ["plain", "gate", "neg-eigval", "no-short-conv", "tied-gate-negeig", "deltaproduct"]
)
def test_against_the_fla_model(tmp_path, variant, length):
    pytest.importorskip("fla")
    from fla.models import (
        DeltaNetConfig,
        DeltaNetForCausalLM,
        GatedDeltaProductConfig,
        GatedDeltaProductForCausalLM,
    )

    if variant == "deltaproduct":
        src = fla_deltaproduct_checkpoint(tmp_path / "fla")
        fla_model = _fla_model_with(src, GatedDeltaProductConfig, GatedDeltaProductForCausalLM)
    else:
        src = fla_deltanet_checkpoint(tmp_path / "fla", **FLA_VARIANTS[variant])
        fla_model = _fla_model_with(src, DeltaNetConfig, DeltaNetForCausalLM)
    source_format = "fla-deltaproduct" if variant == "deltaproduct" else "fla-deltanet"
    convert(source_format, src, tmp_path / "pflow", options=QUIET)
    # The torch backend: this checks the conversion; the Triton kernels have their own tests against it.
    ours = PFlowForCausalLM.from_pretrained(tmp_path / "pflow", dtype=torch.float32, kernel_backend="torch")
    ours = ours.cuda().eval()
    ids = random_ids(2, length, vocab=64).cuda()
    with torch.no_grad():
        expected = fla_model(ids, use_cache=False).logits.float()
        got = ours(ids, use_cache=False).logits.float()
    reference = fla_ref(src, ids.cpu()).float().cuda()
    print(
        f"{variant} T={length}: max |ours - fla| = {(got - expected).abs().max():.2e}, "
        f"max |fla - float64 reference| = {(expected - reference).abs().max():.2e}, "
        f"max |ours - reference| = {(got - reference).abs().max():.2e}"
    )
    # Measured on an H200, fla 0.6.0: fla vs float64 <= 1.8e-5; ours vs fla <= 2.5e-5 for DeltaNet (K = 16)
    # and <= 1.8e-4 for the DeltaProduct (K = 8), where fla's L2-norm epsilon (absent in PFlow) dominates.
    torch.testing.assert_close(expected, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, expected, atol=5e-4, rtol=0)


def test_llama_special_token_ids_outside_the_vocabulary_become_none(tmp_path):
    """Some Llama configs say pad_token_id = -1 for "no padding token": the converted config keeps None."""
    src = llama_family_checkpoint(tmp_path / "src", "llama")
    # as in Hub configs; transformers 5.17 refuses to save a generation config with pad_token_id = -1
    config = json.loads((src / "config.json").read_text())
    config.update(pad_token_id=-1, bos_token_id=1, eos_token_id=[2, 99])
    (src / "config.json").write_text(json.dumps(config))
    convert("llama", src, tmp_path / "pflow", options=Options(progress=False))
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "pflow").config
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (None, 1, [2])
