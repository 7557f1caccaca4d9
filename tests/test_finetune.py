"""`parallelflow finetune` / `merge` and the PEFT integration, on a tiny hybrid model (CPU, torch path)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_parallelflow import cli
from modeling_parallelflow.errors import CheckpointError
from modeling_parallelflow.finetune import (
    PromptCompletionDataset,
    build_datasets,
    pad_collator,
    read_records,
    resolve_precision,
    resolve_resume,
)
from modeling_parallelflow.finetune_merge import merge_adapter, merge_to_dir
from modeling_parallelflow.hub import push_to_hub, read_meta
from modeling_parallelflow.peft_support import LORA_TARGET_MODULES, register_lora_target_modules
from modeling_parallelflow.tokenizer import build_tokenizer
from tests.hub_helpers import RecordingHubApi
from tests.model_helpers import run_without_package, tiny_model

peft = pytest.importorskip("peft")
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SENTENCES = [
    "the cat sat on the mat.",
    "a dog ran in the park.",
    "birds sing at dawn.",
    "rain falls on the hills.",
    "we read a book by the fire.",
]
TEXT = " ".join(SENTENCES * 60)  # ~ 5k tokens of one repeating paragraph
LORA_RUN = [
    "--seq-len", "32", "--batch-size", "4", "--max-steps", "30", "--learning-rate", "1e-2",
    "--lora-r", "8", "--logging-steps", "5", "--save-steps", "10", "--warmup-steps", "2",
    "--precision", "fp32",  # the same run on a GPU machine (the Trainer moves the model there)
]  # fmt: skip


def make_base_checkpoint(path: Path, name: str = "tiny-hybrid") -> Path:
    """A tiny random PFlow model (configs/<name>.json) plus a BPE tokenizer trained on TEXT, in `path`."""
    tokenizer = build_tokenizer([TEXT], vocab_size=320, model_max_length=1024)
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model = tiny_model(name, **ids)
    with torch.no_grad():  # a trained LM's scale: std-0.02 tied embeddings cap the logits at about +-1
        model.model.embed_tokens.weight.normal_(std=0.25)
    model.generation_config.update(**ids)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sample_ids(path: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer(SENTENCES[0] + " " + SENTENCES[3], return_tensors="pt")["input_ids"]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base_checkpoint(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> Path:
    """A LoRA fine-tuning run through the CLI: 30 steps, checkpoints every 10 (the last two are kept)."""
    root = tmp_path_factory.mktemp("lora")
    (root / "data.txt").write_text(TEXT)
    out = root / "adapter"
    assert cli.main(["finetune", str(base), str(root / "data.txt"), "-o", str(out), *LORA_RUN]) == 0
    return out


# ----- PEFT defaults ---------------------------------------------------------------------------------------


def _lora_targets(model) -> set[str]:
    return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if name.endswith("lora_A")}


def test_target_modules_none_takes_the_parallelflow_defaults():
    assert register_lora_target_modules()
    model = get_peft_model(tiny_model("tiny-hybrid"), LoraConfig(r=4))  # target_modules left out
    targets = _lora_targets(model)
    suffixes = {name.rsplit(".", 1)[-1] for name in targets}
    assert suffixes == set(LORA_TARGET_MODULES)
    layer_types = model.config.layer_types
    for i, kind in enumerate(layer_types):
        mixer = "linear_attn" if kind == "pflow" else "self_attn"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert any(name.endswith(f"layers.{i}.{mixer}.{proj}") for name in targets), (i, proj)
    assert not any("conv1d" in name or "b_proj" in name for name in targets)


@pytest.mark.slow  # a fresh interpreter: ~12 s
def test_using_the_package_registers_lora_defaults():
    script = textwrap.dedent(
        """
        from modeling_parallelflow import PFlowForCausalLM
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
        assert "parallelflow" in mapping, sorted(mapping)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_default_lora_targets_through_remote_code_without_package(base, tmp_path):
    script = f"""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(base)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules")
        lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
        print("TARGETS", sorted(lora.peft_config["default"].target_modules))
    """
    result = run_without_package(script, tmp_path)
    assert f"TARGETS {sorted(LORA_TARGET_MODULES)}" in result.stdout, result.stderr[-3000:]


def test_adapter_save_reload_gives_identical_logits(base, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, task_type="CAUSAL_LM"))
    with torch.no_grad():  # lora_B starts at zero: make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    ids = sample_ids(base)
    expected = logits(model, ids)
    assert not torch.allclose(expected, logits(AutoModelForCausalLM.from_pretrained(base), ids))
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, ids), expected)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", trust_remote_code=True)
    assert torch.equal(logits(auto, ids), expected)


# ----- finetune CLI ----------------------------------------------------------------------------------------


def test_lora_finetune_lowers_the_loss(lora_run):
    meta = read_meta(lora_run)
    assert meta["kind"] == "lora" and meta["training"]["steps"] == 30
    assert meta["training_data"]["format"] == "text" and meta["training_data"]["eval_tokens"] > 0
    # measured: held-out loss ~5.8 -> ~0.6 nats/token with this run
    assert meta["eval"]["eval_loss"] < meta["eval"]["eval_loss_before"] - 2.0
    assert sorted(meta["training"]["lora"]["target_modules"]) == sorted(LORA_TARGET_MODULES)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "loss.png"):
        assert (lora_run / name).is_file(), name
    assert not (lora_run / "model.safetensors").exists()
    history = json.loads(
        (lora_run.parent / "adapter-checkpoints" / "checkpoint-30" / "trainer_state.json").read_text()
    )
    train_losses = [entry["loss"] for entry in history["log_history"] if "loss" in entry]
    assert train_losses[-1] < train_losses[0] - 2.0


def test_trained_adapter_loads_with_peft_and_auto_peft(base, lora_run):
    ids = sample_ids(base)
    adapted = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora_run), ids)
    auto = AutoPeftModelForCausalLM.from_pretrained(lora_run, trust_remote_code=True)
    assert torch.equal(logits(auto, ids), adapted)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(base), ids)
    assert (adapted - base_logits).abs().max() > 0.1


@pytest.mark.slow
def test_auto_peft_loads_in_fresh_process_without_package(base, lora_run, tmp_path):
    ids = sample_ids(base)
    expected = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora_run), ids)
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = f"""
        import torch
        from peft import AutoPeftModelForCausalLM
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoPeftModelForCausalLM.from_pretrained({str(lora_run)!r}, trust_remote_code=True).eval()
        assert type(model.base_model.model).__module__.startswith("transformers_modules")
        with torch.no_grad():
            assert torch.equal(model(ref["ids"]).logits, ref["logits"])
        print("AUTO-PEFT-OK")
    """
    result = run_without_package(script, tmp_path)
    assert "AUTO-PEFT-OK" in result.stdout, result.stderr[-3000:]


def test_resume_from_checkpoint_matches_the_uninterrupted_run(base, lora_run, tmp_path):
    # Interrupted after step 20: only checkpoint-20 exists; --resume continues to step 30.
    checkpoints = tmp_path / "adapter-checkpoints"
    shutil.copytree(lora_run.parent / "adapter-checkpoints" / "checkpoint-20", checkpoints / "checkpoint-20")
    data = lora_run.parent / "data.txt"
    out = tmp_path / "adapter"
    assert cli.main(["finetune", str(base), str(data), "-o", str(out), *LORA_RUN, "--resume"]) == 0
    assert read_meta(out)["training"]["steps"] == 30
    resumed = load_file(out / "adapter_model.safetensors")
    uninterrupted = load_file(lora_run / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_merge_equals_the_adapted_model_and_reloads(base, lora_run, tmp_path):
    dst = tmp_path / "merged"
    assert cli.main(["merge", str(base), str(lora_run), str(dst)]) == 0
    assert read_meta(dst)["kind"] == "merged"
    for name in ("config.json", "model.safetensors", "modeling_parallelflow.py", "ops.py", "tokenizer.json"):
        assert (dst / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name != "merged"], "staging dirs left behind"
    ids = sample_ids(base)
    adapted = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora_run), ids)
    merged = merge_adapter(base, lora_run)
    reloaded = AutoModelForCausalLM.from_pretrained(dst)
    assert type(reloaded).__name__ == "PFlowForCausalLM"
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(reloaded, ids), logits(merged, ids))
    assert cli.main(["merge", str(base), str(lora_run), str(dst)]) == 2  # refuses to overwrite

    api = RecordingHubApi(tmp_path / "hub-cache")
    push_to_hub(dst, "pflow-org/merged", api=api)
    card = next((tmp_path / "hub-cache").rglob("README.md")).read_text()
    assert "LoRA r=8" in card and "(merged)" in card and "model.safetensors" in api.uploaded


def test_merge_checks_the_adapter_against_the_base_before_writing(base, lora_run, tmp_path, capsys):
    other = make_base_checkpoint(tmp_path / "other-vocab", name="tiny")  # another architecture and tokenizer
    dst = tmp_path / "merged"
    assert cli.main(["merge", str(other), str(lora_run), str(dst)]) == 1
    assert "does not fit this base" in capsys.readouterr().err and not dst.exists()

    bigger = tmp_path / "bigger-vocab"  # same weights, a tokenizer with more tokens than embedding rows
    shutil.copytree(lora_run, bigger)
    tokenizer = build_tokenizer([TEXT + " zebra quokka axolotl"] * 3, vocab_size=600, min_frequency=1)
    tokenizer.save_pretrained(bigger)
    with pytest.raises(CheckpointError, match="trained on another base"):
        merge_to_dir(base, bigger, dst)
    assert not dst.exists()

    truncated = tmp_path / "truncated"  # one LoRA tensor removed
    shutil.copytree(lora_run, truncated)
    weights = load_file(truncated / "adapter_model.safetensors")
    removed = sorted(weights)[0]
    weights.pop(removed)
    save_file(weights, truncated / "adapter_model.safetensors")
    assert cli.main(["merge", str(base), str(truncated), str(dst)]) == 1
    err = capsys.readouterr().err
    assert f"missing {removed}" in err and not dst.exists()


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    for step, files in ((10, ("trainer_state.json", "adapter_model.safetensors")),
                        (20, ("trainer_state.json", "adapter_model.safetensors")),
                        (30, ("adapter_model.safetensors",))):  # fmt: skip
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in files:
            (tmp_path / f"checkpoint-{step}" / name).write_text("{}")
    assert resolve_resume("latest", tmp_path) == str(tmp_path / "checkpoint-20")
    assert resolve_resume(str(tmp_path / "checkpoint-30"), tmp_path / "elsewhere") == str(
        tmp_path / "checkpoint-20"
    )
    assert resolve_resume(str(tmp_path / "checkpoint-10"), tmp_path) == str(tmp_path / "checkpoint-10")
    with pytest.raises(ValueError, match="no complete checkpoint-N"):
        resolve_resume("latest", tmp_path / "empty")


def test_full_finetune_on_prompt_completion_with_gradient_checkpointing(base, tmp_path):
    pairs = [
        {"prompt": f"Q: {s}\nA:", "completion": f" {SENTENCES[(i + 1) % len(SENTENCES)]}"}
        for i, s in enumerate(SENTENCES)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs * 8))
    out = tmp_path / "full"
    args = ["--full", "--gradient-checkpointing", "--seq-len", "48", "--batch-size", "4", "--max-steps", "6",
            "--learning-rate", "3e-3", "--save-steps", "0", "--eval-fraction", "0.25",
            "--precision", "fp32"]  # fmt: skip
    assert cli.main(["finetune", str(base), str(data), "-o", str(out), *args]) == 0
    meta = read_meta(out)
    assert meta["kind"] == "full" and meta["training_data"]["format"] == "prompt_completion"
    assert meta["eval"]["eval_loss"] < meta["eval"]["eval_loss_before"]
    assert not list((tmp_path / "full-checkpoints").glob("checkpoint-*"))  # --save-steps 0
    for name in ("model.safetensors", "modeling_parallelflow.py", "ops.py", "tokenizer.json", "loss.png"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = sample_ids(base)
    assert not torch.equal(logits(model, ids), logits(AutoModelForCausalLM.from_pretrained(base), ids))

    api = RecordingHubApi(tmp_path / "hub-cache")
    push_to_hub(out, "pflow-org/full", api=api)
    card = next((tmp_path / "hub-cache").rglob("README.md")).read_text()
    assert "(full)" in card and "pairs.jsonl (prompt_completion, 40 records" in card


# ----- data and options ------------------------------------------------------------------------------------


def test_prompt_completion_examples_mask_the_prompt_and_pad(base):
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = PromptCompletionDataset(
        tokenizer, [("the cat", " sat"), ("a dog ran in the park", " yes")], seq_len=64
    )
    batch = pad_collator(tokenizer.pad_token_id)([data[0], data[1]])
    prompt_len = len(tokenizer("the cat", add_special_tokens=False)["input_ids"])
    assert (batch["labels"][0, :prompt_len] == -100).all()
    assert batch["labels"][0, prompt_len] == batch["input_ids"][0, prompt_len]
    short = len(data[0]["input_ids"])
    assert batch["labels"][0, -1] == -100 and batch["attention_mask"][0, short:].eq(0).all()
    assert batch["input_ids"][0, short - 1] == tokenizer.eos_token_id
    assert (
        PromptCompletionDataset(tokenizer, [("the cat sat on the mat", "!"), ("a", "b")], seq_len=3).dropped
        == 1
    )


def test_text_split_holds_out_the_tail(base, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * 20))
    train, evaluation, summary = build_datasets(tokenizer, tmp_path / "data.jsonl", 16, eval_fraction=0.2)
    assert summary["records"] == 100 and len(evaluation) == -(-(len(train) + len(evaluation)) * 2 // 10)
    assert summary["train_tokens"] == train.num_tokens and summary["eval_tokens"] == evaluation.num_tokens


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', "mixes"),
        ('{"text": "a"}\nnot json\n', "data.jsonl:2: not valid JSON"),
        ('{"content": "a"}\n', "expected"),
        ("\n\n", "no records"),
    ],
    ids=["mixed", "bad-json", "unknown-keys", "empty"],
)
def test_bad_data_files_fail_clearly(tmp_path, content, match):
    (tmp_path / "data.jsonl").write_text(content)
    with pytest.raises(ValueError, match=match):
        read_records(tmp_path / "data.jsonl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_precision_on_cpu_is_fp32():
    assert resolve_precision("auto") == "fp32"
    with pytest.raises(ValueError, match="--precision bf16 needs a CUDA GPU"):
        resolve_precision("bf16")


def test_existing_output_and_missing_checkpoint_are_refused(base, tmp_path, capsys):
    (tmp_path / "data.txt").write_text(TEXT)
    (tmp_path / "out").mkdir()
    assert cli.main(["finetune", str(base), str(tmp_path / "data.txt"), "-o", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    argv = ["finetune", str(base), str(tmp_path / "data.txt"), "-o", str(tmp_path / "new"), "--resume"]
    assert cli.main(argv) == 1
    assert "--resume: no complete checkpoint-N folder" in capsys.readouterr().err
