"""Model invariants on CPU with the torch path: cache, padding, packing, generate, training, configs."""

import pytest
import torch

from modeling_parallelflow import PFlowCache, PFlowConfig, PFlowForCausalLM
from tests.model_helpers import random_ids, tiny_config, tiny_model

VARIANTS = {
    "sum": dict(),
    "product": dict(rank_mode="product"),
    "exact-flow": dict(flow="exact"),
    "gate-negeig": dict(use_gate=True, allow_neg_eigval=True),
    "no-conv-r1": dict(use_short_conv=False, rank=1),
    "recurrent-algorithm": dict(algorithm="recurrent"),
    "sigdelta-algorithm": dict(algorithm="sigdelta"),
}


HYBRIDS = {
    "hybrid": dict(),
    "hybrid-qwen-attention": dict(attention_bias=True, attention_output_bias=True, attention_qk_norm=True),
}


def build(variant: str) -> PFlowForCausalLM:
    if variant in HYBRIDS:
        return tiny_model("tiny-hybrid", **HYBRIDS[variant])
    return tiny_model(**VARIANTS[variant])


ALL_VARIANTS = [*VARIANTS, *HYBRIDS]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_incremental_decode_equals_full_forward(variant):
    model = build(variant)
    ids = random_ids(2, 21)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = PFlowCache(model.config)
        # prefill 11 tokens, then one token, then a multi-token continuation on the filled cache, then singles
        pieces, logits = [(0, 11), (11, 12), (12, 17)] + [(t, t + 1) for t in range(17, 21)], []
        for start, end in pieces:
            out = model(ids[:, start:end], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    assert cache.get_seq_length() == 21
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["sum", "product", "hybrid"])
def test_left_padded_batch_equals_single_rows(variant):
    model = build(variant)
    long, short = random_ids(1, 14, seed=2), random_ids(1, 9, seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([long, torch.cat([pad, short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        ref_long = model(long).logits
        ref_short = model(short).logits
    torch.testing.assert_close(padded[0], ref_long[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(padded[1, 5:], ref_short[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["sum", "hybrid"])
def test_left_padded_generate_equals_single_prompts(variant):
    model = build(variant)
    prompts = [random_ids(1, 7, seed=4)[0], random_ids(1, 4, seed=5)[0]]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 7 - len(p) :] = p
        mask[i, 7 - len(p) :] = 1
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    together = model.generate(batch, attention_mask=mask, **kwargs)[:, 7:]
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert torch.equal(together[i], alone[0, len(p) :])


@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
@pytest.mark.parametrize("variant", ["sum", "hybrid"])
def test_chunked_prefill_generates_what_one_prefill_does(variant, cache_implementation):
    """transformers' `prefill_chunk_size`: the left-padded prompt goes through the model 5 tokens at a time
    (the last chunk shorter), and greedy decoding from that cache gives the tokens of a one-shot prefill."""
    model = build(variant)
    ids = random_ids(2, 23, seed=6)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    kwargs = dict(
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        cache_implementation=cache_implementation,
    )
    whole = model.generate(ids, attention_mask=mask, **kwargs)
    chunked = model.generate(ids, attention_mask=mask, prefill_chunk_size=5, **kwargs)
    assert torch.equal(chunked, whole)


def test_generate_greedy_matches_manual_argmax_loop():
    model = build("sum")
    ids = random_ids(1, 5)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("variant", ["sum", "hybrid"])
def test_beam_search_and_sampling_run(variant):
    model = build(variant)
    ids = random_ids(2, 5)
    beams = model.generate(
        ids,
        max_new_tokens=4,
        num_beams=3,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        num_return_sequences=2,
    )
    assert beams.shape == (4, 9)
    torch.manual_seed(0)
    sampled = model.generate(
        ids, max_new_tokens=4, do_sample=True, top_k=20, pad_token_id=0, eos_token_id=None
    )
    assert sampled.shape == (2, 9)
    # beam search with one beam is greedy
    one_beam = model.generate(
        ids, max_new_tokens=4, num_beams=1, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    greedy = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(one_beam, greedy)


def test_beam_search_scores_match_full_forward():
    """Beam search reorders the cache; the returned beam's score must equal its full-forward log-prob."""
    model = build("hybrid")
    ids = random_ids(1, 6)
    out = model.generate(
        ids,
        max_new_tokens=4,
        num_beams=3,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
        length_penalty=0.0,
    )
    seq = out.sequences[:1]
    with torch.no_grad():
        logp = torch.log_softmax(model(seq, use_cache=False).logits.float(), -1)
    total = sum(logp[0, t - 1, seq[0, t]] for t in range(6, 10))
    torch.testing.assert_close(out.sequences_scores[0].float(), total, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["sum", "hybrid", "product"])
def test_packed_sequences_equal_separate_sequences(variant):
    model = build(variant)
    a, b = random_ids(1, 9, seed=6), random_ids(1, 13, seed=7)
    packed = torch.cat([a, b], 1)
    cu = torch.tensor([0, 9, 22], dtype=torch.int32)
    with torch.no_grad():
        out = model(packed, cu_seqlens=cu, use_cache=False).logits
        torch.testing.assert_close(out[:, :9], model(a, use_cache=False).logits, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[:, 9:], model(b, use_cache=False).logits, atol=2e-5, rtol=1e-4)
        masked = model(packed, cu_seqlens=cu, attention_mask=torch.ones_like(packed), use_cache=False).logits
        torch.testing.assert_close(masked, out, atol=0, rtol=0)  # positions still restart per sequence


def test_r1_mixer_is_deltanet():
    """R = 1 sum mode: the mixer's delta rule is DeltaNet's S <- S - beta (S k - v) k^T, o = S q / sqrt(K)."""
    model = build("no-conv-r1")
    mixer = model.model.layers[0].linear_attn
    x = torch.randn(1, 6, model.config.hidden_size)
    with torch.no_grad():
        out = mixer(x)
        h, k_dim = mixer.num_heads, mixer.head_k_dim

        def unit(y):
            return y / (y.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()

        q = unit(torch.nn.functional.silu(mixer.q_proj(x)).view(1, 6, h, k_dim))
        k = unit(torch.nn.functional.silu(mixer.k_proj(x)).view(1, 6, h, k_dim))
        v = torch.nn.functional.silu(mixer.v_proj(x)).view(1, 6, h, -1)
        beta = torch.sigmoid(mixer.b_proj(x)).view(1, 6, h)
        S = torch.zeros(h, v.shape[-1], k_dim)
        outs = []
        for t in range(6):
            for i in range(h):
                kt, vt = k[0, t, i], v[0, t, i]
                S[i] = S[i] - beta[0, t, i] * torch.outer(S[i] @ kt - vt, kt)
            outs.append(torch.einsum("hvk,hk->hv", S, q[0, t]) * k_dim**-0.5)
        o = torch.stack(outs)[None]
        expected = mixer.o_proj(mixer.o_norm(o).reshape(1, 6, -1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_loss_labels_and_num_items_in_batch():
    model = build("sum")
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, model.config.vocab_size).float()
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(4)).loss
    per_token = torch.nn.functional.cross_entropy(
        logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(summed, per_token / 4)


def test_logits_to_keep():
    model = build("sum")
    ids = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:])


def test_gradient_checkpointing_gives_same_gradients():
    model = build("hybrid").train()
    ids = random_ids(2, 12)
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref[name], atol=1e-6, rtol=1e-5, msg=name)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "embed" not in n), "dead weight"


def test_trainer_runs_with_gradient_checkpointing(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = build("sum").train()
    data = [{"input_ids": ids, "labels": ids} for ids in random_ids(16, 24)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        gradient_checkpointing=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and result.training_loss > 0
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank", 0, "rank"),
        ("rank", 9, "rank"),
        ("rank_mode", "mean", "rank_mode"),
        ("flow", "rk4", "flow"),
        ("algorithm", "fft", "algorithm"),
        ("kernel_backend", "cuda", "kernel_backend"),
        ("layer_types", ["pflow", "mamba"], "layer_types"),
        ("layer_types", ["pflow"], "layer_types"),
        ("chunk_size", 48, "chunk_size"),
        ("num_heads", 0, "num_heads"),
        ("conv_size", 0, "conv_size"),
        ("hidden_act", "gelu", "hidden_act"),
        ("attention_bias", "yes", "attention_bias"),
    ],
)
def test_bad_config_raises_naming_the_field(field, value, message):
    kwargs = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2)
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        PFlowConfig(**kwargs)


def test_bad_hybrid_configs_raise():
    with pytest.raises(ValueError, match="sliding_window"):
        PFlowConfig(hidden_size=32, num_hidden_layers=1, num_heads=2, layer_types=["sliding_attention"])
    with pytest.raises(ValueError, match="num_key_value_heads"):
        PFlowConfig(
            hidden_size=32, num_hidden_layers=1, num_heads=4, layer_types=["attention"], num_key_value_heads=3
        )


def test_bad_inputs_raise():
    model = build("sum")
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5, 1))
    with pytest.raises(ValueError, match="attention_mask covers 4 positions"):
        model(ids, attention_mask=torch.ones(2, 4))
    cache = PFlowCache(model.config)
    model(ids, past_key_values=cache)
    with pytest.raises(ValueError, match="5 cached and 5 new"):
        model(ids, attention_mask=torch.ones(2, 5), past_key_values=cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, cu_seqlens=torch.tensor([0, 5, 10]))
    with pytest.raises(ValueError, match="input_ids"):
        model()


def test_shipped_configs_load():
    for name in (
        "tiny",
        "tiny-hybrid",
        "deltanet-340m-r1",
        "deltanet-340m-r2",
        "deltanet-340m-r4",
        "deltanet-1.3b-r1",
        "deltanet-1.3b-r2",
        "deltanet-1.3b-r4",
    ):
        config = tiny_config(name)
        assert config.model_type == "parallelflow"
    assert tiny_config("deltanet-1.3b-r4").rank == 4
