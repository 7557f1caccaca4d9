"""Real-text language modelling (issue #16): PFlow R = 1, 2, 4 (sum) and R = 2 (product) against a Llama of
equal non-embedding parameters, each trained on the same token stream for the same steps.

The corpus is a folder written by text_corpus.py (train.npy, val.npy, manifest.json, tokenizer/), for example
the Debian documentation corpus of debian_corpus.sh. Every model sees the same windows of `--seq-len` tokens
(offsets drawn from one seeded generator over train.npy) in the same order; the loss is the model's own
(`model(input_ids, labels=input_ids).loss`, what a user's training step computes). Held-out loss is the
mean next-token cross-entropy over non-overlapping windows of val.npy, measured every `--eval-every` steps
(a curve) and at the end; perplexity is its exponential. Models are built as in mqar.py (harness.py): untied
embeddings, heads of 64, each model's MLP width chosen for the non-embedding parameter count of PFlow R = 1.
AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine to zero, gradient clip 1.0,
bf16 autocast on CUDA, fp32 on the CPU.

    bash benchmarks/quality/debian_corpus.sh data/prose
    python benchmarks/quality/text_lm.py data/prose --size 30m --tokens 50e6 --out text_30m.json
    python benchmarks/quality/text_lm.py data/prose --size 30m --tokens 50e6 --out R.json --save-dir runs/text

One JSON file holds every model's run (configuration, corpus checksums, commit, device, per model: held-out
loss and perplexity, curves, tokens/s, peak memory); it is rewritten atomically after each model, and a rerun
with the same --out skips the models it holds (a file of another corpus or configuration is refused). At the
end: a markdown table and a plot of held-out and training loss against tokens beside the JSON. --save-dir
keeps each trained model (save_pretrained, with the corpus's tokenizer) for `parallelflow eval`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.bench_env import write_json  # noqa: E402
from benchmarks.quality.harness import (  # noqa: E402
    MODELS,
    Shape,
    adamw,
    build_model,
    git_commit,
    lr_lambda,
    matched_intermediate,
    non_embedding_params,
)

SCHEMA = 1
DEFAULT_MODELS = ("pflow-r1", "pflow-r2-sum", "pflow-r4-sum", "pflow-r2-product", "llama")
TEXT_MODELS = [m for m in MODELS if m != "llama-abspos"]  # the models that reload from --save-dir
# name -> (width, layers); heads of 64. Non-embedding parameters of PFlow R = 1 (the others are matched; with
# a 16,384-token vocabulary's embeddings and LM head in brackets): tiny 0.13M (2.2M; a CPU check of the
# machinery), 30m 27.4M (44.1M), 100m 85.2M (110.3M). At R = 4 the wider key/value projections leave an MLP
# of 496 (30m, 100m) against R = 1's 1,536 / 2,048.
SIZES = {"tiny": (64, 2), "30m": (512, 8), "100m": (768, 12)}


def load_corpus(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train ids, held-out ids, manifest) of a text_corpus.py folder; a clear error for anything missing."""
    from modeling_parallelflow.pretrain_data import read_token_file

    manifest_path = folder / "manifest.json"
    missing = [p.name for p in (manifest_path, folder / "train.npy", folder / "val.npy") if not p.is_file()]
    if missing:
        raise SystemExit(f"{folder} is not a text_corpus.py folder: missing {', '.join(missing)}")
    manifest = json.loads(manifest_path.read_text())
    return read_token_file(folder / "train.npy"), read_token_file(folder / "val.npy"), manifest


def window_offsets(tokens: int, seq_len: int, count: int, seed: int) -> np.ndarray:
    """`count` window starts in [0, tokens - seq_len] from one seeded generator: the same for every model."""
    if tokens < seq_len + 1:
        raise SystemExit(f"the training split holds {tokens} tokens: fewer than one window of {seq_len}")
    return np.random.default_rng(seed).integers(0, tokens - seq_len + 1, size=count)


def windows(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """Token windows [len(starts), seq_len] (int64) of a memory-mapped id array."""
    return torch.from_numpy(np.stack([np.asarray(ids[s : s + seq_len], dtype=np.int64) for s in starts]))


@torch.no_grad()
def heldout_loss(
    model, val: np.ndarray, seq_len: int, batch: int, device, autocast, max_windows: int
) -> float:
    """Mean next-token cross-entropy over the first `max_windows` non-overlapping windows of `val`."""
    model.eval()
    count = min(len(val) // seq_len, max_windows)
    if count == 0:
        raise SystemExit(f"the held-out split holds {len(val)} tokens: fewer than one window of {seq_len}")
    total = 0.0
    for start in range(0, count, batch):
        rows = windows(val, np.arange(start, min(start + batch, count)) * seq_len, seq_len).to(device)
        with autocast():
            loss = model(input_ids=rows, labels=rows).loss
        total += loss.float().item() * len(rows)  # every window predicts seq_len - 1 tokens: equal weights
    model.train()
    return total / count


def save_model(model, tokenizer_dir: Path, target: Path) -> None:
    """save_pretrained (and the corpus tokenizer) to `target` through a staging folder (`atomic_dir`)."""
    from modeling_parallelflow.training import atomic_dir

    with atomic_dir(target, overwrite=True) as staging:
        model.save_pretrained(staging)
        if tokenizer_dir.is_dir():
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)


def train_one(name: str, args, shape: Shape, train: np.ndarray, val: np.ndarray, device) -> dict:
    from tqdm import tqdm

    cuda = device.type == "cuda"
    intermediate = matched_intermediate(name, shape)
    torch.manual_seed(args.seed)
    model = build_model(name, shape, intermediate, fused_loss=True).to(device)
    optimizer = adamw(model, args.lr, cuda, betas=(0.9, 0.95))
    steps = args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, max(1, round(0.02 * steps))))

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    rows_per_step = args.batch_tokens // args.seq_len
    micro = min(args.micro_batch or rows_per_step, rows_per_step)
    starts = window_offsets(len(train), args.seq_len, steps * rows_per_step, args.seed)
    evaluate = lambda: heldout_loss(model, val, args.seq_len, micro, device, autocast, args.val_windows)  # noqa: E731
    eval_curve = [[0, round(evaluate(), 5)]]
    curve, window, steady_tokens, steady_start, done, eval_s = [], [], 0, None, 0, 0.0
    log_every = max(1, steps // 100)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=name, leave=False, dynamic_ncols=True)
    for step in bar:
        step_starts = starts[step * rows_per_step : (step + 1) * rows_per_step]
        loss_sum = torch.zeros((), device=device)
        for first in range(0, rows_per_step, micro):
            rows = windows(train, step_starts[first : first + micro], args.seq_len).to(device)
            with autocast():
                loss = model(input_ids=rows, labels=rows).loss * (len(rows) / rows_per_step)
            loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        window.append(loss_sum)
        done = step + 1
        if step == 0:  # the first step compiles kernels: throughput counts from the end of it
            if cuda:
                torch.cuda.synchronize()
            steady_start = time.perf_counter()
        else:
            steady_tokens += rows_per_step * args.seq_len
        tokens = (step + 1) * rows_per_step * args.seq_len
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean = torch.stack(window).mean().item()
            window.clear()
            curve.append([tokens, round(mean, 5)])
            bar.set_postfix(loss=f"{mean:.3f}")
            if not math.isfinite(mean):
                break
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            paused = time.perf_counter()
            eval_curve.append([tokens, round(evaluate(), 5)])
            eval_s += time.perf_counter() - paused  # evaluation is not training throughput
    if cuda:
        torch.cuda.synchronize()
    steady_s = time.perf_counter() - steady_start - eval_s
    train_s = time.perf_counter() - start
    bar.close()
    final = evaluate()
    eval_curve.append([done * rows_per_step * args.seq_len, round(final, 5)])
    if args.save_dir:
        save_model(model, args.corpus / "tokenizer", args.save_dir / name)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "non_embedding_params": non_embedding_params(model),
        "intermediate_size": intermediate,
        "steps_done": done,
        "tokens": done * rows_per_step * args.seq_len,
        "heldout_loss": round(final, 5),
        "heldout_perplexity": round(math.exp(final), 3) if final < 700 else None,  # NaN < 700 is False
        "final_train_loss": curve[-1][1] if curve else None,
        "loss_curve": curve,
        "heldout_curve": eval_curve,
        "tokens_per_s": round(steady_tokens / steady_s, 1) if steady_tokens else None,
        "train_s": round(train_s, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
    }


def table(data: dict) -> str:
    runs = data["runs"]
    if not runs:
        return "no runs"
    llama = runs.get("llama")
    head = [
        "model",
        "params (non-emb)",
        "MLP",
        "held-out ppl",
        "vs llama",
        "train loss",
        "tokens/s",
        "peak GiB",
    ]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name in [m for m in MODELS if m in runs]:
        r = runs[name]
        ratio = (
            f"{r['heldout_perplexity'] / llama['heldout_perplexity']:.3f}x"
            if llama and r["heldout_perplexity"] and llama["heldout_perplexity"]
            else "-"
        )
        lines.append(
            " | ".join(
                [
                    name,
                    f"{r['params']:,} ({r['non_embedding_params']:,})",
                    str(r["intermediate_size"]),
                    f"{r['heldout_perplexity']:.2f}" if r["heldout_perplexity"] else "diverged",
                    ratio,
                    f"{r['final_train_loss']:.3f}" if r["final_train_loss"] is not None else "-",
                    f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-",
                    f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-",
                ]
            )
        )
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, name in enumerate(m for m in MODELS if m in data["runs"]):
        run, color = data["runs"][name], f"C{i}"
        train = np.array(run["loss_curve"] or [[0, np.nan]], dtype=float)
        held = np.array(run["heldout_curve"], dtype=float)
        axes[0].plot(train[:, 0] / 1e6, train[:, 1], color=color, label=name, lw=1)
        axes[1].plot(held[:, 0] / 1e6, held[:, 1], color=color, marker="o", ms=3, label=name)
    for ax, title in zip(axes, ("training loss", "held-out loss"), strict=True):
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("nats per token")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    cfg = data["config"]
    fig.suptitle(f"{cfg['size']} models, {cfg['tokens'] / 1e6:.3g}M tokens of {cfg['seq_len']}-token windows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("corpus", type=Path, help="a folder written by text_corpus.py")
    p.add_argument(
        "--out", required=True, type=Path, help="results JSON (resumed if present); plot beside it"
    )
    p.add_argument("--size", choices=sorted(SIZES), default="30m")
    p.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of: {', '.join(TEXT_MODELS)}"
    )
    p.add_argument("--tokens", type=float, default=50e6, help="training tokens per model (default 50e6)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument(
        "--batch-tokens", type=int, default=2**16, help="tokens per optimiser step (default 65536)"
    )
    p.add_argument("--micro-batch", type=int, help="windows per forward (gradient accumulation); default all")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps (0: at the end)")
    p.add_argument("--val-windows", type=int, default=256, help="held-out windows evaluated (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dir", type=Path, help="save each trained model to SAVE_DIR/<model>")
    p.add_argument("--max-wall", type=float, help="start no new model after this many seconds")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.replace(",", " ").split()]
    unknown = sorted(set(args.models) - set(TEXT_MODELS))
    if unknown:
        p.error(f"unknown models {unknown}; choose from {', '.join(TEXT_MODELS)}")
    if args.batch_tokens < args.seq_len:
        p.error(f"--batch-tokens ({args.batch_tokens}) must be at least --seq-len ({args.seq_len})")
    args.steps = max(1, round(args.tokens / (args.batch_tokens // args.seq_len * args.seq_len)))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val, manifest = load_corpus(args.corpus)
    width, layers = SIZES[args.size]
    shape = Shape(manifest["vocab_size"], width, layers, args.seq_len)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    import transformers

    config = {
        "size": args.size,
        "shape": {"width": width, "layers": layers, "heads": shape.heads, "vocab_size": shape.vocab_size},
        "tokens": args.steps * (args.batch_tokens // args.seq_len) * args.seq_len,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "batch_tokens": args.batch_tokens // args.seq_len * args.seq_len,
        "lr": args.lr,
        "eval_every": args.eval_every,
        "val_windows": args.val_windows,
        "seed": args.seed,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "corpus": {split: manifest["splits"][split]["sha256"] for split in ("train", "val")},
    }
    header = {
        "schema": SCHEMA,
        "benchmark": "text_lm",
        "config": config,
        **git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    data = {**header, "runs": {}}
    if args.out.exists():
        data = json.loads(args.out.read_text())
        if data.get("schema") != SCHEMA or data.get("config") != config:
            raise SystemExit(f"{args.out} holds runs of another corpus or configuration: pass another --out")
    todo = [m for m in args.models if m not in data["runs"]]
    print(
        f"{len(args.models)} models, {len(args.models) - len(todo)} already in {args.out}; {config['steps']} "
        f"steps of {config['batch_tokens']:,} tokens each; device {header['device']}"
    )
    started = time.perf_counter()
    for i, name in enumerate(todo, 1):
        if args.max_wall is not None and time.perf_counter() - started > args.max_wall:
            print(f"--max-wall {args.max_wall:g}s reached: {len(todo) - i + 1} models left for the next call")
            break
        result = train_one(name, args, shape, train, val, device)
        data["runs"][name] = result | {"commit": header["commit"], "dirty": header["dirty"]}
        write_json(args.out, data)
        print(
            f"[{i}/{len(todo)}] {name}: held-out ppl {result['heldout_perplexity']} "
            f"({result['tokens_per_s']} tok/s, {result['train_s']} s)",
            flush=True,
        )
    print(table(data))
    if data["runs"]:
        plot(data, args.out.with_suffix(".png"))
        print(f"results: {args.out}  plot: {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
