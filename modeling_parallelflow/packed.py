"""Packed sequences: N sequences laid end to end along T in a batch of one, validated once.

A raw `cu_seqlens` tensor passed to `ops.delta_rule` is validated on every call, which reads its values
back to the host (one device sync per call, so per layer in a model). A `PackedSequences` does that read
once, at construction, and is then passed in place of the tensor: the op checks only its device and length
(no host read), the torch backend takes the sequence bounds from its host copy, and the Triton backend
takes its chunk maps from it (built on first use per chunk size, then shared by every layer of the
forward). `PFlowModel.prepare_step` builds one per packed forward and hands it to all layers.
"""

import torch
from torch import Tensor


def check_cu_seqlens_tensor(cu_seqlens: object) -> None:
    """ValueError unless cu_seqlens is a 1-D int32 / int64 tensor [N + 1] with N >= 1 (no host read)."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor [N + 1] with N >= 1 (or a PackedSequences), got {cu_seqlens!r}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must have dtype int32 or int64, got {cu_seqlens.dtype}")


class PackedSequences:
    """N sequences packed along the token axis T of a batch of one, validated once.

    Built from cu_seqlens [N + 1] (int32 / int64 tensor, any device): starts at 0, non-decreasing, and ends
    at `total` when given (the number of packed tokens T). Construction reads the bounds to the host once;
    nothing after it does. `device` (default: cu_seqlens' device) is where the kernels will run.

    Attributes: cu_seqlens [N + 1] int32 on `device`; bounds (N + 1 host ints); num_sequences N;
    total_tokens T.
    """

    def __init__(
        self, cu_seqlens: Tensor, total: int | None = None, device: torch.device | str | None = None
    ):
        check_cu_seqlens_tensor(cu_seqlens)
        bounds = cu_seqlens.tolist()  # the one host read
        end = "" if total is None else f" and end at T = {total}"
        if bounds[0] != 0 or (total is not None and bounds[-1] != total):
            raise ValueError(f"cu_seqlens must start at 0{end}, got {bounds}")
        if any(x > y for x, y in zip(bounds[:-1], bounds[1:], strict=True)):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
        device = cu_seqlens.device if device is None else torch.device(device)
        self.cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        self.bounds = tuple(bounds)
        self.num_sequences = len(bounds) - 1
        self.total_tokens = bounds[-1]
        self._chunk_maps: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def chunk_map(self, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
        """(chunk_seq [G], chunk_tok [G], chunk_off [N + 1]) of `triton_utils.chunk_map` for C = chunk tokens,
        built on the first call per chunk size and cached (the Triton kernels only read it)."""
        if chunk not in self._chunk_maps:
            from .triton_utils import chunk_map  # Triton backend only; this module needs torch alone

            self._chunk_maps[chunk] = chunk_map(
                self.cu_seqlens, self.total_tokens, chunk, self.num_sequences, None
            )
        return self._chunk_maps[chunk]

    def __repr__(self) -> str:
        return f"PackedSequences(bounds={list(self.bounds)}, device={self.device})"


def host_bounds(cu_seqlens: Tensor | PackedSequences) -> list[int]:
    """The N + 1 sequence bounds as host ints: a PackedSequences' cached copy, or a host read of a tensor."""
    if isinstance(cu_seqlens, PackedSequences):
        return list(cu_seqlens.bounds)
    return cu_seqlens.tolist()
