"""The fixed-shape decode path: `generate(..., cache_implementation="static")` makes a PFlowStaticCache
(preallocated, updated in place, stream position on the device; sliding-window layers on a window-sized
ring). On CPU it runs eagerly and must equal the dynamic cache; on a GPU its steps replay as CUDA graphs and
must equal the eager static path."""

import collections
import gc
import os
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch

import modeling_parallelflow
from modeling_parallelflow import PFlowStaticCache
from modeling_parallelflow import cache_parallelflow as cache_module
from modeling_parallelflow.compat_transformers import CACHE_FIELD
from modeling_parallelflow.decode_graph import DecodeGraphs
from modeling_parallelflow.modeling_parallelflow import _KEPT_STATIC_CACHES
from tests.model_helpers import random_ids, tiny_model

GENERATE = dict(pad_token_id=0, eos_token_id=None)
MODELS = {"sum": ("tiny", {}), "product": ("tiny", dict(rank_mode="product")), "hybrid": ("tiny-hybrid", {})}


def build(name: str, **extra):
    config_name, overrides = MODELS[name]
    return tiny_model(config_name, **overrides, **extra)


def left_padded(batch: int = 2, length: int = 7, pads: int = 3):
    ids = random_ids(batch, length)
    mask = torch.ones_like(ids)
    mask[1, :pads] = 0
    ids[1, :pads] = 0
    return ids, mask


def buffer_numel(cache, layer_type: str | None = None) -> int:
    return sum(
        t.numel()
        for layer, kind in zip(cache.layers, cache.layer_types, strict=True)
        if layer_type in (None, kind)
        for t in layer.tensors().values()
    )


GENERATE_MODES = [
    dict(do_sample=False),
    dict(do_sample=True, top_k=20),
    dict(num_beams=3, num_return_sequences=2),
]


def assert_static_generates_as_dynamic(model, ids, mask, mode: dict, new_tokens: int) -> None:
    """generate() with the default (dynamic) cache and with cache_implementation="static": equal outputs."""
    results = []
    for implementation in (None, "static"):
        torch.manual_seed(7)
        results.append(
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                cache_implementation=implementation,
                **mode,
                **GENERATE,
            )
        )
    assert torch.equal(results[0], results[1])


def kept_static_cache(model) -> PFlowStaticCache | None:
    """The static cache `model` keeps for its next generate(cache_implementation="static")."""
    return _KEPT_STATIC_CACHES.get(model, (None, None))[1]


def static_generate(model, ids, mask, new_tokens: int = 6, mode: dict | None = None, **extra):
    torch.manual_seed(7)
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        cache_implementation="static",
        **(mode or dict(do_sample=False)),
        **GENERATE,
        **extra,
    )


@pytest.fixture
def cpu_graphs(monkeypatch) -> list:
    """Decode graphs on CPU: every static cache gets a DecodeGraphs whose capture runs the step once on copies
    of the inputs (undone, as the real warm-up) and whose "graph" replays the step eagerly on those input
    buffers into the same output buffer, without the Python bookkeeping a real replay skips. So the graph
    path (keys, static inputs, reuse across generate() calls) runs without CUDA. Yields the list of
    captured input signatures."""
    captures = []

    class EagerGraphs(DecodeGraphs):
        def _capture(self, step, inputs):
            static = {name: None if t is None else t.clone() for name, t in inputs.items()}
            saved, seen = self.cache.snapshot(), self.cache.seen_tokens
            output = step(**static)
            self.cache.restore(saved)
            self.cache.seen_tokens = seen
            captures.append(self._signature(inputs))

            def replay():
                before = self.cache.seen_tokens
                output.copy_(step(**static))
                self.cache.seen_tokens = before

            return SimpleNamespace(replay=replay), static, output

    init = PFlowStaticCache.__init__
    monkeypatch.setattr(cache_module, "DecodeGraphs", EagerGraphs)
    monkeypatch.setattr(
        PFlowStaticCache, "__init__", lambda self, *a, **kw: init(self, *a, **{**kw, "cuda_graphs": True})
    )
    yield captures
    _KEPT_STATIC_CACHES.clear()  # these graphs hold their step, so the kept caches would keep their models


@pytest.mark.parametrize("name", ["sum", pytest.param("product", marks=pytest.mark.slow), "hybrid"])
@pytest.mark.parametrize("mode", GENERATE_MODES, ids=["greedy", "sample", "beam"])
def test_static_cache_generates_what_the_dynamic_cache_does(name, mode):
    ids, mask = left_padded()
    assert_static_generates_as_dynamic(build(name), ids, mask, mode, new_tokens=6)


@pytest.mark.parametrize("name", ["sum", "hybrid"])
def test_static_cache_forward_equals_full_forward(name):
    """Prefill through the chunked path, then single tokens and a multi-token continuation, in place."""
    model = build(name)
    ids = random_ids(2, 15)
    cache = PFlowStaticCache(model.config, batch_size=2, max_cache_len=20)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        pieces = [
            model(ids[:, a:b], past_key_values=cache).logits for a, b in [(0, 9), (9, 10), (10, 14), (14, 15)]
        ]
    assert cache.get_seq_length() == 15 and int(cache.slot) == 15
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-5, rtol=1e-4)


def test_static_cache_memory_is_flat_in_context_length_for_pflow_layers():
    model = build("sum")
    short = PFlowStaticCache(model.config, batch_size=1, max_cache_len=16)
    long = PFlowStaticCache(model.config, batch_size=1, max_cache_len=32768)
    assert buffer_numel(short) == buffer_numel(long)


def test_static_cache_sliding_layers_are_a_window_sized_ring():
    """Sliding layers keep [B, Hkv, min(window, max_cache_len), D], whatever the capacity; global layers
    keep every position."""
    config = build("hybrid").config
    window, heads, dim = config.sliding_window, config.num_key_value_heads, config.attention_head_dim
    caches = {n: PFlowStaticCache(config, batch_size=3, max_cache_len=n) for n in (5, 64, 4096)}
    for capacity, cache in caches.items():
        for layer, kind in zip(cache.layers, cache.layer_types, strict=True):
            if kind != "pflow":
                ring = min(window, capacity) if kind == "sliding_attention" else capacity
                assert layer.keys.shape == layer.values.shape == (3, heads, ring, dim)
        sliding = buffer_numel(cache, "sliding_attention")
        assert sliding == 2 * 3 * heads * min(window, capacity) * dim
    assert buffer_numel(caches[64], "sliding_attention") == buffer_numel(caches[4096], "sliding_attention")
    assert buffer_numel(caches[64], "pflow") == buffer_numel(caches[4096], "pflow")


@pytest.mark.parametrize("prompt", [5, 19], ids=["prompt-in-window", "prompt-past-window"])
@pytest.mark.parametrize("mode", GENERATE_MODES, ids=["greedy", "sample", "beam"])
def test_static_ring_generates_what_the_dynamic_cache_does(prompt, mode):
    """Sliding layers (window 8) on a ring: a left-padded batch (one row padded past the window when the
    prompt is long), prompts shorter and longer than the window, decoding far past it."""
    ids, mask = left_padded(length=prompt, pads=min(prompt - 2, 10))
    assert_static_generates_as_dynamic(build("hybrid"), ids, mask, mode, new_tokens=24)


@pytest.mark.parametrize("window", [1, 3, 8, 32, 40])  # 32, 40: the ring is the whole capacity
def test_static_ring_forward_equals_full_forward(window):
    """Chunks shorter and longer than the window, single tokens, after the ring has wrapped, with left
    padding: each equals the full forward's logits."""
    model = build("hybrid", sliding_window=window)
    ids, mask = left_padded(length=30, pads=5)
    cache = PFlowStaticCache(model.config, batch_size=2, max_cache_len=32)
    bounds = [(0, 11), (11, 12), (12, 13), (13, 15), (15, 24), (24, 25), (25, 30)]
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        pieces = [
            model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache).logits for a, b in bounds
        ]
    assert int(cache.slot) == 30
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], atol=2e-5, rtol=1e-4)


def test_generate_continues_from_a_returned_static_cache():
    """Restarting generate() with the whole sequence and its static cache (past the window) continues as
    one uninterrupted generate()."""
    model = build("hybrid")
    ids, mask = left_padded(length=12, pads=4)
    cache = PFlowStaticCache(model.config, batch_size=2, max_cache_len=40)
    kwargs = dict(do_sample=False, **GENERATE)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=9, **{CACHE_FIELD: cache}, **kwargs)
    assert cache.get_seq_length() == 20  # the last token is not fed yet
    grown = torch.cat([mask, torch.ones(2, 9, dtype=mask.dtype)], 1)
    resumed = model.generate(first, attention_mask=grown, max_new_tokens=10, **{CACHE_FIELD: cache}, **kwargs)
    straight = model.generate(ids, attention_mask=mask, max_new_tokens=19, **kwargs)
    assert torch.equal(resumed, straight)


def test_static_cache_restore_undoes_a_step():
    """snapshot() / restore() (how CUDA-graph capture undoes its warm-up runs) bring every buffer back,
    the sliding rings included: replaying the step gives the same logits and state."""
    model = build("hybrid")
    ids, mask = left_padded(length=13, pads=4)
    cache = PFlowStaticCache(model.config, batch_size=2, max_cache_len=20)
    step_ids, step_mask = random_ids(2, 1, seed=3), torch.ones(2, 14, dtype=mask.dtype)
    step_mask[:, :13] = mask
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
        saved, seen = cache.snapshot(), cache.seen_tokens
        first = model(step_ids, attention_mask=step_mask, past_key_values=cache).logits
        after = cache.snapshot()
        cache.restore(saved)
        cache.seen_tokens = seen
        again = model(step_ids, attention_mask=step_mask, past_key_values=cache).logits
    assert torch.equal(first, again)
    for x, y in zip(after, cache.snapshot(), strict=True):
        assert torch.equal(x, y)


def test_static_cache_refuses_overflow_wrong_batch_and_use_after_failure():
    model = build("hybrid")
    cache = PFlowStaticCache(model.config, batch_size=2, max_cache_len=8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="holds 8 positions; 0 are used and 9 more do not fit"):
            model(random_ids(2, 9), past_key_values=cache)
        with pytest.raises(ValueError, match="holds 2 sequences, got batch size 3"):
            model(random_ids(3, 2), past_key_values=cache)
        model(random_ids(2, 3), past_key_values=cache)
        last_mlp = model.model.layers[-1].mlp
        original = last_mlp.forward
        last_mlp.forward = lambda x: (_ for _ in ()).throw(RuntimeError("simulated failure"))
        with pytest.raises(RuntimeError, match="simulated failure"):
            model(random_ids(2, 1), past_key_values=cache)
        last_mlp.forward = original
        with pytest.raises(ValueError, match="failed partway .* call reset"):
            model(random_ids(2, 1), past_key_values=cache)
        cache.reset()
        assert cache.get_seq_length() == 0
        model(random_ids(2, 1), past_key_values=cache)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_static_decode(name, dtype):
    model = build(name, kernel_backend="auto").to("cuda", dtype)
    ids, mask = (t.cuda() for t in left_padded(batch=3, length=40))
    outputs = {}
    for graphs in (False, True):
        for mode in ("greedy", "beam"):
            cache = PFlowStaticCache(
                model.config, 3 * (2 if mode == "beam" else 1), 64, dtype, "cuda", graphs
            )
            extra = dict(num_beams=2) if mode == "beam" else dict(do_sample=False)
            outputs[graphs, mode] = model.generate(
                ids, attention_mask=mask, max_new_tokens=12, past_key_values=cache, **extra, **GENERATE
            )
            assert (cache.graphs is not None) == graphs
            if graphs:
                assert cache.graphs.graphs, "no CUDA graph was captured"
    for mode in ("greedy", "beam"):
        assert torch.equal(outputs[True, mode], outputs[False, mode])


@pytest.mark.parametrize("mode", GENERATE_MODES, ids=["greedy", "sample", "beam"])
def test_generate_reuses_its_static_cache_and_graphs(cpu_graphs, mode):
    """A second generate() reuses the model's static cache (reset in place) and replays the decode graph the
    first one captured; so does one with another prompt and fewer new tokens (the cache is large enough).
    Every call generates what the dynamic cache does."""
    model = build("hybrid")
    ids, mask = left_padded(length=12, pads=4)
    first = static_generate(model, ids, mask, 9, mode)
    cache = kept_static_cache(model)
    graphs = cache.graphs.graphs
    assert len(cpu_graphs) == len(graphs) == 1
    second = static_generate(model, ids, mask, 9, mode)
    assert kept_static_cache(model) is cache and cache.graphs.graphs is graphs
    assert len(cpu_graphs) == 1, "the second generate() captured again"
    assert torch.equal(first, second)
    assert_static_generates_as_dynamic(model, ids, mask, mode, new_tokens=9)

    other_ids, other_mask = random_ids(2, 10, seed=5), torch.ones(2, 10, dtype=torch.long)
    other_mask[0, :6] = 0
    assert_static_generates_as_dynamic(model, other_ids, other_mask, mode, new_tokens=5)
    assert kept_static_cache(model) is cache and len(cpu_graphs) == 1


def test_generate_makes_a_new_static_cache_when_the_kept_one_does_not_fit():
    """More rows (batch, beams), more positions, other weights or dtype: a new cache; the model does not keep
    its cache alive."""
    model = build("hybrid")
    ids, mask = left_padded(length=7, pads=2)
    caches = []
    for args, extra in [
        ((ids, mask), {}),
        ((ids, mask, 20), {}),  # more positions
        ((random_ids(3, 7), None, 20), {}),  # more rows
        ((random_ids(3, 7), None, 20), dict(num_beams=2)),
    ]:
        static_generate(model, *args, **extra)
        caches.append(kept_static_cache(model))
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())  # untied, new address
    static_generate(model, random_ids(3, 7), None, 20, num_beams=2)
    caches.append(kept_static_cache(model))
    model.double()
    assert_static_generates_as_dynamic(model, ids, mask, dict(do_sample=False), new_tokens=6)
    caches.append(kept_static_cache(model))
    assert len({id(c) for c in caches}) == len(caches)
    assert [c.batch_size for c in caches] == [2, 2, 3, 6, 6, 2]
    assert caches[-1].layers[0].recurrent.dtype == torch.float32  # the fp32 state, whatever the model dtype
    assert caches[-1].layers[0].conv["q"].dtype == torch.float64
    model_ref = weakref.ref(model)
    del model, caches
    gc.collect()
    assert model_ref() is None


def test_generate_makes_a_new_static_cache_when_adapters_change():
    """peft's disable_adapter, merge and unmerge change what the LoRA layers compute, not where the weights
    are: the kept cache (whose graphs were captured with the old behaviour) is not reused, and every call
    generates what the dynamic cache does."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("sum"), peft.LoraConfig(r=4, init_lora_weights=False))
    base = model.get_base_model()
    ids, mask = left_padded(length=7, pads=2)
    with_lora = static_generate(model, ids, mask)
    caches = [kept_static_cache(base)]
    with model.disable_adapter():
        without_lora = static_generate(model, ids, mask)
        caches.append(kept_static_cache(base))
        assert_static_generates_as_dynamic(model, ids, mask, dict(do_sample=False), new_tokens=6)
    assert not torch.equal(with_lora, without_lora), "the adapter changes nothing: the test proves nothing"
    assert torch.equal(static_generate(model, ids, mask), with_lora)
    caches.append(kept_static_cache(base))
    assert len({id(c) for c in caches}) == 3
    model.merge_adapter()
    assert torch.equal(static_generate(model, ids, mask), with_lora)
    assert kept_static_cache(base) is not caches[-1]


def test_generate_leaves_a_passed_cache_alone():
    """A cache passed to generate() is used as it is; the kept cache is neither replaced nor touched."""
    model = build("hybrid")
    ids, mask = left_padded(length=7, pads=2)
    static_generate(model, ids, mask)
    kept = kept_static_cache(model)
    kept_state = kept.snapshot()
    passed = PFlowStaticCache(model.config, batch_size=2, max_cache_len=30)
    model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **{CACHE_FIELD: passed}, **GENERATE
    )
    assert passed.get_seq_length() == 12 and kept_static_cache(model) is kept
    assert all(torch.equal(x, y) for x, y in zip(kept_state, kept.snapshot(), strict=True))


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy", "nonzero")


def count_host_reads(monkeypatch, model) -> list[collections.Counter]:
    """From now on, count every call of a Tensor method in HOST_READS (each makes the host wait for the
    device) whose nearest caller outside torch is in this package, by "method file:line". One Counter per
    forward of `model`: reads up to the end of forward i go to Counter i (a generate(): the prefill with its
    input preparation, then one decode step each). Python-level reads only: a data-dependent shape inside
    one op (boolean-mask indexing) is not seen here; on a GPU the graph capture refuses it."""
    package, torch_dir = os.path.dirname(modeling_parallelflow.__file__), os.path.dirname(torch.__file__)
    counts = [collections.Counter()]

    def counting(name, method):
        def wrapper(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(torch_dir):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(package):
                counts[-1][f"{name} {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"] += 1
            return method(tensor, *args, **kwargs)

        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    model.register_forward_hook(lambda *_: counts.append(collections.Counter()))
    return counts


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-path"])
@pytest.mark.parametrize("name", ["sum", "hybrid"])
@pytest.mark.parametrize("mode", [GENERATE_MODES[0], GENERATE_MODES[2]], ids=["greedy", "beam"])
def test_static_decode_steps_make_no_host_reads_in_this_package(request, monkeypatch, name, mode, graphs):
    """The per-token path of a static-cache generate() (prepare_inputs_for_generation, cached_prefix_length,
    prepare_step, the layers or the graph path up to DecodeGraphs.run) reads nothing back from the device.
    transformers' own loop does, once a step (its stopping check); those are not counted."""
    if graphs:
        request.getfixturevalue("cpu_graphs")
    model = build(name)
    ids, mask = left_padded(length=9, pads=3)
    counts = count_host_reads(monkeypatch, model)
    with torch.no_grad():  # a forward with a cu_seqlens tensor reads it once: the count sees it
        model(random_ids(1, 6), cu_seqlens=torch.tensor([0, 2, 6]), use_cache=False)
    assert [n.split(":")[0] for n in counts.pop(0).elements()] == ["tolist packed.py"]
    static_generate(model, ids, mask, 6, mode)
    monkeypatch.undo()
    assert len(counts) == 7  # the prefill, 5 decode steps, after the last forward
    assert counts[1:6] == [collections.Counter()] * 5, counts


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sum", "hybrid"])
def test_cuda_graphs_are_captured_once_across_generate_calls(monkeypatch, name):
    """Two static generate() calls capture the decode graph once; after the reset the replayed graph
    generates what the eager static path does, for the same and for another prompt."""
    captures = []
    capture = DecodeGraphs._capture
    monkeypatch.setattr(DecodeGraphs, "_capture", lambda self, *a: captures.append(1) or capture(self, *a))
    model = build(name, kernel_backend="auto").to("cuda", torch.bfloat16)
    ids, mask = (t.cuda() for t in left_padded(batch=3, length=40))
    first = static_generate(model, ids, mask, 12)
    second = static_generate(model, ids, mask, 12)
    assert len(captures) == 1 and torch.equal(first, second)
    other_ids, other_mask = random_ids(3, 40, seed=9).cuda(), torch.ones_like(mask)
    other_mask[0, :10] = 0
    replayed = static_generate(model, other_ids, other_mask, 12)
    assert len(captures) == 1
    eager = PFlowStaticCache(model.config, 3, 40 + 12, torch.bfloat16, "cuda", cuda_graphs=False)
    expected = model.generate(
        other_ids, attention_mask=other_mask, max_new_tokens=12, do_sample=False,
        **{CACHE_FIELD: eager}, **GENERATE,
    )  # fmt: skip
    assert torch.equal(replayed, expected)
