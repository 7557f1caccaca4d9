"""The chunked linear cross-entropy against transformers' ForCausalLMLoss on full logits (torch, CPU)."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from modeling_parallelflow import loss_parallelflow
from modeling_parallelflow.loss_parallelflow import linear_cross_entropy

VOCAB, DIM = 37, 16


def reference(hidden, weight, labels, **kwargs):
    return ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=weight.shape[0], **kwargs)


def inputs(dtype, batch=3, length=11, ignore_every=4):
    hidden = torch.randn(batch, length, DIM, dtype=dtype)
    weight = torch.randn(VOCAB, DIM, dtype=dtype) / DIM**0.5
    labels = torch.randint(0, VOCAB, (batch, length))
    labels.view(-1)[::ignore_every] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_elements", [VOCAB * 5, 1 << 26], ids=["chunk5", "one_chunk"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_items_in_batch": torch.tensor(17)}, {"num_items_in_batch": 9}, {"ignore_index": 3}],
    ids=["mean", "num_items_tensor", "num_items_int", "ignore_3"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_for_causal_lm_loss(monkeypatch, chunk_elements, kwargs, dtype):
    monkeypatch.setattr(loss_parallelflow, "CHUNK_ELEMENTS", chunk_elements)
    hidden, weight, labels = inputs(dtype)
    if "ignore_index" in kwargs:
        labels[labels == -100] = kwargs["ignore_index"]
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = linear_cross_entropy(h1, w1, labels, **kwargs)
    ref = reference(h2, w2, labels, **kwargs)
    ours.backward()
    ref.backward()
    # fp32: rounding only. bf16: both make bf16 logits and bf16 gradient matmuls; ours sums the weight
    # gradient over chunks in fp32 (measured max rel. diff 4e-3, one bf16 ulp).
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)


def test_shift_labels_and_all_ignored():
    hidden, weight, labels = inputs(torch.float32)
    shifted = torch.randint(0, VOCAB, labels.shape)
    torch.testing.assert_close(
        linear_cross_entropy(hidden, weight, None, shift_labels=shifted),
        reference(hidden, weight, None, shift_labels=shifted),
    )
    ignored = torch.full_like(labels, -100)
    assert linear_cross_entropy(hidden, weight, ignored).isnan()  # as torch's mean over no tokens
    assert reference(hidden, weight, ignored).isnan()


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(loss_parallelflow.LINEAR_CE_ENV, raising=False)
    assert loss_parallelflow.resolve_linear_ce(cpu) == "torch"
    monkeypatch.setenv(loss_parallelflow.LINEAR_CE_ENV, "bogus")
    with pytest.raises(ValueError, match="PFLOW_LINEAR_CE"):
        loss_parallelflow.resolve_linear_ce(cpu)
    monkeypatch.setenv(loss_parallelflow.LINEAR_CE_ENV, "liger")
    with pytest.raises((RuntimeError, ValueError), match="PFLOW_LINEAR_CE=liger"):
        loss_parallelflow.resolve_linear_ce(cpu)


def tiny_model(**overrides):
    from modeling_parallelflow import PFlowConfig, PFlowForCausalLM

    config = PFlowConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2, rank=2, **overrides
    )
    return PFlowForCausalLM(config)


@pytest.mark.parametrize("kwargs", [{}, {"num_items_in_batch": torch.tensor(20)}], ids=["mean", "num_items"])
def test_model_training_loss_without_logits(kwargs):
    """train(): the fused loss, logits None; eval(): logits and the same loss; the same gradients."""
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 13))
    labels = ids.clone()
    labels[0, :4] = -100
    model.train()
    fused = model(input_ids=ids, labels=labels, **kwargs)
    fused.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.eval()
    full = model(input_ids=ids, labels=labels, **kwargs)
    full.loss.backward()
    assert fused.logits is None and full.logits.shape == (2, 13, VOCAB)
    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_model_fused_loss_off_keeps_logits():
    model = tiny_model(fused_loss=False).train()
    ids = torch.randint(0, VOCAB, (1, 9))
    assert model(input_ids=ids, labels=ids).logits.shape == (1, 9, VOCAB)
