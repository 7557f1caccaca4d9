"""Cases of the GPU shape sweep (`gpu_sweep.py`) for the fused layer kernels, against their torch paths in
float64 on the same (rounded) inputs:

- "conv": `triton_conv.short_conv_silu` (short causal conv + SiLU, L2 norm per head for q and k) against
  `short_conv_silu_torch`: output, new cache tail, dx and dweight; head widths 16..256, conv widths 1..4,
  cache tails (prefill and 1- / 2-token decode), packed sequences (an empty and a 1-token one), left pads.
- "norm": `triton_norm.gated_rms_norm` against `gated_rms_norm_torch`: output, do, dg and dweight; widths
  16..256 and odd ones, gated and plain, up to 64 x 2048 rows.

Every case runs in bf16, fp16 and fp32; outputs are checked finite (the launchers poison their buffers
under PFLOW_TRITON_POISON=1, as for the delta-rule cases) and compared by relative Frobenius error.
Both sides get the same upstream gradient, rounded to the input dtype (the kernels receive it so).
"""

import zlib

HEAD_DIMS = (16, 32, 48, 64, 96, 128, 192, 256)
PACKED = (0, 1, 1, 40, 64, 65, 200, 300)  # an empty sequence, a 1-token one, block edges
DTYPES = ("bfloat16", "float16", "float32")


def glue_case(kind, *, dtype, B=2, T=100, heads=2, group=64, W=4, tail=False, cu=None, pad=False, flag=True):
    """flag: normalize (conv) or gated (norm). Fields shared with the delta-rule cases keep `cost` and the
    summary working (R = 1, sum mode, K = V = group)."""
    parts = [kind, dtype, f"B{B}", f"T{T}", f"H{heads}", f"G{group}"]
    parts += [f"W{W}"] if kind == "conv" else []
    parts += ["tail"] if tail else []
    parts += ["packed"] if cu is not None else []
    parts += ["pads"] if pad else []
    parts += [{"conv": "l2", "norm": "gated"}[kind]] if flag else []
    return dict(
        id="-".join(parts),
        algo=kind,
        B=B,
        T=T,
        H=heads,
        R=1,
        K=group,
        V=group,
        mode="sum",
        dtype=dtype,
        grad=True,
        cu=None if cu is None else list(cu),
        W=W,
        tail=tail,
        pad=pad,
        flag=flag,
    )


def glue_cases() -> list[dict]:
    cases = []
    for dtype in DTYPES:
        for i, group in enumerate(HEAD_DIMS):
            cases.append(glue_case("conv", dtype=dtype, group=group, flag=True))
            cases.append(glue_case("conv", dtype=dtype, group=group, W=1 + i % 4, flag=i % 2 == 0))
            cases.append(glue_case("conv", dtype=dtype, group=group, tail=True, T=1 + i % 2, B=3))
            cases.append(glue_case("norm", dtype=dtype, group=group, flag=True))
            cases.append(glue_case("norm", dtype=dtype, group=group, flag=False, T=37))
        for group in (16, 128, 256):
            cases.append(glue_case("conv", dtype=dtype, B=1, T=300, group=group, cu=PACKED))
            cases.append(glue_case("conv", dtype=dtype, T=67, group=group, pad=True, flag=False))
            cases.append(glue_case("conv", dtype=dtype, T=67, group=group, tail=True, pad=True))
        for group in (24, 40, 200):
            cases.append(glue_case("norm", dtype=dtype, group=group, T=29, heads=3))
        cases.append(glue_case("conv", dtype=dtype, B=16, T=2048, heads=8, group=128))  # model-sized
        cases.append(glue_case("norm", dtype=dtype, B=64, T=2048, heads=1, group=128))  # 131K rows
    return cases


def _rel(x, ref) -> float:
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _compare(ours: dict, ref: dict) -> dict:
    import torch

    errors = {name: _rel(ours[name], ref[name]) for name in ref}
    finite = all(bool(torch.isfinite(x).all()) for x in ours.values())
    return {"errors": errors, "finite": finite}


def _backward(ours_y, ref_y, gen):
    import torch

    dy = torch.randn(ref_y.shape, device=ref_y.device, generator=gen).to(ours_y.dtype)
    (ours_y * dy).sum().backward()
    (ref_y * dy.double()).sum().backward()


def _run_conv(c, device, dtype, gen):
    import torch

    from modeling_parallelflow.modeling_parallelflow import segment_ids_from_cu_seqlens, short_conv_silu_torch
    from modeling_parallelflow.triton_conv import short_conv_silu

    channels = c["H"] * c["K"]
    x = torch.randn(c["B"], c["T"], channels, device=device, generator=gen).to(dtype)
    weight = (torch.randn(channels, 1, c["W"], device=device, generator=gen) / c["W"] ** 0.5).to(dtype)
    tail = (
        torch.randn(c["B"], channels, c["W"] - 1, device=device, generator=gen).to(dtype)
        if c["tail"]
        else None
    )
    pad_mask = None
    if c["pad"]:
        pad_mask = torch.ones(c["B"], c["T"], dtype=torch.bool, device=device)
        pad_mask[0, :9] = False  # left padding
        pad_mask[-1, c["T"] // 2] = False
    cu = segments = pos = None
    if c["cu"] is not None:
        cu = torch.tensor(c["cu"], device=device)
        segments = segment_ids_from_cu_seqlens(cu, c["T"])
        pos = (torch.arange(c["T"], device=device) - cu[segments]).to(torch.int32)
    x1, w1 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    x2, w2 = x.double().requires_grad_(), weight.double().requires_grad_()
    y, new_tail = short_conv_silu(
        x1, w1, group=c["K"], normalize=c["flag"], tail=tail, pos=pos, pad_mask=pad_mask
    )
    y_ref, tail_ref = short_conv_silu_torch(
        x2,
        w2,
        group=c["K"],
        normalize=c["flag"],
        tail=None if tail is None else tail.double(),
        segments=segments,
        pad_mask=pad_mask,
    )
    _backward(y, y_ref, gen)
    ours = {"y": y, "dx": x1.grad, "dweight": w1.grad}
    ref = {"y": y_ref, "dx": x2.grad, "dweight": w2.grad}
    if cu is None and c["W"] > 1:  # the packed path keeps no tail (no cache with packed inputs)
        ours["tail"], ref["tail"] = new_tail, tail_ref
    return _compare(ours, ref)


def _run_norm(c, device, dtype, gen):
    import torch

    from modeling_parallelflow.modeling_parallelflow import gated_rms_norm_torch
    from modeling_parallelflow.triton_norm import gated_rms_norm

    shape = (c["B"], c["T"], c["H"], c["V"])
    o = torch.randn(shape, device=device, generator=gen).to(dtype)
    weight = (1 + 0.3 * torch.randn(c["V"], device=device, generator=gen)).to(dtype)
    gate = torch.randn(shape, device=device, generator=gen).to(dtype) if c["flag"] else None
    ours_in = [None if x is None else x.clone().requires_grad_() for x in (o, weight, gate)]
    ref_in = [None if x is None else x.double().requires_grad_() for x in (o, weight, gate)]
    y = gated_rms_norm(ours_in[0], ours_in[1], ours_in[2], 1e-6)
    y_ref = gated_rms_norm_torch(ref_in[0], ref_in[1], ref_in[2], 1e-6)
    _backward(y, y_ref, gen)
    ours, ref = {"y": y}, {"y": y_ref}
    for name, x, xr in zip(("do", "dweight", "dg"), ours_in, ref_in, strict=True):
        if x is not None:
            ours[name], ref[name] = x.grad, xr.grad
    return _compare(ours, ref)


def run_glue_case(c: dict) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(c["id"].encode()))
    run = _run_conv if c["algo"] == "conv" else _run_norm
    return run(c, device, getattr(torch, c["dtype"]), gen)
