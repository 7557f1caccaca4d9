"""The invariants transformers' common model tests hold a causal LM to (ModelTesterMixin,
GenerationTesterMixin), written for this model and run on every supported transformers version.

Where a common check does not apply to a recurrent state, as for transformers' in-tree Mamba2 and
Qwen3-Next, the test says why: there are no attention weights to return, and a cache cannot be cropped.
"""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from modeling_parallelflow import PFlowCache, PFlowForCausalLM
from modeling_parallelflow.compat_transformers import CACHE_FIELD
from tests.model_helpers import random_ids, tiny_model

GENERATE = dict(pad_token_id=0, eos_token_id=None)
MODELS = {"sum": dict(), "product": dict(rank_mode="product"), "hybrid": None}


def build(name: str) -> PFlowForCausalLM:
    return tiny_model("tiny-hybrid") if MODELS[name] is None else tiny_model(**MODELS[name])


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generate_equals_argmax_loop_over_full_forwards(name):
    model = build(name)
    ids = random_ids(2, 6)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, **GENERATE)
    seq = ids
    for _ in range(6):
        seq = torch.cat([seq, full_logits(model, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("name", ["sum", "hybrid"])
def test_sampling_with_a_seed_equals_sampling_from_full_forward_logits(name):
    model = build(name)
    ids = random_ids(2, 5)
    torch.manual_seed(123)
    out = model.generate(
        ids, max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, **GENERATE
    )
    torch.manual_seed(123)
    seq = ids
    for _ in range(6):
        probs = torch.softmax(full_logits(model, seq)[:, -1], -1)
        seq = torch.cat([seq, torch.multinomial(probs, num_samples=1)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("name", ["sum", "product", "hybrid"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["beam", "beam-sample"])
def test_beam_scores_equal_full_forward_log_probabilities(name, do_sample):
    model = build(name)
    ids = random_ids(2, 5)
    torch.manual_seed(0)
    out = model.generate(
        ids, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=do_sample, length_penalty=0.0,
        output_scores=True, return_dict_in_generate=True, **GENERATE,
    )  # fmt: skip
    logp = torch.log_softmax(full_logits(model, out.sequences), -1)
    new = out.sequences[:, 5:]
    total = logp[:, 4:-1].gather(-1, new[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(out.sequences_scores.float(), total, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["sum", "hybrid"])
def test_left_padded_batch_generates_what_single_prompts_do(name):
    model = build(name)
    prompts = [random_ids(1, 8, seed=4)[0], random_ids(1, 3, seed=5)[0]]
    batch = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, 8 - len(p) :], mask[i, 8 - len(p) :] = p, 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, **GENERATE)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=5, do_sample=False, **GENERATE)
        assert torch.equal(together[i, 8:], alone[0, len(p) :])


@pytest.mark.parametrize("cache_argument", ["cache", "past_key_values"])
@pytest.mark.parametrize("use_cache", [True, False, None])
def test_cached_continuation_equals_full_forward(cache_argument, use_cache):
    """A passed cache is always read and advanced, under either argument name, whatever use_cache says."""
    model = build("hybrid")
    ids = random_ids(2, 12)
    with torch.no_grad():
        first = model(ids[:, :7], use_cache=True)
        cache = first[CACHE_FIELD]
        assert isinstance(cache, PFlowCache) and cache.get_seq_length() == 7
        second = model(ids[:, 7:], use_cache=use_cache, **{cache_argument: cache})
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(
        torch.cat([first.logits, second.logits], 1), full_logits(model, ids), atol=2e-5, rtol=1e-4
    )


def test_cache_passed_twice_under_both_names_is_refused():
    model = build("sum")
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="pass the cache once"):
        model(ids, cache=PFlowCache(model.config), past_key_values=PFlowCache(model.config))


@pytest.mark.parametrize("name", ["sum", "hybrid"])
def test_generate_continues_from_a_returned_cache(name):
    """Restarting generate() with the whole sequence and its cache must not re-feed the cached tokens
    (transformers >= 5.24 leaves that slicing to models whose caches are all linear)."""
    model = build(name)
    ids = random_ids(1, 6)
    first = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, **GENERATE)
    cache = first[CACHE_FIELD]
    resumed = model.generate(
        first.sequences, max_new_tokens=3, do_sample=False, **{CACHE_FIELD: cache}, **GENERATE
    )
    straight = model.generate(ids, max_new_tokens=6, do_sample=False, **GENERATE)
    assert torch.equal(resumed, straight)


@pytest.mark.parametrize("name", ["sum", "hybrid"])
def test_output_hidden_states(name):
    model = build(name)
    ids = random_ids(2, 5)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        base = model.model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 5, model.config.hidden_size) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    torch.testing.assert_close(out.hidden_states[-1], base.last_hidden_state)
    assert model(ids).hidden_states is None


def test_return_dict_false_gives_a_tuple():
    model = build("sum")
    ids = random_ids(1, 5)
    with torch.no_grad():
        as_tuple = model(ids, labels=ids, return_dict=False)
        as_output = model(ids, labels=ids)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.loss)
    torch.testing.assert_close(as_tuple[1], as_output.logits)


def test_output_attentions_is_a_clear_error():
    """Not applicable: pflow layers keep a recurrent matrix state, there are no attention weights (as for
    transformers' Mamba2, `has_attentions = False`). Asking for them fails clearly, not with None."""
    model = build("hybrid")
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(random_ids(1, 4), output_attentions=True)


def test_unknown_keyword_arguments_are_errors():
    model = build("sum")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['past_key_value'\\]"):
        model(random_ids(1, 4), past_key_value=None)
    with pytest.raises(TypeError):
        model.model(random_ids(1, 4), num_items_in_batch=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_from_pretrained_with_dtype(tmp_path, dtype):
    model = build("hybrid")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert all(p.dtype == dtype for p in loaded.parameters())
    with torch.no_grad():
        logits = loaded(random_ids(1, 6)).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_resize_token_embeddings_keeps_tied_head_and_old_logits():
    model = build("sum")
    ids = random_ids(1, 6)
    before = full_logits(model, ids)
    old_vocab = model.config.vocab_size
    model.resize_token_embeddings(old_vocab + 7)
    assert model.config.vocab_size == old_vocab + 7
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    after = full_logits(model, ids)
    assert after.shape[-1] == old_vocab + 7
    torch.testing.assert_close(after[..., :old_vocab], before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sum", "hybrid"])
def test_right_padding_leaves_real_positions_unchanged(name):
    model = build(name)
    ids = random_ids(1, 6)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long()
    with torch.no_grad():
        out = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(out[:, :6], full_logits(model, ids), atol=2e-5, rtol=1e-4)


def test_assisted_decoding_is_refused_clearly():
    """Not applicable: assisted decoding rolls the cache back, and a recurrent state cannot forget tokens
    (`_is_stateful`, as for Mamba2); generate() refuses it with its own error."""
    model = build("sum")
    with pytest.raises(ValueError, match="stateful"):
        model.generate(random_ids(1, 4), assistant_model=build("sum"), max_new_tokens=2, **GENERATE)


def test_generation_config_and_model_classes_are_wired():
    model = build("sum")
    assert isinstance(model, transformers.GenerationMixin)
    assert model.can_generate()
    assert model.config.model_type == "parallelflow"
