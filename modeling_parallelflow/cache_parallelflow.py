"""PFlowCache: per-layer decoding state of a ParallelFlow model.

pflow layers keep the short-convolution tails and the fp32 recurrent state; attention layers keep keys and
values. The cache counts the tokens it has seen so `generate()` can ask `get_seq_length()`.

A cache is right or refuses: it records the config it was built for (`cache_signature`) and the model
checks it before use; a forward that fails partway leaves it as it was (`PFlowCache.transaction`).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache

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
    attention: `keys` / `values` [B, Hkv, S, D] (sliding layers keep the last `window - 1` positions)."""

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
