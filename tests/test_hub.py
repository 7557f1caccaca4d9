"""`parallelflow push` with the Hub client replaced by a recorder, the model card, and loading the pushed
folder back by repo id from an offline Hub cache in a fresh process without the package."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import get_relative_import_files

import modeling_parallelflow.modeling_parallelflow as modeling_file
from modeling_parallelflow import cli
from modeling_parallelflow.hub import find_eval_results, model_card, push_to_hub, write_meta
from tests.hub_helpers import SHA, RecordingHubApi
from tests.model_helpers import run_without_package, tiny_config, tiny_model
from tests.test_finetune import make_base_checkpoint, sample_ids

REPO_ID = "pflow-org/tiny-hybrid"
META = {
    "kind": "merged",
    "base_model": "pflow-org/tiny-base",
    "training_data": {"path": "/home/me/data/stories.jsonl", "format": "text", "records": 300,
                      "train_tokens": 1728, "eval_tokens": 224},
    "training": {"steps": 30, "batch_size": 4, "seq_len": 32, "learning_rate": 0.01, "precision": "fp32",
                 "lora": {"r": 8, "alpha": 32.0, "target_modules": ["q_proj", "v_proj"]}},
    "eval": {"eval_loss": 0.2481, "eval_loss_before": 11.42},
}  # fmt: skip
LM_EVAL_RESULTS = {
    "results": {"lambada_tiny": {"alias": "lambada_tiny", "acc,none": 0.25, "acc_stderr,none": 0.0433,
                                 "perplexity,none": 123.4, "perplexity_stderr,none": 5.6}},
    "config": {"model": "hf"},
}  # fmt: skip


def expected_upload(tokenizer_dir: Path, tmp_path: Path) -> set[str]:
    code = {
        "modeling_parallelflow.py",
        *(Path(p).name for p in get_relative_import_files(modeling_file.__file__)),
    }
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "tokenizer-only")
    tokenizer_files = {p.name for p in (tmp_path / "tokenizer-only").iterdir()}
    return {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "README.md",
        *code,
        *tokenizer_files,
    }


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A full checkpoint as `parallelflow merge` leaves it, plus run artefacts that must not be uploaded."""
    src = make_base_checkpoint(tmp_path / "src")
    write_meta(src, META)
    (src / "lm_eval_results.json").write_text(json.dumps(LM_EVAL_RESULTS))
    (src / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return src


@pytest.mark.slow
def test_push_uploads_exactly_the_expected_files_and_loads_by_repo_id_offline(checkpoint, tmp_path):
    api = RecordingHubApi(tmp_path / "hub-cache")
    commit = push_to_hub(checkpoint, REPO_ID, private=True, commit_message="first", api=api)
    assert commit.oid == SHA
    assert [call[:2] for call in api.calls] == [("create_repo", REPO_ID), ("upload_folder", REPO_ID)]
    assert api.calls[0][2]["private"] is True and api.calls[0][2]["exist_ok"] is True
    assert api.calls[1][2]["commit_message"] == "first"

    expected = expected_upload(checkpoint, tmp_path)
    assert set(api.uploaded) == expected
    for name in ("configuration_parallelflow.py", "cache_parallelflow.py", "ops.py", "ops_chunk_torch.py",
                 "ops_reference.py", "tokenizer.json", "tokenizer_config.json"):  # fmt: skip
        assert name in expected, name
    snapshot = tmp_path / "hub-cache" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / SHA
    config = json.loads((snapshot / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_parallelflow.PFlowForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    generation = json.loads((snapshot / "generation_config.json").read_text())
    assert generation["pad_token_id"] == tokenizer.pad_token_id

    ids = sample_ids(checkpoint)
    with torch.no_grad():
        expected_logits = AutoModelForCausalLM.from_pretrained(checkpoint).eval()(ids).logits
    text = "the cat sat on the mat."
    torch.save(
        {"ids": ids, "logits": expected_logits, "text_ids": tokenizer(text)["input_ids"]}, tmp_path / "ref.pt"
    )
    script = f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        tokenizer = AutoTokenizer.from_pretrained({REPO_ID!r}, trust_remote_code=True)
        assert tokenizer({text!r})["input_ids"] == ref["text_ids"]
        model = AutoModelForCausalLM.from_pretrained({REPO_ID!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(ref["ids"]).logits
        assert torch.equal(logits, ref["logits"]), (logits - ref["logits"]).abs().max()
        print("HUB-CACHE-OK")
    """
    result = run_without_package(script, tmp_path, HF_HUB_CACHE=str(tmp_path / "hub-cache"))
    assert "HUB-CACHE-OK" in result.stdout, result.stderr[-3000:]


def test_model_card_describes_architecture_training_and_evals(checkpoint, tmp_path):
    api = RecordingHubApi(tmp_path / "hub-cache")
    push_to_hub(checkpoint, REPO_ID, api=api)
    card = next((tmp_path / "hub-cache").rglob("README.md")).read_text()
    model = tiny_model("tiny-hybrid")
    assert card.startswith("---\n") and "library_name: transformers" in card and "custom_code" in card
    assert "base_model: pflow-org/tiny-base" in card
    for fact in (
        f"| parameters | {model.num_parameters():,} |",
        "| rank R | 2 |",
        "| rank mode | sum |",
        "| flow | euler |",
        "| algorithm | auto |",
        "| layers | 4 (2 x pflow, 1 x sliding_attention, 1 x attention) |",
        "| layer types | pflow, sliding_attention, pflow, attention |",
        "stories.jsonl (text, 300 records, 1,728 training tokens)",
        "LoRA r=8, alpha=32 on q_proj, v_proj",
        "Held-out loss on the fine-tuning data: 0.2481",
        "| lambada_tiny | acc | 0.2500 | 0.0433 |",
        "| lambada_tiny | perplexity | 123.4000 | 5.6000 |",
        f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)',
    ):
        assert fact in card, fact
    assert "/home/me" not in card


def test_model_card_without_run_metadata():
    card = model_card(tiny_config("tiny"), repo_id="me/x", num_parameters=1234)
    assert "Training data: not recorded." in card and "No evaluation results recorded." in card
    assert "attention heads" not in card and "base_model" not in card


def test_find_eval_results_reads_lm_eval_json_files(tmp_path):
    (tmp_path / "evals" / "model").mkdir(parents=True)
    (tmp_path / "evals" / "model" / "results_2025.json").write_text(json.dumps(LM_EVAL_RESULTS))
    (tmp_path / "config.json").write_text(json.dumps({"results": "not a table"}))
    (tmp_path / "broken.json").write_text("{")
    assert find_eval_results(tmp_path) == {
        "lambada_tiny": {"acc,none": 0.25, "acc_stderr,none": 0.0433, "perplexity,none": 123.4,
                         "perplexity_stderr,none": 5.6}
    }  # fmt: skip


def test_push_cli_uses_huggingface_hub_api(checkpoint, tmp_path, monkeypatch, capsys):
    api = RecordingHubApi(tmp_path / "hub-cache")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: api)
    results = tmp_path / "runs" / "eval" / "results.json"  # where `parallelflow eval` writes, outside DIR
    results.parent.mkdir(parents=True)
    results.write_text(
        json.dumps({"results": {"copy_task": {"alias": "copy_task", "exact_match,none": 0.75}}})
    )
    argv = ["push", str(checkpoint), REPO_ID, "--private", "--commit-message", "via cli", "--eval-results"]
    assert cli.main([*argv, str(results)]) == 0
    assert api.calls[0][2]["private"] is True and api.calls[1][2]["commit_message"] == "via cli"
    card = next((tmp_path / "hub-cache").rglob("README.md")).read_text()
    assert "| copy_task | exact_match | 0.7500 |  |" in card and "lambada_tiny" not in card
    assert f"https://huggingface.co/{REPO_ID}/commit/{SHA}" in capsys.readouterr().out


def test_push_refuses_adapters_and_bad_repo_ids(checkpoint, tmp_path):
    api = RecordingHubApi(tmp_path / "hub-cache")
    with pytest.raises(ValueError, match="repo_id must look like 'owner/name'"):
        push_to_hub(checkpoint, "no-owner", api=api)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="parallelflow merge"):
        push_to_hub(tmp_path / "adapter", REPO_ID, api=api)
    assert api.calls == []


def test_saved_checkpoints_ship_the_triton_kernels(tmp_path):
    tiny_model("tiny").save_pretrained(tmp_path)
    kernels = ("triton_dispatch", "triton_chunk_fwd", "triton_chunk_bwd", "triton_recurrent", "triton_conv")
    kernels += ("triton_exact_flow",)
    glue = ("triton_norm", "triton_decode", "triton_sigdelta", "glue_parallelflow", "shared_input_linear")
    for name in (*kernels, *glue):
        assert (tmp_path / f"{name}.py").is_file(), name


def test_push_a_converted_checkpoint(tmp_path):
    from conversion import Options, convert

    src = make_base_checkpoint(tmp_path / "src", name="tiny")
    convert("pflow", src, tmp_path / "rank4", options=Options(rank=4, progress=False))
    api = RecordingHubApi(tmp_path / "hub-cache")
    push_to_hub(tmp_path / "rank4", REPO_ID, api=api)
    card = next((tmp_path / "hub-cache").rglob("README.md")).read_text()
    assert "| rank R | 4 |" in card and "Training data: not recorded." in card
    assert {"model.safetensors", "tokenizer.json", "modeling_parallelflow.py"} <= set(api.uploaded)


@pytest.mark.slow  # a fresh interpreter: ~6 s
def test_tokenizer_loads_with_plain_transformers(checkpoint, tmp_path):
    script = f"""
        import io, sys
        sys.stdin = io.StringIO("")  # nobody answers transformers' "run the custom code?" prompt
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(checkpoint)!r})  # no trust_remote_code
        print("TOKENS", tokenizer("def main(")["input_ids"])
    """
    result = run_without_package(script, tmp_path)
    expected = AutoTokenizer.from_pretrained(checkpoint)("def main(")["input_ids"]
    # AutoTokenizer reads config.json first and, without the model's code, checks its layer_types against
    # transformers' own names: config.json stores those (configuration_parallelflow.SAVED_LAYER_TYPES)
    # transformers still asks "run the custom code?" (config.json maps AutoConfig to it) and, answered no
    # or not at all, builds a plain config: the tokenizer itself needs no code
    assert f"TOKENS {expected}" in result.stdout, result.stderr[-3000:]
