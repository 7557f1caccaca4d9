"""PackedSequences: packed cu_seqlens validated once (one host read) and shared by every layer of a forward.

Tier 1 (CPU, torch backend) and tier 2 (`triton_interpret`: the Triton backend in Triton's interpreter).
"""

import collections

import pytest
import torch
import torch.nn.functional as F

from modeling_parallelflow import packed as packed_module
from modeling_parallelflow.ops import delta_rule, delta_rule_drivers
from modeling_parallelflow.packed import PackedSequences
from tests.model_helpers import random_ids, tiny_model

HOST_READS = ("tolist", "item", "__int__", "__bool__", "__float__", "__index__")
CU = [0, 9, 9, 22]  # three sequences, one of them empty


@pytest.fixture
def host_reads(monkeypatch) -> collections.Counter:
    """Counts every tensor-to-host read (tolist, item, int(), bool(), ...) while the test runs."""
    calls = collections.Counter()
    for name in HOST_READS:
        method = getattr(torch.Tensor, name)

        def counting(self, *args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


@pytest.fixture
def constructions(monkeypatch) -> list:
    """Records each PackedSequences built while the test runs."""
    built = []
    init = PackedSequences.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(PackedSequences, "__init__", counting)
    return built


def op_inputs(seed=0, length=22, rank=2, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    q = rand(1, length, 2, 16)
    k = F.normalize(rand(1, length, 2, rank, 16), dim=-1)
    v = rand(1, length, 2, rank, 16)
    beta = torch.sigmoid(rand(1, length, 2, rank)) / rank
    h0 = rand(len(CU) - 1, 2, 16, 16)
    return [x.to(dtype) for x in (q, k, v)] + [beta, h0]


@pytest.mark.parametrize("variant", ["tiny", "tiny-hybrid"])
def test_packed_forward_validates_once_and_reads_the_host_once(variant, host_reads, constructions):
    """L layers (the hybrid: 2 delta-rule + 2 attention), forward and training step: one PackedSequences,
    one host read (its construction); a plain batch none."""
    model = tiny_model(variant)
    ids, cu = random_ids(1, 22), torch.tensor(CU, dtype=torch.int32)
    with torch.no_grad():
        logits = model(ids, cu_seqlens=cu, use_cache=False).logits
    assert (len(constructions), dict(host_reads)) == (1, {"tolist": 1})
    model(ids, labels=ids, cu_seqlens=cu, use_cache=False).loss.backward()
    assert (len(constructions), dict(host_reads)) == (2, {"tolist": 2})
    host_reads.clear()
    with torch.no_grad():
        model(random_ids(2, 22), use_cache=False)
    assert (len(constructions), dict(host_reads)) == (2, {})
    plan = PackedSequences(cu)
    host_reads.clear()
    with torch.no_grad():  # a prebuilt PackedSequences: no host read at all
        again = model(ids, cu_seqlens=plan, use_cache=False).logits
    assert (len(constructions), dict(host_reads)) == (3, {})
    torch.testing.assert_close(again, logits, atol=0, rtol=0)


@pytest.mark.parametrize("algorithm", ["tensor_inv", "sigdelta", "recurrent"])
@pytest.mark.parametrize("mode", ["sum", "product"])
def test_op_with_packed_sequences_equals_op_with_the_tensor(algorithm, mode, host_reads):
    q, k, v, beta, h0 = op_inputs()
    options = dict(mode=mode, algorithm=algorithm, backend="torch", chunk_size=16, initial_state=h0)
    options["output_final_state"] = True
    cu = torch.tensor(CU)  # int64: the PackedSequences holds it as int32
    o_raw, h_raw = delta_rule(q, k, v, beta, cu_seqlens=cu, **options)
    assert host_reads["tolist"] >= 1
    plan = PackedSequences(cu, total=22)
    host_reads.clear()
    o, h = delta_rule(q, k, v, beta, cu_seqlens=plan, **options)
    beta_col = beta[..., None]
    o_drv, h_drv = delta_rule_drivers(q, -beta_col * k, k, beta_col * v, cu_seqlens=plan, **options)
    assert dict(host_reads) == {}
    for x in (o, o_drv):
        torch.testing.assert_close(x, o_raw, atol=0, rtol=0)
    for x in (h, h_drv):
        torch.testing.assert_close(x, h_raw, atol=0, rtol=0)


def test_packed_sequences_holds_int32_bounds_and_caches_chunk_maps(monkeypatch):
    plan = PackedSequences(torch.tensor(CU), total=22)
    assert plan.cu_seqlens.dtype == torch.int32 and plan.bounds == tuple(CU)
    assert (plan.num_sequences, plan.total_tokens, plan.device) == (3, 22, torch.device("cpu"))
    assert "PackedSequences" in repr(plan) and "[0, 9, 9, 22]" in repr(plan)
    triton_utils = pytest.importorskip("modeling_parallelflow.triton_utils")
    built = []
    chunk_map = triton_utils.chunk_map
    monkeypatch.setattr(triton_utils, "chunk_map", lambda *args: built.append(args[2]) or chunk_map(*args))
    maps = [plan.chunk_map(16), plan.chunk_map(16), plan.chunk_map(32)]
    assert built == [16, 32] and maps[0] is maps[1]
    for got, want in zip(maps[0], chunk_map(plan.cu_seqlens, 22, 16, 3, None), strict=True):
        assert torch.equal(got, want)


BAD_CU_SEQLENS = {
    "list": ([0, 22], None, "1-D tensor"),
    "2d": (torch.tensor([[0, 22]]), None, "1-D tensor"),
    "one-entry": (torch.tensor([0]), None, "1-D tensor"),
    "float": (torch.tensor([0.0, 22.0]), None, "int32 or int64"),
    "start": (torch.tensor([1, 22]), None, "start at 0, got"),
    "end": (torch.tensor([0, 21]), 22, "start at 0 and end at T = 22"),
    "decreasing": (torch.tensor([0, 12, 9, 22]), 22, "non-decreasing"),
}


@pytest.mark.parametrize("cu, total, message", BAD_CU_SEQLENS.values(), ids=BAD_CU_SEQLENS.keys())
def test_bad_cu_seqlens_raise_clear_errors(cu, total, message):
    with pytest.raises(ValueError, match=rf"^cu_seqlens .*{message}"):
        PackedSequences(cu, total=total)


def test_op_and_model_reject_a_packed_sequences_that_does_not_fit():
    q, k, v, beta, _ = op_inputs()
    with pytest.raises(ValueError, match=r"^cu_seqlens packs 20 tokens .* but T = 22"):
        delta_rule(q, k, v, beta, cu_seqlens=PackedSequences(torch.tensor([0, 20])), backend="torch")
    meta = PackedSequences(torch.tensor(CU), device="meta")
    with pytest.raises(ValueError, match=r"^cu_seqlens is on meta but q is on cpu"):
        delta_rule(q, k, v, beta, cu_seqlens=meta, backend="torch")
    batch2 = [torch.cat([x, x]) for x in (q, k, v, beta)]
    with pytest.raises(ValueError, match=r"^cu_seqlens requires batch size B == 1"):
        delta_rule(*batch2, cu_seqlens=PackedSequences(torch.tensor(CU)), backend="torch")
    model = tiny_model()
    ids = random_ids(1, 22)
    with pytest.raises(ValueError, match=r"must pack the 22 tokens"):
        model(ids, cu_seqlens=PackedSequences(torch.tensor([0, 20])), use_cache=False)
    with pytest.raises(ValueError, match=r"^cu_seqlens must start at 0 and end at T = 22"):
        model(ids, cu_seqlens=torch.tensor([0, 9, 21]), use_cache=False)
    with pytest.raises(ValueError, match=r"^cu_seqlens must be non-decreasing"):
        model(ids, cu_seqlens=torch.tensor([0, 12, 9, 22]), use_cache=False)


def test_host_bounds_reads_a_tensor_and_reuses_a_plan(host_reads):
    assert packed_module.host_bounds(torch.tensor(CU)) == CU and host_reads["tolist"] == 1
    plan = PackedSequences(torch.tensor(CU))
    host_reads.clear()
    assert packed_module.host_bounds(plan) == CU and dict(host_reads) == {}


@pytest.mark.triton_interpret
@pytest.mark.parametrize(
    "algorithm", ["tensor_inv", pytest.param("sigdelta", marks=pytest.mark.slow)]
)  # ~5 s
def test_triton_op_with_packed_sequences_equals_op_with_the_tensor(algorithm, monkeypatch):
    """Triton backend: same outputs and gradients; the chunk map is built once for both calls."""
    triton_utils = pytest.importorskip("modeling_parallelflow.triton_utils")
    built = []
    chunk_map = triton_utils.chunk_map
    monkeypatch.setattr(triton_utils, "chunk_map", lambda *args: built.append(args[2]) or chunk_map(*args))
    q, k, v, beta, h0 = op_inputs()
    options = dict(
        algorithm=algorithm, backend="triton", chunk_size=16, initial_state=h0, output_final_state=True
    )
    plan = PackedSequences(torch.tensor(CU, dtype=torch.int32), total=22)
    results = []
    for cu in (torch.tensor(CU, dtype=torch.int32), plan, plan):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o, h = delta_rule(*leaves, beta, cu_seqlens=cu, **options)
        (o.square().sum() + h.sum()).backward()
        results.append([o, h, *(x.grad for x in leaves)])
    assert len(built) == 2  # once for the tensor call, once for both calls with the plan
    for got in results[1:]:
        for x, want in zip(got, results[0], strict=True):
            torch.testing.assert_close(x, want, atol=0, rtol=0)


@pytest.mark.triton_interpret
def test_triton_model_packed_forward_builds_one_chunk_map(monkeypatch):
    """Both delta-rule layers of a packed forward share one chunk map; logits equal the torch backend's."""
    from modeling_parallelflow import PFlowConfig, PFlowForCausalLM

    triton_utils = pytest.importorskip("modeling_parallelflow.triton_utils")
    built = []
    chunk_map = triton_utils.chunk_map
    monkeypatch.setattr(triton_utils, "chunk_map", lambda *args: built.append(args[2]) or chunk_map(*args))
    fields = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=2, rank=2, chunk_size=16)
    fused = PFlowForCausalLM(PFlowConfig(kernel_backend="triton", **fields))
    reference = PFlowForCausalLM(PFlowConfig(kernel_backend="torch", **fields))
    reference.load_state_dict(fused.state_dict())
    ids, cu = torch.randint(0, 50, (1, 22)), torch.tensor(CU)
    with torch.no_grad():
        logits = fused(input_ids=ids, cu_seqlens=cu, use_cache=False).logits
        want = reference(input_ids=ids, cu_seqlens=cu, use_cache=False).logits
    assert len(built) == 1
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
