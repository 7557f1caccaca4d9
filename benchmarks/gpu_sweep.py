"""GPU shape sweep of the Triton delta-rule kernels against the float64 token loop (issue #18).

Each case runs the public op `delta_rule(q, k, v, beta)` on CUDA with the Triton backend and the same
(rounded) inputs through the float64 token loop (`ops_reference`, reached as backend="torch",
algorithm="recurrent"), then compares the output, the final state and the gradients of q, k, v, beta and
the initial state (relative Frobenius error per column). The launchers allocate NaN-poisoned buffers
(PFLOW_TRITON_POISON=1, triton_utils.new_tensor), so an element a kernel forgets to write shows up as a
NaN; every result must also be finite.

Cases run in child processes, a group per child, several children at once. A crash (illegal memory
access, abort) ends only its child: the case that was running is recorded as "crash" and the rest of
its group is re-run in a fresh child, so one crash hides no other case.

    python benchmarks/gpu_sweep.py --out sweep.json                         # the full sweep
    python benchmarks/gpu_sweep.py --out s.json --subset sanitizer --workers 1   # for compute-sanitizer
    python benchmarks/gpu_sweep.py --out s.json --filter 'K16-V16' --tune par_stages=1

The JSON holds the environment (commit, GPU, versions), the tolerances, every case with its errors and
status, and a summary: counts, worst error per column and dtype, wall time.
"""

import argparse
import json
import os
import platform
import queue
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import bench_env
from sweep_glue import glue_case, glue_cases, run_glue_case

# a worker thread still running at interpreter exit (a time box's SIGINT) finds no __file__
SCRIPT = os.path.abspath(__file__)
POISON_ENV = "PFLOW_TRITON_POISON"
TUNE_ENV = "PFLOW_SWEEP_TUNE"
# Relative error bounds per input dtype (output, final state and every gradient), about 2x the worst
# measured on an H200 at 762502b (benchmarks/results/gpu_sweep_762502b.json, passing cases): bf16 8.3e-3,
# fp16 2.2e-3 (dh0, K = 16, R = 8), fp32 8.5e-7 (3xTF32 dots; the bound leaves room for longer sequences).
# bf16 / fp16 errors are the rounding of the states and corrected values kept in the input dtype.
TOLERANCES = {"bfloat16": 1.5e-2, "float16": 4e-3, "float32": 2e-5}
HEAD_DIMS = (16, 32, 48, 64, 96, 128, 192, 256)
MIXED_DIMS = ((16, 64), (64, 16), (32, 128), (128, 32), (48, 96), (96, 48), (32, 256), (256, 32), (16, 256))
CU_SEQLENS = (0, 1, 1, 40, 64, 65, 200, 300)  # an empty sequence, a 1-token one, chunk-size edges


def case(
    algo="tensor_inv",
    B=3,
    T=100,
    H=2,
    R=2,
    K=64,
    V=None,
    mode="sum",
    dtype="bfloat16",
    h0=True,
    cu=None,
    grad=True,
    chunk=64,
):
    """One sweep case; the id names every field that differs from a plain batch."""
    V = K if V is None else V
    parts = [algo, mode, dtype, f"B{B}", f"T{T}", f"H{H}", f"R{R}", f"K{K}", f"V{V}"]
    parts += ["h0"] if h0 else []
    parts += ["varlen"] if cu is not None else []
    parts += [] if chunk == 64 else [f"chunk{chunk}"]
    parts += [] if grad else ["fwd"]
    return dict(
        id="-".join(parts),
        algo=algo,
        B=B,
        T=T,
        H=H,
        R=R,
        K=K,
        V=V,
        mode=mode,
        dtype=dtype,
        h0=h0,
        cu=None if cu is None else list(cu),
        grad=grad,
        chunk=chunk,
    )


def full_cases() -> list[dict]:
    """A covering design rather than the whole product: every head dim x every R x both modes at T = 100,
    then mixed widths, lengths x batches, dtypes, varlen and the other algorithms on subsets."""
    cases = [case(R=r, K=k, mode=m) for k in HEAD_DIMS for r in range(1, 9) for m in ("sum", "product")]
    for i, (k, v) in enumerate(MIXED_DIMS):
        for j, r in enumerate((1, 2, 5, 8)):
            cases.append(case(R=r, K=k, V=v, mode=("sum", "product")[(i + j) % 2]))
    for k, r, m in ((16, 8, "product"), (32, 2, "sum"), (64, 4, "product"), (128, 1, "sum")):
        for t in (1, 63, 512, 2048):
            for b in (1, 3, 64):  # the float64 loop keeps B H K V T R (product) values per step
                if b * 2 * k * k * t * (r if m == "product" else 1) <= 1 << 27:
                    cases.append(case(B=b, T=t, R=r, K=k, mode=m, h0=b != 1))
    for b, t, r, k, dtype in (
        (64, 16, 8, 256, "bfloat16"),
        (64, 16, 1, 256, "float32"),
        (64, 40, 8, 128, "bfloat16"),
        (48, 72, 1, 128, "bfloat16"),  # more programs than the GPU holds: query tiles ahead (scan_launch),
        (80, 100, 1, 48, "float32"),  # over two chunks
    ):
        cases.append(case(B=b, T=t, R=r, K=k, dtype=dtype))  # many programs: the scans' widest V blocks
    for dtype in ("float32", "bfloat16"):  # the 8-token fp32 chunks (R >= 5; bf16 runs them at K > 128)
        for r, k, m in ((8, 256, "sum"), (5, 192, "product"), (6, 256, "product"), (8, 48, "sum")):
            cases.append(case(B=2, T=20, R=r, K=k, mode=m, dtype=dtype))
    for i, k in enumerate((16, 32, 64, 128)):  # smaller chunks: C * R = 16 and 32 rows
        for j, (r, chunk) in enumerate(((1, 16), (1, 32), (2, 16), (3, 16))):
            cases.append(case(R=r, K=k, mode=("sum", "product")[(i + j) % 2], chunk=chunk))
    for dtype in ("float16", "float32"):
        for i, k in enumerate((16, 32, 64, 128, 256)):
            for j, r in enumerate((1, 2, 4, 8)):
                cases.append(case(R=r, K=k, mode=("sum", "product")[(i + j) % 2], dtype=dtype))
    for i, k in enumerate((16, 32, 64, 128)):
        for j, r in enumerate((1, 3, 8)):
            for dtype in ("bfloat16", "float32"):
                m = ("sum", "product")[(i + j) % 2]
                cases.append(case(B=1, T=300, R=r, K=k, mode=m, dtype=dtype, cu=CU_SEQLENS))
    for i, (k, v) in enumerate(((16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (32, 128))):
        for j, r in enumerate((1, 2, 4, 8)):
            m = ("sum", "product")[(i + j) % 2]
            cases.append(case("sigdelta", R=r, K=k, V=v, mode=m))
            cases.append(case("recurrent", R=r, K=k, V=v, mode=m, grad=False))
            cases.append(case("decode", T=1 + j, R=r, K=k, V=v, mode=m, grad=False))
            if j % 2 == 0:  # auto picks sigdelta or tensor_inv by shape; forward only (inference)
                cases.append(case("auto", R=r, K=k, V=v, mode=m, grad=False))
    for algo in ("sigdelta", "recurrent"):
        for r, m in ((2, "sum"), (3, "product")):
            cases.append(case(algo, B=1, T=300, R=r, K=32, mode=m, cu=CU_SEQLENS, grad=algo != "recurrent"))
            cases.append(case(algo, B=1, T=1, R=r, K=32, mode=m, grad=algo != "recurrent"))
    return cases + glue_cases()


def sanitizer_cases() -> list[dict]:
    """Small shapes for compute-sanitizer (slow): the small head dims of issue #18 and every kernel."""
    cases = [case(B=2, T=20, R=r, K=k) for k in (16, 32) for r in (2, 8)]
    cases += [case(B=2, T=20, R=4, K=16, mode="product"), case(B=2, T=20, R=2, K=16, V=64)]
    cases += [case(B=2, T=20, R=8, K=256, V=32)]
    cases += [case(B=1, T=40, R=3, K=32, cu=(0, 1, 1, 17, 40), dtype=d) for d in ("bfloat16", "float32")]
    cases += [case(B=2, T=20, R=8, K=256, dtype=d) for d in ("bfloat16", "float32")]
    cases += [case("sigdelta", B=2, T=20, R=2, K=16), case("recurrent", B=2, T=20, R=8, K=32, grad=False)]
    cases += [case("decode", B=2, T=3, R=2, K=16, grad=False)]
    cases += [
        glue_case("conv", dtype="bfloat16", B=1, T=40, group=g, cu=(0, 1, 1, 17, 40)) for g in (16, 256)
    ]
    cases += [glue_case("conv", dtype="float32", B=2, T=2, group=48, tail=True, pad=True)]
    cases += [
        glue_case("norm", dtype=d, B=2, T=20, group=g) for d in ("bfloat16", "float32") for g in (24, 256)
    ]
    return cases


def narrow_cases() -> list[dict]:
    """Head widths below the issue's 16..256 that the op also accepts (masked inside 16-wide tiles, as K = 24
    is inside 32): not yet run on a GPU (tests/README.md)."""
    cases = []
    for i, (k, v) in enumerate(((8, 8), (12, 20), (8, 64), (64, 8), (4, 4))):
        for j, r in enumerate((1, 2, 8)):
            for dtype in ("bfloat16", "float32"):
                cases.append(case(R=r, K=k, V=v, mode=("sum", "product")[(i + j) % 2], dtype=dtype))
    return cases + [
        case("decode", T=2, R=2, K=8, V=8, grad=False),
        case("recurrent", R=2, K=12, V=20, grad=False),
    ]


SUBSETS = {"full": full_cases, "sanitizer": sanitizer_cases, "narrow": narrow_cases}


def cost(c: dict) -> float:
    """Rough relative cost: compiling (fp32 3xTF32 kernels and wide heads are slow) plus the float64 loop."""
    steps = c["T"] * (c["R"] if c["mode"] == "product" else 1) * (2 if c["grad"] else 1)
    compile_cost = (3 if c["dtype"] == "float32" else 1) * (c["K"] + c["V"]) / 64
    return compile_cost + steps * (1 + c["B"] * c["K"] * c["V"] / 65536) / 2000


# ---------------------------------------------------------------------------------------------- child


def _inputs(c: dict, device):
    import torch

    torch.manual_seed(zlib.crc32(c["id"].encode()))
    B, T, H, R, K, V = (c[x] for x in "BTHRKV")
    n_seq = B if c["cu"] is None else len(c["cu"]) - 1
    q = torch.randn(B, T, H, K)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, R, K), dim=-1)
    v = torch.randn(B, T, H, R, V)
    beta = torch.sigmoid(torch.randn(B, T, H, R)) / (R if c["mode"] == "sum" else 1)  # unit keys: stable
    dtype = getattr(torch, c["dtype"])
    leaves = [x.to(device=device, dtype=dtype) for x in (q, k, v, beta)]
    h0 = torch.randn(n_seq, H, K, V, device=device) if c["h0"] else None
    return leaves, h0


def _fold(x, batch):
    """[B, T, H, ...] -> [1, T, B * H, ...]: the batch's sequences become heads of one sequence."""
    return x.transpose(0, 1).reshape(1, x.shape[1], batch * x.shape[2], *x.shape[3:])


def _reference(c: dict, leaves, h0):
    """o, final state (and the leaves' and h0's float64 copies) from the float64 token loop on the GPU."""
    import torch

    from modeling_parallelflow.ops import delta_rule

    ref = [x.detach().double().requires_grad_(c["grad"]) for x in leaves]
    ref_h0 = None if h0 is None else h0.detach().double().requires_grad_(c["grad"])
    B, T, H = c["B"], c["T"], c["H"]
    kwargs = dict(mode=c["mode"], output_final_state=True, algorithm="recurrent", backend="torch")
    if c["cu"] is None:  # plain batch: heads of one sequence, so the loop runs once over T
        init = None if ref_h0 is None else ref_h0.reshape(1, B * H, *ref_h0.shape[2:])
        o, ht = delta_rule(*(_fold(x, B) for x in ref), initial_state=init, **kwargs)
        o = o.reshape(T, B, H, -1).transpose(0, 1)
        ht = ht.reshape(B, H, *ht.shape[2:])
    else:
        cu = torch.tensor(c["cu"], device=leaves[0].device)
        o, ht = delta_rule(*ref, initial_state=ref_h0, cu_seqlens=cu, **kwargs)
    return o, ht, ref, ref_h0


def _rel(x, ref) -> float:
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_case(c: dict) -> dict:
    import torch

    if c["algo"] in ("conv", "norm"):  # the fused layer kernels (sweep_glue.py)
        return run_glue_case(c)

    from modeling_parallelflow.ops import delta_rule
    from modeling_parallelflow.triton_dispatch import triton_recurrent_step_

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: TRITON_INTERPRET=1
    leaves, h0 = _inputs(c, device)
    o_ref, ht_ref, ref, ref_h0 = _reference(c, leaves, h0)
    cu = None if c["cu"] is None else torch.tensor(c["cu"], dtype=torch.int32, device=device)
    if c["algo"] == "decode":  # the in-place decode step on a cached fp32 state
        q, k, v, beta = leaves
        bcol = beta[..., None]
        state = h0.clone() if h0 is not None else torch.zeros(c["B"], c["H"], c["K"], c["V"], device=device)
        o = triton_recurrent_step_(
            q, (-bcol * k).to(k.dtype), k, (bcol * v).to(v.dtype), state, mode=c["mode"]
        )
        ht = state
    else:
        leaves = [x.clone().requires_grad_(c["grad"]) for x in leaves]
        h0 = None if h0 is None else h0.clone().requires_grad_(c["grad"])
        with torch.set_grad_enabled(c["grad"]):
            o, ht = delta_rule(
                *leaves,
                mode=c["mode"],
                initial_state=h0,
                output_final_state=True,
                cu_seqlens=cu,
                chunk_size=c["chunk"],
                algorithm=c["algo"],
                backend="triton",
            )
    results = {"o": o, "ht": ht}
    errors = {"o": _rel(o, o_ref), "ht": _rel(ht, ht_ref)}
    if c["grad"]:
        gen = torch.Generator(device=device).manual_seed(1)
        do = torch.randn(o_ref.shape, device=device, dtype=torch.float64, generator=gen)
        dht = torch.randn(ht_ref.shape, device=device, dtype=torch.float64, generator=gen)
        ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
        ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()
        names = ["dq", "dk", "dv", "dbeta"] + (["dh0"] if h0 is not None else [])
        for name, x, xr in zip(names, leaves + [h0], ref + [ref_h0], strict=False):
            results[name] = x.grad
            errors[name] = _rel(x.grad, xr.grad)
    finite = all(bool(torch.isfinite(x).all()) for x in results.values())
    return {"errors": errors, "finite": finite}


def child_main(path: str) -> None:
    """Run the cases in `path`; one '@@START id' / '@@RESULT json' pair per case on stdout."""
    os.environ[POISON_ENV] = "1"
    import torch

    from modeling_parallelflow import triton_utils

    triton_utils.TUNE.update(json.loads(os.environ.get(TUNE_ENV, "{}")))
    for c in json.load(open(path)):
        print("@@START " + c["id"], flush=True)
        start = time.time()
        try:
            out = run_case(c)
        except Exception as err:  # a CUDA error poisons this process: report it and let the parent restart
            msg = f"{type(err).__name__}: {err}"[:600]
            # "CUDA error" from torch, "Triton Error [CUDA]" from a launch: the context is lost either way
            fatal = isinstance(err, getattr(torch, "AcceleratorError", ())) or "CUDA" in msg
            out = {"status": "crash" if fatal else "error", "message": msg}
            print(
                "@@RESULT " + json.dumps({"id": c["id"], "seconds": time.time() - start, **out}), flush=True
            )
            if fatal:
                sys.exit(3)
            continue
        print("@@RESULT " + json.dumps({"id": c["id"], "seconds": time.time() - start, **out}), flush=True)


# --------------------------------------------------------------------------------------------- parent


def verdict(c: dict, res: dict) -> dict:
    if "errors" not in res:
        return res
    tol = TOLERANCES[c["dtype"]]
    worst = max(res["errors"].values())
    ok = res["finite"] and worst <= tol
    return {**res, "status": "pass" if ok else "fail", "worst": worst, "tolerance": tol}


def run_group(group: list[dict], workdir: str, timeout: float, log) -> dict[str, dict]:
    """Run a group in one child; returns results by id (the crashed case included, the rest missing)."""
    path = os.path.join(workdir, f"group_{zlib.crc32(group[0]['id'].encode())}_{time.time_ns()}.json")
    json.dump(group, open(path, "w"))
    err_path = path + ".err"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--child", path],
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
        )
    results, current, last = {}, None, time.time()
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], 5.0)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            last = time.time()
            if line.startswith("@@START "):
                current = line[8:].strip()
            elif line.startswith("@@RESULT "):
                res = json.loads(line[9:])
                results[res.pop("id")] = res
                current = None
        elif time.time() - last > timeout:
            proc.kill()
            if current is not None:
                results[current] = {"status": "timeout", "message": f"no result in {timeout:.0f} s"}
            break
    proc.wait()
    tail = open(err_path).read()[-600:]
    if current is not None and current not in results:
        results[current] = {"status": "crash", "message": f"child exited with {proc.returncode}: {tail}"}
    if not results:  # the child failed before its first case: report all, do not retry forever
        results = {
            c["id"]: {"status": "error", "message": f"child exited with {proc.returncode}: {tail}"}
            for c in group
        }
    if proc.returncode not in (0, 3, None) and log:
        log(f"child exited with {proc.returncode} after {len(results)} of {len(group)} cases")
    return results


def environment(commit: str | None) -> dict:
    """bench_env.environment() (commit: the argument, else $PFLOW_COMMIT, else git) plus CUDA and Python."""
    import torch

    env = bench_env.environment()
    env.update(commit=commit or env["commit"], cuda=torch.version.cuda, python=platform.python_version())
    return env


def summarize(cases: list[dict], results: dict[str, dict], wall: float) -> dict:
    counts: dict[str, int] = {}
    worst: dict[str, dict[str, dict]] = {}
    for c in cases:
        res = results.get(c["id"], {"status": "missing"})
        counts[res["status"]] = counts.get(res["status"], 0) + 1
        for col, val in res.get("errors", {}).items():
            slot = worst.setdefault(c["dtype"], {})
            if col not in slot or val > slot[col]["value"]:
                slot[col] = {"value": val, "case": c["id"]}
    failed = [c["id"] for c in cases if results.get(c["id"], {}).get("status") != "pass"]
    return {
        "n_cases": len(cases),
        "counts": counts,
        "not_passed": failed,
        "worst": worst,
        "wall_seconds": round(wall, 1),
    }


def resumed(path: str, rerun: str, by_id: dict[str, dict]) -> dict[str, dict]:
    """Results of an earlier run's finished (pass / fail) cases that are still in the sweep and do not match
    `rerun`, each tagged with the commit it ran at."""
    old = json.load(open(path))
    commit = old["env"]["commit"]
    kept = {}
    for entry in old["cases"]:
        cid = entry["id"]
        if cid in by_id and entry["status"] in ("pass", "fail") and not (rerun and re.search(rerun, cid)):
            kept[cid] = {"commit": commit, **{k: v for k, v in entry.items() if k not in by_id[cid]}}
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="JSON file written as results come in")
    parser.add_argument("--subset", default="full", choices=sorted(SUBSETS))
    parser.add_argument("--filter", default="", help="regular expression on case ids")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--group", type=int, default=4, help="cases per child process")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds without a result")
    parser.add_argument("--commit", default=os.environ.get("PFLOW_COMMIT"))
    parser.add_argument("--tune", nargs="*", default=[], help="triton_utils.TUNE overrides key=int")
    parser.add_argument(
        "--resume", help="an earlier JSON of this subset: its finished cases are kept, the others run"
    )
    parser.add_argument("--rerun", default="", help="regular expression: cases of --resume to run again")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return 0
    if not args.out:
        parser.error("--out is required")
    tune = {k: int(v) for k, v in (item.split("=") for item in args.tune)}
    os.environ[TUNE_ENV] = json.dumps(tune)
    cases = [c for c in SUBSETS[args.subset]() if re.search(args.filter, c["id"])]
    by_id = {c["id"]: c for c in cases}
    assert len(by_id) == len(cases), "case ids must be unique"
    results = resumed(args.resume, args.rerun, by_id) if args.resume else {}
    ordered = sorted((c for c in cases if c["id"] not in results), key=cost, reverse=True)
    n_groups = -(-len(ordered) // args.group)
    work: queue.Queue = queue.Queue()
    for i in range(n_groups):  # every group mixes heavy and light cases, so the groups cost about the same
        work.put(ordered[i::n_groups])
    workdir = tempfile.mkdtemp(prefix="gpu_sweep_")  # group files and child stderr
    lock = threading.Lock()
    start = time.time()
    env = environment(args.commit)
    for res in results.values():
        res.setdefault("commit", "unknown")
    report = {
        "env": env,
        "resumed_from": args.resume,
        "subset": args.subset,
        "filter": args.filter,
        "tune": tune,
        "tolerances": TOLERANCES,
        "cases": [],
        "summary": {},
    }

    def save():
        report["cases"] = [{**c, **results[c["id"]]} for c in cases if c["id"] in results]
        report["summary"] = summarize(cases, results, time.time() - start)
        bench_env.write_json(args.out, report)

    def log(msg):
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    def worker():
        while True:
            try:
                group = work.get_nowait()
            except queue.Empty:
                return
            got = run_group(group, workdir, args.timeout, log)
            with lock:
                for c in group:
                    if c["id"] in got:
                        results[c["id"]] = {**verdict(c, got[c["id"]]), "commit": env["commit"]}
                        res = results[c["id"]]
                        worst = f"{res['worst']:.2e}" if "worst" in res else res.get("message", "")[:160]
                        log(f"{res['status']:7s} {c['id']} {worst}")
                rest = [c for c in group if c["id"] not in got]
                if rest:
                    work.put(rest)
                save()

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    save()
    summary = report["summary"]
    print(json.dumps({k: summary[k] for k in ("n_cases", "counts", "wall_seconds")}), flush=True)
    print(json.dumps(summary["worst"], indent=1), flush=True)
    return 0 if summary["counts"].get("pass", 0) == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
