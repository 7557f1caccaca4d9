"""The short conv's backward (`triton_conv.conv_bwd`: `_dc_kernel`, then `_dx_kernel`) by launch settings.

    python benchmarks/bench_conv.py --out conv.json            # GPU; prints a table and the best settings
    python benchmarks/bench_conv.py --out conv.json --env      # ... and ends with PFLOW_CONV_* assignments

Every combination of TUNE["conv_block_t"] (token rows per tile), ["conv_dc_warps"] and ["conv_dx_warps"] runs
at the mixer shapes of the 340M and 1.3B configs (bf16, 32,768 tokens, heads of 128 channels, conv width 4),
each for a normalised (q, k) and a plain (v) feature. dx and dweight must agree with the default settings'
to a relative error of 1e-3 (the norm's row sums and dweight's partial sums follow the tile; a wrong tile
gives errors of order 1), or the settings leave the ranking. Time: median ms of `triton.testing.do_bench`
of the whole backward (both launches and the dweight sum), inputs built outside it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from benchmarks.bench_env import environment, write_json  # noqa: E402
from modeling_parallelflow import triton_conv  # noqa: E402

# name -> (B, T, C): q / k / v features of the 340M (hidden 1024) and 1.3B (hidden 2048) mixers
SHAPES = {"340m 2048x16": (16, 2048, 1024), "1.3b 2048x16": (16, 2048, 2048), "1.3b 8192x4": (4, 8192, 2048)}
GROUP, WIDTH = 128, 4
SETTINGS = {"conv_block_t": (16, 32, 64), "conv_dc_warps": (2, 4, 8), "conv_dx_warps": (2, 4, 8)}
ENV = {key: "PFLOW_" + key.upper() for key in SETTINGS}  # read by triton_utils.TUNE at import


def inputs(batch: int, length: int, channels: int):
    torch.manual_seed(0)
    x = torch.randn(batch, length, channels, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(channels, WIDTH, device="cuda") / 2).to(torch.bfloat16)
    dy = torch.randn_like(x)
    return dy, x, weight


def backward(args, normalize: bool, settings: dict):
    triton_conv.TUNE.update(settings)
    dy, x, weight = args
    return triton_conv.conv_bwd(dy, x, weight, None, None, None, GROUP, normalize)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--env", action="store_true", help="end with the best settings as PFLOW_CONV_* assignments"
    )
    args = parser.parse_args()
    defaults = {key: triton_conv.TUNE[key] for key in SETTINGS}
    combos = [dict(zip(SETTINGS, values, strict=True)) for values in itertools.product(*SETTINGS.values())]
    combos = [defaults] + [combo for combo in combos if combo != defaults]
    result = {"env": environment(), "defaults": defaults, "rows": []}
    total = {}  # settings -> summed ms over shapes and features
    for shape, dims in SHAPES.items():
        tensors = inputs(*dims)
        for normalize in (True, False):
            dx0, dw0 = backward(tensors, normalize, defaults)
            for settings in combos:
                dx, dw = backward(tensors, normalize, settings)
                dx_err = ((dx.float() - dx0.float()).norm() / dx0.float().norm()).item()
                dw_err = ((dw - dw0).norm() / dw0.norm()).item()
                ms = triton.testing.do_bench(lambda t=tensors, n=normalize, s=settings: backward(t, n, s))
                row = dict(
                    shape=shape, normalize=normalize, **settings, ms=ms, dx_rel_err=dx_err, dw_rel_err=dw_err
                )
                result["rows"].append(row)
                key = tuple(settings.values())
                total[key] = total.get(key, 0.0) + (ms if max(dx_err, dw_err) < 1e-3 else float("inf"))
            triton_conv.TUNE.update(defaults)
        write_json(args.out, result)
    ranked = sorted(total.items(), key=lambda item: item[1])
    default_ms = total[tuple(defaults.values())]
    print("block_t dc_warps dx_warps  summed ms (6 backwards)  vs defaults")
    for key, ms in ranked[:8]:
        print(f"{key[0]:7d} {key[1]:8d} {key[2]:8d}  {ms:24.3f}  {ms / default_ms:.3f}")
    print(f"defaults {tuple(defaults.values())}: {default_ms:.3f} ms")
    best = dict(zip(SETTINGS, ranked[0][0], strict=True))
    result["best"] = dict(settings=best, summed_ms=ranked[0][1], default_summed_ms=default_ms)
    write_json(args.out, result)
    if args.env:
        print(" ".join(f"{ENV[key]}={value}" for key, value in best.items()))


if __name__ == "__main__":
    main()
