"""Public op of ParallelFlow: the rank-R delta rule. Validates inputs, then dispatches to a backend.

Backends: "triton" (`triton_dispatch.run_drivers`, imported lazily; optional) and "torch"
(`ops_reference` token loop for algorithm "recurrent", else the chunked `ops_chunk_torch` with the
tensorInv or sigDelta W/U solver). Packed sequences reach the backends as a `packed.PackedSequences`
(validated once: its bounds and chunk maps are reused, no further host reads). The maths is in OPS.md.
"""

import functools
import math
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .ops_chunk_torch import chunk_delta_rule, chunk_wu
from .ops_reference import delta_rule_reference
from .ops_sigdelta_torch import sigdelta_wu
from .packed import PackedSequences, check_cu_seqlens_tensor

MODES = ("sum", "product")
ALGORITHMS = ("auto", "tensor_inv", "sigdelta", "recurrent")
BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "PFLOW_KERNEL_BACKEND"
MIN_CHUNK_SIZE = 16  # the Triton kernels' smallest chunk (triton_utils.pick_chunk); torch takes the same
_warned_fallback = False


@functools.cache
def _load_triton() -> tuple[Callable | None, ImportError | None]:
    """(triton_dispatch.run_drivers, None) if the Triton kernels import, else (None, the ImportError).
    run_drivers trusts its arguments: `_run` calls it after the op validated them."""
    # `from .x import y` form: transformers copies the modules imported this way into saved checkpoints.
    try:
        from .triton_dispatch import HAS_TRITON, run_drivers
    except ImportError as err:
        return None, err
    if not HAS_TRITON:  # the module imports, its kernels did not
        return None, ImportError("triton_dispatch.HAS_TRITON is False (is the `triton` package installed?)")
    return run_drivers, None


def valid_chunk_size(chunk_size: object) -> bool:
    """True for the chunk sizes both backends accept: an int power of two >= MIN_CHUNK_SIZE."""
    return (
        isinstance(chunk_size, int)
        and not isinstance(chunk_size, bool)
        and chunk_size >= MIN_CHUNK_SIZE
        and chunk_size & (chunk_size - 1) == 0
    )


def _triton_interpreted() -> bool:
    """TRITON_INTERPRET set: the Triton kernels run in Triton's CPU interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _resolve_backend(backend: str, device: torch.device) -> str:
    """ "auto" -> $PFLOW_KERNEL_BACKEND if set, else triton for CUDA inputs when it imports, else torch."""
    requested = f"backend={backend!r}"
    if backend == "auto":
        env = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"environment variable {BACKEND_ENV} must be one of {BACKENDS}, got {env!r}")
        backend, requested = env, f"{BACKEND_ENV}={env!r}"
    is_cuda = device.type == "cuda"
    if backend == "torch" or (backend == "auto" and not is_cuda):
        return "torch"
    if backend == "triton" and not is_cuda and not _triton_interpreted():
        raise ValueError(
            f"{requested} needs CUDA tensors, but the tensors are on {device}: the Triton kernels run on "
            "the GPU. Move them to CUDA or use backend='torch' (or set TRITON_INTERPRET=1 before import "
            "to run the kernels in Triton's CPU interpreter)"
        )
    kernel, err = _load_triton()
    if kernel is not None:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"{requested} asks for the Triton kernels, but they do not import: {err}")
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"CUDA inputs but the Triton kernels do not import ({err}); using the slow torch backend.",
            stacklevel=3,
        )
    return "torch"


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_shapes(specs: list[tuple[str, object, str]], sizes: dict[str, int]) -> None:
    """Check each (name, tensor, "B T H K") and bind the letters to sizes, consistently across tensors."""
    for name, x, dims in specs:
        letters = dims.split()
        expected = f"[{', '.join(letters)}]"
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
        if x.dim() != len(letters):
            raise ValueError(f"{name} must have shape {expected}, got {x.dim()} dims {list(x.shape)}")
        for letter, size in zip(letters, x.shape, strict=True):
            if size == 0:
                raise ValueError(f"{name} of shape {expected} = {list(x.shape)} has an empty dim {letter}")
            if sizes.setdefault(letter, size) != size:
                raise ValueError(
                    f"{name} has {letter} = {size} (shape {expected} = {list(x.shape)}), but earlier "
                    f"arguments give {letter} = {sizes[letter]}"
                )


def _check_dtypes(names: tuple[str, ...], tensors: tuple[Tensor, ...], same: bool) -> None:
    for name, x in zip(names, tensors, strict=True):
        if not x.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if same and len({x.dtype for x in tensors}) > 1:
        got = ", ".join(f"{n}={x.dtype}" for n, x in zip(names, tensors, strict=True))
        raise ValueError(f"{', '.join(names)} must share one dtype, got {got}")


def _check_packed(cu_seqlens: object, device: torch.device, sizes: dict[str, int]) -> PackedSequences:
    """cu_seqlens as a PackedSequences (what the backends get): a raw tensor is validated here (one host
    read of its values); a PackedSequences, validated when built, only has its device and T checked."""
    if not isinstance(cu_seqlens, PackedSequences):
        check_cu_seqlens_tensor(cu_seqlens)
    if cu_seqlens.device != device:
        raise ValueError(
            f"cu_seqlens is on {cu_seqlens.device} but q is on {device}: all tensors must share a device"
        )
    if sizes["B"] != 1:
        raise ValueError(
            f"cu_seqlens requires batch size B == 1 (sequences packed along T), got B = {sizes['B']}"
        )
    if not isinstance(cu_seqlens, PackedSequences):
        return PackedSequences(cu_seqlens, total=sizes["T"])
    if cu_seqlens.total_tokens != sizes["T"]:
        raise ValueError(
            f"cu_seqlens packs {cu_seqlens.total_tokens} tokens ({cu_seqlens!r}), but T = {sizes['T']}"
        )
    return cu_seqlens


def _check_options(
    q: Tensor,
    sizes: dict[str, int],
    tensors: dict[str, Tensor],
    *,
    mode: str,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | PackedSequences | None,
    chunk_size: int,
    algorithm: str,
    backend: str,
) -> dict:
    """Validate everything but the main tensors' shapes and dtypes; returns the keyword arguments of `_run`
    (scale resolved to a float)."""
    _check_choice("mode", mode, MODES)
    _check_choice("algorithm", algorithm, ALGORITHMS)
    _check_choice("backend", backend, BACKENDS)
    if not isinstance(output_final_state, bool):
        raise ValueError(f"output_final_state must be a bool, got {output_final_state!r}")
    if not valid_chunk_size(chunk_size):
        raise ValueError(
            f"chunk_size must be a power of two >= {MIN_CHUNK_SIZE} (the chunk sizes both backends accept), "
            f"got {chunk_size!r}"
        )
    if scale is None:
        scale = sizes["K"] ** -0.5
    elif (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"scale must be a positive finite float or None (K ** -0.5), got {scale!r}")
    sizes["N"] = sizes["B"]
    if cu_seqlens is not None:
        cu_seqlens = _check_packed(cu_seqlens, q.device, sizes)
        sizes["N"] = cu_seqlens.num_sequences
    if initial_state is not None:
        _check_shapes([("initial_state", initial_state, "N H K V")], sizes)
        _check_dtypes(("initial_state",), (initial_state,), same=False)
        tensors["initial_state"] = initial_state
    for name, x in tensors.items():
        if x.device != q.device:
            raise ValueError(
                f"{name} is on {x.device} but q is on {q.device}: all tensors must share a device"
            )
    return dict(
        mode=mode,
        scale=float(scale),
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        algorithm=algorithm,
        backend=backend,
    )


def beta_drivers(k: Tensor, v: Tensor | None, beta: Tensor) -> tuple[Tensor, Tensor | None]:
    """The drivers of `delta_rule`: a = -beta k [B, T, H, R, K] in k's dtype and u = beta v [B, T, H, R, V]
    in v's dtype (None when v is None), from beta [B, T, H, R] in its own dtype."""
    col = beta[..., None]
    return (-col * k).to(k.dtype), None if v is None else (col * v).to(v.dtype)


def _run(
    q: Tensor,
    a: Tensor | None,
    b: Tensor,
    u: Tensor,
    *,
    beta: Tensor | None = None,
    mode: str,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: PackedSequences | None,
    chunk_size: int,
    algorithm: str,
    backend: str,
) -> tuple[Tensor, Tensor | None]:
    """Resolve the backend once and run. Drivers (q, a, b, u), or the beta form (a None, b = k, u = v,
    beta [B, T, H, R]): the Triton backend takes it as is (under autograd it keeps k, v, beta rather than
    a = -beta k); the torch backend gets the drivers built here."""
    kwargs = dict(
        mode=mode,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    if _resolve_backend(backend, q.device) == "triton":
        kernel, _ = _load_triton()
        return kernel(q, a, b, u, beta=beta, chunk_size=chunk_size, algorithm=algorithm, **kwargs)
    if beta is not None:
        a, u = beta_drivers(b, u, beta)
    if algorithm == "recurrent":
        dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
        o, final_state = delta_rule_reference(q, a, b, u, dtype=dtype, **kwargs)
        return o.to(u.dtype), final_state
    wu_solver = sigdelta_wu if algorithm == "sigdelta" else chunk_wu
    return chunk_delta_rule(q, a, b, u, chunk_size=chunk_size, wu_solver=wu_solver, **kwargs)


def delta_rule_drivers(
    q: Tensor,
    a: Tensor,
    b: Tensor,
    u: Tensor,
    *,
    mode: str = "sum",
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | PackedSequences | None = None,
    chunk_size: int = 64,
    algorithm: str = "auto",
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Delta rule on general drivers: per token h <- h + B_t (A_t^T h + U_t^T), o_t = scale * h^T q_t.

    q [B, T, H, K]; a, b [B, T, H, R, K]; u [B, T, H, R, V] (one floating dtype for all four).
    mode "sum" (the R components of a token read the same state) or "product" (applied r = 1..R).
    initial_state [N, H, K, V], any float dtype, used in float32. cu_seqlens packs N sequences along T
    (B must be 1; the state restarts at each one): an int32/int64 tensor [N + 1], validated on every call
    (one host read of its values per call, a device sync on a GPU), or a `packed.PackedSequences`,
    validated once when it was built (no host read here; pass one to every layer of a model).
    scale defaults to K ** -0.5.
    Returns o [B, T, H, V] in u's dtype and, if output_final_state, the final state [N, H, K, V]
    (float32 on the torch backend; float64 when the inputs are float64), else None.
    """
    sizes: dict[str, int] = {}
    _check_shapes(
        [("q", q, "B T H K"), ("a", a, "B T H R K"), ("b", b, "B T H R K"), ("u", u, "B T H R V")], sizes
    )
    _check_dtypes(("q", "a", "b", "u"), (q, a, b, u), same=True)
    tensors = {"a": a, "b": b, "u": u}
    options = _check_options(
        q,
        sizes,
        tensors,
        mode=mode,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        algorithm=algorithm,
        backend=backend,
    )
    return _run(q, a, b, u, **options)


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    mode: str = "sum",
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | PackedSequences | None = None,
    chunk_size: int = 64,
    algorithm: str = "auto",
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Rank-R delta rule: h <- h + sum_r beta_r k_r (v_r - h^T k_r)^T per token, o_t = scale * h^T q_t.

    q [B, T, H, K]; k [B, T, H, R, K] (not normalised here); v [B, T, H, R, V] (q, k, v one floating
    dtype); beta [B, T, H, R] (any floating dtype). The delta rule on the drivers a = -beta k, b = k,
    u = beta v (in k's and v's dtypes; on the Triton backend built inside its autograd function, which keeps
    k, v and beta for the backward, not a); the keyword arguments and returns are `delta_rule_drivers`'.
    """
    sizes: dict[str, int] = {}
    _check_shapes(
        [("q", q, "B T H K"), ("k", k, "B T H R K"), ("v", v, "B T H R V"), ("beta", beta, "B T H R")], sizes
    )
    _check_dtypes(("q", "k", "v"), (q, k, v), same=True)
    _check_dtypes(("beta",), (beta,), same=False)
    tensors = {"k": k, "v": v, "beta": beta}
    options = _check_options(
        q,
        sizes,
        tensors,
        mode=mode,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        algorithm=algorithm,
        backend=backend,
    )
    return _run(q, None, k, v, beta=beta, **options)
