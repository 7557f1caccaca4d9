"""Registers, spills and shared memory of our kernels compiled for sm_90a, without a GPU.

    python benchmarks/compile_report.py [R] [num_warps_par]

Uses Triton's bundled ptxas (`ptxas-blackwell` understands the PTX version recent Triton emits).
"""

import inspect
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from modeling_parallelflow import triton_chunk_bwd, triton_chunk_fwd  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
INT_ARGS = {"chunk_seq", "chunk_tok", "cu", "chunk_off"}
FP32_ARGS = {"tmat", "ht", "h0", "dh0", "dht", "scale"}


def report(fn, consts, num_warps=4, num_stages=2, states="bf16"):
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in INT_ARGS:
            sig[name] = "*i32"
        elif name in FP32_ARGS:
            sig[name] = "*fp32"
        elif name in ("states", "dstates"):
            sig[name] = f"*{states}"
        else:
            sig[name] = "*bf16"
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts),
        target=GPUTarget("cuda", 90, 128),
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
    lines = [
        ln.split("info    :")[-1].strip() for ln in info.splitlines() if "spill" in ln or "registers" in ln
    ]
    print(f"{fn.fn.__name__:18s} warps={num_warps} shared={kernel.metadata.shared:6d} | " + " | ".join(lines))


def main():
    rank = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    par_warps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    chunk = max(16, 64 // rank)
    crp = max(16, triton.next_power_of_2(chunk * rank))
    base = dict(H=16, K=128, V=128, R=rank, C=chunk, CRP=crp, BK=128)
    report(
        triton_chunk_fwd._wu_kernel,
        dict(
            base,
            BV=32,
            BKS=32,
            LOG_NB=(crp // 16).bit_length() - 1,
            PRODUCT=False,
            COMPUTE_WU=True,
            PREC="tf32",
            INV_PREC="tf32",
        ),
    )
    report(
        triton_chunk_fwd._fwd_scan_kernel,
        dict(base, BV=64, HAS_H0=False, STORE_HT=True, STORE_STATES=True, PREC="tf32"),
    )
    report(triton_chunk_bwd._bwd_dh_kernel, dict(base, BV=64, HAS_DH0=True, HAS_DHT=False, PREC="tf32"))
    report(
        triton_chunk_bwd._bwd_chunk_kernel,
        dict(base, BK=64, BV=32, PRODUCT=False, PREC="tf32"),
        num_warps=par_warps,
    )


if __name__ == "__main__":
    main()
