"""A cache is right or refuses: foreign configs and batch sizes are errors, and a failed forward leaves
the cache as it was (CPU, torch path)."""

import pytest
import torch

from modeling_parallelflow import PFlowCache
from modeling_parallelflow.compat_transformers import cache_of
from tests.model_helpers import random_ids, tiny_model


def test_cache_of_another_config_is_refused():
    model, other = tiny_model(), tiny_model("tiny-hybrid")
    with torch.no_grad():
        cache = cache_of(other(random_ids(1, 5), use_cache=True))
        with pytest.raises(ValueError, match="built for another model config .*layer_types"):
            model(random_ids(1, 1), past_key_values=cache)
        rank_cache = cache_of(tiny_model(rank=1)(random_ids(1, 5), use_cache=True))
        with pytest.raises(ValueError, match="rank: cache 1 vs model 2"):
            model(random_ids(1, 1), past_key_values=rank_cache)


def test_cache_of_another_batch_size_is_refused():
    model = tiny_model()
    with torch.no_grad():
        cache = cache_of(model(random_ids(2, 5), use_cache=True))
        with pytest.raises(ValueError, match="the cache holds 2 sequences but the inputs have batch size 3"):
            model(random_ids(3, 1), past_key_values=cache)


def test_not_a_pflow_cache_is_refused():
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="must be a PFlowCache, got DynamicCache"):
        tiny_model()(random_ids(1, 3), past_key_values=DynamicCache())


@pytest.mark.parametrize("name", ["tiny", "tiny-hybrid"])
def test_failed_forward_leaves_the_cache_unchanged(name):
    """A forward that fails in its last layer must not have advanced any layer's state: a retry gives the
    same logits as a forward that never failed."""
    model = tiny_model(name)
    ids = random_ids(1, 9)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        cache = cache_of(model(ids[:, :6], use_cache=True))
        last_mlp = model.model.layers[-1].mlp
        original = last_mlp.forward
        last_mlp.forward = lambda x: (_ for _ in ()).throw(RuntimeError("simulated failure"))
        with pytest.raises(RuntimeError, match="simulated failure"):
            model(ids[:, 6:], past_key_values=cache)
        last_mlp.forward = original
        assert cache.get_seq_length() == 6
        retry = model(ids[:, 6:], past_key_values=cache).logits
    torch.testing.assert_close(retry, reference[:, 6:], atol=2e-5, rtol=1e-4)


def test_cache_is_honoured_in_train_mode():
    model = tiny_model().train()
    ids = random_ids(1, 8)
    cache = PFlowCache(model.config)
    first = model(ids[:, :5], past_key_values=cache).logits
    second = model(ids[:, 5:], past_key_values=cache).logits
    assert cache.get_seq_length() == 8
    full = model(ids).logits
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.tensor([1, 2, 3])), "input_ids must be a 2D tensor"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "no tokens"),
        (dict(input_ids=torch.ones(1, 3)), "integer token ids"),
        (
            dict(input_ids=random_ids(1, 4), position_ids=torch.arange(3)[None]),
            "position_ids must have shape",
        ),
        (dict(inputs_embeds=torch.zeros(1, 3, 5)), "inputs_embeds must have shape"),
    ],
    ids=["1d-ids", "empty-ids", "float-ids", "short-position-ids", "embeds-width"],
)
def test_bad_model_inputs_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model()(**kwargs)
