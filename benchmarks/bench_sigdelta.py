"""sigDelta vs tensorInv on the GPU, same process, same inputs: the W/U stage alone and the full op.

    python benchmarks/bench_sigdelta.py --out benchmarks/results/sigdelta_h100.json   # GPU run (~6 min)
    python benchmarks/bench_sigdelta.py --report benchmarks/results/sigdelta_h100.json  # table + chart

Sections (results JSON keys):
- "correctness": bf16 at a small shape against float64 (torch `chunk_wu` for the W/U stage, the token
  loop for the op, forward and backward), both solvers, every R, both masks;
- "wu": the W/U stage at 32,768 tokens (T x B = 4096 x 8), H = 16, K = V = 128, bf16, over R in
  {1, 2, 4, 8} and C in {16, ..., 256}; sigDelta in several (block_rows, solve) variants;
- "op": the public op (triton backend) forward and forward+backward at the same shape, both algorithms,
  the chunk sizes the pipeline runs (triton_utils.pick_chunk; C * R up to 256 by raising TUNE["cr_target"]).
Times are medians of `triton.testing.do_bench` in ms.
"""

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_parallelflow import triton_sigdelta, triton_utils  # noqa: E402
from modeling_parallelflow.ops import delta_rule_drivers  # noqa: E402
from modeling_parallelflow.ops_chunk_torch import chunk_wu  # noqa: E402
from modeling_parallelflow.ops_reference import delta_rule_reference  # noqa: E402
from modeling_parallelflow.triton_chunk_fwd import tensor_inv_wu  # noqa: E402

RANKS = (1, 2, 4, 8)
CHUNKS = (16, 32, 64, 128, 256)
VARIANTS = (
    (32, "direct"),
    (16, "blockinv"),
    (32, "blockinv"),
    (64, "blockinv"),
    (16, "parallel"),
    (32, "parallel"),
)
TINV_MAX_CR = 256  # tensorInv keeps the whole C*R x C*R inverse of a chunk in one program's registers


def wu_points(smoke):
    """(R, C, mode) of the W/U timings: every C * R <= 512 in the sum form; product form at C*R 64, 256."""
    if smoke:
        return [(1, 16, "sum"), (2, 16, "product")]
    points = [(r, c, "sum") for r in RANKS for c in CHUNKS if c * r <= 512]
    return points + [(r, 256 // r, "product") for r in RANKS] + [(2, 32, "product"), (4, 16, "product")]


def op_points(smoke):
    """(R, C) of the op timings, the pipeline's default C * R <= 64 first, then larger chunks."""
    if smoke:
        return [(1, 16), (2, 16)]
    return sorted(((r, c) for r in RANKS for c in CHUNKS if c * r <= 256), key=lambda p: p[0] * p[1])


def drivers(batch, seq_len, heads, rank, k_dim, v_dim, mode, dtype, device, correlated=False):
    """q, a = -beta k, b = k, u = beta v with unit keys and betas in (0, 1) (/ R in the sum form).

    correlated: keys = normalize(one shared key + 0.1 noise), the hard case for (I - N)^-1.
    """
    q = torch.randn(batch, seq_len, heads, k_dim, device=device)
    k = torch.randn(batch, seq_len, heads, rank, k_dim, device=device)
    if correlated:
        k = torch.randn(k_dim, device=device) + 0.1 * k
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(batch, seq_len, heads, rank, 1, device=device) / (rank if mode == "sum" else 1)
    u = beta * torch.randn(batch, seq_len, heads, rank, v_dim, device=device)
    return [x.to(dtype) for x in (q, -beta * k, k, u)]


def rel_err(x, ref):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return ((x - ref).norm() / ref.norm()).item()


def wu_reference(a, b, u, mode, chunk):
    """float64 tensorInv W, U (torch chunk_wu, on the CPU) of a plain batch; zero rows pad the last chunk."""
    seq_len = a.shape[1]
    pad = -seq_len % chunk
    chunks = [
        torch.nn.functional.pad(x.double().cpu(), (0, 0, 0, 0, 0, 0, 0, pad)).unflatten(1, (-1, chunk))
        for x in (a, b, u)
    ]  # [B, n, C, H, R, *]
    w, uu = chunk_wu(*(x.movedim(3, 1) for x in chunks), mode)  # [B, H, n, C, R, *]
    return [x.movedim(1, 3).flatten(1, 2)[:, :seq_len] for x in (w, uu)]


def wu_solvers(rank, chunk, variants):
    """name -> W/U launcher (a, b, u, mode) for tensorInv and each sigDelta variant."""
    out = {}
    if chunk * rank <= TINV_MAX_CR:
        out["tensor_inv"] = lambda a, b, u, mode: tensor_inv_wu(a, b, u, mode=mode, chunk_size=chunk)
    for rows, solve in variants:

        def run(a, b, u, mode, rows=rows, solve=solve):
            return triton_sigdelta.sigdelta_wu(
                a, b, u, mode=mode, chunk_size=chunk, block_rows=rows, solve=solve
            )

        out[f"sigdelta/{rows}/{solve}"] = run
    return out


def bench(fn, smoke):
    if smoke:  # CPU interpreter: one timed call, enough to exercise the code path
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


class Recorder:
    """Accumulates results and rewrites the JSON after every entry (a killed run keeps what it measured)."""

    def __init__(self, path, meta):
        self.path, self.data = path, {"meta": meta, "correctness": [], "wu": [], "op": []}

    def add(self, section, row):
        self.data[section].append(row)
        print(section, json.dumps(row), flush=True)
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps(self.data, indent=1))


def meta(args, device):
    import triton

    commit = os.environ.get("PFLOW_COMMIT")
    if commit is None:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
        commit = proc.stdout.strip() or "unknown"
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "shape": {
            "tokens": args.batch * args.seq_len,
            "T": args.seq_len,
            "B": args.batch,
            "H": args.heads,
            "K": args.dim,
            "V": args.dim,
            "dtype": "bfloat16",
        },
    }


def correctness(rec, args, device, dtype):
    """W/U stage vs float64 chunk_wu at C*R up to 256, and the op fwd+bwd vs the float64 token loop."""
    batch, seq_len, heads, dim = 1, (40 if args.smoke else 300), args.heads, args.dim
    for rank in RANKS:
        for mode in ("sum", "product"):
            chunk = 256 // rank if not args.smoke else 16
            for correlated in (False, True):
                _, a, b, u = drivers(batch, seq_len, heads, rank, dim, dim, mode, dtype, device, correlated)
                w_ref, u_ref = wu_reference(a, b, u, mode, chunk)
                for name, fn in wu_solvers(rank, chunk, VARIANTS).items():
                    if ("wu", rank, chunk, mode, name) in args.failed:
                        continue  # did not compile in the warm-up (reported in the "wu" section)
                    w, uu = fn(a, b, u, mode)
                    rec.add(
                        "correctness",
                        {
                            "what": "wu-correlated" if correlated else "wu",
                            "solver": name,
                            "R": rank,
                            "mode": mode,
                            "C": chunk,
                            "w": rel_err(w, w_ref),
                            "u": rel_err(uu, u_ref),
                        },
                    )
            q, a, b, u = drivers(batch, seq_len // 2, heads, rank, dim, dim, mode, dtype, device)
            h0 = torch.randn(batch, heads, dim, dim, device=device)
            ref = [x.detach().double().requires_grad_() for x in (q, a, b, u, h0)]
            o_ref, ht_ref = delta_rule_reference(
                *ref[:4],
                mode=mode,
                scale=dim**-0.5,
                initial_state=ref[4],
                output_final_state=True,
                dtype=torch.float64,
            )
            do, dht = torch.randn_like(o_ref), torch.randn_like(ht_ref)
            ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()
            for algorithm in ("tensor_inv", "sigdelta"):
                leaves = [x.clone().requires_grad_() for x in (q, a, b, u, h0)]
                o, ht = delta_rule_drivers(
                    *leaves[:4],
                    mode=mode,
                    initial_state=leaves[4],
                    output_final_state=True,
                    chunk_size=64,
                    algorithm=algorithm,
                    backend="triton",
                )
                ((o.float() * do.float()).sum() + (ht * dht.float()).sum()).backward()
                row = {
                    "what": "op",
                    "solver": algorithm,
                    "R": rank,
                    "mode": mode,
                    "o": rel_err(o, o_ref),
                    "ht": rel_err(ht, ht_ref),
                }
                row.update(
                    {f"d{n}": rel_err(x.grad, r.grad) for n, x, r in zip("qabuh", leaves, ref, strict=True)}
                )
                rec.add("correctness", row)


def wu_timings(rec, args, device, dtype, deadline):
    """The W/U stage alone: every solver at every (R, C), sum form; the product form at a few points."""
    for rank, chunk, mode in wu_points(args.smoke):
        if time.time() > deadline:
            rec.add("wu", {"skipped": "time budget", "R": rank, "C": chunk, "mode": mode})
            continue
        _, a, b, u = drivers(
            args.batch, args.seq_len, args.heads, rank, args.dim, args.dim, mode, dtype, device
        )
        moved = sum(x.numel() * x.element_size() for x in (a, b, u)) + a.nbytes + u.nbytes
        ref = wu_reference(a[:1, :, :2], b[:1, :, :2], u[:1, :, :2], mode, chunk)  # 2 heads of sequence 0
        for name, fn in wu_solvers(rank, chunk, VARIANTS).items():
            row = {"R": rank, "C": chunk, "CR": chunk * rank, "mode": mode, "solver": name}
            if ("wu", rank, chunk, mode, name) in args.failed:
                rec.add("wu", {**row, "error": "compile failed or timed out in the precompile phase"})
                continue
            try:
                w, uu = fn(a, b, u, mode)
                row.update(err_w=rel_err(w[:1, :, :2], ref[0]), err_u=rel_err(uu[:1, :, :2], ref[1]))
                ms = bench(functools.partial(fn, a, b, u, mode), args.smoke)
                row.update(ms=ms, tbps=moved / ms / 1e9)
            except Exception as err:  # compile failures (registers, shared memory) are results too
                row.update(error=f"{type(err).__name__}: {str(err)[:200]}")
            rec.add("wu", row)


def best_variants(rows):
    """(rank, C*R) -> fastest (block_rows, solve) of the sum-form W/U timings."""
    best = {}
    for row in rows:
        if row.get("mode") == "sum" and row.get("solver", "").startswith("sigdelta") and "ms" in row:
            key = (row["R"], row["CR"])
            if key not in best or row["ms"] < best[key][0]:
                _, rows_, solve = row["solver"].split("/")
                best[key] = (row["ms"], (int(rows_), solve))
    return {key: value[1] for key, value in best.items()}


def fwd_bwd(op, leaves, do):
    op(*leaves)[0].backward(do)


def op_timings(rec, args, device, dtype, deadline):
    """Public op, triton backend: forward and forward+backward, both algorithms, same inputs."""
    best = best_variants(rec.data["wu"])
    default_target = triton_utils.TUNE["cr_target"]
    for rank, chunk in op_points(args.smoke):
        if time.time() > deadline or ("op", rank, chunk) in args.failed:
            rec.add("op", {"skipped": "time budget or precompile failure", "R": rank, "C": chunk})
            continue
        triton_utils.TUNE["cr_target"] = max(64, chunk * rank)  # let the pipeline run this chunk size
        if (rank, chunk * rank) in best:
            triton_sigdelta.BLOCK_CONFIG[("sum", rank, chunk * rank)] = best[(rank, chunk * rank)]
        q, a, b, u = drivers(
            args.batch, args.seq_len, args.heads, rank, args.dim, args.dim, "sum", dtype, device
        )
        do = torch.randn(q.shape[:3] + (args.dim,), device=device, dtype=dtype)
        for algorithm in ("tensor_inv", "sigdelta"):
            row = {
                "R": rank,
                "C": chunk,
                "CR": chunk * rank,
                "solver": algorithm,
                "sigdelta_config": triton_sigdelta.block_config(rank, chunk),
            }
            try:
                op = functools.partial(
                    delta_rule_drivers, chunk_size=chunk, algorithm=algorithm, backend="triton"
                )
                with torch.no_grad():
                    row["fwd_ms"] = bench(functools.partial(op, q, a, b, u), args.smoke)
                leaves = [x.clone().requires_grad_() for x in (q, a, b, u)]
                row["fwdbwd_ms"] = bench(functools.partial(fwd_bwd, op, leaves, do), args.smoke)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            rec.add("op", row)
    triton_utils.TUNE["cr_target"] = default_target


def wu_best(rows, mode, rank, chunk, solver):
    """Fastest timed row of one solver family ("tensor_inv" or "sigdelta") at (mode, R, C), or None."""
    hits = [r for r in rows if "ms" in r and (r["mode"], r["R"], r["C"]) == (mode, rank, chunk)]
    hits = [r for r in hits if r["solver"].split("/")[0] == solver]
    return min(hits, key=lambda r: r["ms"], default=None)


def cell(row, key):
    if row is None:
        return "n/a"
    return f"{row[key]:.3f}" if key in row else row.get("error", "n/a")[:40]


def report(data, chart):
    """Markdown tables (W/U stage, op, correctness) and a chart of both solvers' times against C * R."""
    info = data["meta"]
    lines = [
        f"GPU {info['gpu']}, torch {info['torch']}, triton {info['triton']}, commit {info['commit'][:12]}, "
        f"device copy {info.get('copy_tbps', 0):.2f} TB/s",
        "",
        "| mode | R | C | C*R | tensorInv ms | sigDelta ms (rows/solve) | speed-up | sigDelta TB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    wu = data["wu"]
    for mode, rank, chunk in sorted({(r["mode"], r["R"], r["C"]) for r in wu if "ms" in r}):
        tinv, sig = (wu_best(wu, mode, rank, chunk, name) for name in ("tensor_inv", "sigdelta"))
        ratio = f"{tinv['ms'] / sig['ms']:.2f}" if tinv and sig else "n/a"
        variant = sig["solver"].split("/", 1)[1] if sig else ""
        tbps = f"{sig['tbps']:.2f}" if sig else "n/a"
        lines.append(
            f"| {mode} | {rank} | {chunk} | {chunk * rank} | {cell(tinv, 'ms')} "
            f"| {cell(sig, 'ms')} ({variant}) | {ratio} | {tbps} |"
        )
    lines += ["", "| R | C | C*R | fwd tensorInv | fwd sigDelta | fwd+bwd tensorInv | fwd+bwd sigDelta |"]
    lines.append("|---|---|---|---|---|---|---|")
    ops = {(r["R"], r["C"], r["solver"]): r for r in data["op"] if "solver" in r}
    for rank, chunk in sorted({(r, c) for r, c, _ in ops}):
        t, g = ops.get((rank, chunk, "tensor_inv")), ops.get((rank, chunk, "sigdelta"))
        lines.append(
            f"| {rank} | {chunk} | {rank * chunk} | {cell(t, 'fwd_ms')} | {cell(g, 'fwd_ms')} "
            f"| {cell(t, 'fwdbwd_ms')} | {cell(g, 'fwdbwd_ms')} |"
        )
    lines += ["", "| check | solver | R | mode | max relative error vs float64 |", "|---|---|---|---|---|"]
    for r in data["correctness"]:
        worst = max(v for v in r.values() if isinstance(v, float))
        lines.append(f"| {r['what']} | {r['solver']} | {r['R']} | {r['mode']} | {worst:.2e} |")
    plot(data, chart)
    return "\n".join(lines)


def plot(data, chart):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for rank, color in zip(RANKS, ("C0", "C1", "C2", "C3"), strict=True):
        for solver, style in (("tensor_inv", "o--"), ("sigdelta", "s-")):
            chunks = sorted({r["C"] for r in data["wu"] if r.get("R") == rank and r.get("mode") == "sum"})
            best = [(c * rank, wu_best(data["wu"], "sum", rank, c, solver)) for c in chunks]
            pts = [(cr, r["ms"]) for cr, r in best if r is not None]
            if pts:
                axes[0].plot(*zip(*pts, strict=True), style, color=color, label=f"R={rank} {solver}")
            ops = [r for r in data["op"] if r.get("R") == rank and r.get("solver") == solver]
            for ax, key in ((axes[1], "fwd_ms"), (axes[2], "fwdbwd_ms")):
                pts = sorted((r["CR"], r[key]) for r in ops if key in r)
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, color=color, label=f"R={rank} {solver}")
    titles = ("W/U stage alone", "op forward", "op forward+backward")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(xscale="log", yscale="log", xlabel="C * R (rows per chunk)", ylabel="ms (median)")
        ax.set_title(f"{title} (sum form)")
        ax.minorticks_off()
        ax.set_xticks([16, 32, 64, 128, 256, 512], labels=["16", "32", "64", "128", "256", "512"])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"sigDelta (solid) vs tensorInv (dashed): 32K tokens, H=16, K=V=128, bf16, {data['meta']['gpu']}"
    )
    fig.tight_layout()
    fig.savefig(chart, dpi=110)


def compile_job(job, heads, dim):
    """Run one configuration once on tiny inputs (T = C) so that its kernels land in Triton's cache."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if job[0] == "wu":
        _, rank, chunk, mode, name = job
        _, a, b, u = drivers(1, chunk, heads, rank, dim, dim, mode, dtype, device)
        wu_solvers(rank, chunk, VARIANTS)[name](a, b, u, mode)
    else:
        _, rank, chunk = job
        triton_utils.TUNE["cr_target"] = max(64, chunk * rank)
        q, a, b, u = drivers(1, chunk, heads, rank, dim, dim, "sum", dtype, device)
        h0 = torch.randn(1, heads, dim, dim, device=device)
        for algorithm in ("tensor_inv", "sigdelta"):
            for state in (None, h0):  # the correctness section passes an initial state, the timings none
                leaves = [x.clone().requires_grad_() for x in (q, a, b, u)]
                o, _ = delta_rule_drivers(
                    *leaves,
                    initial_state=state,
                    output_final_state=state is not None,
                    chunk_size=chunk,
                    algorithm=algorithm,
                    backend="triton",
                )
                o.float().sum().backward()
                with torch.no_grad():
                    delta_rule_drivers(q, a, b, u, chunk_size=chunk, algorithm=algorithm, backend="triton")
    if device == "cuda":
        torch.cuda.synchronize()
    return "ok"


def precompile(args):
    """Warm Triton's on-disk cache from several processes; returns job -> "ok" / error / "timeout"."""
    import multiprocessing

    wu_jobs = [(r, c, m, name) for r, c, m in wu_points(args.smoke) for name in wu_solvers(r, c, VARIANTS)]
    jobs = [("wu", *job) for job in wu_jobs] + [("op", r, c) for r, c in op_points(args.smoke)]
    jobs.sort(key=lambda job: -job[1] * job[2])  # the largest (slowest to compile) first
    pool = multiprocessing.get_context("spawn").Pool(args.compile_workers)
    pending = {job: pool.apply_async(compile_job, (job, args.heads, args.dim)) for job in jobs}
    deadline, status = time.time() + args.compile_budget_s, {}
    for job, result in pending.items():
        try:
            status[job] = result.get(timeout=max(1.0, deadline - time.time()))
        except multiprocessing.TimeoutError:
            status[job] = "timeout"
        except Exception as err:
            status[job] = f"{type(err).__name__}: {str(err)[:200]}"
    pool.terminate()
    return status


def kernel_resources():
    """Registers, spills and shared memory of every compiled W/U kernel of this process (occupancy)."""
    from modeling_parallelflow.triton_chunk_fwd import _wu_kernel

    out = []
    for name, fn in (("sigdelta", triton_sigdelta._sigdelta_wu_kernel), ("tensor_inv", _wu_kernel)):
        for caches in getattr(fn, "device_caches", {}).values():
            for key, kernel in caches[0].items():
                meta_ = getattr(kernel, "metadata", None)
                out.append(
                    {
                        "kernel": name,
                        "key": str(key)[-400:],
                        "n_regs": getattr(kernel, "n_regs", None),
                        "n_spills": getattr(kernel, "n_spills", None),
                        "shared": getattr(meta_, "shared", None),
                        "num_warps": getattr(meta_, "num_warps", None),
                    }
                )
    return out


def copy_bandwidth(device):
    """Device-to-device copy rate (bytes read + written per second), the memory ceiling of this GPU."""
    import triton.testing

    x = torch.empty(2**28, device=device, dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
    return 2 * x.nbytes / ms / 1e9


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="results JSON path")
    parser.add_argument("--report", help="results JSON -> markdown table and chart (no GPU needed)")
    parser.add_argument("--chart", default="benchmarks/sigdelta_wu.png")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--compile-workers", type=int, default=12, help="processes that warm the cache")
    parser.add_argument("--compile-budget-s", type=float, default=240)
    parser.add_argument("--budget-s", type=float, default=480, help="stop timing new points after this")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter: code path only")
    parser.add_argument("--sections", default="correctness,wu,op")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text()), args.chart))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.seq_len, args.batch, args.heads, args.dim = 32, 1, 1, 16
    deadline = time.time() + args.budget_s
    rec = Recorder(args.out, meta(args, device))
    args.failed = set()
    if device == "cuda":
        rec.data["meta"]["copy_tbps"] = copy_bandwidth(device)
    if args.compile_workers > 0:
        start = time.time()
        status = precompile(args)
        rec.data["meta"]["precompile_s"] = time.time() - start
        rec.data["meta"]["precompile"] = {"/".join(map(str, job)): st for job, st in status.items()}
        print("precompiled", sum(st == "ok" for st in status.values()), "of", len(status), flush=True)
        deadline += time.time() - start
        args.failed = {job for job, st in status.items() if st != "ok"}
    torch.manual_seed(0)
    sections = args.sections.split(",")
    if "correctness" in sections:
        correctness(rec, args, device, torch.bfloat16 if device == "cuda" else torch.float32)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if "wu" in sections:
        wu_timings(rec, args, device, dtype, deadline)
    if "op" in sections:
        op_timings(rec, args, device, dtype, deadline)
    if device == "cuda":
        try:
            rec.data["meta"]["kernels"] = kernel_resources()
        except Exception as err:  # Triton's cache layout differs between versions
            rec.data["meta"]["kernels"] = f"{type(err).__name__}: {err}"
        rec.add("op", {"done": True})


if __name__ == "__main__":
    main()
