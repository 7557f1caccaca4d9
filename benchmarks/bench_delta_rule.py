"""Benchmark of the rank-R delta rule: ours (Triton) against fla and SDPA, with accuracy in the same run.

    python benchmarks/bench_delta_rule.py --out benchmarks/results/h100.json            # everything
    python benchmarks/bench_delta_rule.py --only check,bench --shapes 4096x8 --out r.json

Our provider times the public op `delta_rule(q, k, v, beta)`, as users call it.
Sections: `check` (each benchmarked variant, fwd and every gradient, against the float64 token loop at a
small shape, plus fla's own error on the same inputs), `bench` (fwd and fwd+bwd ms and TB/s at
32,768 tokens, H = 16, K = V = 128, bf16, performance.md's grid), `decode` (one token on a cached
state), `tune` (V block of the sequential kernels). Providers are a registry: name -> setup(shape)
returning (run, inputs needing grad). Timings: triton.testing.do_bench medians.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench_env import environment, write_json  # noqa: E402
from modeling_parallelflow import triton_chunk_bwd, triton_chunk_fwd  # noqa: E402
from modeling_parallelflow.ops import beta_drivers, delta_rule, delta_rule_drivers  # noqa: E402
from modeling_parallelflow.ops_exact_flow import exact_flow_drivers  # noqa: E402
from modeling_parallelflow.ops_reference import delta_rule_reference  # noqa: E402
from modeling_parallelflow.triton_dispatch import triton_delta_rule_drivers, triton_recurrent_step_  # noqa: E402

try:
    from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
    from fla.ops.gated_delta_product import chunk_gated_delta_product

    HAS_FLA = True
except ImportError:
    HAS_FLA = False

DEV = "cuda"
HEADS, DIM = 16, 128
SHAPES = {"2048x16": (16, 2048), "4096x8": (8, 4096), "8192x4": (4, 8192), "16384x2": (2, 16384)}


def rand_delta(batch, seq_len, rank, dtype, requires_grad):
    """q, unit keys k [B,T,H,R,K], values v, sigmoid betas beta [B,T,H,R] / R (sum-form scaling)."""
    q = torch.randn(batch, seq_len, HEADS, DIM, device=DEV, dtype=dtype)
    k = F.normalize(torch.randn(batch, seq_len, HEADS, rank, DIM, device=DEV, dtype=torch.float32), dim=-1)
    v = torch.randn(batch, seq_len, HEADS, rank, DIM, device=DEV, dtype=dtype)
    beta = torch.rand(batch, seq_len, HEADS, rank, device=DEV).sigmoid()
    out = [q, k.to(dtype), v, beta.to(dtype)]
    return [x.requires_grad_(requires_grad) for x in out]


def ours(rank, mode, algorithm="auto"):
    """The public op `delta_rule(q, k, v, beta)` as users call it (validation, dispatch, drivers and all)."""

    def setup(batch, seq_len, dtype, grad):
        q, k, v, beta = rand_delta(batch, seq_len, rank, dtype, False)
        beta = beta / rank if mode == "sum" else beta
        leaves = [x.detach().requires_grad_(grad) for x in (q, k, v, beta)]
        return (
            lambda: delta_rule(*leaves, mode=mode, scale=DIM**-0.5, backend="triton", algorithm=algorithm)[0],
            leaves,
        )

    return setup


def ours_exact(rank):
    """The exact flow as the layer runs it (flow="exact", sum form): drivers, phi, then the chunked op."""

    def setup(batch, seq_len, dtype, grad):
        q, k, v, beta = rand_delta(batch, seq_len, rank, dtype, False)
        leaves = [x.detach().requires_grad_(grad) for x in (q, k, v, beta / rank)]

        def run():
            a, u = exact_flow_drivers(*beta_drivers(leaves[1], leaves[2], leaves[3]), leaves[1], "sum")
            return delta_rule_drivers(leaves[0], a, leaves[1], u, scale=DIM**-0.5, backend="triton")[0]

        return run, leaves

    return setup


def fla_delta(rank):
    def setup(batch, seq_len, dtype, grad):
        q, k, v, beta = rand_delta(batch, seq_len, rank, dtype, False)
        if rank == 1:
            leaves = [
                x.detach().requires_grad_(grad) for x in (q, k[:, :, :, 0], v[:, :, :, 0], beta[..., 0])
            ]
            return lambda: chunk_delta_rule(*leaves, scale=DIM**-0.5)[0], leaves
        # DeltaProduct takes the R keys of a token as R consecutive pseudo-tokens: [B, T*R, H, K]
        kk = k.transpose(2, 3).reshape(batch, seq_len * rank, HEADS, DIM)
        vv = v.transpose(2, 3).reshape(batch, seq_len * rank, HEADS, DIM)
        bb = beta.transpose(2, 3).reshape(batch, seq_len * rank, HEADS)
        leaves = [x.detach().requires_grad_(grad) for x in (q, kk, vv, bb)]
        return (
            lambda: chunk_gated_delta_product(
                leaves[0], leaves[1], leaves[2], None, leaves[3], num_householder=rank, scale=DIM**-0.5
            )[0],
            leaves,
        )

    return setup


def sdpa(batch, seq_len, dtype, grad):
    leaves = [
        torch.randn(batch, HEADS, seq_len, DIM, device=DEV, dtype=dtype, requires_grad=grad) for _ in range(3)
    ]
    return lambda: F.scaled_dot_product_attention(*leaves, is_causal=True), leaves


PROVIDERS = {
    "ours_R1_sum": ours(1, "sum"),
    "ours_R2_sum": ours(2, "sum"),
    "ours_R2_product": ours(2, "product"),
    "ours_R4_sum": ours(4, "sum"),
    "ours_R4_product": ours(4, "product"),
    "ours_R8_sum": ours(8, "sum"),  # 128-row chunks (C = 16): the W/U path
    "ours_R2_exact": ours_exact(2),  # phi of every token's 2 x 2 Gram matrix on top of ours_R2_sum
    "ours_R1_sum_sigdelta": ours(1, "sum", "sigdelta"),  # the other W/U solver (auto: triton_sigdelta table)
    "ours_R4_sum_sigdelta": ours(4, "sum", "sigdelta"),
    "fla_delta_rule_R1": fla_delta(1),
    "fla_delta_product_R2": fla_delta(2),
    "fla_delta_product_R4": fla_delta(4),
    "sdpa_causal": sdpa,
}


def min_bytes(name, tokens):
    """Bytes a fused forward must move (bf16): q, k, v (R of each), beta, o."""
    rank = 1 if name == "sdpa_causal" or "R1" in name else int(name.split("_R")[1][0])
    return 2 * tokens * HEADS * (DIM + 2 * rank * DIM + rank + DIM)


def time_provider(name, shape, mode):
    batch, seq_len = SHAPES[shape]
    run, leaves = PROVIDERS[name](batch, seq_len, torch.bfloat16, mode == "fwdbwd")
    if mode == "fwd":
        with torch.no_grad():
            ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    else:
        do = torch.randn_like(run())

        def step():
            for x in leaves:
                x.grad = None
            run().backward(do)

        ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    torch.cuda.empty_cache()
    return ms


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def check_variant(rank, mode, dtype, seq_len=512, batch=1, heads=2, with_h0=True, cu=None):
    """Errors of o, final state and every gradient against the float64 loop (ops_reference)."""
    q, k, v, beta = rand_delta(batch, seq_len, rank, torch.float32, False)
    q, k, v, beta = q[:, :, :heads], k[:, :, :heads], v[:, :, :heads], beta[:, :, :heads]
    beta = beta / rank if mode == "sum" else beta
    a, b, u = -beta[..., None] * k, k, beta[..., None] * v
    n_seq = batch if cu is None else len(cu) - 1
    h0 = torch.randn(n_seq, heads, DIM, DIM, device=DEV) if with_h0 else None
    cu_t = None if cu is None else torch.tensor(cu, device=DEV, dtype=torch.int32)
    ins = [x.to(dtype).detach().requires_grad_() for x in (q, a, b, u)]
    h0_in = None if h0 is None else h0.clone().requires_grad_()
    o, ht = triton_delta_rule_drivers(
        *ins,
        mode=mode,
        scale=DIM**-0.5,
        initial_state=h0_in,
        output_final_state=True,
        cu_seqlens=cu_t,
        algorithm="tensor_inv",
    )
    refs = [x.detach().to(dtype).double().requires_grad_() for x in (q, a, b, u)]
    h0_ref = None if h0 is None else h0.double().requires_grad_()
    o_ref, ht_ref = delta_rule_reference(
        *refs,
        mode=mode,
        scale=DIM**-0.5,
        initial_state=h0_ref,
        output_final_state=True,
        cu_seqlens=cu_t,
        dtype=torch.float64,
    )
    do, dht = torch.randn_like(o_ref), torch.randn_like(ht_ref)
    ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
    ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()
    errs = {"o": rel(o, o_ref), "ht": rel(ht, ht_ref)}
    for name, x, xr in zip("qabu", ins, refs, strict=True):
        errs["d" + name] = rel(x.grad, xr.grad)
    if h0 is not None:
        errs["dh0"] = rel(h0_in.grad, h0_ref.grad)
    return errs


def check_fla_r1(seq_len=512):
    """Our R = 1 and fla chunk_delta_rule on the same bf16 inputs, both against the float64 loop."""
    q, k, v, beta = (x[:, :, :2] for x in rand_delta(1, seq_len, 1, torch.bfloat16, False))
    a, b, u = -beta[..., None] * k, k, beta[..., None] * v
    o_ref, _ = delta_rule_reference(
        q.double(), a.double(), b.double(), u.double(), mode="sum", scale=DIM**-0.5, dtype=torch.float64
    )
    o_ours, _ = triton_delta_rule_drivers(q, a, b, u, mode="sum", scale=DIM**-0.5)
    out = {"ours_o": rel(o_ours, o_ref)}
    if HAS_FLA:
        # fla gets k, v, beta: its a, u are formed in-kernel, ours from the same bf16 products
        o_fla, _ = chunk_delta_rule(q, k[:, :, :, 0], v[:, :, :, 0], beta[..., 0], scale=DIM**-0.5)
        out["fla_o"] = rel(o_fla, o_ref)
    return out


def decode_bench(batch=8):
    """ms per decode step (1 token, cached fp32 state): ours in place (plain and CUDA graph) vs fla."""
    q, k, v, beta = rand_delta(batch, 1, 1, torch.bfloat16, False)
    a, b, u = -beta[..., None] * k, k, beta[..., None] * v
    state = torch.randn(batch, HEADS, DIM, DIM, device=DEV)
    res = {
        "ours_step": triton.testing.do_bench(
            lambda: triton_recurrent_step_(q, a, b, u, state), warmup=25, rep=100, return_mode="median"
        )
    }
    triton_recurrent_step_(q, a, b, u, state)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_recurrent_step_(q, a, b, u, state)
    res["ours_step_cuda_graph"] = triton.testing.do_bench(
        graph.replay, warmup=25, rep=100, return_mode="median"
    )
    if HAS_FLA:
        res["fla_fused_recurrent"] = triton.testing.do_bench(
            lambda: fused_recurrent_delta_rule(
                q,
                k[:, :, :, 0],
                v[:, :, :, 0],
                beta[..., 0],
                scale=DIM**-0.5,
                initial_state=state,
                output_final_state=True,
            ),
            warmup=25,
            rep=100,
            return_mode="median",
        )
    return res


def tune_block_v(shape):
    """fwd+bwd ms of ours R=1 with the sequential kernels' V block forced to 16 / 32 / 64."""
    original = triton_chunk_fwd.scan_block_v
    res = {}
    for bv in (16, 32, 64):
        triton_chunk_fwd.scan_block_v = triton_chunk_bwd.scan_block_v = lambda *_, bv=bv: bv
        try:
            res[f"bv{bv}"] = time_provider("ours_R1_sum", shape, "fwdbwd")
        finally:
            triton_chunk_fwd.scan_block_v = triton_chunk_bwd.scan_block_v = original
    return res


def guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # one failing provider must not lose the rest of the run
        return {"error": f"{type(err).__name__}: {err}"[:400]}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="check,bench,decode,tune")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sections = args.only.split(",")
    result = {"env": environment(), "heads": HEADS, "dim": DIM, "dtype": "bfloat16"}
    save = lambda: write_json(args.out, result)  # noqa: E731
    if "check" in sections:
        checks = {}
        variants = [
            (r, m, torch.bfloat16)
            for r, m in [(1, "sum"), (2, "sum"), (2, "product"), (4, "sum"), (4, "product"), (8, "sum")]
        ]
        variants += [(1, "sum", torch.float16), (4, "product", torch.float16), (2, "product", torch.float32)]
        for rank, mode, dtype in variants:
            key = f"R{rank}_{mode}_{str(dtype)[6:]}"
            checks[key] = guarded(check_variant, rank, mode, dtype)
            print(
                key,
                {k: f"{v:.1e}" if isinstance(v, float) else v for k, v in checks[key].items()},
                flush=True,
            )
        checks["varlen_R2_sum_bf16"] = guarded(
            check_variant, 2, "sum", torch.bfloat16, seq_len=300, cu=[0, 1, 64, 65, 200, 300]
        )
        checks["fla_vs_ours_R1_bf16_T512"] = guarded(check_fla_r1)
        print("varlen", checks["varlen_R2_sum_bf16"], "\nfla", checks["fla_vs_ours_R1_bf16_T512"], flush=True)
        result["check"] = checks
        save()
    if "bench" in sections:
        bench = result.setdefault("bench", {})
        for shape in args.shapes.split(","):
            for name in args.providers.split(","):
                if name.startswith("fla") and not HAS_FLA:
                    continue
                for mode in ("fwd", "fwdbwd"):
                    ms = guarded(time_provider, name, shape, mode)
                    row = {"ms": ms} if isinstance(ms, float) else ms
                    if isinstance(ms, float) and mode == "fwd":
                        row["tbps_min_bytes"] = min_bytes(name, 32768) / ms / 1e9
                    bench[f"{shape}/{name}/{mode}"] = row
                    print(f"{shape:8s} {name:22s} {mode:7s} {row}", flush=True)
                save()
    if "decode" in sections:
        result["decode_ms"] = guarded(decode_bench)
        print("decode", result["decode_ms"], flush=True)
        save()
    if "tune" in sections:
        result["tune_block_v"] = {s: guarded(tune_block_v, s) for s in ("4096x8", "16384x2")}
        print("tune", result["tune_block_v"], flush=True)
        save()


if __name__ == "__main__":
    main()
