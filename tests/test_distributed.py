"""`parallelflow train` data-parallel on the CPU: 2 processes on gloo, FSDP2 and DDP against one process.

The 2-process runs fork the test process (so the ranks do not import torch and transformers again, which
takes longer than the runs themselves on a 2-core machine); the real launchers, torchrun and
`accelerate launch`, run as subprocesses in the tests marked slow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from modeling_parallelflow import pretrain
from modeling_parallelflow.pretrain_data import (
    PackedBatches,
    pack_boundaries,
    read_token_file,
    tokenize_to_file,
    write_token_file,
)
from modeling_parallelflow.pretrain_dist import (
    DistEnv,
    checkpoint_steps,
    export_checkpoint,
    init_distributed,
    load_checkpoint,
    resolve_precision,
    resolve_strategy,
    unwrap,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.json"
EOS = 2
SINGLE = DistEnv(0, 1, 0, torch.device("cpu"), "single")
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ACCELERATE_ENV = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_MIXED_PRECISION")


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for name in (*LAUNCH_ENV, *ACCELERATE_ENV, "FSDP_ACTIVATION_CHECKPOINTING"):
        monkeypatch.delenv(name, raising=False)


def _documents_file(path: Path, seed: int, tokens: int) -> Path:
    """Random ids with an eos every ~30 tokens: packed batches of many short documents."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 512, tokens)
    ids[rng.random(ids.size) < 0.03] = EOS
    return write_token_file(path, ids, 512)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    return _documents_file(tmp_path_factory.mktemp("tokens") / "tokens.npy", 0, 12_000)


@pytest.fixture(scope="module")
def val_file(tmp_path_factory) -> Path:
    """Held-out ids drawn as token_file's, from another seed."""
    return _documents_file(tmp_path_factory.mktemp("tokens") / "val.npy", 1, 3_000)


def train_argv(
    data: Path, out: Path, *extra: str, model: tuple[str, str] = ("--config", str(TINY))
) -> list[str]:
    base = [
        "--kernel-backend",
        "torch",
        "--device",
        "cpu",
        "--micro-tokens",
        "64",
        "--log-every",
        "1",
        "--max-steps",
        "2",
    ]
    return [str(data), "-o", str(out), *model, *base, *extra]


def train_args(*argv, **kwargs) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    return parser.parse_args(train_argv(*argv, **kwargs))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, *args, world: int = 2) -> None:
    """fn(rank, *args) in `world` forked processes that form a gloo group through the launcher variables."""
    torch.multiprocessing.start_processes(
        _rank_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True, start_method="fork"
    )


def two_steps(run: pretrain.PretrainRun) -> dict:
    """Losses of steps 0 and 1 (one optimizer step between) and the full gradients of step 0."""
    loss0 = run.forward_backward(0)
    grads = {}
    for name, param in unwrap(run.model).named_parameters():
        grad = param.grad
        grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    run.optimizer_step()
    return {"losses": [float(loss0), float(run.forward_backward(1))], "grads": grads}


def _two_steps_rank(rank: int, args: argparse.Namespace, result: Path) -> None:
    outcome = two_steps(pretrain.PretrainRun(args, init_distributed("cpu")))
    if rank == 0:
        torch.save(outcome, result)


def _train_rank(rank: int, args: argparse.Namespace) -> None:
    assert pretrain.run(args) == 0


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def metrics(out: Path) -> list[dict]:
    """The training lines of a run's metrics.jsonl."""
    return [r for r in _records(out) if "loss" in r]


def heldout_metrics(out: Path) -> list[dict]:
    """The held-out lines (--val-data) of a run's metrics.jsonl."""
    return [r for r in _records(out) if "val_loss" in r]


# Measured on the CPU, fp32: DDP and FSDP2 against one process differ by at most 1.2e-7 in the loss and
# 6e-8 in any gradient entry (summation order of the reductions).
LOSS_TOL = dict(rtol=1e-6, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "strategy, grad_accum, extra",
    [
        pytest.param("ddp", 2, (), id="ddp-accum2"),
        pytest.param("fsdp2", 1, (), id="fsdp2"),
        pytest.param("fsdp2", 2, ("--activation-checkpointing",), id="fsdp2-accum2-activation-ckpt"),
    ],
)
def test_two_ranks_equal_one_process_on_the_same_global_batch(
    token_file, tmp_path, strategy, grad_accum, extra
):
    args = train_args(
        token_file, tmp_path / "dist", "--strategy", strategy, "--grad-accum", str(grad_accum), *extra
    )
    run_ranks(_two_steps_rank, args, tmp_path / "dist.pt")
    distributed = torch.load(tmp_path / "dist.pt")
    single_args = train_args(token_file, tmp_path / "single", "--grad-accum", str(2 * grad_accum))
    single = two_steps(pretrain.PretrainRun(single_args, SINGLE))
    torch.testing.assert_close(distributed["losses"], single["losses"], **LOSS_TOL)
    assert distributed["grads"].keys() == single["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(
            distributed["grads"][name], grad, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_fsdp2_bf16_mixed_keeps_fp32_master_weights_near_fp32(token_file, tmp_path):
    args = train_args(token_file, tmp_path / "dist", "--strategy", "fsdp2", "--precision", "bf16-mixed")
    run_ranks(_two_steps_rank, args, tmp_path / "dist.pt")
    mixed = torch.load(tmp_path / "dist.pt")
    fp32 = two_steps(
        pretrain.PretrainRun(train_args(token_file, tmp_path / "single", "--grad-accum", "2"), SINGLE)
    )
    # Measured: losses within 6e-4 of fp32, gradients within 2.6e-2 relative norm (bf16 compute, 8-bit
    # mantissa), the same as autocast in one process (2.3e-2).
    torch.testing.assert_close(mixed["losses"], fp32["losses"], rtol=0, atol=2e-3)
    for name, grad in fp32["grads"].items():
        assert mixed["grads"][name].dtype == torch.float32
        assert (mixed["grads"][name] - grad).norm() <= 5e-2 * grad.norm(), name


@pytest.fixture(scope="module")
def fsdp2_run(token_file, val_file, tmp_path_factory) -> Path:
    """`parallelflow train` on 2 ranks with FSDP2: 3 steps, a checkpoint after each, held-out loss at step 2
    and at the end (10 micro-batches of 64 tokens, 5 per rank), the export at the end."""
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    run_ranks(
        _train_rank,
        train_args(
            token_file,
            out,
            *("--max-steps", "3", "--save-every", "1", "--keep-checkpoints", "0"),
            *("--val-data", str(val_file), "--eval-every", "2", "--val-tokens", "640"),
        ),
    )
    return out


def test_run_writes_metrics_plot_summary_checkpoints_and_export(fsdp2_run):
    assert [m["step"] for m in metrics(fsdp2_run)] == [1, 2, 3]
    assert all(m["tokens_per_s_per_gpu"] > 0 and m["tokens"] == m["step"] * 128 for m in metrics(fsdp2_run))
    assert (fsdp2_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((fsdp2_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp2" and summary["steps"] == 3
    assert sorted(checkpoint_steps(fsdp2_run / "checkpoints")) == [1, 2, 3]
    assert (fsdp2_run / "model" / "config.json").is_file() and (
        fsdp2_run / "model" / "model.safetensors"
    ).is_file()
    assert not list(fsdp2_run.glob("**/.*.tmp"))


def test_heldout_loss_is_the_token_weighted_mean_over_every_rank(fsdp2_run, token_file, val_file, tmp_path):
    records = heldout_metrics(fsdp2_run)
    assert [r["step"] for r in records] == [2, 3] and records[0]["val_loss"] != records[1]["val_loss"]
    summary = json.loads((fsdp2_run / "summary.json").read_text())
    assert summary["val_loss"] == records[-1]["val_loss"]
    assert summary["val_perplexity"] == pytest.approx(np.exp(summary["val_loss"]))
    # the exported model in one process: the same 10 micro-batches, the loss of each weighted by its tokens
    argv = ("--val-data", str(val_file), "--val-tokens", "640")
    model = ("--init-from", str(fsdp2_run / "model"))
    run = pretrain.PretrainRun(train_args(token_file, tmp_path / "one", *argv, model=model), SINGLE)
    assert run.val_batches == list(range(10))
    with torch.no_grad():
        pairs = [
            (run.model(**run.val[i]).loss.item(), (run.val[i]["labels"][:, 1:] != -100).sum().item())
            for i in range(10)
        ]
    tokens = sum(n for _, n in pairs)
    expected = sum(loss * n for loss, n in pairs) / tokens
    assert run.heldout_loss() == pytest.approx((expected, tokens), rel=1e-6)
    assert records[-1]["val_tokens"] == tokens
    assert records[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)  # 2 ranks (FSDP2) vs 1 process


def test_sharded_checkpoint_resumes_to_identical_losses(fsdp2_run, token_file, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp2_run / "checkpoints" / "step-00000001", resumed / "checkpoints" / "step-00000001")
    (resumed / "metrics.jsonl").write_text((fsdp2_run / "metrics.jsonl").read_text())  # lines past 1 dropped
    run_ranks(_train_rank, train_args(token_file, resumed, "--max-steps", "3", "--resume"))
    assert [m["loss"] for m in metrics(resumed)] == [m["loss"] for m in metrics(fsdp2_run)]


def test_sharded_checkpoint_resumes_in_one_process(fsdp2_run, token_file, tmp_path):
    """Resharded on load: 2 FSDP2 ranks -> 1 process with twice the accumulation (same global batch)."""
    run = pretrain.PretrainRun(
        train_args(token_file, tmp_path / "one", "--grad-accum", "2", "--max-steps", "3"), SINGLE
    )
    state = load_checkpoint(
        fsdp2_run / "checkpoints" / "step-00000001", run.model, run.optimizer, run.scheduler
    )
    assert state["step"] == 1 and state["world_size"] == 2
    losses = [float(run.forward_backward(1))]
    run.optimizer_step()
    losses.append(float(run.forward_backward(2)))
    torch.testing.assert_close(losses, [m["loss"] for m in metrics(fsdp2_run)[1:]], **LOSS_TOL)


def test_export_loads_with_auto_model_and_gives_the_trained_logits(fsdp2_run, token_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from modeling_parallelflow import register

    register()  # the installed package's classes, not the code files copied into the folder
    run = pretrain.PretrainRun(train_args(token_file, tmp_path / "one", "--max-steps", "3"), SINGLE)
    load_checkpoint(fsdp2_run / "checkpoints" / "step-00000003", run.model, run.optimizer, run.scheduler)
    offline = export_checkpoint(fsdp2_run / "checkpoints" / "step-00000003", tmp_path / "offline")
    ids = torch.from_numpy(read_token_file(token_file)[:100].astype(np.int64))[None]
    cu_seqlens = torch.tensor([0, 37, 100], dtype=torch.int32)
    run.model.eval()
    with torch.no_grad():
        trained = run.model(input_ids=ids, cu_seqlens=cu_seqlens, use_cache=False).logits
        for folder in (fsdp2_run / "model", offline):
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            assert type(model).__name__ == "PFlowForCausalLM"
            torch.testing.assert_close(
                model(input_ids=ids, cu_seqlens=cu_seqlens, use_cache=False).logits, trained, rtol=0, atol=0
            )
    imported = pretrain.build_model(
        train_args(token_file, tmp_path, model=("--init-from", str(fsdp2_run / "model")))
    )
    for name, tensor in imported.state_dict().items():
        torch.testing.assert_close(tensor, unwrap(run.model).state_dict()[name], rtol=0, atol=0)


def test_pack_boundaries_split_after_eos_and_cut_long_documents():
    ids = np.array([5, 6, EOS, 7, EOS, EOS, 8, 9, 10, 11, 12, 13, 14])
    assert pack_boundaries(ids, EOS, 4).tolist() == [0, 3, 5, 6, 10, 13]
    assert pack_boundaries(ids, EOS, 100).tolist() == [0, 3, 5, 6, 13]
    assert pack_boundaries(np.array([EOS, 3]), EOS, 8).tolist() == [0, 1, 2]


def test_packed_batches_mask_the_first_token_of_each_document_and_cover_every_chunk(token_file):
    tokens = read_token_file(token_file)
    data = PackedBatches(tokens, 500, eos_token_id=EOS, max_doc_len=64, vocab_size=512, seed=3)
    batch = data[5]
    cu = batch["cu_seqlens"]
    assert batch["input_ids"].shape == (1, 500) and cu.dtype == torch.int32 and cu[-1] == 500
    assert (torch.diff(cu) <= 64).all()
    masked = (batch["labels"][0] == -100).nonzero().flatten()
    assert masked.tolist() == cu[1:-1].tolist()
    assert sorted(data.chunk_of(i) for i in range(data.num_chunks)) == list(range(data.num_chunks))
    assert data[7]["input_ids"].equal(data[7]["input_ids"])  # a batch depends on its index only
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        PackedBatches(tokens, 500, eos_token_id=EOS, max_doc_len=64, vocab_size=100)[0]


@pytest.mark.parametrize("suffix, vocab, dtype", [(".npy", 512, "uint16"), (".bin", 70_000, "uint32")])
def test_token_file_round_trip(tmp_path, suffix, vocab, dtype):
    ids = np.array([0, 1, vocab - 1, 7])
    path = write_token_file(tmp_path / f"t{suffix}", ids, vocab)
    assert read_token_file(path, dtype).tolist() == ids.tolist()
    assert read_token_file(path, dtype).dtype == np.dtype(dtype)
    with pytest.raises(ValueError, match="must lie in"):
        write_token_file(tmp_path / f"bad{suffix}", [vocab], vocab)


def test_tokenize_to_file_ends_every_document_with_eos(tmp_path):
    from modeling_parallelflow.tokenizer import build_tokenizer

    texts = ["def f(x):\n    return x\n", "print('hello')\n"] * 20
    tokenizer = build_tokenizer(texts, vocab_size=300)
    count = tokenize_to_file(tokenizer, texts, tmp_path / "t.npy")
    tokens = read_token_file(tmp_path / "t.npy")
    assert len(tokens) == count and (tokens == tokenizer.eos_token_id).sum() == len(texts)
    assert tokenizer.decode(tokens[: list(tokens).index(tokenizer.eos_token_id)]) == texts[0]


@pytest.mark.parametrize(
    "env, world, launcher, strategy, precision",
    [
        ({}, 1, "single", "none", "fp32"),
        ({}, 2, "torchrun", "fsdp2", "fp32"),
        ({"ACCELERATE_MIXED_PRECISION": "bf16"}, 2, "accelerate", "ddp", "bf16-mixed"),
        (
            {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
            2,
            "accelerate",
            "fsdp2",
            "fp32",
        ),
    ],
    ids=["single", "torchrun", "accelerate-ddp", "accelerate-fsdp2"],
)
def test_defaults_follow_the_launcher(monkeypatch, env, world, launcher, strategy, precision):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    dist_env = DistEnv(0, world, 0, torch.device("cpu"), launcher)
    assert resolve_strategy(None, dist_env) == strategy
    assert resolve_precision(None, dist_env) == precision


def test_clear_errors(monkeypatch, token_file, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        resolve_strategy(None, DistEnv(0, 2, 0, torch.device("cpu"), "accelerate"))
    with pytest.raises(ValueError, match="strategy none runs one process"):
        resolve_strategy("none", DistEnv(0, 2, 0, torch.device("cpu"), "torchrun"))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        pretrain.PretrainRun(
            train_args(token_file, tmp_path / "a", "--max-steps", "1", "--micro-tokens", "99999"), SINGLE
        )
    with pytest.raises(ValueError, match="--eval-every must be >= 0"):
        pretrain.PretrainRun(train_args(token_file, tmp_path / "a", "--eval-every", "-1"), SINGLE)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain.PretrainRun(train_args(token_file, tmp_path / "b", "--max-steps", "1"), SINGLE)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        pretrain.PretrainRun(train_args(token_file, tmp_path / "b", "--max-steps", "1", "--resume"), SINGLE)


def _launch(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_ENV, *ACCELERATE_ENV)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


TRAIN_MODULE = ["-m", "modeling_parallelflow.pretrain"]


@pytest.mark.slow
def test_torchrun_launch(token_file, tmp_path):
    argv = train_argv(token_file, tmp_path / "run", "--max-steps", "2")
    _launch(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *TRAIN_MODULE, *argv],
        tmp_path,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["launcher"], summary["strategy"], summary["world_size"]) == ("torchrun", "fsdp2", 2)


@pytest.mark.slow
@pytest.mark.parametrize("config, strategy", [("fsdp2.yaml", "fsdp2"), ("ddp.yaml", "ddp")])
def test_accelerate_launch(token_file, tmp_path, config, strategy):
    argv = train_argv(token_file, tmp_path / "run", "--max-steps", "2", "--precision", "fp32")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / config),
        "--num_processes",
        "2",
    ]
    _launch([*launch, *TRAIN_MODULE, *argv], tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["launcher"], summary["strategy"], summary["world_size"]) == ("accelerate", strategy, 2)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_finetune_under_accelerate_fsdp2(tmp_path):
    """The transformers Trainer with accelerate's FSDP2 plugin. Not on the CPU: accelerate turns FSDP on
    only for GPU-like process groups, and under --cpu it runs plain data parallelism instead."""
    from transformers import AutoModelForCausalLM

    from modeling_parallelflow import PFlowConfig, PFlowForCausalLM, register
    from modeling_parallelflow.tokenizer import build_tokenizer

    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(200)]
    tokenizer = build_tokenizer(texts, vocab_size=512)
    config = PFlowConfig.from_json_file(TINY)
    config.eos_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    PFlowForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "data.txt").write_text("\n".join(texts))
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"),
        "--num_processes",
        "2",
    ]
    finetune = [
        "-m",
        "modeling_parallelflow",
        "finetune",
        str(tmp_path / "base"),
        str(tmp_path / "data.txt"),
        "-o",
        str(tmp_path / "out"),
        "--full",
        "--max-steps",
        "4",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
    ]
    _launch([*launch, *finetune], tmp_path)
    register()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
