"""The fixed-shape decode path: `generate(..., cache_implementation="static")` makes a PFlowStaticCache
(preallocated, updated in place, stream position on the device; sliding-window layers on a window-sized
ring). On CPU it runs eagerly and must equal the dynamic cache; on a GPU its steps replay as CUDA graphs and
must equal the eager static path."""

import pytest
import torch

from modeling_parallelflow import PFlowStaticCache
from modeling_parallelflow.compat_transformers import CACHE_FIELD
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
