"""What the exact flow adds to a step: `exact_flow_drivers` (the Gram matrix, phi, the rescaled drivers)
forward and forward + backward, with phi's tiny products as batched GEMMs (torch.matmul) or as broadcast sums
(`ops_exact_flow.small_matmul`), checked against float64 first.

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

FORMS = {"bmm": torch.matmul, "broadcast": ops_exact_flow.small_matmul}
SHAPES = {"mqar_w64": (65536, 1), "mqar_w128": (65536, 2), "2048x16": (32768, 16)}  # (tokens, heads)


def drivers(tokens, heads, rank, dtype, device="cuda"):
    """a, b = unit keys, u [1, tokens, heads, rank, 64]; betas in (0, 1) / rank as the sum form uses."""
    k = torch.nn.functional.normalize(torch.randn(1, tokens, heads, rank, 64, device=device), dim=-1)
    v = torch.randn(1, tokens, heads, rank, 64, device=device)
    beta = torch.rand(1, tokens, heads, rank, device=device) / rank
    a, u = beta_drivers(k, v, beta)
    return a.to(dtype), k.to(dtype), u.to(dtype)


def with_form(form, fn):
    ops_exact_flow.small_matmul, saved = FORMS[form], ops_exact_flow.small_matmul
    try:
        return fn()
    finally:
        ops_exact_flow.small_matmul = saved


def check(rank):
    """Largest |a' - a'_64| + |u' - u'_64| of each form in float32 against float64 (2048 tokens)."""
    a, b, u = drivers(2048, 2, rank, torch.float64)
    ref = ops_exact_flow.exact_flow_drivers(a, b, u, "sum")
    errors = {}
    for form in FORMS:
        out = with_form(
            form, lambda: ops_exact_flow.exact_flow_drivers(a.float(), b.float(), u.float(), "sum")
        )
        errors[form] = max((x.double() - y).abs().max().item() for x, y in zip(out, ref, strict=True))
    return errors


def time_form(form, shape, rank, mode):
    tokens, heads = SHAPES[shape]
    leaves = [x.requires_grad_(mode == "fwdbwd") for x in drivers(tokens, heads, rank, torch.bfloat16)]

    def fwd():
        return ops_exact_flow.exact_flow_drivers(*leaves, "sum")

    def fwdbwd():
        a, u = fwd()
        torch.autograd.backward((a, u), (torch.ones_like(a), torch.ones_like(u)))

    def bench():
        if mode == "fwd":
            with torch.no_grad():
                return triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
        return triton.testing.do_bench(fwdbwd, warmup=25, rep=100, return_mode="median", grad_to_none=leaves)

    return with_form(form, bench)


def main():
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "check": {}, "ms": {}}
    for rank in (2, 4):
        result["check"][f"R{rank}"] = check(rank)
        print(f"R = {rank}: max error against float64 {result['check'][f'R{rank}']}", flush=True)
        for shape in SHAPES:
            for mode in ("fwd", "fwdbwd"):
                row = {form: round(time_form(form, shape, rank, mode), 4) for form in FORMS}
                result["ms"][f"R{rank}/{shape}/{mode}"] = row
                times = "  ".join(f"{f} {ms:.3f} ms" for f, ms in row.items())
                print(f"R = {rank} {shape:9s} {mode:6s} {times}", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
