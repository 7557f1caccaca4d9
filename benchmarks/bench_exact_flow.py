"""What the exact flow adds to a step: `exact_flow_drivers` (the Gram matrix, phi, the rescaled drivers)
forward and forward + backward, checked against float64 first. Variants: the fused Triton kernels
(`triton`, triton_exact_flow.py), the torch path (`torch`, phi's tiny products as broadcast sums,
`ops_exact_flow.small_matmul`) and the torch path as it was before fece89c (`torch_bmm`, those products as
cuBLAS batched GEMMs).

    python benchmarks/bench_exact_flow.py --out exact_flow.json    # on a GPU

Shapes: the MQAR step (65,536 tokens; 1 head at width 64, 2 at 128) and bench_delta_rule's 2048 x 16
(16 heads), R = 2 (the grid's exact-flow model) and R = 4, head size 64, bf16 drivers as the layer makes them.
"""

import argparse
import json

import torch
import triton

from modeling_parallelflow import ops_exact_flow
from modeling_parallelflow.ops import beta_drivers

VARIANTS = {  # name: (backend, phi's small products)
    "triton": ("triton", ops_exact_flow.small_matmul),
    "torch": ("torch", ops_exact_flow.small_matmul),
    "torch_bmm": ("torch", torch.matmul),
}
SHAPES = {"mqar_w64": (65536, 1), "mqar_w128": (65536, 2), "2048x16": (32768, 16)}  # (tokens, heads)


def drivers(tokens, heads, rank, dtype, device="cuda"):
    """a, b = unit keys, u [1, tokens, heads, rank, 64]; betas in (0, 1) / rank as the sum form uses."""
    k = torch.nn.functional.normalize(torch.randn(1, tokens, heads, rank, 64, device=device), dim=-1)
    v = torch.randn(1, tokens, heads, rank, 64, device=device)
    beta = torch.rand(1, tokens, heads, rank, device=device) / rank
    a, u = beta_drivers(k, v, beta)
    return a.to(dtype), k.to(dtype), u.to(dtype)


def run_variant(variant, fn):
    """fn(backend) with phi's small products as the variant has them."""
    backend, small_matmul = VARIANTS[variant]
    ops_exact_flow.small_matmul, saved = small_matmul, ops_exact_flow.small_matmul
    try:
        return fn(backend)
    finally:
        ops_exact_flow.small_matmul = saved


def check(rank):
    """Largest error of a' and u' of each variant in float32 against the torch path in float64."""
    a, b, u = drivers(2048, 2, rank, torch.float64)
    ref = ops_exact_flow.exact_flow_drivers(a, b, u, "sum")
    errors = {}
    for variant in VARIANTS:
        out = run_variant(
            variant,
            lambda backend: ops_exact_flow.exact_flow_drivers(
                a.float(), b.float(), u.float(), "sum", backend
            ),
        )
        errors[variant] = max((x.double() - y).abs().max().item() for x, y in zip(out, ref, strict=True))
    return errors


def time_variant(variant, shape, rank, mode):
    """Median ms of one forward (no autograd) or forward + backward, bf16 drivers."""
    tokens, heads = SHAPES[shape]
    leaves = [x.requires_grad_(mode == "fwdbwd") for x in drivers(tokens, heads, rank, torch.bfloat16)]

    def bench(backend):
        def fwd():
            return ops_exact_flow.exact_flow_drivers(*leaves, "sum", backend)

        def fwdbwd():
            a, u = fwd()
            torch.autograd.backward((a, u), (torch.ones_like(a), torch.ones_like(u)))

        if mode == "fwd":
            with torch.no_grad():
                return triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
        return triton.testing.do_bench(fwdbwd, warmup=25, rep=100, return_mode="median", grad_to_none=leaves)

    return run_variant(variant, bench)


def main():
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ranks", default="2,4")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "check": {}, "ms": {}}
    for rank in map(int, args.ranks.split(",")):
        result["check"][f"R{rank}"] = check(rank)
        print(f"R = {rank}: max error against float64 {result['check'][f'R{rank}']}", flush=True)
        for shape in SHAPES:
            for mode in ("fwd", "fwdbwd"):
                row = {v: round(time_variant(v, shape, rank, mode), 4) for v in VARIANTS}
                result["ms"][f"R{rank}/{shape}/{mode}"] = row
                times = "  ".join(f"{v} {ms:.3f} ms" for v, ms in row.items())
                print(f"R = {rank} {shape:9s} {mode:6s} {times}", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
