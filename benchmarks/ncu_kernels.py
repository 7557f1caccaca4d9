"""One forward + backward of each provider inside a CUDA profiler range, for Nsight Compute's counters.

    ncu --clock-control none --profile-from-start off --export report \
        python benchmarks/ncu_kernels.py --shape 16384x2 --providers ours_R1_sum,fla_delta_rule_R1
    ncu --import report.ncu-rep --csv --page details > ncu.csv   # (benchmarks/gpu_calls.sh ncu: both)

Each provider first runs warm-up steps outside the range (Triton compiles, fla autotunes), so ncu replays only
the kernels of the step inside it. Providers and shapes are bench_delta_rule.py's (H = 16, K = V = 128, bf16).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_delta_rule as bench  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="16384x2", choices=sorted(bench.SHAPES))
    parser.add_argument("--providers", default="ours_R1_sum,fla_delta_rule_R1")
    args = parser.parse_args()
    batch, seq_len = bench.SHAPES[args.shape]
    for name in args.providers.split(","):
        run, leaves = bench.PROVIDERS[name](batch, seq_len, torch.bfloat16, True)
        grad_out = torch.randn_like(run())
        for _ in range(3):
            run().backward(grad_out)
        torch.cuda.synchronize()
        for x in leaves:
            x.grad = None
        torch.cuda.nvtx.range_push(name)
        torch.cuda.cudart().cudaProfilerStart()
        run().backward(grad_out)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        torch.cuda.nvtx.range_pop()
        print(f"profiled {name} at {args.shape}", file=sys.stderr, flush=True)
        del run, leaves, grad_out


if __name__ == "__main__":
    main()
