"""The fixed-shape decode path: `generate(..., cache_implementation="static")` makes a PFlowStaticCache
(preallocated, updated in place, stream position on the device). On CPU it runs eagerly and must equal the
dynamic cache; on a GPU its steps replay as CUDA graphs and must equal the eager static path."""

import pytest
import torch

from modeling_parallelflow import PFlowStaticCache
from tests.model_helpers import random_ids, tiny_model

GENERATE = dict(pad_token_id=0, eos_token_id=None)
MODELS = {"sum": ("tiny", {}), "product": ("tiny", dict(rank_mode="product")), "hybrid": ("tiny-hybrid", {})}


def build(name: str, **extra):
    config_name, overrides = MODELS[name]
    return tiny_model(config_name, **overrides, **extra)


def left_padded(batch: int = 2, length: int = 7):
    ids = random_ids(batch, length)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["sum", pytest.param("product", marks=pytest.mark.slow), "hybrid"])
@pytest.mark.parametrize(
    "mode",
    [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=3, num_return_sequences=2)],
    ids=["greedy", "sample", "beam"],
)
def test_static_cache_generates_what_the_dynamic_cache_does(name, mode):
    model = build(name)
    ids, mask = left_padded()
    results = []
    for implementation in (None, "static"):
        torch.manual_seed(7)
        results.append(
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=6,
                cache_implementation=implementation,
                **mode,
                **GENERATE,
            )
        )
    assert torch.equal(results[0], results[1])


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
    size = lambda cache: sum(t.numel() for layer in cache.layers for t in layer.tensors().values())  # noqa: E731
    assert size(short) == size(long)


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
