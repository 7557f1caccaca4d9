"""Host helpers shared by the Triton delta-rule kernels: chunk choice, chunk map, dot precision.

Every chunked kernel works on the varlen layout: tokens flattened to [TT, H, ...] (TT = B * T) and
sequence offsets `cu` [N + 1] (int32). A plain batch is the varlen case cu = [0, T, 2T, ..., B*T].
Chunks never straddle a sequence boundary; global chunk g of sequence n, local chunk i, is
g = chunk_off[n] + i, and per-chunk buffers (states, inverses) are indexed by g.
"""

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from .packed import PackedSequences

MAX_RANK = 8
# Set to "1" (tests, benchmarks/gpu_sweep.py): launchers allocate outputs and scratch NaN-filled, so an
# element a kernel forgets to write shows up as a NaN instead of stale memory.
POISON_ENV = "PFLOW_TRITON_POISON"
MAX_HEAD_DIM = 256
# sm_90 shared memory per multiprocessor, and what the driver reserves per resident program (scan_launch)
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_PROGRAM = 1024
# Launch settings; benchmarks/profile_kernels.py overrides entries to compare variants. Defaults measured
# on an H100 (benchmarks/README.md).
TUNE = {
    "cr_target": 64,  # C * R rows per chunk (cr128 measured 3x slower at R = 4)
    "wu_warps": 4,
    # 8: R = 1 fwd+bwd 3.62 -> 3.85 ms. 8 for the dh scan alone (H200, 794bcb6, 2048 x 16, dh kernel): R = 1
    # 0.468 -> 0.491 ms, R = 4 1.086 -> 1.796, R = 8 2.958 -> 2.218, and illegal memory accesses in the
    # sweep (fp32, K = 256): benchmarks/results/h200_table_794bcb6/.
    "scan_warps": 4,
    # pipeline stages of the sequential scans, where shared memory allows (scan_stages). H200 at 0457324,
    # 16384 x 2 fwd+bwd: with V blocks of 32 (scan_min_programs 128) 2 -> 3 takes R = 1 from 3.860 to 3.427 ms
    # and R = 4 from 13.66 to 12.19; with V blocks of 16 (256 programs) it is slower (3.806 -> 4.186).
    "scan_stages": int(os.environ.get("PFLOW_SCAN_STAGES", "3")),
    # 1: the forward scan may load its Q tiles one chunk ahead, into registers (scan_launch)
    "scan_ahead": int(os.environ.get("PFLOW_SCAN_AHEAD", "1")),
    # largest V block of the sequential kernels (scan_block_v). 32 halves their fp32 state tile but doubles
    # the V blocks that recompute P, unless fwd_local_p and bwd_local_dx take P out of the scans.
    "scan_bv": 64,
    # scan_block_v halves the V block (down to 16) until the sequential kernels run this many programs. At
    # 16384 x 2, H = 16 (32 (sequence, head) pairs) 256 gives V blocks of 16, and each block loads W and B of
    # every chunk again: H200 at 432dfee, a states-only scan took 0.56 ms there against 0.27 at 2048 x 16.
    # At a3b8d7f (16384 x 2, fwd+bwd, R = 1 / R = 4, 2-stage scans): 256 3.875 / 14.33 ms, 128 3.891 / 13.73,
    # 64 4.065 / 14.33; 128 with 3-stage scans: above at scan_stages.
    "scan_min_programs": int(os.environ.get("PFLOW_SCAN_MIN_PROGRAMS", "128")),
    "par_warps": 4,  # 8: R = 1 fwd+bwd 3.31 -> 3.62 ms, R = 4 9.76 -> 12.09 ms
    "par_bv": 32,
    # K tile of the backward chunk kernel (at least 32, at most K rounded up). At K = 128, 64 computes du and
    # re-reads X, dX and dO once per K tile; 128 does it once, at the price of three [C*R, 128] fp32
    # accumulators in registers. H200 at 16d3764, with 8 warps: R = 1 fwd+bwd 2.87 -> 3.29 ms; over 227 KiB
    # of shared memory at K = 256 or at R = 8, K = 128.
    "par_bk": 64,
    # 1: dX's local part scale P^T dO comes from a chunk-parallel kernel before the sequential backward scan,
    # which then computes P = (Q B^T) * M_out no more: every V block of a (sequence, head) recomputed it, and
    # few (sequence, head) pairs split V into blocks of 16 (16384 x 2). H200 at 16d3764: R = 1 fwd+bwd
    # 2.87 -> 3.09 ms at 2048 x 16, 3.69 -> 3.90 at 16384 x 2.
    "bwd_local_dx": int(os.environ.get("PFLOW_BWD_LOCAL_DX", "0")),
    # 1: the forward scan reads P = (Q B^T) * M_out from one chunk-parallel launch instead of computing it for
    # every V block (the same redundancy; the measured split of e109a40 moved all of o out of the scan, this
    # keeps o in it). H200 at 16d3764, 16384 x 2: R = 1 fwd 1.29 -> 1.92 ms; R = 4 fwd+bwd 13.62 -> 13.25.
    "fwd_local_p": int(os.environ.get("PFLOW_FWD_LOCAL_P", "0")),
    # pipeline stages of the backward chunk kernel. H200 at 0457324, 2048 x 16 / 16384 x 2 fwd+bwd: 2 -> 3
    # takes R = 1 from 2.988 to 2.819 / 3.808 to 3.628 ms (the kernel 1.066 -> 0.904), R = 4 9.69 -> 9.08 /
    # 14.11 -> 13.52. ptxas serializes its wgmma either way (C7514, benchmarks/compile_report.py); leaving
    # the first V loop unpipelined removes that but measured slower (2.877 / 3.685 ms, R = 4 9.54 / 13.97),
    # and is gone.
    "par_stages": int(os.environ.get("PFLOW_PAR_STAGES", "3")),
    # 1: the backward recomputes the chunk states and X with one more forward scan instead of keeping them
    # and keeps U (activation memory -4 KiB per token per layer at R = 1, K = V = 128; -16 at R = 4:
    # benchmarks/activation_census.py). Measured on an H200 at de8b259, 340M training step at 2048 x 16:
    # R = 1 125.6K -> 135.7K tokens/s, 40.5 -> 37.7 GiB; R = 4 65.3K -> 64.1K, 84.6 -> 73.4 GiB.
    "recompute_states": int(os.environ.get("PFLOW_RECOMPUTE_STATES", "1")),
    # 1: the forward does not keep the fp32 inverses T [G, H, CRP, CRP] (C * R * 4 bytes per token and head);
    # the backward recomputes them with one chunk-parallel launch, as it does for the sigdelta solver.
    "recompute_inverses": int(os.environ.get("PFLOW_RECOMPUTE_INVERSES", "0")),
    # The short conv's backward (triton_conv): token rows per tile (0: 4096 / K rounded, 16 to 64) and warps
    # of its two launches. At the 1.3B shape they took 54 of ~560 ms of a training step (H200, b76ce2f).
    # `benchmarks/bench_conv.py` (H200, 54695e7): 2 warps for `_dx_kernel` instead of 4 take the backward
    # from 3.30 to 2.27 ms (summed over its 6 shapes), and the 1.3B step from 57.4K to 58.6K tokens/s. A
    # one-launch variant that recomputed dc for each tap's rows measured slower (58.0K -> 54.4K) and is gone.
    "conv_block_t": int(os.environ.get("PFLOW_CONV_BLOCK_T", "0")),
    "conv_dc_warps": int(os.environ.get("PFLOW_CONV_DC_WARPS", "4")),
    "conv_dx_warps": int(os.environ.get("PFLOW_CONV_DX_WARPS", "2")),
}


def new_tensor(shape, *, dtype, device) -> torch.Tensor:
    """torch.empty(shape), or NaN-filled when $PFLOW_TRITON_POISON is "1"."""
    if os.environ.get(POISON_ENV) == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_like(x: torch.Tensor) -> torch.Tensor:
    return new_tensor(x.shape, dtype=x.dtype, device=x.device)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pick_chunk(chunk_size: int, rank: int, dtype: torch.dtype | None = None) -> int:
    """Token chunk C actually used: min(chunk_size, largest power of two <= cr_target / R), at least 16.

    R = 1 -> 64, R = 2 -> 32, R >= 3 -> 16 (C * R padded to the next power of two inside the kernels).
    float32 inputs at R >= 5 take C = 8 (64 rows): their 128-row fp32 tiles exceed the shared memory of an
    sm_90 GPU; the kernels pad query tiles to 16 rows.
    """
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the Triton kernels, got {chunk_size}")
    smallest = 8 if dtype == torch.float32 else 16
    by_rank = max(smallest, 1 << ((TUNE["cr_target"] // rank).bit_length() - 1))
    return min(chunk_size, by_rank)


@dataclasses.dataclass(frozen=True)
class ScanTiles:
    """What a sequential scan holds in shared memory, per chunk: W and B [rows, k_block], or with `from_t`
    B and the inverse T [rows, rows]; Q [query_rows, k_block] (0 where the kernel reads no Q);
    `v_rows` rows of [v_block] (dO in the dh kernel); beside them the state and X operands,
    (k_block + rows) x v_block. Elements of `dtype`."""

    rows: int
    query_rows: int
    v_rows: int
    k_block: int
    v_block: int
    dtype: torch.dtype
    from_t: bool = False

    def shared(self, stages: int, ahead: bool = False) -> int:
        """Bytes of shared memory at `stages` >= 2 pipeline stages, as Triton 3.6 lays them out for sm_90:
        each stage holds W, B and the query-side tiles (Q, the v_rows); with `ahead` those are loaded one
        chunk ahead into registers (`token_tile`) instead and held once, as are the state and X operands.
        With `from_t` a stage holds B, T and the [rows, v_block] tile of U~ or v instead of W, and the
        forward scans hold the operands (A h + U~) and X once. `benchmarks/compile_report.py --scan-model`
        compares it with the compiler's: bf16 exact at R = 1, K = 128 (V blocks of 64) and from 4 KB under
        to 20 KB over elsewhere; fp32 from 4 KB under to 48 KB over."""
        query = self.query_rows * self.k_block + self.v_rows * self.v_block
        item = self.dtype.itemsize
        if self.from_t:
            # B and T, and the forward scans' U~ or v
            tiles = self.rows * (self.k_block + self.rows + (0 if self.v_rows else self.v_block))
            per_stage = (tiles + (0 if ahead else query)) * item
            # the dh kernel's state and du operands; the forward scans' (A h + U~) and X
            operands = (self.k_block + self.rows if self.v_rows else 2 * self.rows) * self.v_block
            return stages * per_stage + (operands + (query if ahead else 0)) * item
        per_stage = 2 * self.rows * self.k_block + (0 if ahead else query)
        once = (self.k_block + self.rows) * self.v_block + (query if ahead else 0)
        return (stages * per_stage + once) * item


def scan_launch(tiles: ScanTiles, programs: int, sms: int, may_load_ahead: bool = False) -> tuple[int, bool]:
    """(pipeline stages, query tiles ahead) of a sequential scan with `tiles` on a grid of `programs` on `sms`
    multiprocessors.

    Stages: TUNE["scan_stages"] (3), unless 3 stages pass 180 KB, or the grid has more programs than fit on
    the GPU at once with them while 2 stages would fit more: then 2. H200, fwd+bwd, 2 against 3 stages:
    - R = 4 at 2048 x 16 (512 programs; 94 against 131 KB of shared memory, 2 against 1 per multiprocessor):
      9.08 ms (0457324) against 9.68 (6075f75);
    - R = 4 at 16384 x 2 (128 programs): 12.86 against 11.52 (6075f75, one run);
    - R = 1 at 2048 x 16, the backward's states-only scan (no Q): 90 KB at 2 stages, two programs per
      multiprocessor, against 123 KB at 3 (ef6dd95: fwd+bwd 2.755 -> 2.639 ms).
    Float32 inputs where one stage reaches 96 KB take 1, since two pass the 227 KB of shared memory of an
    sm_90 GPU (K = 128 at R = 1, K = 256). Measured with Triton 3.6 on an H200: one stage is correct for
    fp32 there, but for bf16 / fp16 it is compiled into illegal accesses (K = 256; at 0457324 also K = 128,
    16384 x 2), so those keep at least two (and `needs_fp32` keeps them off 128-row chunks at K > 128).

    Ahead (`may_load_ahead`: the forward scan, with TUNE["scan_ahead"]): 2 stages with the query tiles loaded
    one chunk ahead, where the grid has more programs than fit at once and that fits more per multiprocessor.
    R = 1, K = 128 at 2048 x 16: the scan with o 123 -> 105 KB, one program per multiprocessor -> two, 0.612
    -> 0.554 ms (H200). Only there: it costs registers, and where tiles are large (K = 256, fp32) ptxas
    spills them.
    """

    def held(n, ahead=False):  # one program's shared memory at n stages
        return tiles.shared(n, ahead) + SHARED_RESERVED_PER_PROGRAM

    per_stage = held(1) - held(0)
    if tiles.dtype == torch.float32 and per_stage >= 96 * 1024:
        return 1, False
    stages = TUNE["scan_stages"]
    if stages > 2:
        resident = [SHARED_PER_SM // held(n) for n in (2, stages)]
        if stages * per_stage > 180 * 1024 or (programs > sms * resident[1] and resident[1] < resident[0]):
            stages = 2
    resident = SHARED_PER_SM // held(stages)
    if may_load_ahead and tiles.query_rows and programs > sms * resident:
        if SHARED_PER_SM // held(2, ahead=True) > resident:
            return 2, True
    return stages, False


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 / H200; that for the CPU interpreter)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def needs_fp32(rank: int, k_dim: int, dtype: torch.dtype) -> bool:
    """bf16 / fp16 chunks at R >= 5 have 128 rows (C = 16); with K > 128 two-stage scans of them pass shared
    memory and one-stage ones are miscompiled (Triton 3.6, sm_90). The chunked kernels then run in float32
    (C = 8, 64 rows: measured correct), the inputs cast up and the outputs back."""
    return dtype != torch.float32 and rank >= 5 and next_pow2(k_dim) > 128


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get near-fp32 tensor-core dots (3xTF32); bf16/fp16 dots ignore the setting."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def seq_offsets(batch: int, seq_len: int, cu_seqlens, device) -> torch.Tensor:
    """cu [N + 1] int32 over the flattened token axis; cu_seqlens: None (plain batch), a tensor [N + 1] or a
    PackedSequences (its int32 cu_seqlens, already on the device)."""
    if isinstance(cu_seqlens, PackedSequences):
        return cu_seqlens.cu_seqlens
    if cu_seqlens is not None:
        return cu_seqlens.to(device=device, dtype=torch.int32)
    return torch.arange(0, batch + 1, device=device, dtype=torch.int32) * seq_len


def varlen_layout(batch: int, seq_len: int, cu_seqlens, chunk: int, device):
    """(cu [N + 1] int32, chunk map of `chunk_map`) of a plain batch (cu_seqlens None), of a cu_seqlens
    tensor (built here, no host sync) or of a PackedSequences (its cached map: built once per chunk size)."""
    cu = seq_offsets(batch, seq_len, cu_seqlens, device)
    if isinstance(cu_seqlens, PackedSequences):
        return cu, cu_seqlens.chunk_map(chunk)
    plain_len = None if cu_seqlens is not None else seq_len
    return cu, chunk_map(cu, batch * seq_len, chunk, cu.numel() - 1, plain_len)


def chunk_map(cu: torch.Tensor, total_tokens: int, chunk: int, n_seq: int, seq_len: int | None):
    """(chunk_seq [G], chunk_tok [G], chunk_off [N + 1]) without a host sync.

    G = total_tokens // C + N bounds the number of chunks (exact for a plain batch); surplus chunks get
    a start token at or past their sequence's end, so the kernels mask every row of them away.
    """
    device = cu.device
    if seq_len is not None:  # plain batch: every sequence has ceil(T / C) chunks
        per = triton.cdiv(seq_len, chunk)
        g = torch.arange(n_seq * per, device=device, dtype=torch.int32)
        seq = g // per
        tok = seq * seq_len + (g % per) * chunk
        off = torch.arange(n_seq + 1, device=device, dtype=torch.int32) * per
        return seq, tok.to(torch.int32), off
    lens = cu[1:] - cu[:-1]
    off = torch.zeros(n_seq + 1, device=device, dtype=torch.int32)
    off[1:] = torch.cumsum((lens + chunk - 1) // chunk, 0)
    g = torch.arange(total_tokens // chunk + n_seq, device=device, dtype=torch.int32)
    seq = torch.searchsorted(off[1:].contiguous(), g, right=True).clamp_(max=n_seq - 1).to(torch.int32)
    tok = cu[seq.long()] + (g - off[seq.long()]) * chunk
    return seq, tok.to(torch.int32), off


@triton.jit
def chunk_rows(t0, eos, h, H: tl.constexpr, R: tl.constexpr, C: tl.constexpr, CRP: tl.constexpr):
    """Rows (t, r) of the chunk starting at token t0, flattened t-major: j = t * R + r, padded to CRP.

    Returns the token-in-chunk of each row [CRP], the row offset into a [TT, H, R, *] tensor (int64)
    and the validity mask (inside the chunk and before the sequence end eos).
    """
    j = tl.arange(0, CRP)
    t = j // R
    tok = t0 + t
    valid = (j < C * R) & (tok < eos)
    row = (tok.to(tl.int64) * H + h) * R + j % R
    return t, row, valid


@triton.jit
def scale_rows(x, col):
    """x [ROWS, N] times col [ROWS] (fp32) per row, in x's dtype: the drivers a = -beta k and u = beta v of
    the beta form, built in registers (rounded as `ops.beta_drivers` rounds them)."""
    return (col[:, None] * x.to(tl.float32)).to(x.dtype)


@triton.jit
def token_tile(
    x, t0, eos, h, cols, col_mask, H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, CQ: tl.constexpr
):
    """x [TT, H, D] rows of the C tokens from t0, columns cols: a [CQ, len(cols)] tile, zero at padding rows
    (CQ > C) and at tokens from eos on. The forward scan can load its Q tiles one chunk ahead with it, into
    registers, outside its pipeline stages (`scan_launch`)."""
    cidx = tl.arange(0, CQ)
    tok = t0 + cidx
    rows = tok.to(tl.int64) * H + h
    mask = ((tok < eos) & (cidx < C))[:, None] & col_mask[None, :]
    return tl.load(x + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
