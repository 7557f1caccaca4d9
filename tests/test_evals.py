"""lm-eval on a tiny saved PFlow checkpoint, offline: harness CLI and runner on every bundled task, from a
foreign working directory; a multiple-choice loglikelihood redone by hand; batch size 1 == 4; peft adapters;
unavailable tasks fail with a message; report files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from evals import TASKS_DIR  # noqa: E402
from evals.report import markdown_table, metric_rows, write_report  # noqa: E402
from evals.runner import TaskUnavailableError, evaluate  # noqa: E402
from evals.tiny import save_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
BUNDLED = [
    "pflow_mqar_kv4_t64",
    "pflow_mqar_kv8_t128",
    "pflow_mqar_kv16_t256",
    "pflow_mqar_kv16_t512",
    "pflow_mqar_kv32_t512",
    "pflow_mqar_kv64_t512",
    "pflow_passkey_1k",
    "pflow_passkey_4k",
    "pflow_passkey_16k",
    "pflow_heldout_ppl",
    "pflow_brackets",
]
# One task of each kind, several docs: batches with padding and the one-token-continuation cache.
MIXED = ["pflow_brackets", "pflow_mqar_kv4_t64", "pflow_passkey_1k", "pflow_heldout_ppl"]
MAX_LENGTH = 512  # lm-eval keeps the last 512 tokens of longer contexts: the long tasks stay fast on CPU


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """configs/tiny.json (chunk 64) + a local BPE tokenizer, saved with remote code (evals.tiny)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("pflow_tiny"), chunk_size=64)


@pytest.fixture(scope="module")
def suite_results(checkpoint, tmp_path_factory):
    """The runner on the whole bundled group, one doc per task, from a foreign working directory."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        return _evaluate(checkpoint, ["parallelflow_offline"], limit=1, log=print)
    finally:
        os.chdir(cwd)


def _evaluate(checkpoint: Path, tasks: list[str], **kwargs) -> dict:
    """The runner on CPU, keeping samples, with contexts cut to MAX_LENGTH tokens."""
    options = {"device": "cpu", "max_length": MAX_LENGTH, "log_samples": True, "log": str, **kwargs}
    return evaluate(str(checkpoint), tasks, **options)


def _loglikelihoods(sample: dict) -> torch.Tensor:
    """A sample's loglikelihoods: resps hold (loglikelihood, is_greedy) pairs, or floats for rolling ones."""
    return torch.tensor([resp[0] if isinstance(resp, (list, tuple)) else resp for (resp,) in sample["resps"]])


def _leaf_values(results: dict) -> dict:
    return {(r["name"], r["metric"], r["filter"]): r["value"] for r in metric_rows(results) if not r["group"]}


def test_loader_is_deterministic_and_answers_are_in_context():
    sys.path.insert(0, str(TASKS_DIR))
    try:
        import loader
    finally:
        sys.path.remove(str(TASKS_DIR))
    mqar = loader.mqar_docs(kv_pairs=8, items=64, docs=5)
    assert mqar == loader.mqar_docs(kv_pairs=8, items=64, docs=5)
    for doc in mqar:
        *pairs_and_filler, queries = doc["context"].split("\n")
        key = queries.split()[-1]
        answer = doc["choices"][doc["gold"]]
        assert f"{key}{answer}" in pairs_and_filler[0].split()  # the pair, as "ab:17"
        assert f"{key}{answer}" not in queries  # never queried before the scored query
        assert all(choice in doc["context"] for choice in doc["choices"]) and len(set(doc["choices"])) == 4
        assert len(doc["context"].split()) == 64  # 8 pairs + 48 filler + 7 answered queries + the key
    for doc in loader.passkey_docs(chars=2000, docs=4):
        assert doc["context"].count(doc["answer"]) == 2 and abs(len(doc["context"]) - 2000) < 100
    for doc in loader.bracket_docs(docs=20):
        assert len(set(doc["choices"])) == 4
    with pytest.raises(ValueError, match="kv_pairs"):
        loader.mqar_docs(kv_pairs=2, items=64)
    with pytest.raises(ValueError, match="kind"):
        loader.load({"kind": "nope"})


@pytest.mark.slow
def test_harness_cli_runs_every_bundled_task_offline(checkpoint, suite_results, tmp_path):
    """`lm_eval --model hf ... --include_path <abs evals/tasks>` from another directory == the runner."""
    out = tmp_path / "cli_out"
    command = [
        sys.executable, "-m", "lm_eval",
        "--model", "hf",
        "--model_args", f"pretrained={checkpoint},trust_remote_code=True,max_length={MAX_LENGTH}",
        "--tasks", "parallelflow_offline",
        "--include_path", str(TASKS_DIR),
        "--device", "cpu", "--batch_size", "1", "--limit", "1",
        "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    cli = json.loads(result_file.read_text())
    assert set(BUNDLED) <= set(cli["results"])
    assert set(BUNDLED) <= set(suite_results["results"])
    runner = _leaf_values(suite_results)
    for key, value in _leaf_values(cli).items():
        assert value == pytest.approx(runner[key], rel=1e-5, abs=1e-6), key


def test_runner_report_files(suite_results, tmp_path):
    paths = write_report(suite_results, tmp_path / "report")
    assert {"json", "markdown", "plot", "samples"} <= set(paths)
    saved = json.loads(paths["json"].read_text())
    assert set(BUNDLED) <= set(saved["results"]) and saved["run"]["limit"] == 1
    table = paths["markdown"].read_text()
    for name in [*BUNDLED, "parallelflow_mqar", "parallelflow_passkey"]:
        assert f"| {name} |" in table or f"| **{name}** |" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "report").glob(".*"))  # no temporary files left behind


def _by_hand(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context): the sum of the continuation tokens' log-softmax in one forward."""
    whole = tokenizer(context + continuation)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    assert n_context < len(whole) <= MAX_LENGTH  # no truncation by lm-eval
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)[n_context - 1 :]
    return logprobs.gather(-1, torch.tensor(whole[n_context:])[:, None]).sum().item()


def test_multiple_choice_loglikelihood_by_hand(checkpoint, suite_results):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    for task in ["pflow_brackets", "pflow_mqar_kv4_t64"]:
        (sample,) = suite_results["samples"][task]
        for (context, continuation), ((loglikelihood, _),) in zip(
            sample["arguments"], sample["resps"], strict=True
        ):
            by_hand = _by_hand(model, tokenizer, context, continuation)
            assert loglikelihood == pytest.approx(by_hand, abs=1e-4), (task, continuation)


def test_batch_size_4_equals_batch_size_1(checkpoint):
    """Right-padded loglikelihood batches and left-padded generate batches give the batch-size-1 results."""
    runs = {bs: _evaluate(checkpoint, MIXED, limit=2, batch_size=bs) for bs in (1, 4)}
    for task in MIXED:
        for one, four in zip(runs[1]["samples"][task], runs[4]["samples"][task], strict=True):
            if task == "pflow_passkey_1k":
                assert one["resps"] == four["resps"]  # generated text
            else:
                torch.testing.assert_close(_loglikelihoods(four), _loglikelihoods(one), rtol=1e-5, atol=1e-4)
    assert _leaf_values(runs[4]) == pytest.approx(_leaf_values(runs[1]), rel=1e-5)


def test_peft_adapter_is_applied(checkpoint, tmp_path):
    """`peft=ADAPTER` scores with the adapter: the loglikelihoods are the PeftModel's own."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    adapter = tmp_path / "adapter"
    peft.get_peft_model(base, config).save_pretrained(adapter)
    results = _evaluate(checkpoint, ["pflow_brackets"], limit=1, peft=str(adapter))
    assert results["run"]["model_args"]["peft"] == str(adapter)

    base = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    adapted = peft.PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    (sample,) = results["samples"]["pflow_brackets"]
    (context, continuation), ((loglikelihood, _),) = sample["arguments"][0], sample["resps"][0]
    assert loglikelihood == pytest.approx(_by_hand(adapted, tokenizer, context, continuation), abs=1e-4)
    with adapted.disable_adapter():
        assert loglikelihood != pytest.approx(_by_hand(adapted, tokenizer, context, continuation), abs=1e-3)


@pytest.mark.slow
def test_unknown_task_is_reported(checkpoint):
    with pytest.raises(TaskUnavailableError, match="no_such_task"):
        evaluate(str(checkpoint), ["no_such_task"], device="cpu", log=str)


@pytest.mark.slow
def test_hub_task_offline_says_so_without_traceback(checkpoint, tmp_path):
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "modeling_parallelflow",
        "eval",
        str(checkpoint),
        "--tasks",
        "wikitext,piqa",
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "wikitext: its dataset is not available offline" in proc.stderr
    assert "piqa: its dataset is not available offline" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_from_a_results_dict(tmp_path):
    results = {
        "results": {
            "grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": "N/A"},
            "t1": {"alias": " - t1", "acc,none": 0.25, "acc_stderr,none": 0.1},
            "t2": {"alias": "t2", "bits_per_byte,none": 1.5, "bits_per_byte_stderr,none": "N/A"},
        },
        "groups": {"grp": {}},
        "n-samples": {"t1": {"original": 10, "effective": 4}},
        "higher_is_better": {"t1": {"acc": True}, "t2": {"bits_per_byte": False}},
    }
    table = markdown_table(results)
    assert "| **grp** | acc | none | 0.5000 |  |  |" in table
    assert "| t1 | acc ↑ | none | 0.2500 | 0.1000 | 4 |" in table
    assert "| t2 | bits_per_byte ↓ | none | 1.5000 |  |  |" in table
    paths = write_report(results, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md", "results.png"]
    assert json.loads(paths["json"].read_text())["results"]["t1"]["acc,none"] == 0.25


def test_generated_text_is_the_models_greedy_continuation(checkpoint):
    """lm-eval's generate_until (HFLM, the runner's model class: a left-padded batch of two) equals an argmax
    loop over full forwards without a cache, so broken cached generation fails here. (The bundled passkey
    tasks stop at the first newline or period, which a random tiny model emits at once: their text is
    empty, so this test uses its own stop string.)"""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    contexts = [
        "def main(argv):\n    return",
        "The pass key is 4821. Remember it. What is the pass key? It is",
    ]
    options = {"until": ["@@@"], "max_gen_toks": 10, "do_sample": False}
    requests = [
        Instance(request_type="generate_until", doc={}, arguments=(context, options), idx=0)
        for context in contexts
    ]
    generated = HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=MAX_LENGTH
    ).generate_until(requests)
    eos = tokenizer.decode([tokenizer.eos_token_id])
    for context, text in zip(contexts, generated, strict=True):
        seq = torch.tensor([tokenizer(context, add_special_tokens=False)["input_ids"]])
        start = seq.shape[1]
        with torch.no_grad():
            for _ in range(options["max_gen_toks"]):
                seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
        expected = tokenizer.decode(seq[0, start:]).split(eos)[0].split("@@@")[0]
        assert len(expected) > 0 and text == expected, (text, expected)
