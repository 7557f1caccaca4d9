"""Registers, spills, shared memory, pipelined loads (async copies) and ptxas's wgmma-serialization warning
(C7514) of our kernels compiled for sm_90a, without a GPU: the default launches and the TUNE variants of
triton_utils (par_bk, bwd_local_dx, fwd_local_p), bf16, K = V = 128.

    python benchmarks/compile_report.py [R]
    python benchmarks/compile_report.py --scan-model   # triton_utils.ScanTiles.shared against the compiler

Uses Triton's bundled ptxas (`ptxas-blackwell` understands the PTX version recent Triton emits). The local
Triton may be newer than the GPU image's, so counts can differ there: run it with the image's Triton 3.6.
"""

import inspect
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from modeling_parallelflow import triton_chunk_bwd, triton_chunk_fwd  # noqa: E402
from modeling_parallelflow.triton_utils import TUNE, ScanTiles, scan_launch  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
INT_ARGS = {"chunk_seq", "chunk_tok", "cu", "chunk_off"}
SCALAR_INT_ARGS = {"k_len", "v_len"}
TRITON_TYPE = {torch.bfloat16: "bf16", torch.float32: "fp32"}
FP32_ARGS = {"scratch", "ht", "h0", "dh0", "dht", "dbeta"}


def report(label, fn, consts, num_warps=4, num_stages=2, states="bf16", dtype="bf16"):
    """Compile fn as a launch would: every pointer (and the integer scalars, 128 here) specialized as
    divisible by 16, which Triton does for torch's allocations. Without that the loads are neither vectorized
    nor pipelined, and the counts are those of another program (up to 2.5 KB of spills per thread that the
    real launches do not have)."""
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name == "scale":
            sig[name] = "fp32"
            continue
        if name in SCALAR_INT_ARGS:
            sig[name] = "i32"
        elif name in INT_ARGS:
            sig[name] = "*i32"
        elif name in FP32_ARGS:
            sig[name] = "*fp32"
        elif name in ("states", "dstates"):
            sig[name] = f"*{states}"
        else:
            sig[name] = f"*{dtype}"
        attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        open(path, "w").write(kernel.asm["ptx"])
        info = subprocess.run(
            [PTXAS, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        ).stderr
    spills = [
        ln.split("info    :")[-1].strip() for ln in info.splitlines() if "spill" in ln or "registers" in ln
    ]
    serialized = "serialized" in info  # ptxas C7514: wgmma waits inserted, the dots no longer overlap
    copies = kernel.asm["ttgir"].count("async_copy_global_to_local")
    print(
        f"{label:34s} warps={num_warps} shared={kernel.metadata.shared:6d} async copies={copies:2d} "
        f"wgmma serialized={int(serialized)} | " + " | ".join(spills)
    )
    return kernel.metadata.shared


def check_scan_model():
    """triton_utils.ScanTiles.shared against the compiler, for the three sequential scans (the forward's with
    o, its states-only rerun, dh) at the launch settings scan_launch picks (stages, query tiles ahead) for the
    given V block and grid size."""
    for dtype, k_dim, rank, bv, programs in (
        (torch.bfloat16, 128, 1, 64, 512),
        (torch.bfloat16, 128, 1, 32, 128),
        (torch.bfloat16, 128, 4, 64, 512),
        (torch.bfloat16, 64, 2, 64, 256),
        (torch.bfloat16, 256, 1, 32, 512),
        (torch.float32, 128, 1, 64, 512),
        (torch.float32, 128, 1, 16, 32),
        (torch.float32, 64, 1, 64, 256),
    ):
        chunk = max(16, 64 // rank)
        crp, cq = max(16, triton.next_power_of_2(chunk * rank)), max(16, chunk)
        base = dict(H=16, K=k_dim, V=k_dim, R=rank, C=chunk, CQ=cq, CRP=crp, BK=k_dim, BV=bv, PREC="tf32")
        fwd = dict(base, HAS_H0=False, STORE_HT=True, LOAD_P=False, FROM_T=True, BETA=True)
        scans = (
            ("fwd", "o", dict(fwd, STORE_STATES=False, WRITE_O=True), cq, 0),
            ("fwd", "st", dict(fwd, STORE_STATES=True, WRITE_O=False), 0, 0),
            ("dh", "--", dict(base, HAS_DH0=True, HAS_DHT=False, LOCAL_DX=False, BETA=True), cq, cq),
        )
        for kernel, what, consts, query_rows, v_rows in scans:  # what: o, states only (st), -- (dh)
            tiles = ScanTiles(crp, query_rows, v_rows, k_dim, bv, dtype, from_t=True)
            stages, ahead = scan_launch(tiles, programs, 132, may_load_ahead=kernel == "fwd")
            if stages < 2:
                continue  # one stage: nothing pipelined, the model does not apply
            model = tiles.shared(stages, ahead)
            name = TRITON_TYPE[dtype]
            label = f"{kernel} {what} {name} K={k_dim} R={rank} BV={bv} stages={stages} ahead={ahead:d}"
            fn = triton_chunk_fwd._fwd_scan_kernel if kernel == "fwd" else triton_chunk_bwd._bwd_dh_kernel
            consts = dict(consts, QUERY_AHEAD=ahead) if kernel == "fwd" else consts
            compiled = report(label, fn, consts, num_stages=stages, dtype=TRITON_TYPE[dtype])
            print(
                f"    model {model} bytes, compiled {compiled}" + ("" if model == compiled else " (differs)")
            )


def main():
    if sys.argv[1:] == ["--scan-model"]:
        return check_scan_model()
    rank = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    chunk = max(16, 64 // rank)
    crp = max(16, triton.next_power_of_2(chunk * rank))
    base = dict(H=16, K=128, V=128, R=rank, C=chunk, CQ=max(16, chunk), CRP=crp, BK=128, PREC="tf32")
    wu = dict(base, BV=32, BKS=32, LOG_NB=(crp // 16).bit_length() - 1, PRODUCT=False, COMPUTE_WU=True)
    wu.update(BETA=True, INV_PREC="tf32", LOW_DOTS=True)
    del wu["CQ"]
    report("_wu_kernel", triton_chunk_fwd._wu_kernel, wu)
    # the sequential kernels' pipeline as launched at 16384 x 2 (128 programs)
    cq = max(16, chunk)

    def seq_launch(bv, v_rows):  # (stages, ahead); W, B and Q tiles; v_rows: dO in the dh kernel
        tiles = ScanTiles(crp, cq, v_rows, 128, bv, torch.bfloat16, from_t=True)
        return scan_launch(tiles, 128, 132, v_rows == 0)

    scan = dict(base, HAS_H0=False, STORE_HT=True, STORE_STATES=False, WRITE_O=True, FROM_T=True, BETA=True)
    for bv, warps in ((64, 4), (64, 8), (32, 4), (16, 4)):  # BV 16: few (sequence, head) pairs, 16384 x 2
        stages, ahead = seq_launch(bv, 0)
        for load_p in (False, True):
            report(
                f"_fwd_scan_kernel BV={bv} LOAD_P={int(load_p)}",
                triton_chunk_fwd._fwd_scan_kernel,
                dict(scan, BV=bv, LOAD_P=load_p, QUERY_AHEAD=ahead),
                num_warps=warps,
                num_stages=stages,
            )
    local_p = {k: base[k] for k in ("H", "K", "R", "C", "CQ", "CRP", "PREC")}
    report("_fwd_local_p_kernel", triton_chunk_fwd._fwd_local_p_kernel, dict(local_p, BK=64))
    for bv, warps in ((64, 4), (64, 8), (32, 4), (16, 4)):
        stages, _ = seq_launch(bv, cq)
        for local in (False, True):
            report(
                f"_bwd_dh_kernel BV={bv} LOCAL_DX={int(local)}",
                triton_chunk_bwd._bwd_dh_kernel,
                dict(base, BV=bv, HAS_DH0=True, HAS_DHT=False, LOCAL_DX=local, BETA=True),
                num_warps=warps,
                num_stages=stages,
            )
    report("_bwd_local_dx_kernel", triton_chunk_bwd._bwd_local_dx_kernel, dict(base, BK=64, BV=64))
    for bk, warps in ((64, 4), (64, 8), (128, 4), (128, 8)):
        report(
            f"_bwd_chunk_kernel BK={bk}",
            triton_chunk_bwd._bwd_chunk_kernel,
            dict(base, BK=bk, BV=32, PRODUCT=False, BETA=True),
            num_warps=warps,
            num_stages=TUNE["par_stages"],
        )


if __name__ == "__main__":
    main()
