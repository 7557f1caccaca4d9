"""Generation speed through `model.generate()`: PFlow (eager dynamic cache, and the static cache whose decode
steps replay as CUDA graphs) against fla's DeltaNet and transformers' Llama (dynamic cache, and static cache
with torch.compile), one process, random weights, greedy decoding, bf16.

    python benchmarks/bench_generate.py --out benchmarks/results/generate.json [--quick]
    python benchmarks/bench_generate.py --out g32k.json --prompts 32768 --batches 1,8  # a slice of the grid

For each model, batch B and prompt length P: `generate` with max_new_tokens = 1 (the prefill) and 1 + N;
decode tokens/s = B * N / (t[1 + N] - t[1]); end-to-end new tokens/s = B * (1 + N) / t[1 + N]; peak memory
of the longer call. For PFlow's static cache also the replay time of its decode graph alone
(`graph_replay_ms`) beside the whole decode step (`step_ms`): the rest is generate()'s host work. A run that
does not fit is recorded as "OOM". Each cell gets a freshly built model (see main). Models: bench_model.py's
at the 340M shape (configs/deltanet-340m-r<R>.json; fla and Llama at the PFlow R = 1 shape).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_env import environment, write_json  # noqa: E402
from benchmarks.bench_model import HAS_FLA, fla_deltanet, llama, pflow  # noqa: E402  (the same models)
from modeling_parallelflow.compat_transformers import cache_of  # noqa: E402

# name -> (builder, generate() keyword arguments)
PROVIDERS = {
    "pflow-r1 eager": (pflow(1), {}),
    "pflow-r1 static+graphs": (pflow(1), {"cache_implementation": "static"}),
    # transformers' chunked prefill: the prompt in 8K-token pieces, prefill memory flat past 8K tokens
    "pflow-r1 static+graphs 8K-prefill-chunks": (
        pflow(1),
        {"cache_implementation": "static", "prefill_chunk_size": 8192},
    ),
    "pflow-r4 eager": (pflow(4), {}),
    "pflow-r4 static+graphs": (pflow(4), {"cache_implementation": "static"}),
    "fla-deltanet": (fla_deltanet, {}),
    "llama dynamic": (llama, {}),
    # transformers compiles the forward itself for a compileable (static) cache on CUDA
    "llama static+compile": (llama, {"cache_implementation": "static"}),
}


def timed_generate(model, ids, new_tokens: int, kwargs: dict) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model, batch: int, prompt: int, new_tokens: int, kwargs: dict) -> dict:
    ids = torch.randint(3, 32000, (batch, prompt), device="cuda")
    kwargs = {**kwargs, "pad_token_id": 0, "eos_token_id": None}
    if kwargs.get("cache_implementation") == "static":
        kwargs["max_cache_len"] = (
            prompt + new_tokens + 1
        )  # one cache size for both calls (one capture/compile)
    timed_generate(model, ids, 1 + new_tokens, kwargs)  # warm-up: Triton/compile/graph capture
    torch.cuda.reset_peak_memory_stats()
    prefill = min(timed_generate(model, ids, 1, kwargs) for _ in range(2))
    total = min(timed_generate(model, ids, 1 + new_tokens, kwargs) for _ in range(2))
    row = {
        "decode_tokens_per_s": batch * new_tokens / max(total - prefill, 1e-9),
        "new_tokens_per_s": batch * (1 + new_tokens) / total,
        "prefill_s": prefill,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    replay = graph_replay_ms(model, ids, kwargs)
    if replay is not None:  # what of a decode step is the GPU's: the rest is generate()'s host work
        row["graph_replay_ms"] = replay
        row["step_ms"] = 1e3 * (total - prefill) / new_tokens
    return row


def graph_replay_ms(model, ids, kwargs: dict, replays: int = 50) -> float | None:
    """ms of one replay of PFlow's captured decode graph (CUDA events, the graph alone, no host work between
    replays), or None for a model without one. The replays advance the cache's state: timing only."""
    if kwargs.get("cache_implementation") != "static" or model.config.model_type != "parallelflow":
        return None
    out = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, **kwargs)
    graphs = getattr(cache_of(out), "graphs", None)
    if graphs is None or not graphs.graphs:
        return None
    graph = next(iter(graphs.graphs.values()))[0]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def plot(results: dict, path: str) -> None:
    """Decode tokens/s (log scale) and peak memory against prompt length, a panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "decode_tokens_per_s" in r]
    batches = sorted({r["batch"] for r in rows})
    if not batches:
        return
    fig, axes = plt.subplots(2, len(batches), figsize=(5 * len(batches), 7), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = {model: f"C{i}" for i, model in enumerate(models)}  # one color per model in every panel
    for col, batch in enumerate(batches):
        for model in models:
            mine = [r for r in rows if r["model"] == model and r["batch"] == batch]
            mine.sort(key=lambda r: r["prompt"])
            if mine:
                prompts = [r["prompt"] for r in mine]
                style = dict(color=colors[model], label=model)
                axes[0][col].plot(prompts, [r["decode_tokens_per_s"] for r in mine], "o-", **style)
                axes[1][col].plot(prompts, [r["peak_memory_gib"] for r in mine], "o-", **style)
        axes[0][col].set(title=f"B = {batch}", xscale="log", yscale="log", ylabel="decode tokens/s")
        axes[1][col].set(xscale="log", xlabel="prompt tokens", ylabel="peak memory (GiB)")
        ticks = sorted({r["prompt"] for r in rows})
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(ticks, [str(t) for t in ticks], minor=False)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(models), 4), fontsize=8)
    env = results["env"]
    tokens = results["new_tokens"]
    fig.suptitle(f"generate(), 340M shape, bf16, {tokens} new tokens; {env['gpu']}, {env['commit']}")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="results JSON (after every row); chart beside it")
    parser.add_argument("--quick", action="store_true", help="B in (1, 8), 512-token prompts, 32 new tokens")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,8,64; --quick 1,8)")
    parser.add_argument("--prompts", help="comma-separated prompt lengths (default 512,8192,32768)")
    args = parser.parse_args()
    batches, prompts, new_tokens = (
        ((1, 8), (512,), 32) if args.quick else ((1, 8, 64), (512, 8192, 32768), 64)
    )
    if args.batches:  # split the grid over several calls
        batches = tuple(int(b) for b in args.batches.split(","))
    if args.prompts:
        prompts = tuple(int(p) for p in args.prompts.split(","))
    providers = args.providers.split(",")
    unknown = [name for name in providers if name not in PROVIDERS]
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {list(PROVIDERS)}")
    results = {"env": environment(), "new_tokens": new_tokens, "rows": []}
    for name in providers:
        builder, kwargs = PROVIDERS[name]
        if builder is fla_deltanet and not HAS_FLA:
            results["rows"].append({"model": name, "skipped": "flash-linear-attention is not installed"})
            continue
        for batch in batches:
            for prompt in prompts:
                row = {"model": name, "batch": batch, "prompt": prompt}
                try:
                    # A fresh model per cell: transformers keeps the largest static cache length a model has
                    # seen (and its compiled graphs), PFlow its static cache and CUDA graphs; a later, smaller
                    # cell would run on those.
                    model = builder("340m").to("cuda", torch.bfloat16).eval()
                    with torch.no_grad():
                        row.update(measure(model, batch, prompt, new_tokens, kwargs))
                except torch.OutOfMemoryError:
                    row["result"] = "OOM"
                except Exception as err:  # noqa: BLE001 - one failing provider must not stop the table
                    row["result"] = f"{type(err).__name__}: {str(err)[:300]}"
                model = None
                torch._dynamo.reset()
                gc.collect()
                torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
                write_json(args.out, results)
    write_json(args.out, results)
    plot(results, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
