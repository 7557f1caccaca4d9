"""A declarative key map: one rule per tensor, its inverse, and the completeness checks every conversion runs.

A rule names one source key and one target key, plus an optional tensor surgery (and its inverse). Rules with
no source create a new target tensor (`make`); rules with no target drop a source tensor on purpose (`note`
says why). `KeyMap.apply` refuses, listing every offending key at once, when a source key is missing or left
unconsumed, a target key is left unfilled or unexpected, or a shape does not match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

Surgery = Callable[[torch.Tensor], torch.Tensor]
MAX_LISTED = 20


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the option or the keys at fault."""


@dataclass(frozen=True)
class Rule:
    source: str | None
    target: str | None
    forward: Surgery | None = None  # None: copy
    backward: Surgery | None = None  # inverse of `forward`; None with forward None: copy
    make: Callable[[], torch.Tensor] | None = None  # a new target tensor (source is None)
    note: str = ""  # why a tensor is new or dropped

    def inverse(self) -> Rule:
        if self.source is None or self.target is None:
            raise ConversionError(
                f"rule {self.source} -> {self.target} creates or drops a tensor: no inverse"
            )
        if self.forward is not None and self.backward is None:
            raise ConversionError(f"rule {self.source} -> {self.target} has no inverse surgery")
        return Rule(self.target, self.source, forward=self.backward, backward=self.forward)


def per_layer(templates: Iterable[tuple[str, str]], layers: Iterable[int]) -> list[Rule]:
    """Copy rules from (source, target) templates with `{i}` for the layer index."""
    return [Rule(src.format(i=i), dst.format(i=i)) for i in layers for src, dst in templates]


def _listing(title: str, keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED])
    more = f" (and {len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return f"{title} ({len(keys)}): {shown}{more}"


@dataclass
class KeyMap:
    rules: list[Rule]
    name: str = "conversion"

    def __post_init__(self) -> None:
        for side in ("source", "target"):
            keys = [getattr(rule, side) for rule in self.rules if getattr(rule, side) is not None]
            repeated = {key for key in keys if keys.count(key) > 1}
            if repeated:
                raise ConversionError(
                    f"{self.name}: {side} keys named by more than one rule: {sorted(repeated)}"
                )

    def inverse(self) -> KeyMap:
        return KeyMap([rule.inverse() for rule in self.rules], name=f"inverse of {self.name}")

    @property
    def dropped(self) -> list[Rule]:
        return [rule for rule in self.rules if rule.target is None]

    @property
    def created(self) -> list[Rule]:
        return [rule for rule in self.rules if rule.source is None]

    def apply(
        self,
        state_dict: Mapping[str, torch.Tensor],
        expected: Mapping[str, tuple[int, ...]],
        *,
        progress: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Source tensors -> target tensors, checked against `expected` target shapes (key -> shape)."""
        problems: list[str] = []
        needed = {rule.source for rule in self.rules if rule.source is not None}
        produced = {rule.target for rule in self.rules if rule.target is not None}
        if missing := needed - set(state_dict):
            problems.append(_listing("source keys missing from the checkpoint", missing))
        if unconsumed := set(state_dict) - needed:
            problems.append(_listing("source keys no rule consumes", unconsumed))
        if unfilled := set(expected) - produced:
            problems.append(_listing("target keys no rule fills", unfilled))
        if unexpected := produced - set(expected):
            problems.append(_listing("target keys the target model does not have", unexpected))
        if problems:
            raise ConversionError(f"{self.name}: " + "; ".join(problems))

        out: dict[str, torch.Tensor] = {}
        bad_shapes: list[str] = []
        for rule in tqdm(self.rules, desc=self.name, unit="tensor", disable=not progress):
            if rule.target is None:
                continue
            try:
                if rule.source is None:
                    tensor = rule.make()
                else:
                    tensor = state_dict[rule.source]
                    tensor = rule.forward(tensor) if rule.forward is not None else tensor
            except (RuntimeError, ValueError) as error:  # a reshape that does not fit the source shape
                source_shape = tuple(state_dict[rule.source].shape) if rule.source is not None else None
                bad_shapes.append(f"{rule.source} {source_shape} -> {rule.target}: {error}")
                continue
            if tuple(tensor.shape) != tuple(expected[rule.target]):
                bad_shapes.append(
                    f"{rule.target}: got {tuple(tensor.shape)}, expected {tuple(expected[rule.target])}"
                )
                continue
            out[rule.target] = tensor.contiguous()
        if bad_shapes:
            raise ConversionError(f"{self.name}: " + _listing("shape mismatches", bad_shapes))
        return out
