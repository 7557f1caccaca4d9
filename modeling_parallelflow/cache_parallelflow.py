"""PFlowCache: per-layer decoding state of a ParallelFlow model.

pflow layers keep the short-convolution tails and the fp32 recurrent state; attention layers keep keys and
values. The cache counts the tokens it has seen so `generate()` can ask `get_seq_length()`.

A cache is right or refuses: it records the config it was built for (`cache_signature`) and the model
checks it before use; a forward that fails partway leaves it as it was (`PFlowCache.transaction`).
"""

from __future__ import annotations

import contextlib
import os

import torch
from transformers.cache_utils import Cache

from .decode_graph import DecodeGraphs

# Config fields that fix the shape and meaning of the cached tensors.
SIGNATURE_FIELDS = (
    "layer_types", "hidden_size", "num_heads", "rank", "rank_mode", "head_k_dim", "head_v_dim",
    "use_short_conv", "conv_size", "num_attention_heads", "num_key_value_heads", "attention_head_dim",
    "sliding_window",
)  # fmt: skip


def cache_signature(config) -> dict:
    return {name: getattr(config, name, None) for name in SIGNATURE_FIELDS}


class PFlowLayerState:
    """One layer's state. pflow: `conv` {"q","k","v": [B, C, W-1]}, `recurrent` [B, H, K, V] fp32.
    attention: `keys` / `values` [B, Hkv, S, D] (sliding layers keep the last `window - 1` positions; in a
    PFlowStaticCache they are a ring [B, Hkv, Wr, D], Wr = min(window, max_cache_len))."""

    def __init__(self, layer_type: str, sliding_window: int | None = None):
        self.layer_type = layer_type
        self.sliding_window = sliding_window if layer_type == "sliding_attention" else None
        self.conv: dict[str, torch.Tensor] = {}
        self.recurrent: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {f"conv.{k}": v for k, v in self.conv.items()}
        for name in ("recurrent", "keys", "values"):
            if getattr(self, name) is not None:
                named[name] = getattr(self, name)
        return named

    def apply(self, fn) -> None:
        """Replace every batch-leading tensor t by fn(t)."""
        self.conv = {k: fn(v) for k, v in self.conv.items()}
        for name in ("recurrent", "keys", "values"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))


class PFlowCache(Cache):
    """Decoding cache for `PFlowForCausalLM` (not compileable: generate() keeps the 2D attention mask)."""

    is_compileable = False

    def __init__(self, config, batch_size: int | None = None, dtype=None, device=None):
        # Cache.__init__ differs between transformers releases; this class keeps its own layer list.
        self.layer_types = list(config.layer_types)
        self.signature = cache_signature(config)
        self.layers = [PFlowLayerState(t, config.sliding_window) for t in self.layer_types]
        self.seen_tokens = 0
        self.offloading = False
        self.layer_class_to_replicate = None

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"PFlowCache(layers={self.layer_types}, seen_tokens={self.seen_tokens})"

    def check_compatible(self, config, batch_size: int) -> None:
        """Raise a ValueError unless this cache was built for `config` and holds `batch_size` rows."""
        signature = cache_signature(config)
        differing = [name for name in SIGNATURE_FIELDS if self.signature.get(name) != signature[name]]
        if differing:
            detail = ", ".join(
                f"{n}: cache {self.signature.get(n)!r} vs model {signature[n]!r}" for n in differing
            )
            raise ValueError(f"this PFlowCache was built for another model config ({detail})")
        cached_batch = self.batch_size
        if cached_batch is not None and cached_batch != batch_size:
            raise ValueError(
                f"the cache holds {cached_batch} sequences but the inputs have batch size {batch_size}; "
                "start a new cache, or use batch_select_indices / batch_repeat_interleave to match"
            )

    @contextlib.contextmanager
    def transaction(self):
        """Commit every layer's update or none: on an exception the cache is restored as it was.
        (Updates replace tensors, they never write into them, so keeping the old references suffices.)"""
        saved = [(dict(layer.conv), layer.recurrent, layer.keys, layer.values) for layer in self.layers]
        seen = self.seen_tokens
        try:
            yield self
        except BaseException:
            for layer, (conv, recurrent, keys, values) in zip(self.layers, saved, strict=True):
                layer.conv, layer.recurrent, layer.keys, layer.values = conv, recurrent, keys, values
            self.seen_tokens = seen
            raise

    # --- attention layers -------------------------------------------------------------------------------
    def update_attention(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, key_valid):
        """Append keys/values [B, Hkv, T, D]. Returns what the T new queries attend to: keys, values
        [B, Hkv, S, D], the stream position of every key `key_slot` [S] and of every query `query_slot` [T],
        and `key_valid` [B, past + T] (or None) cut to the S kept keys."""
        layer = self.layers[layer_idx]
        length = keys.shape[2]
        if layer.keys is None:
            all_keys, all_values = keys, values
        else:
            all_keys = torch.cat([layer.keys, keys], dim=2)
            all_values = torch.cat([layer.values, values], dim=2)
        # later queries see at most window - 1 earlier positions
        start = 0 if layer.sliding_window is None else max(all_keys.shape[2] - (layer.sliding_window - 1), 0)
        layer.keys, layer.values = all_keys[:, :, start:], all_values[:, :, start:]
        first_slot = self.seen_tokens + length - all_keys.shape[2]
        key_slot = first_slot + torch.arange(all_keys.shape[2], device=keys.device)
        query_slot = self.seen_tokens + torch.arange(length, device=keys.device)
        return (
            all_keys,
            all_values,
            key_slot,
            query_slot,
            None if key_valid is None else key_valid[:, first_slot:],
        )

    # --- bookkeeping used by generate() -----------------------------------------------------------------
    def advance(self, num_tokens: int) -> None:
        """Called once per model forward, after every layer has run."""
        self.seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def is_sliding(self) -> list[bool]:
        return [t == "sliding_attention" for t in self.layer_types]

    @property
    def is_linear(self) -> list[bool]:
        return [t == "pflow" for t in self.layer_types]

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int | None:
        for layer in self.layers:
            for tensor in layer.tensors().values():
                return tensor.shape[0]
        return None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("PFlowCache cannot be cropped: a recurrent state cannot forget tokens")

    def reset(self) -> None:
        windows = [layer.sliding_window for layer in self.layers]
        self.layers = [PFlowLayerState(t, w) for t, w in zip(self.layer_types, windows, strict=True)]
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.apply(lambda t: t[indices])


class _InPlaceTails(dict):
    """Conv tails {"q", "k", "v": [B, C, W-1]} whose assignment writes into the preallocated tensor."""

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self[name].copy_(value)


class PFlowStaticLayerState(PFlowLayerState):
    """A layer state of preallocated tensors updated in place (fixed addresses, so a decode step can be
    captured in a CUDA graph): assigning `recurrent`, `keys`, `values` or a conv tail copies into them."""

    def __init__(self, layer_type: str, sliding_window: int | None, buffers: dict[str, torch.Tensor]):
        object.__setattr__(self, "_buffers", buffers)
        tails = {key[len("conv.") :]: t for key, t in buffers.items() if key.startswith("conv.")}
        object.__setattr__(self, "_tails", _InPlaceTails(tails))
        self.layer_type = layer_type
        self.sliding_window = sliding_window if layer_type == "sliding_attention" else None

    def __getattr__(self, name: str):
        if name == "conv":
            return self._tails
        if name in ("recurrent", "keys", "values"):
            return self._buffers.get(name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        if name == "conv":
            for key, tail in value.items():
                self._tails[key] = tail
        elif name in ("recurrent", "keys", "values"):
            self._buffers[name].copy_(value)
        else:
            super().__setattr__(name, value)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._buffers)

    def apply(self, fn) -> None:
        for tensor in self._buffers.values():
            tensor.copy_(fn(tensor))


class PFlowStaticCache(PFlowCache):
    """Decoding cache of fixed shapes: every tensor is allocated up front and updated in place, and the
    stream position lives on the device, so a decode step has no host synchronisation and can be replayed
    as a CUDA graph (`decode_graph.py`). `model.generate(..., cache_implementation="static")` makes one.

    pflow layers: conv tails [B, C, W-1] and the fp32 state [B, H, K, V] (memory flat in context length);
    global attention layers: keys / values [B, Hkv, max_cache_len, D], position p at slot p;
    sliding attention layers: a ring, keys / values [B, Hkv, Wr, D] with Wr = min(sliding_window,
    max_cache_len) (memory flat in context length), position p at slot p % Wr (see `update_attention`);
    `key_valid` [B, max_cache_len] bool marks real (not padding) positions.
    """

    def __init__(
        self,
        config,
        batch_size: int,
        max_cache_len: int,
        dtype=None,
        device=None,
        cuda_graphs: bool | None = None,
    ):
        """cuda_graphs (default: on for a CUDA device unless the environment sets PFLOW_CUDA_GRAPHS=0) replays
        one-token decode steps as CUDA graphs."""
        super().__init__(config)
        if batch_size < 1 or max_cache_len < 1:
            raise ValueError(f"batch_size and max_cache_len must be >= 1, got {batch_size}, {max_cache_len}")
        dtype = dtype or torch.float32
        self.capacity = max_cache_len  # not `max_cache_len`: a read-only property of Cache in some releases
        self.fixed_batch_size = batch_size
        self.layers = [
            self._allocate(config, t, batch_size, max_cache_len, dtype, device) for t in self.layer_types
        ]
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # tokens seen, on the device
        self.key_valid = torch.zeros(batch_size, max_cache_len, dtype=torch.bool, device=device)
        self.real_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # non-pad tokens per row
        self.positions = torch.arange(max_cache_len, device=device)
        if cuda_graphs is None:
            on_cuda = device is not None and torch.device(device).type == "cuda"
            cuda_graphs = on_cuda and os.environ.get("PFLOW_CUDA_GRAPHS", "1") != "0"
        self.graphs = DecodeGraphs(self) if cuda_graphs else None
        self.broken = False

    @staticmethod
    def _allocate(config, layer_type: str, batch: int, length: int, dtype, device) -> PFlowStaticLayerState:
        buffers = {}
        if layer_type == "pflow":
            h, r, k, v = config.num_heads, config.rank, config.head_k_dim, config.head_v_dim
            if config.use_short_conv:
                for name, channels in (("q", h * k), ("k", h * r * k), ("v", h * r * v)):
                    buffers[f"conv.{name}"] = torch.zeros(
                        batch, channels, config.conv_size - 1, dtype=dtype, device=device
                    )
            buffers["recurrent"] = torch.zeros(batch, h, k, v, dtype=torch.float32, device=device)
        else:
            if layer_type == "sliding_attention":  # a ring: no query sees more than the window
                length = min(config.sliding_window, length)
            shape = (batch, config.num_key_value_heads, length, config.attention_head_dim)
            for name in ("keys", "values"):
                buffers[name] = torch.zeros(shape, dtype=dtype, device=device)
        return PFlowStaticLayerState(layer_type, config.sliding_window, buffers)

    def check_compatible(self, config, batch_size: int) -> None:
        if self.broken:
            raise ValueError(
                "a forward failed partway on this static cache, so its state is unknown; call reset()"
            )
        if batch_size != self.fixed_batch_size:
            raise ValueError(
                f"this static cache holds {self.fixed_batch_size} sequences, got batch size {batch_size}"
            )
        super().check_compatible(config, batch_size)

    def check_room(self, length: int) -> None:
        if self.seen_tokens + length > self.capacity:
            raise ValueError(
                f"the static cache holds {self.capacity} positions; {self.seen_tokens} are used and "
                f"{length} more do not fit (make it with a larger max_cache_len)"
            )

    @contextlib.contextmanager
    def transaction(self):
        """In-place updates cannot be rolled back: a failed forward marks the cache broken (it refuses
        further use until `reset()`) instead of leaving a silently wrong state."""
        try:
            yield self
        except BaseException:
            self.broken = True
            raise

    def record_new_tokens(
        self, pad_mask: torch.Tensor | None, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' validity (pad_mask [B, T] bool, None = all real) at their positions.
        Returns key_valid [B, max_cache_len] and the new tokens' RoPE positions [B, T] (real tokens before
        them: padding does not count), from a per-row count, so a step costs O(T), not O(max_cache_len)."""
        slots = self.slot + self.positions[:length]
        new = pad_mask if pad_mask is not None else self.key_valid.new_ones(self.fixed_batch_size, length)
        self.key_valid.index_copy_(1, slots, new)
        counts = new.long().cumsum(-1)
        positions = (self.real_tokens[:, None] + counts - 1).clamp(min=0)
        self.real_tokens += counts[:, -1]
        return self.key_valid, positions

    def update_attention(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, key_valid):
        """Write keys/values [B, Hkv, T, D] in place. Returns what the T new queries attend to: keys, values
        [B, Hkv, S, D], the stream position of every key `key_slot` [S] (negative: an empty ring slot) and of
        every query `query_slot` [T], and `key_valid` [B, S] (None: all real) for those keys.

        Global layers: S = max_cache_len, the buffers themselves. Sliding layers (a ring of Wr slots):
        - T = 1 (decode; or Wr = max_cache_len, so nothing wraps): write, then attend to the ring (S = Wr),
          which holds the window ending at the new token, with no copy;
        - T > 1 (a prefill or a multi-token continuation, of any length): attend to the ring as it was
          followed by the new keys (S = Wr + T; later queries see at most window - 1 earlier positions, as
          the dynamic cache), then keep only the last min(T, Wr) new positions in the ring.
        Shapes depend on T only and positions stay on the device (no host sync; CUDA-graph safe)."""
        layer = self.layers[layer_idx]
        length = keys.shape[2]
        query_slot = self.slot + self.positions[:length]
        if layer.sliding_window is None:
            layer.keys.index_copy_(2, query_slot, keys)
            layer.values.index_copy_(2, query_slot, values)
            return layer.keys, layer.values, self.positions, query_slot, key_valid
        ring = layer.keys.shape[2]
        if length == 1 or ring == self.capacity:
            self._write_ring(layer, query_slot, keys, values)
            key_slot = self._ring_positions(self.slot + length, ring)
            return layer.keys, layer.values, key_slot, query_slot, self._valid_at(key_valid, key_slot)
        ring_slot = self._ring_positions(self.slot, ring)
        all_keys = torch.cat([layer.keys, keys], dim=2)  # copies: the ring may be overwritten below
        all_values = torch.cat([layer.values, values], dim=2)
        key_slot = torch.cat([ring_slot, query_slot])
        keep = min(length, ring)  # distinct ring slots (index_copy_ with repeated indices is undefined)
        self._write_ring(layer, query_slot[-keep:], keys[:, :, -keep:], values[:, :, -keep:])
        return all_keys, all_values, key_slot, query_slot, self._valid_at(key_valid, key_slot)

    @staticmethod
    def _write_ring(layer, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys / values [B, Hkv, N, D] of stream positions [N] (N <= ring size) into their ring slots."""
        slots = positions % layer.keys.shape[2]
        layer.keys.index_copy_(2, slots, keys)
        layer.values.index_copy_(2, slots, values)

    def _ring_positions(self, end: torch.Tensor, ring: int) -> torch.Tensor:
        """[ring] stream position held by each ring slot once positions 0 .. end - 1 were written (the
        latest p < end with p % ring == slot); negative where the slot was never written."""
        last = end - 1
        return last - (last - self.positions[:ring]) % ring

    def _valid_at(self, key_valid: torch.Tensor | None, key_slot: torch.Tensor) -> torch.Tensor:
        """key_valid [B, max_cache_len] read at key_slot [S] -> [B, S]; False at negative (empty) slots."""
        written = key_slot >= 0
        if key_valid is None:
            return written[None].expand(self.fixed_batch_size, -1)
        index = key_slot.clamp(min=0)[None].expand(key_valid.shape[0], -1)
        return key_valid.gather(1, index) & written

    def advance(self, num_tokens: int) -> None:
        super().advance(num_tokens)
        self.slot += num_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    @property
    def batch_size(self) -> int:
        return self.fixed_batch_size

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of every tensor the decode step writes (to undo CUDA-graph warm-up runs)."""
        return [t.clone() for t in self._state_tensors()]

    def restore(self, saved: list[torch.Tensor]) -> None:
        for tensor, copy in zip(self._state_tensors(), saved, strict=True):
            tensor.copy_(copy)

    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.slot, self.key_valid, self.real_tokens] + [
            t for layer in self.layers for t in layer.tensors().values()
        ]

    def reset(self) -> None:
        """Empty again, in place: every tensor is zeroed where it is, so the decode graphs captured on them
        stay valid (generate() reuses a model's static cache this way)."""
        for tensor in self._state_tensors():
            tensor.zero_()
        self.seen_tokens = 0
        self.broken = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for tensor in (self.key_valid, self.real_tokens):
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a static cache has a fixed batch size; make it for the expanded batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a static cache has a fixed batch size; make it for the selected batch")
