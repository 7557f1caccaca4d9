"""The real-text harness (benchmarks/quality/text_lm.py) on a small learnable token corpus, on the CPU."""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_parallelflow.pretrain_data import write_token_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "text_lm.py"
VOCAB = 64


def _load():
    spec = importlib.util.spec_from_file_location("text_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["text_lm"] = module
    spec.loader.exec_module(module)
    return module


text_lm = _load()


def _corpus(folder: Path) -> Path:
    """train.npy / val.npy / manifest.json as text_corpus.py writes them: a sequence a model learns fast
    (each token a fixed function of the one before, with a little noise)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    splits = {}
    for split, length in (("train", 40_000), ("val", 2_000)):
        ids = np.empty(length, dtype=np.int64)
        ids[0] = 1
        for i in range(1, length):
            ids[i] = (5 * ids[i - 1] + 3) % VOCAB if rng.random() > 0.05 else rng.integers(VOCAB)
        path = write_token_file(folder / f"{split}.npy", ids, VOCAB)
        splits[split] = {"tokens": length, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps({"vocab_size": VOCAB, "splits": splits}))
    return folder


ARGS = ["--size", "tiny", "--seq-len", "32", "--batch-tokens", "512", "--tokens", "30000", "--lr", "1e-2"]
ARGS += ["--eval-every", "20", "--val-windows", "16", "--threads", "1"]


@pytest.mark.slow  # trains small models (~4-8 s)
def test_every_model_sees_the_same_windows_and_learns(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "text.json"
    assert text_lm.main([str(corpus), *ARGS, "--models", "pflow-r1,llama", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["steps"] == 59 and data["config"]["tokens"] == 59 * 512
    for name in ("pflow-r1", "llama"):
        run = data["runs"][name]
        first, last = run["heldout_curve"][0][1], run["heldout_curve"][-1][1]
        assert first > np.log(VOCAB) - 0.5  # an untrained model knows nothing
        assert last < 1.5, (name, run["heldout_curve"])  # the rule is learnt (noise alone costs ~0.4 nats)
        assert run["heldout_perplexity"] == pytest.approx(np.exp(run["heldout_loss"]), rel=1e-3)
        assert run["steps_done"] == 59 and len(run["heldout_curve"]) == 4  # steps 0, 20, 40 and the end
    counts = [data["runs"][n]["non_embedding_params"] for n in ("pflow-r1", "llama")]
    assert abs(counts[0] - counts[1]) / counts[0] < 0.02
    assert out.with_suffix(".png").stat().st_size > 0
    np.testing.assert_array_equal(  # the same seeded offsets, whoever asks
        text_lm.window_offsets(40_000, 32, 100, 0), text_lm.window_offsets(40_000, 32, 100, 0)
    )

    # a rerun skips what the file holds; another configuration is refused
    assert text_lm.main([str(corpus), *ARGS, "--models", "pflow-r1", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == data
    with pytest.raises(SystemExit, match="another corpus or configuration"):
        text_lm.main([str(corpus), *ARGS, "--lr", "3e-3", "--models", "pflow-r1", "--out", str(out)])


def test_saved_model_reloads_with_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    corpus = _corpus(tmp_path / "corpus")
    args = [*ARGS, "--tokens", "1024", "--models", "pflow-r2-sum", "--eval-every", "0"]
    out, saved = tmp_path / "r.json", tmp_path / "models"
    assert text_lm.main([str(corpus), *args, "--out", str(out), "--save-dir", str(saved)]) == 0
    assert sorted(p.name for p in saved.iterdir()) == ["pflow-r2-sum"]  # no temporary folder left
    model = AutoModelForCausalLM.from_pretrained(saved / "pflow-r2-sum", trust_remote_code=True)
    ids = torch.from_numpy(np.load(corpus / "val.npy")[:32].astype(np.int64))[None]
    loss = model(input_ids=ids, labels=ids).loss.item()
    assert np.isfinite(loss) and model.config.rank == 2


def test_gradient_accumulation_gives_the_same_run(tmp_path):
    """--micro-batch splits each step's 16 windows into forwards of 4: the same losses, to fp32 rounding."""
    corpus = _corpus(tmp_path / "corpus")
    args = [*ARGS, "--tokens", "2048", "--models", "llama", "--eval-every", "2"]
    whole, split = tmp_path / "whole.json", tmp_path / "split.json"
    assert text_lm.main([str(corpus), *args, "--out", str(whole)]) == 0
    assert text_lm.main([str(corpus), *args, "--micro-batch", "4", "--out", str(split)]) == 0
    a, b = (json.loads(p.read_text())["runs"]["llama"] for p in (whole, split))
    assert a["steps_done"] == b["steps_done"] == 4
    np.testing.assert_allclose(np.array(a["heldout_curve"]), np.array(b["heldout_curve"]), rtol=1e-4)
    np.testing.assert_allclose(np.array(a["loss_curve"]), np.array(b["loss_curve"]), rtol=1e-4)


def test_bad_inputs_are_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="missing manifest.json, train.npy, val.npy"):
        text_lm.main([str(tmp_path / "empty"), *ARGS, "--out", str(tmp_path / "x.json")])
    for unknown in ("mamba", "llama-abspos"):  # llama-abspos (MQAR only) does not reload when saved
        with pytest.raises(SystemExit):
            text_lm.main([str(tmp_path / "empty"), "--models", unknown, "--out", str(tmp_path / "x.json")])
        assert f"unknown models ['{unknown}']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="fewer than one window"):
        text_lm.window_offsets(10, 32, 1, 0)
