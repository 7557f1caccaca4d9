"""The fused Triton glue of the pflow mixer against its torch path (the reference in modeling_parallelflow).

Tier 2 (`triton_interpret`): small fp32 shapes in Triton's CPU interpreter (compiled on a GPU where there
is one). Tier 3 (`gpu`): bf16 at a model-like shape, forward and backward, against the torch path in fp32.
"""

import pytest
import torch

from modeling_parallelflow.compat_transformers import cache_of
from modeling_parallelflow.modeling_parallelflow import (
    gated_rms_norm_torch,
    segment_ids_from_cu_seqlens,
    short_conv_silu_torch,
)

triton_conv = pytest.importorskip("modeling_parallelflow.triton_conv")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # tier 2 runs on a GPU too


def conv_reference(x, weight, tail, cu_seqlens, pad_mask, group, normalize):
    """The mixer's torch path (`short_conv_silu_torch`), with segments from cu_seqlens."""
    segments = segment_ids_from_cu_seqlens(cu_seqlens, x.shape[1]) if cu_seqlens is not None else None
    return short_conv_silu_torch(
        x, weight, group=group, normalize=normalize, tail=tail, segments=segments, pad_mask=pad_mask
    )


def positions(cu_seqlens, length):
    segments = segment_ids_from_cu_seqlens(cu_seqlens, length)
    return (torch.arange(length, device=cu_seqlens.device) - cu_seqlens[segments]).to(torch.int32)


CASES = {
    # name: (B, T, groups, group, W, tail, cu_seqlens, pad)
    "plain": (2, 37, 3, 16, 4, False, None, False),
    "norm_odd_group": (2, 21, 2, 24, 4, False, None, False),
    "tail_prefill": (2, 19, 2, 16, 4, True, None, False),
    "tail_decode_1": (3, 1, 2, 16, 4, True, None, False),
    "tail_decode_2": (1, 2, 2, 16, 3, True, None, False),
    "short_no_tail": (2, 2, 2, 16, 4, False, None, False),
    "packed": (1, 50, 2, 16, 4, False, [0, 1, 3, 20, 50], False),
    "pads": (2, 23, 2, 16, 4, False, None, True),
    "width_1": (2, 9, 2, 16, 1, False, None, False),
}


def make_case(name, device, dtype):
    batch, length, groups, group, width, has_tail, cu, pad = CASES[name]
    channels = groups * group
    x = torch.randn(batch, length, channels, device=device, dtype=dtype)
    weight = torch.randn(channels, 1, width, device=device, dtype=dtype) / width**0.5
    tail = torch.randn(batch, channels, width - 1, device=device, dtype=dtype) if has_tail else None
    cu_seqlens = torch.tensor(cu, device=device) if cu is not None else None
    pad_mask = None
    if pad:
        pad_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        pad_mask[0, :5] = False  # left padding
        pad_mask[1, 7] = False
    return x, weight, tail, cu_seqlens, pad_mask, group


def check_conv(name, normalize, device, dtype, tol):
    x, weight, tail, cu, pad_mask, group = make_case(name, device, dtype)
    x1, w1 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    x2, w2 = x.double().requires_grad_(), weight.double().requires_grad_()  # the torch path in float64
    pos = positions(cu, x.shape[1]) if cu is not None else None
    y, new_tail = triton_conv.short_conv_silu(
        x1, w1, group=group, normalize=normalize, tail=tail, pos=pos, pad_mask=pad_mask
    )
    ref_tail = tail.double() if tail is not None else None
    y_ref, tail_ref = conv_reference(x2, w2, ref_tail, cu, pad_mask, group, normalize)
    dy = torch.randn_like(y_ref)
    (y.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(new_tail.double(), tail_ref, **tol)
    assert new_tail.is_contiguous()  # the next decode step reads it without a copy
    torch.testing.assert_close(x1.grad.double(), x2.grad, **tol)
    torch.testing.assert_close(w1.grad.double(), w2.grad, **tol)
    with torch.no_grad():  # training keeps no tail: the same output, no tail built
        y_only, none = triton_conv.short_conv_silu(
            x,
            weight,
            group=group,
            normalize=normalize,
            tail=tail,
            pos=pos,
            pad_mask=pad_mask,
            keep_tail=False,
        )
    assert none is None
    torch.testing.assert_close(y_only, y.detach(), rtol=0, atol=0)


# Launch settings of the conv kernels (TUNE; warps matter on a GPU only): the defaults, then small and large
# row tiles.
LAUNCHES = [
    pytest.param({}, id="default"),
    pytest.param(dict(conv_block_t=16, conv_dc_warps=2, conv_dx_warps=8), id="bt16"),
    pytest.param(dict(conv_block_t=64, conv_dc_warps=8, conv_dx_warps=2), id="bt64"),
]


@pytest.mark.triton_interpret
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("normalize", [False, True], ids=["silu", "silu_l2"])
@pytest.mark.parametrize("name", list(CASES))
def test_conv_interpreted(monkeypatch, name, normalize, launch):
    for key, value in launch.items():
        monkeypatch.setitem(triton_conv.TUNE, key, value)
    check_conv(name, normalize, DEVICE, torch.float32, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.gpu
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("normalize", [False, True], ids=["silu", "silu_l2"])
def test_conv_gpu_bf16_model_shape(monkeypatch, normalize, launch):
    """bf16 at 2 x 2048 tokens, 8 heads of 128 channels; the reference runs in fp32 on the same inputs.
    Tolerance: bf16 output rounding (rel. 4e-3) and bf16 dx; dweight sums 4,096 products in fp32."""
    for key, value in launch.items():
        monkeypatch.setitem(triton_conv.TUNE, key, value)
    torch.manual_seed(0)
    x = torch.randn(2, 2048, 1024, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(1024, 1, 4, device="cuda") / 2).to(torch.bfloat16)
    x1, w1 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    x2, w2 = x.double().requires_grad_(), weight.double().requires_grad_()  # the torch path in float64
    y, _ = triton_conv.short_conv_silu(x1, w1, group=128, normalize=normalize)
    y_ref, _ = conv_reference(x2, w2, None, None, None, 128, normalize)
    dy = torch.randn_like(y_ref)
    (y.float() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    for ours, ref in ((y, y_ref), (x1.grad, x2.grad), (w1.grad, w2.grad)):
        rel = (ours.float() - ref).norm() / ref.norm()
        assert rel < 1e-2, rel


def check_norm(shape, gated, device, dtype, tol):
    triton_norm = pytest.importorskip("modeling_parallelflow.triton_norm")
    o = torch.randn(*shape, device=device, dtype=dtype)
    weight = 1 + 0.3 * torch.randn(shape[-1], device=device, dtype=dtype)
    gate = torch.randn(*shape, device=device, dtype=dtype) if gated else None
    ours_in = [x.clone().requires_grad_() if x is not None else None for x in (o, weight, gate)]
    ref_in = [x.float().requires_grad_() if x is not None else None for x in (o, weight, gate)]
    y = triton_norm.gated_rms_norm(ours_in[0], ours_in[1], ours_in[2], 1e-6)
    y_ref = gated_rms_norm_torch(ref_in[0], ref_in[1], ref_in[2], 1e-6)
    # Both get the same dy: ours arrives in y's dtype, so the reference gets it rounded alike. (With an fp32
    # dy for the reference only, dweight, a sum over 65,536 rows, differed by up to 0.77 at |dweight| ~ 144
    # from the rounding of dy alone: H200 run at db39112.)
    dy = torch.randn_like(y_ref).to(dtype).float()
    (y.float() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(y.float(), y_ref, **tol)
    for ours, ref in zip(ours_in, ref_in, strict=True):
        if ours is not None:
            torch.testing.assert_close(ours.grad.float(), ref.grad, **tol)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("shape", [(2, 7, 3, 32), (1, 5, 2, 24)], ids=["V32", "V24"])
def test_gated_norm_interpreted(shape, gated):
    check_norm(shape, gated, DEVICE, torch.float32, dict(rtol=1e-5, atol=1e-5))


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize(
    "shape, dtype",
    [((2, 1000, 3, 128), torch.float32), ((4, 2048, 8, 128), torch.bfloat16)],
    ids=["fp32_V128", "bf16_model_shape"],
)
def test_gated_norm_gpu(shape, dtype, gated):
    # bf16: one output rounding (rel. 4e-3); dweight sums 65,536 rows in fp32.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    check_norm(shape, gated, "cuda", dtype, tol)


@pytest.mark.gpu
def test_glue_kernels_address_past_2_31_elements():
    """Tensors of more than 2**31 elements (a 64 x 32K prefill at R = 4 has 17G in its keys): the rows past
    2**31 must equal the same rows run alone. With int32 offsets they wrapped, and bench_generate's R = 4,
    B = 64, 32K-token prefill hit an illegal memory access (H200, 16d3764). Forward and backward."""
    triton_norm = pytest.importorskip("modeling_parallelflow.triton_norm")
    torch.manual_seed(0)
    x = torch.randn(3, 2**20, 1024, device="cuda", dtype=torch.bfloat16)  # 3 * 2**30 elements
    weight = (torch.randn(1024, 1, 4, device="cuda") / 2).to(torch.bfloat16)
    whole = x.requires_grad_()
    y, _ = triton_conv.short_conv_silu(whole, weight, group=128, normalize=True)
    y[2:].float().sum().backward()
    last = x[2:].detach().clone().requires_grad_()
    y_last, _ = triton_conv.short_conv_silu(last, weight, group=128, normalize=True)
    y_last.float().sum().backward()
    assert torch.equal(y[2:], y_last)
    assert torch.equal(whole.grad[2:], last.grad)
    del x, whole, y, y_last, last

    o = torch.randn(2**24 + 16, 128, device="cuda", dtype=torch.bfloat16)  # 2**31 + 2,048 elements
    gate = torch.randn_like(o)
    w = torch.ones(128, device="cuda", dtype=torch.bfloat16)
    tail = slice(-64, None)
    o1, g1 = o.requires_grad_(), gate.requires_grad_()
    y = triton_norm.gated_rms_norm(o1, w, g1, 1e-6)
    y[tail].float().sum().backward()
    o2, g2 = o[tail].detach().clone().requires_grad_(), gate[tail].detach().clone().requires_grad_()
    y2 = triton_norm.gated_rms_norm(o2, w, g2, 1e-6)
    y2.float().sum().backward()
    assert torch.equal(y[tail], y2)
    assert torch.equal(o1.grad[tail], o2.grad) and torch.equal(g1.grad[tail], g2.grad)


def tiny_pair(**overrides):
    """The same tiny fp32 model twice: Triton backend (fused glue, interpreted on CPU) and torch backend."""
    from modeling_parallelflow import PFlowConfig, PFlowForCausalLM

    fields = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=2, rank=2, chunk_size=16)
    fields.update(overrides)
    torch.manual_seed(0)
    fused = PFlowForCausalLM(PFlowConfig(kernel_backend="triton", **fields))
    reference = PFlowForCausalLM(PFlowConfig(kernel_backend="torch", **fields))
    reference.load_state_dict(fused.state_dict())
    return fused.to(DEVICE), reference.to(DEVICE)


@pytest.mark.slow
@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", ["plain_gate", "pads", "packed", "exact_flow"])
def test_model_training_step_interpreted(case):
    """Loss and every gradient of the Triton-glue model equal the torch path's (fp32); exact_flow adds the
    fused exact-flow drivers (triton_exact_flow.py)."""
    fused, reference = tiny_pair(
        use_gate=case == "plain_gate", flow="exact" if case == "exact_flow" else "euler"
    )
    ids = torch.randint(0, 50, (2, 21) if case != "packed" else (1, 40), device=DEVICE)
    kwargs = {}
    if case == "pads":
        mask = torch.ones_like(ids)
        mask[0, :6] = 0
        kwargs["attention_mask"] = mask
    if case == "packed":
        kwargs["cu_seqlens"] = torch.tensor([0, 3, 17, 40], device=DEVICE)
    losses = []
    for model in (fused, reference):
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        losses.append(loss)
    # Measured on the CPU interpreter: loss equal to 1e-7; the GPU's fp32 dots are 3xTF32.
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    ref_params = dict(reference.named_parameters())
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.triton_interpret
def test_model_prefill_and_decode_interpreted():
    """Prefill writes the conv tails, decode reads them: Triton-glue logits equal the torch path's."""
    fused, reference = tiny_pair(use_gate=True)
    ids = torch.randint(0, 50, (2, 12), device=DEVICE)
    with torch.no_grad():
        outs = [model(input_ids=ids[:, :9], use_cache=True) for model in (fused, reference)]
        torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-4, atol=1e-5)
        caches = [cache_of(out) for out in outs]
        for step in range(9, 12):
            logits = [
                model(input_ids=ids[:, step : step + 1], past_key_values=cache, use_cache=True).logits
                for model, cache in zip((fused, reference), caches, strict=True)
            ]
            torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)
