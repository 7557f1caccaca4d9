"""Triton delta-rule kernels against the float64 token loop.

Tier 2 (`triton_interpret`): small fp32 cases under TRITON_INTERPRET=1 on the CPU (also run on a GPU).
Tier 3 (`gpu`): the bf16/fp16 grid with measured tolerances.
"""

import importlib.util

import pytest
import torch

triton_dispatch = pytest.importorskip("modeling_parallelflow.triton_dispatch")


def loop_reference(q, a, b, u, *, mode, scale, initial_state=None, cu_seqlens=None):
    """Float64 token loop on general drivers: h <- h + B_t (A_t^T h + U_t^T), o_t = scale h_t^T q_t."""
    q, a, b, u = (x.double() for x in (q, a, b, u))
    batch, seq_len, n_heads, rank, k_dim = a.shape
    v_dim = u.shape[-1]
    if cu_seqlens is None:
        bounds = [(i, 0, seq_len) for i in range(batch)]
    else:
        bounds = [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True)]
    outs = torch.zeros(batch, seq_len, n_heads, v_dim, dtype=torch.float64)
    finals = []
    for n, (bi, start, end) in enumerate(bounds):
        h = torch.zeros(n_heads, k_dim, v_dim, dtype=torch.float64)
        if initial_state is not None:
            h = h + initial_state[n].double()
        rows = []
        for t in range(start, end):
            if mode == "sum":
                x = torch.einsum("hrk,hkv->hrv", a[bi, t], h) + u[bi, t]
                h = h + torch.einsum("hrk,hrv->hkv", b[bi, t], x)
            else:
                for r in range(rank):
                    x = torch.einsum("hk,hkv->hv", a[bi, t, :, r], h) + u[bi, t, :, r]
                    h = h + b[bi, t, :, r, :, None] * x[:, None, :]
            rows.append(scale * torch.einsum("hk,hkv->hv", q[bi, t], h))
        if rows:
            outs[bi, start:end] = torch.stack(rows)
        finals.append(h)
    return outs, torch.stack(finals)


def make_inputs(batch, seq_len, n_heads, rank, k_dim, v_dim, *, dtype, device, n_states=None):
    """Delta-rule drivers from unit keys and sigmoid betas (a = -beta k, b = k, u = beta v)."""
    q = torch.randn(batch, seq_len, n_heads, k_dim, device=device)
    k = torch.nn.functional.normalize(
        torch.randn(batch, seq_len, n_heads, rank, k_dim, device=device), dim=-1
    )
    v = torch.randn(batch, seq_len, n_heads, rank, v_dim, device=device)
    beta = torch.rand(batch, seq_len, n_heads, rank, 1, device=device) / rank
    a, b, u = -beta * k, k, beta * v
    h0 = None if n_states is None else torch.randn(n_states, n_heads, k_dim, v_dim, device=device)
    return [x.to(dtype) for x in (q, a, b, u)], h0


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def run_case(
    batch,
    seq_len,
    n_heads,
    rank,
    k_dim,
    v_dim,
    mode,
    *,
    with_h0,
    chunk_size,
    dtype,
    device,
    cu=None,
    backward=True,
    algorithm="tensor_inv",
):
    n_states = batch if cu is None else len(cu) - 1
    (q, a, b, u), h0 = make_inputs(
        batch,
        seq_len,
        n_heads,
        rank,
        k_dim,
        v_dim,
        dtype=dtype,
        device=device,
        n_states=n_states if with_h0 else None,
    )
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    leaves = [x.clone().requires_grad_(backward) for x in (q, a, b, u)]
    h0_leaf = None if h0 is None else h0.clone().requires_grad_(backward)
    o, ht = triton_dispatch.triton_delta_rule_drivers(
        *leaves,
        mode=mode,
        scale=k_dim**-0.5,
        initial_state=h0_leaf,
        output_final_state=True,
        cu_seqlens=cu_t,
        chunk_size=chunk_size,
        algorithm=algorithm,
    )
    ref_leaves = [x.detach().cpu().double().requires_grad_(backward) for x in (q, a, b, u)]
    ref_h0 = None if h0 is None else h0.detach().cpu().double().requires_grad_(backward)
    o_ref, ht_ref = loop_reference(
        *ref_leaves, mode=mode, scale=k_dim**-0.5, initial_state=ref_h0, cu_seqlens=cu
    )
    errs = {"o": rel_err(o.cpu(), o_ref), "ht": rel_err(ht.cpu(), ht_ref)}
    if backward:
        do = torch.randn_like(o_ref)
        dht = torch.randn_like(ht_ref)
        (
            (o.float() * do.to(device=device, dtype=torch.float32)).sum()
            + (ht * dht.to(device=device, dtype=torch.float32)).sum()
        ).backward()
        ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()
        for name, x, xr in zip("qabu", leaves, ref_leaves, strict=True):
            errs["d" + name] = rel_err(x.grad.cpu(), xr.grad)
        if h0 is not None:
            errs["dh0"] = rel_err(h0_leaf.grad.cpu(), ref_h0.grad)
    return errs


# (B, T, H, R, K, V, mode, with_h0, chunk_size, cu_seqlens): odd T, one above / below a chunk multiple.
INTERPRET_CASES = [
    pytest.param(2, 37, 1, 1, 16, 16, "sum", True, 16, None, id="R1-sum-T37-h0"),
    pytest.param(1, 33, 2, 2, 16, 32, "product", False, 16, None, id="R2-product-T33-H2"),
    pytest.param(1, 17, 1, 3, 32, 16, "sum", True, 16, None, id="R3-sum-T17-CRpad"),
    pytest.param(1, 40, 1, 2, 24, 20, "sum", True, 16, [0, 5, 21, 40], id="R2-sum-varlen-oddK"),
    pytest.param(1, 31, 1, 2, 16, 16, "product", True, 16, [0, 16, 31], id="R2-product-varlen-h0"),
    # fp32 at R >= 5 runs chunks of C = 8 tokens, query tiles padded to 16 rows
    pytest.param(1, 21, 1, 5, 16, 16, "sum", True, 16, None, id="R5-sum-T21-C8"),
    pytest.param(1, 19, 1, 8, 16, 32, "product", True, 64, [0, 3, 19], id="R8-product-varlen-C8"),
]


@pytest.mark.triton_interpret
@pytest.mark.parametrize("batch,seq_len,n_heads,rank,k_dim,v_dim,mode,with_h0,chunk_size,cu", INTERPRET_CASES)
def test_chunk_matches_loop_fp32(batch, seq_len, n_heads, rank, k_dim, v_dim, mode, with_h0, chunk_size, cu):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    errs = run_case(
        batch,
        seq_len,
        n_heads,
        rank,
        k_dim,
        v_dim,
        mode,
        with_h0=with_h0,
        chunk_size=chunk_size,
        dtype=torch.float32,
        device=device,
        cu=cu,
    )
    # interpreter fp32 arithmetic gives ~1e-6; 3xTF32 / TF32-free dots on a GPU stay below 1e-4
    assert max(errs.values()) < 2e-4, errs


def _public_op_case(batch, seq_len, rank, k_dim, v_dim, mode, algorithm, cu, device):
    """q, k (unit), v, beta (fp32, sigmoid / R) and h0 for the public op; cu_seqlens or None."""
    gen = torch.Generator().manual_seed(7)
    n_states = batch if cu is None else len(cu) - 1
    q = torch.randn(batch, seq_len, 2, k_dim, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(batch, seq_len, 2, rank, k_dim, generator=gen), dim=-1)
    v = torch.randn(batch, seq_len, 2, rank, v_dim, generator=gen)
    beta = torch.sigmoid(torch.randn(batch, seq_len, 2, rank, generator=gen)) / rank
    h0 = torch.randn(n_states, 2, k_dim, v_dim, generator=gen)
    cu = None if cu is None else torch.tensor(cu, device=device)
    return [x.to(device) for x in (q, k, v, beta, h0)], cu


def _outputs_and_grads(inputs, **options):
    """[o, ht, dq, dk, dv, dbeta, dh0] of delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True,
    **options) on inputs [q, k, v, beta, h0], backward from a fixed random dO (seed 5) and dht = 1."""
    from modeling_parallelflow.ops import delta_rule

    inputs = [x.clone().requires_grad_() for x in inputs]
    o, ht = delta_rule(*inputs[:4], initial_state=inputs[4], output_final_state=True, **options)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(5)).to(o.device)
    ((o.double() * do.double()).sum() + ht.double().sum()).backward()
    return [o, ht] + [x.grad for x in inputs]


@pytest.mark.triton_interpret
@pytest.mark.parametrize(
    "batch,seq_len,rank,k_dim,v_dim,mode,algorithm,cu",
    [
        (2, 37, 1, 16, 32, "sum", "tensor_inv", None),
        pytest.param(
            1, 40, 3, 32, 16, "product", "tensor_inv", [0, 5, 21, 40], marks=pytest.mark.slow
        ),  # ~5 s
        (2, 21, 2, 16, 16, "sum", "sigdelta", None),
        pytest.param(2, 30, 2, 48, 24, "product", "tensor_inv", None, marks=pytest.mark.slow),  # ~4 s
    ],
    ids=["R1-sum", "R3-product-varlen", "R2-sigdelta", "R2-product-K48-V24"],
)
def test_public_op_beta_form_matches_loop_and_keeps_no_drivers(
    batch, seq_len, rank, k_dim, v_dim, mode, algorithm, cu
):
    """delta_rule(q, k, v, beta) on the Triton backend: the kernels build a = -beta k and u = beta v in
    registers and return dk, dv, dbeta; output, final state and the gradients of q, k, v, beta, h0 equal the
    float64 loop's (with and without autograd), and the tensors kept for the backward are those of the
    drivers form less a."""
    from modeling_parallelflow.ops import delta_rule, delta_rule_drivers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    leaves, cu = _public_op_case(batch, seq_len, rank, k_dim, v_dim, mode, algorithm, cu, device)
    options = dict(mode=mode, output_final_state=True, cu_seqlens=cu, chunk_size=16, algorithm=algorithm)

    def run(op, inputs, **extra):
        inputs = [x.clone().requires_grad_() for x in inputs]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            o, ht = op(*inputs, **options, **extra)
        gen = torch.Generator().manual_seed(3)
        do, dht = (torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device) for x in (o, ht))
        ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
        kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        return [o, ht] + [x.grad for x in inputs], sum(kept.values())

    q, k, v, beta, h0 = leaves
    ours, kept = run(
        lambda q, k, v, beta, h0, **kw: delta_rule(q, k, v, beta, initial_state=h0, **kw),
        leaves,
        backend="triton",
    )
    ref, _ = run(
        lambda q, k, v, beta, h0, **kw: delta_rule(q, k, v, beta, initial_state=h0, **kw),
        [x.double() for x in leaves],
        backend="torch",
    )
    for name, x, r in zip(["o", "ht", "dq", "dk", "dv", "dbeta", "dh0"], ours, ref, strict=True):
        assert rel_err(x.cpu(), r.cpu()) < 2e-4, (name, rel_err(x.cpu(), r.cpu()))
    with torch.no_grad():  # inference: the same kernels without the autograd function
        o, ht = delta_rule(q, k, v, beta, initial_state=h0, **options, backend="triton")
    assert rel_err(o.cpu(), ref[0].cpu()) < 2e-4 and rel_err(ht.cpu(), ref[1].cpu()) < 2e-4

    def drivers(q, k, v, beta, h0, **kw):  # the same maths with a = -beta k built outside the kernels
        col = beta[..., None]
        return delta_rule_drivers(q, -col * k, k, col * v, initial_state=h0, **kw)

    _, kept_drivers = run(drivers, leaves, backend="triton")
    a_bytes = k.numel() * k.element_size()
    assert kept <= kept_drivers - a_bytes + beta.numel() * beta.element_size(), (kept, kept_drivers, a_bytes)


@pytest.mark.triton_interpret
def test_wide_keys_at_high_rank_run_in_fp32_and_keep_the_dtype():
    # bf16 at R >= 5 and K > 128 takes the fp32 kernels (triton_utils.needs_fp32); o stays bf16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    (q, a, b, u), h0 = make_inputs(1, 11, 1, 5, 160, 16, dtype=torch.bfloat16, device=device, n_states=1)
    o, ht = triton_dispatch.triton_delta_rule_drivers(
        q, a, b, u, mode="sum", scale=0.1, initial_state=h0, output_final_state=True, chunk_size=16
    )
    o_ref, ht_ref = loop_reference(
        q.cpu(), a.cpu(), b.cpu(), u.cpu(), mode="sum", scale=0.1, initial_state=h0.cpu()
    )
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    # computed in fp32 from the bf16 inputs: only the bf16 rounding of o remains (~4e-3)
    assert rel_err(o.cpu(), o_ref) < 1e-2 and rel_err(ht.cpu(), ht_ref) < 1e-4


@pytest.mark.triton_interpret
@pytest.mark.parametrize("mode", ["sum", "product"])
def test_recurrent_matches_loop_and_updates_in_place(mode):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    (q, a, b, u), h0 = make_inputs(2, 3, 2, 2, 16, 32, dtype=torch.float32, device=device, n_states=2)
    o_ref, ht_ref = loop_reference(
        q.cpu(), a.cpu(), b.cpu(), u.cpu(), mode=mode, scale=0.25, initial_state=h0.cpu()
    )
    o, ht = triton_dispatch.triton_delta_rule_drivers(
        q, a, b, u, mode=mode, scale=0.25, initial_state=h0, output_final_state=True, algorithm="recurrent"
    )
    assert rel_err(o.cpu(), o_ref) < 1e-5 and rel_err(ht.cpu(), ht_ref) < 1e-5
    state = h0.clone()
    o_step = triton_dispatch.triton_recurrent_step_(q, a, b, u, state, mode=mode, scale=0.25)
    assert rel_err(o_step.cpu(), o_ref) < 1e-5 and rel_err(state.cpu(), ht_ref) < 1e-5


@pytest.mark.triton_interpret
@pytest.mark.parametrize("mode", ["sum", "product"])
def test_tensor_inv_wu_solves_the_chunk_system(mode):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, chunk = 2, 16
    (_, a, b, u), _ = make_inputs(1, 20, 1, rank, 16, 16, dtype=torch.float32, device=device)
    w, uu = triton_dispatch.tensor_inv_wu(a, b, u, mode=mode, chunk_size=chunk)
    for start in (0, chunk):  # second chunk is partial (4 tokens)
        rows = lambda x, s=slice(start, start + chunk): x[0, s, 0].reshape(-1, x.shape[-1]).cpu().double()  # noqa: E731
        ar, br, ur = rows(a), rows(b), rows(u)
        tok = torch.arange(ar.shape[0]) // rank
        mask = (
            tok[:, None] > tok[None, :] if mode == "sum" else torch.ones(len(tok), len(tok)).tril(-1).bool()
        )
        lhs = torch.eye(len(tok), dtype=torch.float64) - (ar @ br.T) * mask
        assert rel_err(rows(w), torch.linalg.solve(lhs, ar)) < 1e-5
        assert rel_err(rows(uu), torch.linalg.solve(lhs, ur)) < 1e-5


@pytest.mark.triton_interpret
def test_sigdelta_selects_its_solver_or_says_it_is_missing():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    (q, a, b, u), _ = make_inputs(1, 16, 1, 1, 16, 16, dtype=torch.float32, device=device)
    if importlib.util.find_spec("modeling_parallelflow.triton_sigdelta") is None:
        with pytest.raises(NotImplementedError, match="sigdelta"):
            triton_dispatch.triton_delta_rule_drivers(q, a, b, u, algorithm="sigdelta")
    else:
        o, _ = triton_dispatch.triton_delta_rule_drivers(q, a, b, u, algorithm="sigdelta", chunk_size=16)
        o_ref, _ = loop_reference(q, a, b, u, mode="sum", scale=16**-0.5)
        assert rel_err(o, o_ref) < 1e-4


def test_bad_arguments_raise_clear_errors():
    (q, a, b, u), _ = make_inputs(1, 16, 1, 1, 16, 16, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="chunk_size"):
        triton_dispatch.triton_delta_rule_drivers(q, a, b, u, chunk_size=24)
    with pytest.raises(ValueError, match="mode"):
        triton_dispatch.triton_delta_rule_drivers(q, a, b, u, mode="prod")
    with pytest.raises(ValueError, match="head widths"):
        big = torch.zeros(1, 2, 1, 1, 512)
        triton_dispatch.triton_delta_rule_drivers(q[:, :2], big, big, big[..., :16])


# Tier 3: measured on an H100 (bf16 / fp16 inputs, fp32 state); see benchmarks/README.md.
GPU_GRID = [
    pytest.param(rank, mode, dtype, k_dim, id=f"R{rank}-{mode}-{str(dtype)[6:]}-K{k_dim}")
    for rank in (1, 2, 3, 4, 8)
    for mode in ("sum", "product")
    for dtype in (torch.bfloat16, torch.float16)
    for k_dim in (64, 128)
]


@pytest.mark.gpu
@pytest.mark.parametrize("rank,mode,dtype,k_dim", GPU_GRID)
def test_chunk_matches_loop_gpu(rank, mode, dtype, k_dim):
    errs = run_case(
        2, 200, 2, rank, k_dim, k_dim, mode, with_h0=True, chunk_size=64, dtype=dtype, device="cuda"
    )
    # measured on an H100 (benchmarks/results/h100_bench_203a1ee.json, T=512): worst relative error over
    # o, final state and all gradients 5.6e-3 in bf16 (fla's o: 3.8e-3, ours 3.8e-3) and 8.5e-4 in fp16;
    # the bound is 2x that, the bf16/fp16 input rounding itself being ~4e-3 / 5e-4.
    assert max(errs.values()) < (1.2e-2 if dtype == torch.bfloat16 else 2e-3), errs


@pytest.mark.gpu
@pytest.mark.parametrize("rank,mode", [(1, "sum"), (2, "product"), (4, "sum")])
def test_chunk_varlen_gpu(rank, mode):
    errs = run_case(
        1,
        300,
        2,
        rank,
        128,
        128,
        mode,
        with_h0=True,
        chunk_size=64,
        dtype=torch.bfloat16,
        device="cuda",
        cu=[0, 1, 64, 65, 200, 300],
    )
    assert max(errs.values()) < 1.2e-2, errs  # measured 4.1e-3 (R=2 sum, same cu_seqlens, H100)


@pytest.mark.triton_interpret
@pytest.mark.parametrize(
    "rank,mode,algorithm,cu",
    [
        (1, "sum", "tensor_inv", None),
        pytest.param(3, "product", "tensor_inv", [0, 5, 21, 40], marks=pytest.mark.slow),  # ~4 s a flag
        (2, "sum", "sigdelta", None),
    ],
    ids=["R1-sum", "R3-product-varlen", "R2-sigdelta"],
)
@pytest.mark.parametrize(
    "flag",
    [
        "recompute_states",
        # off by default: ~6 s each under the interpreter, so with the slow tests
        pytest.param("recompute_inverses", marks=pytest.mark.slow),
        pytest.param("recompute_states+recompute_inverses", marks=pytest.mark.slow),
    ],
)
def test_recomputed_states_give_the_same_gradients_and_keep_less(
    monkeypatch, flag, rank, mode, algorithm, cu
):
    """TUNE["recompute_states"]: the backward reruns the scan (same kernel, same inputs) instead of keeping
    the chunk states and X; TUNE["recompute_inverses"]: it reruns the solve for the inverses T instead of
    keeping them (sigdelta never keeps them). Every output and gradient equals the float64 loop's and is
    identical to the kept path's, and less is kept for the backward (tensorInv). "a+b": both at once."""
    if flag != "recompute_states" and algorithm == "sigdelta":
        pytest.skip("the sigdelta solver keeps no T")
    from modeling_parallelflow import triton_utils
    from modeling_parallelflow.ops import delta_rule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    leaves, cu = _public_op_case(1 if cu else 2, 40, rank, 32, 16, mode, algorithm, cu, device)

    def run(inputs=leaves, **options):
        inputs = [x.clone().requires_grad_() for x in inputs]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            o, ht = delta_rule(
                *inputs[:4],
                initial_state=inputs[4],
                output_final_state=True,
                mode=mode,
                cu_seqlens=cu,
                chunk_size=16,
                **(options or dict(algorithm=algorithm, backend="triton")),
            )
        (o.sum() + ht.sum()).backward()
        kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        return [o, ht] + [x.grad for x in inputs], sum(kept.values())

    for name in flag.split("+"):
        monkeypatch.setitem(triton_utils.TUNE, name, 0)
    kept_all, kept_bytes = run()
    for name in flag.split("+"):
        monkeypatch.setitem(triton_utils.TUNE, name, 1)
    recomputed, recomputed_bytes = run()
    reference, _ = run([x.double() for x in leaves], algorithm="recurrent", backend="torch")
    for x, y, ref in zip(kept_all, recomputed, reference, strict=True):
        assert torch.equal(x, y)
        assert rel_err(y.cpu(), ref.cpu()) < 2e-4
    if algorithm != "sigdelta":  # its rerun keeps W and U, more than the states at K = V = 16
        assert recomputed_bytes < kept_bytes, (recomputed_bytes, kept_bytes)


@pytest.mark.triton_interpret
def test_half_precision_dots_match_loop_and_fp32_inputs():
    """fp16 inputs run the solve's products in fp16 (the scans' X = T (A h + U~), and W = T A, U = T U~ of
    `tensor_inv_wu` where `low_dots_ok`); output, final state and gradients stay within fp16 rounding of the
    float64 loop and of the same inputs in fp32 (tf32x3 dots); W and U likewise."""
    from modeling_parallelflow import triton_dispatch
    from modeling_parallelflow.triton_chunk_fwd import low_dots_ok

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert low_dots_ok(torch.float16, 32, 48) and not low_dots_ok(torch.float16, 16, 48)
    assert not low_dots_ok(torch.float32, 128, 128)
    leaves, _ = _public_op_case(2, 40, 2, 32, 48, "sum", "tensor_inv", None, device)

    def run(inputs, **options):
        return _outputs_and_grads(inputs, chunk_size=16, **options)

    half = [x.half() for x in leaves[:4]] + [leaves[4]]
    reference = run([x.double() for x in leaves], algorithm="recurrent", backend="torch")
    low = run(half, algorithm="tensor_inv", backend="triton")
    full = run(leaves, algorithm="tensor_inv", backend="triton")
    for x, y, ref in zip(low, full, reference, strict=True):
        assert rel_err(x.cpu(), ref.cpu()) < 4e-3, rel_err(x.cpu(), ref.cpu())
        assert rel_err(x.cpu(), y.cpu()) < 4e-3, rel_err(x.cpu(), y.cpu())
    gen = torch.Generator().manual_seed(6)
    a, b = (torch.randn(1, 40, 2, 2, 32, generator=gen).to(device) * 0.2 for _ in range(2))
    u = torch.randn(1, 40, 2, 2, 48, generator=gen).to(device)
    w16, u16 = triton_dispatch.tensor_inv_wu(a.half(), b.half(), u.half(), mode="sum", chunk_size=16)
    w32, u32 = triton_dispatch.tensor_inv_wu(a, b, u, mode="sum", chunk_size=16)
    assert rel_err(w16.float().cpu(), w32.cpu()) < 4e-3 and rel_err(u16.float().cpu(), u32.cpu()) < 4e-3


@pytest.mark.triton_interpret
def test_128_row_chunks_form_w_and_u_and_match_loop():
    """fp16 at R = 5: 16-token chunks of 80 rows, padded to 128, where the scans take W and U formed by the
    W/U kernel instead of forming X from T (`_Plan.x_from_t`); the backward still takes dU = T^T dX from the
    dh kernel. Output, final state and every gradient within fp16 rounding of the float64 loop."""
    from modeling_parallelflow import triton_dispatch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    leaves, _ = _public_op_case(1, 24, 5, 32, 16, "sum", "tensor_inv", None, device)
    plan = triton_dispatch._Plan(leaves[1].half(), None, 64, "sum", 1.0)
    assert (plan.chunk, plan.x_from_t) == (16, False)

    half = [x.half() for x in leaves[:4]] + [leaves[4]]
    reference = _outputs_and_grads([x.double() for x in leaves], algorithm="recurrent", backend="torch")
    ours = _outputs_and_grads(half, algorithm="tensor_inv", backend="triton")
    for x, ref in zip(ours, reference, strict=True):
        assert torch.isfinite(x).all() and rel_err(x.cpu(), ref.cpu()) < 4e-3, rel_err(x.cpu(), ref.cpu())


def _slow(setting):  # settings off by default, ~4 s each under the interpreter
    return pytest.param(setting, marks=pytest.mark.slow)


@pytest.mark.triton_interpret
@pytest.mark.parametrize(
    "rank,mode,k_dim,v_dim,cu",
    [(1, "sum", 96, 32, None), (3, "product", 32, 16, [0, 5, 21, 40])],
    ids=["R1-K96", "R3-product-varlen"],
)
@pytest.mark.parametrize(
    "setting",
    [
        {"query_ahead": True},
        _slow({"par_bk": 128}),
        _slow({"bwd_local_dx": 1}),
        _slow({"fwd_local_p": 1}),
        _slow({"scan_bv": 16}),
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()),
)
def test_launch_variants_match_loop_and_the_default(monkeypatch, setting, rank, mode, k_dim, v_dim, cu):
    """Launch variants: the forward scan with its Q tiles loaded one chunk ahead (what `scan_launch` picks on
    grids larger than the GPU holds; forced here), TUNE["par_bk"] = 128 (the backward
    chunk kernel in one K tile; K = 96 masked), TUNE["bwd_local_dx"] (dX's local part from a chunk-parallel
    kernel, not the sequential scan) and TUNE["fwd_local_p"] (the forward scan reads P from a chunk-parallel
    kernel), TUNE["scan_bv"] = 16 (more V blocks in the sequential kernels). Output, final state and every
    gradient equal the float64 loop's and the default launches'."""
    from modeling_parallelflow import triton_chunk_fwd, triton_utils

    device = "cuda" if torch.cuda.is_available() else "cpu"
    leaves, cu = _public_op_case(1, 40, rank, k_dim, v_dim, mode, "tensor_inv", cu, device)

    def run(inputs, **options):
        return _outputs_and_grads(inputs, chunk_size=16, mode=mode, cu_seqlens=cu, **options)

    reference = run([x.double() for x in leaves], algorithm="recurrent", backend="torch")
    default = run(leaves, algorithm="tensor_inv", backend="triton")
    for name, value in setting.items():
        if name == "query_ahead":
            monkeypatch.setattr(triton_chunk_fwd, "scan_launch", lambda *args, ahead=value: (2, ahead))
        else:
            monkeypatch.setitem(triton_utils.TUNE, name, value)
    variant = run(leaves, algorithm="tensor_inv", backend="triton")
    for x, y, ref in zip(variant, default, reference, strict=True):
        assert rel_err(x.cpu(), ref.cpu()) < 2e-4, rel_err(x.cpu(), ref.cpu())
        assert rel_err(x.cpu(), y.cpu()) < 2e-5, rel_err(x.cpu(), y.cpu())
