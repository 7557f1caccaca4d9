"""Whole-model training benchmark: tokens/s and peak memory of one training step, all models in one process.

    python benchmarks/bench_model.py --out benchmarks/results/h200_model.json     # the table (~4 min, H200)
    python benchmarks/bench_model.py --quick --out /tmp/quick.json                # tiny smoke run (CPU too)
    python benchmarks/bench_model.py --profile pflow_r1 --sizes 340m --shapes 2048x16 --out prof.json
    python benchmarks/bench_model.py --models pflow_r1 --ablate fused_add_norm --out ablated.json

One step = forward with labels (the model's own loss) + backward + fused AdamW step, bf16 weights, B x T
tokens of random ids. Models (registry MODELS): PFlow R = 1, 2, 4 (sum) and R = 2 (product) from
configs/deltanet-<size>-r<R>.json; fla DeltaNetForCausalLM at the same shape (skipped, with a note, when
fla is not installed); transformers LlamaForCausalLM with SDPA at the same hidden / MLP / layer shape
(parameter counts are in the JSON). Tokens/s: steps timed with CUDA events after warm-up steps. Peak
memory: torch.cuda.max_memory_allocated over the timed steps (weights, grads and optimizer state
included). A model that runs out of memory is recorded as "OOM" and the run goes on. `--profile NAME`
prints the top kernels of one step of that model (torch.profiler) and stores them in the JSON. `--ablate`
switches parts of PFlow's training glue off for the whole run (registry ABLATIONS), for A/B runs.
Writes the JSON (GPU, versions, commit) and a PNG chart next to it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from benchmarks.bench_env import environment, write_json  # noqa: E402
from modeling_parallelflow import PFlowConfig, PFlowForCausalLM  # noqa: E402
from modeling_parallelflow import modeling_parallelflow as pflow_modeling  # noqa: E402

try:
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    HAS_FLA = True
except ImportError:
    HAS_FLA = False

SHAPES = {"2048x16": (16, 2048), "8192x4": (4, 8192)}  # T x B -> (B, T): 32,768 tokens per step
SIZES = ("340m", "1.3b")
QUICK_SHAPE = {"64x2": (2, 64)}
# (warm-up, timed) steps per size: the default run stays under ~5 minutes on one H200.
STEPS = {"340m": (2, 5), "1.3b": (2, 3), "quick": (1, 2)}


def pflow_config(size: str, rank: int, mode: str) -> PFlowConfig:
    if size == "quick":
        return PFlowConfig(
            vocab_size=512, hidden_size=128, num_hidden_layers=2, num_heads=2, rank=rank, rank_mode=mode
        )
    config = PFlowConfig.from_json_file(os.path.join(ROOT, "configs", f"deltanet-{size}-r{rank}.json"))
    config.rank_mode = mode
    return config


def pflow(rank: int, mode: str = "sum") -> Callable[[str], torch.nn.Module]:
    return lambda size: PFlowForCausalLM(pflow_config(size, rank, mode))


def fla_deltanet(size: str) -> torch.nn.Module:
    """fla's DeltaNet at the PFlow R = 1 shape: no output gate, short conv 4, L2-normalised SiLU q/k."""
    ref = pflow_config(size, 1, "sum")
    config = DeltaNetConfig(
        vocab_size=ref.vocab_size,
        hidden_size=ref.hidden_size,
        num_hidden_layers=ref.num_hidden_layers,
        num_heads=ref.num_heads,
        intermediate_size=ref.intermediate_size,
        expand_k=1.0,
        expand_v=1.0,
        use_gate=False,
        use_short_conv=True,
        conv_size=ref.conv_size,
        norm_eps=ref.norm_eps,
        attn_mode="chunk",
    )
    return DeltaNetForCausalLM(config)


def llama(size: str) -> torch.nn.Module:
    """Llama (SDPA) with PFlow R = 1's hidden size, heads, MLP and depth: attention's q, k, v, o match the
    mixer's projections, so the parameter counts agree to within the mixer's conv and beta weights."""
    ref = pflow_config(size, 1, "sum")
    config = LlamaConfig(
        vocab_size=ref.vocab_size,
        hidden_size=ref.hidden_size,
        num_hidden_layers=ref.num_hidden_layers,
        num_attention_heads=ref.num_heads,
        intermediate_size=ref.intermediate_size,
        max_position_embeddings=max(8192, ref.max_position_embeddings),
        rms_norm_eps=ref.norm_eps,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


MODELS: dict[str, Callable[[str], torch.nn.Module]] = {
    "pflow_r1": pflow(1),
    "pflow_r2": pflow(2),
    "pflow_r4": pflow(4),
    "pflow_r2_product": pflow(2, "product"),
    "fla_deltanet": fla_deltanet,
    "llama_sdpa": llama,
}


def _separate_projections() -> None:
    pflow_modeling.project = lambda x, layers: tuple(layer(x) for layer in layers)


def _unfused_add_norm() -> None:
    pflow_modeling.PFlowRMSNorm.add_and_norm = lambda self, x, residual: (residual + x, self(residual + x))


# name -> what switches it off: each projection its own nn.Linear call (autograd adds the input gradients);
# the post-mixer residual add apart from its RMSNorm (under autograd)
ABLATIONS: dict[str, Callable[[], None]] = {
    "shared_input_linear": _separate_projections,
    "fused_add_norm": _unfused_add_norm,
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dtype() -> torch.dtype:
    """bf16 weights on the GPU; fp32 on a CPU (smoke runs only: CPU bf16 matmuls are very slow)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def build(name: str, size: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    dev = device()
    with dev:
        model = MODELS[name](size).to(dtype())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def random_ids(model: torch.nn.Module, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, length), device=device())


def measure(model, optimizer, batch: int, length: int, warmup: int, steps: int) -> dict:
    """Tokens/s over `steps` timed training steps after `warmup` ones, and the peak memory in GiB."""
    ids = random_ids(model, batch, length)
    for _ in range(warmup):
        train_step(model, optimizer, ids)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        began = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, ids)
    if torch.cuda.is_available():
        end.record()
        sync()
        seconds = start.elapsed_time(end) / 1e3
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        seconds, peak = time.perf_counter() - began, None
    return {
        "tokens_per_s": batch * length * steps / seconds,
        "step_ms": 1e3 * seconds / steps,
        "peak_gib": peak,
    }


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_model(name: str, size: str, shapes: dict[str, tuple[int, int]]) -> dict:
    """{shape: {tokens_per_s, step_ms, peak_gib} | {"error": "OOM" | message}} plus the parameter count."""
    warmup, steps = STEPS[size]
    rows: dict = {}
    model = optimizer = None
    try:
        model, optimizer = build(name, size)
        rows["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        for shape, (batch, length) in shapes.items():
            try:
                rows[shape] = measure(model, optimizer, batch, length, warmup, steps)
            except Exception as err:  # one failing shape must not lose the rest of the run
                rows[shape] = {"error": "OOM" if is_oom(err) else f"{type(err).__name__}: {err}"[:400]}
            optimizer.zero_grad(set_to_none=True)
            release()
    except Exception as err:
        rows["error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {err}"[:400]
    finally:
        del model, optimizer
        release()
    return rows


def profile_model(name: str, size: str, batch: int, length: int, top: int = 25) -> list[dict]:
    """Top kernels (by device time) of one training step after two warm-up steps; printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer = build(name, size)
    ids = random_ids(model, batch, length)
    for _ in range(2):
        train_step(model, optimizer, ids)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        train_step(model, optimizer, ids)
        sync()
    use_device = torch.cuda.is_available()
    sort_by = "self_cuda_time_total" if use_device else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=70), flush=True)
    events = [e for e in prof.key_averages() if not use_device or e.self_device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total if use_device else e.self_cpu_time_total, reverse=True)
    total = sum(e.self_device_time_total if use_device else e.self_cpu_time_total for e in events)
    print(f"total self time of {name} (one step): {total / 1e3:.1f} ms", flush=True)
    return [
        {
            "name": e.key,
            "calls": e.count,
            "self_ms": (e.self_device_time_total if use_device else e.self_cpu_time_total) / 1e3,
        }
        for e in events[:top]
    ]


def print_table(bench: dict, shapes: list[str]) -> None:
    header = f"{'size':6s} {'model':18s} {'params':>8s} " + " ".join(
        f"{s + ' tok/s':>16s} {'GiB':>6s}" for s in shapes
    )
    print(header)
    for key, rows in bench.items():
        size, name = key.split("/")
        cells = []
        for shape in shapes:
            row = rows.get(shape, {"error": rows.get("error", "-")})
            if "tokens_per_s" in row:
                peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
                cells.append(f"{row['tokens_per_s'] / 1e3:15.1f}K {peak:>6s}")
            else:
                cells.append(f"{str(row['error'])[:16]:>16s} {'':>6s}")
        params = f"{rows['params_m']:.0f}M" if "params_m" in rows else "-"
        print(f"{size:6s} {name:18s} {params:>8s} " + " ".join(cells), flush=True)


def plot(bench: dict, shapes: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(key.split("/")[0] for key in bench))
    fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 7), squeeze=False)
    for col, size in enumerate(sizes):
        names = [key.split("/")[1] for key in bench if key.startswith(f"{size}/")]
        width = 0.8 / len(shapes)
        for i, shape in enumerate(shapes):
            rows = [bench[f"{size}/{n}"].get(shape, {}) for n in names]
            xs = [j + i * width for j in range(len(names))]
            axes[0][col].bar(xs, [r.get("tokens_per_s", 0) / 1e3 for r in rows], width, label=shape)
            axes[1][col].bar(xs, [r.get("peak_gib") or 0 for r in rows], width, label=shape)
            for x, r in zip(xs, rows, strict=True):
                if "error" in r:
                    axes[0][col].text(x, 0, str(r["error"])[:8], rotation=90, ha="center", va="bottom")
        for row, label in ((0, "training tokens/s (K)"), (1, "peak memory (GiB)")):
            ax = axes[row][col]
            ax.set_xticks([j + width * (len(shapes) - 1) / 2 for j in range(len(names))])
            ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{size}, T x B")
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="results JSON; the chart goes next to it (.png)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"T x B, from {list(SHAPES)}")
    parser.add_argument("--quick", action="store_true", help="tiny models and shape: a smoke check")
    parser.add_argument("--profile", metavar="MODEL", help="print the top kernels of one step of MODEL")
    parser.add_argument("--ablate", default="", help=f"parts to switch off: {','.join(ABLATIONS)}")
    args = parser.parse_args()
    ablated = [name for name in args.ablate.split(",") if name]
    unknown = sorted(set(ablated) - set(ABLATIONS))
    if unknown:
        parser.error(f"unknown --ablate {unknown}; choose from {list(ABLATIONS)}")
    for name in ablated:
        ABLATIONS[name]()

    sizes = ["quick"] if args.quick else args.sizes.split(",")
    shapes = QUICK_SHAPE if args.quick else {s: SHAPES[s] for s in args.shapes.split(",")}
    result = {
        "env": environment(),
        "dtype": str(dtype()).removeprefix("torch."),
        "optimizer": "AdamW(fused)",
        "ablated": ablated,
        "notes": [],
    }
    save = lambda: write_json(args.out, result)  # noqa: E731
    print(result["env"], flush=True)

    if args.profile:
        shape, (batch, length) = next(iter(shapes.items()))
        result["profile"] = {
            "model": args.profile,
            "size": sizes[0],
            "shape": shape,
            "top": profile_model(args.profile, sizes[0], batch, length),
        }
        save()
        return

    names = args.models.split(",")
    if not HAS_FLA and "fla_deltanet" in names:
        names.remove("fla_deltanet")
        result["notes"].append("fla_deltanet skipped: flash-linear-attention (fla) is not installed")
        print(result["notes"][-1], flush=True)
    bench = result["bench"] = {}
    for size in sizes:
        for name in names:
            bench[f"{size}/{name}"] = rows = bench_model(name, size, shapes)
            print(f"{size}/{name}: {rows}", flush=True)
            save()
    print_table(bench, list(shapes))
    env = result["env"]
    plot(bench, list(shapes), os.path.splitext(args.out)[0] + ".png", f"{env['gpu']}, commit {env['commit']}")


if __name__ == "__main__":
    main()
