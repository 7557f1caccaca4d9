"""Registers, spills, shared memory, pipelined loads (async copies) and ptxas's wgmma-serialization warning
(C7514) of our kernels compiled for sm_90a, without a GPU: the default launches and the TUNE variants of
triton_utils (par_bk, bwd_local_dx, fwd_local_p), bf16, K = V = 128.

    python benchmarks/compile_report.py [R]

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
from modeling_parallelflow.triton_utils import TUNE, scan_stages  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
INT_ARGS = {"chunk_seq", "chunk_tok", "cu", "chunk_off"}
SCALAR_INT_ARGS = {"k_len", "v_len"}
FP32_ARGS = {"tmat", "ht", "h0", "dh0", "dht", "dbeta"}


def report(label, fn, consts, num_warps=4, num_stages=2, states="bf16"):
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
            sig[name] = "*bf16"
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


def main():
    rank = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    chunk = max(16, 64 // rank)
    crp = max(16, triton.next_power_of_2(chunk * rank))
    base = dict(H=16, K=128, V=128, R=rank, C=chunk, CQ=max(16, chunk), CRP=crp, BK=128, PREC="tf32")
    wu = dict(base, BV=32, BKS=32, LOG_NB=(crp // 16).bit_length() - 1, PRODUCT=False, COMPUTE_WU=True)
    wu.update(LOAD_T=False, BETA=True, INV_PREC="tf32", LOW_DOTS=True)
    del wu["CQ"]
    report("_wu_kernel", triton_chunk_fwd._wu_kernel, wu)
    # the sequential kernels' pipeline as launched at 16384 x 2 (128 programs)
    cq = max(16, chunk)

    def seq_stages(bv, v_rows):  # W, B and Q tiles; v_rows: dO in the dh kernel
        return scan_stages(crp, cq, v_rows, 128, bv, torch.bfloat16, programs=128, sms=132)

    scan = dict(base, HAS_H0=False, STORE_HT=True, STORE_STATES=False, WRITE_O=True)
    for bv, warps in ((64, 4), (64, 8), (32, 4), (16, 4)):  # BV 16: few (sequence, head) pairs, 16384 x 2
        for load_p in (False, True):
            report(
                f"_fwd_scan_kernel BV={bv} LOAD_P={int(load_p)}",
                triton_chunk_fwd._fwd_scan_kernel,
                dict(scan, BV=bv, LOAD_P=load_p),
                num_warps=warps,
                num_stages=seq_stages(bv, 0),
            )
    local_p = {k: base[k] for k in ("H", "K", "R", "C", "CQ", "CRP", "PREC")}
    report("_fwd_local_p_kernel", triton_chunk_fwd._fwd_local_p_kernel, dict(local_p, BK=64))
    for bv, warps in ((64, 4), (64, 8), (32, 4), (16, 4)):
        for local in (False, True):
            report(
                f"_bwd_dh_kernel BV={bv} LOCAL_DX={int(local)}",
                triton_chunk_bwd._bwd_dh_kernel,
                dict(base, BV=bv, HAS_DH0=True, HAS_DHT=False, LOCAL_DX=local),
                num_warps=warps,
                num_stages=seq_stages(bv, cq),
            )
    report("_bwd_local_dx_kernel", triton_chunk_bwd._bwd_local_dx_kernel, dict(base, BK=64, BV=64))
    for bk, warps in ((64, 4), (64, 8), (128, 4), (128, 8)):
        report(
            f"_bwd_chunk_kernel BK={bk}",
            triton_chunk_bwd._bwd_chunk_kernel,
            dict(base, BK=bk, BV=32, PRODUCT=False, BETA=True, REUSE_DU=True),
            num_warps=warps,
            num_stages=TUNE["par_stages"],
        )


if __name__ == "__main__":
    main()
