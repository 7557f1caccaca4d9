"""Entry point of the Triton backend: `triton_delta_rule_drivers` (autograd-aware) and the decode step.

Layers: @triton.jit kernels (triton_chunk_fwd / triton_chunk_bwd / triton_recurrent) -> launchers
(tensors in, tensors out) -> `_ChunkDeltaRule` (autograd.Function) -> `run_drivers` (what ops.py calls,
after validating) and `triton_delta_rule_drivers` (direct entry: cheap option checks, then `run_drivers`).

Recompute vs save: under autograd the forward keeps the inverses T (no solve in the backward; with
TUNE["recompute_inverses"] they are formed again there) and, by default (TUNE["recompute_states"]), u and
h0, from which the backward reruns the scan for the state entering every chunk ([G, H, K, V], bf16 for bf16
inputs, else fp32) and the corrected values X [B, T, H, R, V]; with it off the forward writes those instead.
tensorInv forms neither W = T A nor U = T U~ (up to 64 rows a chunk, `_Plan.x_from_t`): the scans take T
itself. Where W and U are formed (another solver, sigdelta; tensorInv at 128 rows) the forward keeps them for
the rerun, and for another solver the backward forms T with one chunk-parallel launch.
The public op's beta form (`run_drivers(..., beta=beta)`, from `ops.delta_rule`) goes to the kernels as
k, v and beta: the W/U and backward kernels build a = -beta k and u = beta v in registers and the
backward kernel returns dk, dv and dbeta, so the drivers and their gradients never reach HBM.
Without autograd nothing beyond o and the final state is written to HBM.
"""

import torch

from .ops import beta_drivers

try:
    from .triton_chunk_bwd import launch_chunk_bwd
    from .triton_chunk_fwd import launch_fwd_scan, launch_wu, tensor_inv_wu
    from .triton_recurrent import launch_recurrent_
    from .triton_utils import (
        MAX_HEAD_DIM,
        MAX_RANK,
        TUNE,
        needs_fp32,
        next_pow2,
        pick_chunk,
        seq_offsets,
        varlen_layout,
    )

    HAS_TRITON = True
except ImportError:  # the package imports without triton; the torch backend is then used
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "run_drivers",
    "tensor_inv_wu",
    "triton_delta_rule_drivers",
    "triton_recurrent_step_",
]

ALGORITHMS = ("auto", "tensor_inv", "sigdelta", "recurrent")


def _wu_solver(algorithm: str):
    """The W/U stage: tensor_inv_wu (default) or sigdelta_wu from triton_sigdelta.py."""
    if algorithm != "sigdelta":
        return None
    try:
        from .triton_sigdelta import sigdelta_wu
    except ImportError as err:
        raise NotImplementedError(
            "algorithm='sigdelta' on the Triton backend needs modeling_parallelflow/triton_sigdelta.py "
            "(sigdelta_wu), which is not available; use algorithm='tensor_inv' or backend='torch'"
        ) from err
    return sigdelta_wu


class _Plan:
    """Per-call constants: chunk, layout and chunk map (a plain batch is varlen with equal lengths).

    cu_seqlens: None, a tensor [N + 1] (map built here, no host sync) or a PackedSequences (its cached
    map, shared by every layer of a forward)."""

    def __init__(self, b, cu_seqlens, chunk_size, mode, scale):
        """b [B, T, H, R, K]: the keys (their shape and dtype decide the chunk)."""
        batch, seq_len, self.n_heads, self.rank, self.k_dim = b.shape
        self.batch, self.seq_len = batch, seq_len
        self.chunk = pick_chunk(chunk_size, self.rank, b.dtype)
        self.product = mode == "product"
        self.mode = mode
        self.scale = scale
        self.cu_seqlens = cu_seqlens
        self.cu, self.cmap = varlen_layout(batch, seq_len, cu_seqlens, self.chunk, b.device)
        self.n_seq = self.cu.numel() - 1
        # tensorInv's scans form X from T where a chunk has at most 64 rows (C * R padded). At 128 (R >= 5)
        # the scan with o spills registers at V blocks of 64 (176 bytes, compile_report.py), so W and U are
        # formed, as for another solver.
        self.x_from_t = next_pow2(self.chunk * self.rank) <= 64

    def flat(self, x):
        return x.reshape(self.batch * self.seq_len, *x.shape[2:]).contiguous()


def _wu(a, b, u, beta, plan: _Plan, **flags):
    """`launch_wu` on this call's chunk layout (drivers, or the beta form with a None)."""
    return launch_wu(a, b, u, plan.cu, plan.cmap, chunk=plan.chunk, product=plan.product, beta=beta, **flags)


def _forward(
    q,
    a,
    b,
    u,
    h0,
    plan: _Plan,
    solver,
    *,
    beta=None,
    store_ht: bool,
    for_backward: bool,
    keep_states: bool = True,
):
    """W/U stage, then the scan. Drivers (a, b, u) or the beta form (a None, b = k, u = v, beta [TT, H, R]:
    the kernels build the drivers in registers; another solver gets them built here). tensorInv forms only
    the inverses T, from which the scan forms X itself; W and U of another solver (or of tensorInv at 128
    rows a chunk) go to the scan as they are.
    for_backward with keep_states writes the chunk states and X; returns o, ht, (w, uu, xs, tmat, states)
    (w, uu None where the scan forms X from T: `_Plan.x_from_t`)."""
    if solver is None:
        w, uu, tmat = _wu(a, b, u, beta, plan, compute_wu=not plan.x_from_t)
    else:
        if beta is not None:
            a, u = beta_drivers(b, u, beta)
        shape5 = (plan.batch, plan.seq_len) + a.shape[1:]
        w, uu = solver(
            a.view(shape5),
            b.view(shape5),
            u.view(shape5[:-1] + u.shape[-1:]),
            mode=plan.mode,
            chunk_size=plan.chunk,
            cu_seqlens=plan.cu_seqlens,
        )
        w, uu, tmat = plan.flat(w), plan.flat(uu), None
    o, ht, states, xs = _scan(
        q,
        b,
        (a, u, beta, tmat) if w is None else (w, uu, None, None),
        h0,
        plan,
        store_ht=store_ht,
        store_states=for_backward and keep_states,
    )
    return o, ht, (w, uu, xs, tmat, states)


def _scan(q, b, x_from, h0, plan: _Plan, *, store_ht: bool, store_states: bool, need_o: bool = True):
    """The sequential scan: o [TT, H, V] (None unless need_o), ht, and with store_states the chunk states
    [G, H, K, V] (bf16 for bf16 inputs, else fp32) and X [TT, H, R, V]. x_from: (a, u, beta, T), X formed from
    the inverses T (a None in beta form, u = v), or (W, U, None, None)."""
    lhs, rhs, beta, tmat = x_from
    return launch_fwd_scan(
        q,
        b,
        lhs,
        rhs,
        plan.cu,
        plan.cmap,
        h0,
        chunk=plan.chunk,
        scale=plan.scale,
        out_dtype=rhs.dtype,
        store_ht=store_ht,
        store_states=store_states,
        write_o=need_o,
        n_chunks=plan.cmap[0].numel(),
        states_dtype=torch.bfloat16 if b.dtype == torch.bfloat16 else torch.float32,
        tmat=tmat,
        beta=beta,
    )


class _ChunkDeltaRule(torch.autograd.Function):
    """Drivers form: inputs q, a, b, u (beta None). Beta form: a None, b = k, u = v and beta [TT, H, R]: the
    kernels build a = -beta k and u = beta v in registers and return the gradients of k, v and beta, so
    neither the drivers nor their gradients reach HBM. With TUNE["recompute_states"] the backward reruns the
    scan for the chunk states and X, from the kept T (tensorInv; with TUNE["recompute_inverses"] T is formed
    again first) or from the kept W and U (another solver)."""

    @staticmethod
    def forward(ctx, q, a, b, u, beta, h0, plan, solver, store_ht):
        recompute = bool(TUNE["recompute_states"])
        o, ht, (w, uu, xs, tmat, states) = _forward(
            q,
            a,
            b,
            u,
            h0,
            plan,
            solver,
            beta=beta,
            store_ht=store_ht,
            for_backward=True,
            keep_states=not recompute,
        )
        kept_t = None if TUNE["recompute_inverses"] else tmat
        kept_wu = (w, uu) if recompute and w is not None else (None, None)
        kept_u = u if beta is not None or (recompute and w is None) else None  # dbeta's v; the rerun
        kept_h0 = h0 if recompute else None
        ctx.save_for_backward(q, a, b, kept_u, beta, kept_t, states, xs, *kept_wu, kept_h0)
        ctx.plan = plan
        ctx.h0_dtype = None if h0 is None else h0.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, a, b, u, beta, tmat, states, xs, w, uu, h0 = ctx.saved_tensors
        plan = ctx.plan
        if tmat is None:  # not kept (recompute_inverses) or another solver: one chunk-parallel launch
            _, _, tmat = _wu(a, b, None, beta, plan, compute_wu=False)
        if states is None:  # recompute: the same scan on the same inputs writes the same states and X
            x_from = (a, u, beta, tmat) if w is None else (w, uu, None, None)
            _, _, states, xs = _scan(q, b, x_from, h0, plan, store_ht=False, store_states=True, need_o=False)
        dq, d1, d2, d3, dh0 = launch_chunk_bwd(
            q,
            a,
            b,
            xs,
            do.contiguous(),
            states,
            tmat,
            plan.cu,
            plan.cmap,
            None if dht is None else dht.contiguous(),
            chunk=plan.chunk,
            scale=plan.scale,
            product=plan.product,
            need_dh0=ctx.h0_dtype is not None,
            beta=beta,
            v=None if beta is None else u,
        )
        dh0 = None if dh0 is None else dh0.to(ctx.h0_dtype)
        if beta is None:  # d1, d2, d3 = da, db, du
            return dq, d1, d2, d3, None, dh0, None, None, None
        # d1, d2, d3 = dk, dv, dbeta (fp32)
        return dq, None, d1, d2, d3.to(beta.dtype), dh0, None, None, None


def check_kernel_limits(rank: int, k_dim: int, v_dim: int) -> None:
    """The Triton kernels' own limits (the op's validation in ops.py does not know them): R, K and V."""
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"the Triton kernels support rank R in 1..{MAX_RANK}, got R={rank}")
    if k_dim > MAX_HEAD_DIM or v_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"the Triton kernels support head widths up to {MAX_HEAD_DIM}, got K={k_dim}, V={v_dim}"
        )


def _check(q, mode, algorithm, cu_seqlens):
    """Cheap argument checks (no host sync) for direct callers of `triton_delta_rule_drivers`; the op in
    ops.py validates everything itself and calls `run_drivers`."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton backend needs the `triton` package")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if mode not in ("sum", "product"):
        raise ValueError(f"mode must be 'sum' or 'product', got {mode!r}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got B={q.shape[0]}")


def triton_delta_rule_drivers(
    q,
    a,
    b,
    u,
    *,
    mode="sum",
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    chunk_size=64,
    algorithm="auto",
):
    """Rank-R delta rule on general drivers with the Triton kernels (direct entry: tests, benchmarks).

    q [B, T, H, K]; a, b [B, T, H, R, K]; u [B, T, H, R, V]; initial_state [N, H, K, V] (any float);
    cu_seqlens [N + 1] or a packed.PackedSequences (B = 1). Returns o [B, T, H, V] (dtype of u) and
    final_state [N, H, K, V] fp32 (or None). Per token (sum): h <- h + B_t (A_t^T h + U_t^T);
    o_t = scale h^T q_t after the update. chunk_size caps the token chunk C; C = min(chunk_size,
    max(16, pow2 <= 64 / R)) (8 for fp32 at R >= 5; triton_utils.pick_chunk). bf16 / fp16 inputs at
    R >= 5 with K > 128 run the fp32 kernels (triton_utils.needs_fp32); o keeps u's dtype.
    algorithm "recurrent" runs the token-by-token kernel (forward only, for decoding).

    Checks only the options, cheaply (no host sync: a cu_seqlens tensor's values are trusted); shapes,
    dtypes and cu_seqlens are validated by `ops.delta_rule_drivers`, the public op, which calls
    `run_drivers` directly.
    """
    _check(q, mode, algorithm, cu_seqlens)
    return run_drivers(
        q,
        a,
        b,
        u,
        mode=mode,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        algorithm=algorithm,
    )


def run_drivers(
    q,
    a,
    b,
    u,
    *,
    mode,
    scale,
    initial_state,
    output_final_state,
    cu_seqlens,
    chunk_size,
    algorithm,
    beta=None,
):
    """`triton_delta_rule_drivers` without its option checks. Internal: called by ops.py after the op
    validated every argument (cu_seqlens then arrives as a PackedSequences); checks the kernels' limits only.

    Beta form (ops.delta_rule): a None, b = k, u = v and beta [B, T, H, R], taken by the chunked kernels as
    is; the recurrent kernel gets the drivers built here.
    """
    check_kernel_limits(b.shape[3], b.shape[4], u.shape[4])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, a, b, u, beta, initial_state)
    )
    if beta is not None and algorithm == "recurrent":
        (a, u), beta = beta_drivers(b, u, beta), None
    dtype = u.dtype
    q, b = q.to(dtype), b.to(dtype)
    a = None if a is None else a.to(dtype)
    if algorithm == "recurrent":
        if needs_grad:
            raise NotImplementedError(
                "algorithm='recurrent' on the Triton backend is forward-only (decoding); "
                "use algorithm='tensor_inv' for training"
            )
        batch, seq_len = a.shape[:2]
        cu = seq_offsets(batch, seq_len, cu_seqlens, a.device)
        n_seq, n_heads, k_dim, v_dim = cu.numel() - 1, a.shape[2], a.shape[4], u.shape[4]
        if initial_state is None:
            state = torch.zeros(n_seq, n_heads, k_dim, v_dim, device=a.device, dtype=torch.float32)
        else:
            state = initial_state.to(torch.float32).clone().contiguous()
        flat = [x.reshape(batch * seq_len, *x.shape[2:]).contiguous() for x in (q, a, b, u)]
        o = launch_recurrent_(*flat, state, cu, scale=scale, product=mode == "product", out_dtype=dtype)
        return o.view(batch, seq_len, n_heads, v_dim), state if output_final_state else None
    if needs_fp32(b.shape[3], b.shape[4], dtype):  # bf16 / fp16, R >= 5, K > 128 (triton_utils)
        q, a, b, u, beta = (None if x is None else x.float() for x in (q, a, b, u, beta))
    plan = _Plan(b, cu_seqlens, chunk_size, mode, scale)
    flat = [None if x is None else plan.flat(x) for x in (q, a, b, u, beta)]
    h0 = None if initial_state is None else initial_state.contiguous()
    out_shape = q.shape[:3] + u.shape[-1:]
    if algorithm == "auto":  # the faster W/U stage at this shape, from measured crossovers
        from .triton_sigdelta import choose_wu_solver

        algorithm = choose_wu_solver(plan.rank, plan.chunk, plan.k_dim, u.shape[-1], training=needs_grad)
    solver = _wu_solver(algorithm)
    if needs_grad:
        o, ht = _ChunkDeltaRule.apply(*flat, h0, plan, solver, output_final_state)
    else:
        o, ht, _ = _forward(
            *flat[:4], h0, plan, solver, beta=flat[4], store_ht=output_final_state, for_backward=False
        )
    return o.view(out_shape).to(dtype), ht


def triton_recurrent_step_(q, a, b, u, state, *, mode="sum", scale=None):
    """Decode step(s) on a cached state, updated IN PLACE (no host sync, CUDA-graph friendly).

    q [B, T, H, K]; a, b [B, T, H, R, K]; u [B, T, H, R, V]; state [B, H, K, V] fp32 contiguous.
    Returns o [B, T, H, V] (dtype of u).
    """
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("state must be a contiguous float32 tensor [B, H, K, V]")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    batch, seq_len, n_heads = a.shape[:3]
    cu = torch.arange(0, batch + 1, device=a.device, dtype=torch.int32) * seq_len
    flat = [x.reshape(batch * seq_len, *x.shape[2:]).contiguous() for x in (q, a, b, u)]
    o = launch_recurrent_(*flat, state, cu, scale=scale, product=mode == "product", out_dtype=u.dtype)
    return o.view(batch, seq_len, n_heads, u.shape[-1])
