"""Per-kernel time of our delta-rule kernels (torch.profiler) and launch-setting variants (triton_utils.TUNE).

    python benchmarks/profile_kernels.py --out profile.json [--variants base,stages1,...] [--shape 2048x16]

Each variant: fwd and fwd+bwd medians (do_bench) at --shape (default 4096 x 8), H = 16, K = V = 128, bf16,
and the CUDA time of every kernel in one fwd+bwd step for the variants of --kernels-for. fla providers
run once, under the base variant.
"""

import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_delta_rule as bench  # noqa: E402

from modeling_parallelflow.triton_utils import TUNE  # noqa: E402

VARIANTS = {
    "base": {},
    "scan_stages2": {"scan_stages": 2},
    "stages4": {"scan_stages": 4},
    "scan_warps8": {"scan_warps": 8},
    "wu_warps8": {"wu_warps": 8},
    "par_warps8": {"par_warps": 8},
    "cr128": {"cr_target": 128},
    "par_bv64": {"par_bv": 64},
    "par_stages1": {"par_stages": 1},
    "par_stages2": {"par_stages": 2},
    "recompute_t": {"recompute_inverses": 1},
    "par_bk128": {"par_bk": 128},
    "par_bk128_warps8": {"par_bk": 128, "par_warps": 8},
    "bwd_local_dx": {"bwd_local_dx": 1},
    "fwd_local_p": {"fwd_local_p": 1},
    "local_both": {"bwd_local_dx": 1, "fwd_local_p": 1},
    "local_both_bv32": {"bwd_local_dx": 1, "fwd_local_p": 1, "scan_bv": 32},
    # the launch settings before 63f9fc0 (2-stage pipelines; scans in V blocks of 16 below 256 programs)
    "old_defaults": {"par_stages": 2, "scan_stages": 2, "scan_min_programs": 256},
    "keep_states": {"recompute_states": 0},  # chunk states, X, W and U kept: no recompute in the backward
    "min256": {"scan_min_programs": 256},
    "min64": {"scan_min_programs": 64},
    "scan_bv32": {"scan_bv": 32},  # twice the V blocks; with 2 stages two scans with o fit per multiprocessor
    "no_ahead": {"scan_ahead": 0},  # the forward scan's Q through its pipeline everywhere (scan_launch)
}


def kernel_times(run, leaves, reps=3):
    do = torch.randn_like(run())
    for _ in range(2):
        run().backward(do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            for x in leaves:
                x.grad = None
            run().backward(do)
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if total > 0:
            out[evt.key[:60]] = round(total / reps / 1000, 4)  # ms per step
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:14])


def held_mib(run):
    """MiB allocated by one forward and held until its backward (the output and what autograd saved)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = run()
    held = torch.cuda.memory_allocated() - before
    del out
    return round(held / 2**20, 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--providers", default="ours_R1_sum,ours_R4_sum")
    parser.add_argument("--shape", default="4096x8")
    parser.add_argument("--kernels-for", default="base", help="variants whose per-kernel times are profiled")
    args = parser.parse_args()
    batch, seq_len = bench.SHAPES[args.shape]
    defaults = dict(TUNE)
    result = {"env": bench.environment(), "shape": args.shape}
    for variant in args.variants.split(","):
        for name in args.providers.split(","):
            if name.startswith(("fla", "sdpa")) and variant != "base":
                continue
            TUNE.clear()
            TUNE.update(defaults, **VARIANTS.get(variant, {}))
            key = f"{variant}/{name}"
            row = {}
            for mode in ("fwd", "fwdbwd"):
                row[mode] = bench.guarded(bench.time_provider, name, args.shape, mode)
            if variant in args.kernels_for.split(",") or name.startswith(("fla", "sdpa")):
                run, leaves = bench.PROVIDERS[name](batch, seq_len, torch.bfloat16, True)
                row["kernels_ms"] = bench.guarded(kernel_times, run, leaves)
                row["held_mib"] = bench.guarded(held_mib, run)
                del run, leaves
            result[key] = row
            print(key, json.dumps(row), flush=True)
            bench.write_json(args.out, result)
    TUNE.clear()
    TUNE.update(defaults)


if __name__ == "__main__":
    main()
