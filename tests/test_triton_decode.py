"""The one-kernel decode step (`triton_decode.mixer_decode_step_`) and the inference RMSNorm
(`triton_norm.rms_norm`) against the paths they replace.

A pflow mixer given one token on a static cache without autograd runs the fused kernel; on a dynamic cache
it runs the unfused Triton glue and recurrent kernel. Both must give the same output, state and conv tails.
Tier 2 (`triton_interpret`): fp32 on the CPU interpreter, tight. Tier 3 (`gpu`): compiled, fp32 and bf16,
at the 340M shape too.
"""

import copy

import pytest
import torch

from modeling_parallelflow import PFlowConfig, PFlowForCausalLM, PFlowStaticCache
from modeling_parallelflow.cache_parallelflow import PFlowLayerState
from modeling_parallelflow.glue_parallelflow import triton_glue
from modeling_parallelflow.modeling_parallelflow import PFlowMixer, gated_rms_norm_torch

triton_decode = pytest.importorskip("modeling_parallelflow.triton_decode")
triton_norm = pytest.importorskip("modeling_parallelflow.triton_norm")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

MIXERS = {
    # name: PFlowConfig overrides of a one-layer mixer (hidden 32, 2 heads, K = V = 16 unless set)
    "r1": dict(rank=1),
    "r2_sum_gate": dict(rank=2, use_gate=True),
    "r3_product": dict(rank=3, rank_mode="product"),
    "r2_neg_eig": dict(rank=2, allow_neg_eigval=True),
    "no_conv": dict(rank=2, use_short_conv=False, use_gate=True),
    "conv2_odd_dims": dict(rank=2, conv_size=2, head_k_dim=24, head_v_dim=40),
    "conv5": dict(rank=1, conv_size=5, use_gate=True),
}


def mixer_config(**overrides) -> PFlowConfig:
    fields = dict(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_heads=2, head_k_dim=16, head_v_dim=16
    )
    return PFlowConfig(kernel_backend="triton", **{**fields, **overrides})


def perturbed_mixer(config: PFlowConfig, device, dtype) -> PFlowMixer:
    torch.manual_seed(0)
    mixer = PFlowMixer(config, 0)
    with torch.no_grad():
        mixer.o_norm.weight.add_(0.2 * torch.randn_like(mixer.o_norm.weight))
    return mixer.to(device, dtype)


def states(config: PFlowConfig, batch: int, device, dtype):
    """A static layer state (the fused path) and a dynamic one (the unfused path) holding the same random
    tails and recurrent state."""
    static = PFlowStaticCache(config, batch, 8, dtype, device, cuda_graphs=False).layers[0]
    with torch.no_grad():
        for tensor in static.tensors().values():
            tensor.copy_(torch.randn_like(tensor))
    dynamic = PFlowLayerState("pflow")
    dynamic.conv = {name: tail.clone() for name, tail in static.conv.items()}
    dynamic.recurrent = static.recurrent.clone()
    return static, dynamic


def float64_reference(mixer: PFlowMixer, x, pad_mask, state: PFlowLayerState) -> tuple:
    """The oracle: the same mixer on the torch backend in float64 (torch conv, the float token loop of
    `ops_reference`, the torch gated norm), on float64 copies of `state`. Returns (output, state after)."""
    reference = copy.deepcopy(mixer).double()
    reference.config = PFlowConfig.from_dict({**mixer.config.to_dict(), "kernel_backend": "torch"})
    state64 = PFlowLayerState("pflow")
    state64.conv = {name: tail.double() for name, tail in state.conv.items()}
    state64.recurrent = state.recurrent.double()
    with torch.no_grad():
        return reference(x.double(), pad_mask, state64), state64


def run_both(monkeypatch, config: PFlowConfig, batch: int, device, dtype, pads: bool):
    mixer = perturbed_mixer(config, device, dtype)
    static, dynamic = states(config, batch, device, dtype)
    x = torch.randn(batch, 1, config.hidden_size, device=device, dtype=dtype)
    pad_mask = None
    if pads:
        pad_mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
        pad_mask[0] = False
    glue, calls = triton_glue("triton", torch.device(device)), []
    fused_step = glue.mixer_decode_step_
    monkeypatch.setattr(glue, "mixer_decode_step_", lambda *a, **kw: calls.append(1) or fused_step(*a, **kw))
    reference = float64_reference(mixer, x, pad_mask, dynamic)
    with torch.no_grad():
        fused = mixer(x, pad_mask, static)
        assert calls == [1], "the static-cache decode token did not take the fused kernel"
        unfused = mixer(x, pad_mask, dynamic)
        assert calls == [1], "the dynamic-cache decode token took the fused kernel"
    return (fused, unfused), (static, dynamic), reference


def assert_same(pair, caches, tol):
    torch.testing.assert_close(pair[0].float(), pair[1].float(), **tol)
    static, dynamic = caches
    torch.testing.assert_close(static.recurrent, dynamic.recurrent, **tol)
    for name, tail in dynamic.conv.items():
        assert torch.equal(static.conv[name], tail), f"conv tail {name}"


def errors_against(reference, output, state) -> list[float]:
    """Max abs error of the output, the state and each conv tail against the float64 oracle."""
    ref_out, ref_state = reference
    pairs = [(output, ref_out), (state.recurrent, ref_state.recurrent)]
    pairs += [(state.conv[name], tail) for name, tail in ref_state.conv.items()]
    return [(got.double() - want).abs().max().item() for got, want in pairs]


@pytest.mark.triton_interpret
@pytest.mark.parametrize("pads", [False, True], ids=["real", "pad_row"])
@pytest.mark.parametrize("name", list(MIXERS))
def test_fused_decode_token_equals_unfused_mixer_interpreted(monkeypatch, name, pads):
    pair, caches, reference = run_both(
        monkeypatch, mixer_config(**MIXERS[name]), 3, DEVICE, torch.float32, pads
    )
    assert_same(pair, caches, dict(rtol=1e-5, atol=1e-5))
    assert max(errors_against(reference, pair[0], caches[0])) < 1e-5  # fp32 against the float64 oracle


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "overrides",
    [
        dict(rank=1, hidden_size=1024, num_heads=8, head_k_dim=128, head_v_dim=128, use_gate=True),
        dict(rank=4, hidden_size=1024, num_heads=8, head_k_dim=128, head_v_dim=128, use_gate=True),
        dict(rank=2, rank_mode="product", head_k_dim=64, head_v_dim=96),
        *MIXERS.values(),
    ],
)
@pytest.mark.parametrize("batch", [1, 64])
def test_fused_decode_token_equals_unfused_mixer_gpu(monkeypatch, overrides, dtype, batch):
    # bf16: the two paths round at the same points; the sums inside the kernels may differ in order.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    pair, caches, reference = run_both(
        monkeypatch, mixer_config(**overrides), batch, "cuda", dtype, batch > 1
    )
    assert all(t.isfinite().all() for t in (*pair, caches[0].recurrent))
    assert_same(pair, caches, tol)
    fused, unfused = (errors_against(reference, o, c) for o, c in zip(pair, caches, strict=True))
    if dtype == torch.float32:
        assert max(fused) < 1e-4, fused  # TF32-free elementwise fp32 against float64
    else:  # bf16: no farther from the float64 oracle than the unfused path, part by part
        assert all(f <= 1.5 * u + 1e-3 for f, u in zip(fused, unfused, strict=True)), (fused, unfused)


def test_heads_wider_than_the_kernel_take_the_unfused_path():
    assert (
        triton_decode.fits(128, 128) and not triton_decode.fits(256, 128) and not triton_decode.fits(64, 192)
    )


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dim", [32, 40])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
def test_inference_rms_norm_equals_torch_interpreted(dim, residual):
    x = torch.randn(2, 3, dim, device=DEVICE)
    weight = torch.randn(dim, device=DEVICE)
    res = torch.randn_like(x) if residual else None
    total = x + res if residual else x
    expected = gated_rms_norm_torch(total.double(), weight.double(), None, 1e-6)  # float64 oracle
    out = triton_norm.rms_norm(x, weight, 1e-6, residual=res)
    if residual:
        assert torch.equal(out[0], total)
        out = out[1]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.triton_interpret
@pytest.mark.parametrize("rank_mode", ["sum", "product"])
def test_static_generate_on_fused_kernels_equals_dynamic_generate_interpreted(rank_mode):
    """A whole model on the Triton backend: greedy generate() on the static cache (fused decode token,
    fused norms) gives the tokens and the logits of the dynamic cache (unfused glue)."""
    config = mixer_config(num_hidden_layers=2, rank=2, rank_mode=rank_mode, use_gate=True)
    torch.manual_seed(0)
    model = PFlowForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(3, 50, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    outs = [
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            cache_implementation=implementation,
            pad_token_id=0,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        for implementation in (None, "static")
    ]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for dynamic, static in zip(outs[0].logits, outs[1].logits, strict=True):
        torch.testing.assert_close(static, dynamic, rtol=1e-4, atol=1e-5)
