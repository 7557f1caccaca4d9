"""The demo end to end through the CLI (tiny step budget; slow), the CLI registry, the training helpers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerControl, TrainerState

from modeling_parallelflow import cli
from modeling_parallelflow.hub import push_to_hub
from modeling_parallelflow.training import LossPlotCallback, TokenBlockDataset, atomic_dir
from tests.hub_helpers import RecordingHubApi

REPO = Path(__file__).resolve().parents[1]
TINY_DEMO = [
    "--max-steps", "30", "--corpus-bytes", "300000", "--vocab-size", "512", "--batch-size", "8",
    "--seq-len", "64", "--learning-rate", "5e-3", "--max-new-tokens", "8",
]  # fmt: skip


@pytest.mark.slow
def test_demo_through_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output-dir", str(out), *TINY_DEMO]) == 0
    printed = capsys.readouterr().out

    metrics = json.loads((out / "demo_metrics.json").read_text())
    assert metrics["steps"] == 30
    assert metrics["loss_after"]["train"] < metrics["loss_before"]["train"] - 0.5
    assert metrics["loss_after"]["val"] < metrics["loss_before"]["val"]
    for name in ("config.json", "model.safetensors", "modeling_parallelflow.py", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert "reloaded logits equal the trained model's" in printed
    assert "--- greedy" in printed and "--- sampled sample ---" in printed and "trained 30 steps" in printed
    assert not [p for p in tmp_path.iterdir() if p.name != "demo"], "staging dirs left behind"

    # a second run refuses to clobber the checkpoint without --overwrite
    assert cli.main(["demo", "--output-dir", str(out), *TINY_DEMO]) == 2
    assert "--overwrite" in capsys.readouterr().err

    # the main job's checkpoint can be pushed (no fine-tuning fields in its metadata)
    api = RecordingHubApi(tmp_path / "hub-cache")
    push_to_hub(out, "pflow-org/demo", api=api)
    card = next((tmp_path / "hub-cache").rglob("README.md")).read_text()
    assert "- data: Python standard library source files" in card and "30 steps, batch 8 x 64 tokens" in card


def test_cli_help_lists_commands(capsys):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # the console script when installed (pip install -e .), else the same entry point through -m
    script = shutil.which("parallelflow")
    command = [script, "--help"] if script else [sys.executable, "-m", "modeling_parallelflow", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for name in cli.available_commands():
        assert name in result.stdout
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["no-such-command"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_cli_skips_missing_modules(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("modeling_parallelflow.no_such_module", "not installed"))
    monkeypatch.setitem(cli.COMMANDS, "ghost2", ("no_such_package.cli", "not installed"))
    assert "ghost" not in cli.available_commands() and "ghost2" not in cli.available_commands()
    assert "demo" in cli.available_commands()


def test_token_blocks():
    data = TokenBlockDataset(torch.arange(100), seq_len=16)
    assert len(data) == 6 and data.num_tokens == 96
    item = data[1]
    assert item["input_ids"].tolist() == list(range(16, 32))
    assert torch.equal(item["labels"], item["input_ids"])
    with pytest.raises(ValueError, match="seq_len"):
        TokenBlockDataset(torch.arange(10), seq_len=16)


def test_atomic_dir(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as staging:
        (staging / "a").write_text("1")
        assert not target.exists()
    assert (target / "a").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_dir(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "failed") as staging:
            (staging / "a").write_text("1")
            raise RuntimeError("boom")
    with atomic_dir(target, overwrite=True) as staging:
        (staging / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_loss_plot(tmp_path):
    state, control = TrainerState(), TrainerControl()
    plot = LossPlotCallback(tmp_path / "plots" / "loss.png")
    for step, loss in [(0, 6.0), (10, 4.0), (20, 3.0)]:
        state.global_step = step
        plot.on_log(None, state, control, logs={"loss": loss, "learning_rate": 1e-3})
    plot.on_log(None, state, control, logs={"val_loss": 3.5})
    plot.on_train_end(None, state, control)
    assert plot.train == [(0, 6.0), (10, 4.0), (20, 3.0)] and plot.evals == {"val_loss": [(20, 3.5)]}
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["loss.png"]
