"""What changes between the transformers releases we support (5.17 .. newest 5.x), and where it is handled.

- 5.24 renamed the cache argument and output field from `past_key_values` to `cache`: generate() passes
  `cache=` to forward and reads `outputs["cache"]`; 5.17-5.23 use `past_key_values` for both.
- 5.24's generate() slices already-cached prompt tokens off only when some cache layer is not linear;
  `PFlowForCausalLM.prepare_inputs_for_generation` slices them itself (`cached_prefix_length`).

Elsewhere, where the code they touch lives: 5.24 makes `cache_position` every step for remote-code models
that name it (modeling: IGNORED_KWARGS, not a named parameter); `cache_implementation="static"` is ignored
for models without a default dynamic cache (modeling: `_prepare_cache_for_generation`); `Cache.max_cache_len`
is a read-only property in 5.17 (cache: `PFlowStaticCache.capacity`); 5.23+ validates `layer_types` names
(configuration: SAVED_LAYER_TYPES).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

# The field name under which model outputs carry the cache in the installed transformers.
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


def resolve_cache_argument(cache, past_key_values):
    """The one cache among forward's `cache=` (5.24+) and `past_key_values=` (older) arguments."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once: as `cache` or as `past_key_values`, not two different objects")
    return cache if cache is not None else past_key_values


def output_with_cache(output_class, cache, **fields):
    """output_class(**fields) with the cache under this transformers' field name (no deprecation warning)."""
    return output_class(**fields, **{CACHE_FIELD: cache})


def cache_of(outputs):
    """The cache a model output carries, under either field name."""
    return outputs[CACHE_FIELD] if CACHE_FIELD in outputs else None


def cached_prefix_length(input_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None) -> int:
    """How many leading tokens of input_ids [B, L] the cache has already seen: all it has seen when generation
    restarts from a returned cache with the whole sequence (as transformers <= 5.23 always assumes, and 5.24
    when the mask, if any, is as long as the ids), else 0. transformers >= 5.24 leaves this slicing to
    models whose caches are all linear."""
    seen = cache.get_seq_length()
    whole_sequence = attention_mask is None or attention_mask.shape[1] == input_ids.shape[1]
    return seen if 0 < seen < input_ids.shape[1] and whole_sequence else 0
