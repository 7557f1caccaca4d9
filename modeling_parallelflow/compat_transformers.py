"""What changes between the transformers releases we support (5.17 .. newest 5.x), in one place.

- 5.24 renamed the cache argument and output field from `past_key_values` to `cache`: generate() passes
  `cache=` to forward and reads `outputs["cache"]`; 5.17-5.23 use `past_key_values` for both.
- 5.24's generate() slices already-cached prompt tokens off only when some cache layer is not linear;
  `PFlowForCausalLM.prepare_inputs_for_generation` slices them itself (`tokens_not_yet_cached`).
"""

from __future__ import annotations

import dataclasses

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
