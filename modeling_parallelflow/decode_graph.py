"""CUDA-graph replay of one-token decode steps on a `PFlowStaticCache`.

A decode step on a static cache touches only preallocated tensors and keeps its stream position on the
device, so the whole model step (hundreds of small kernels) can be captured once and replayed with one
launch. One graph is captured per input signature (which optional inputs are given, their shapes);
capture runs the step twice on a side stream to warm up (Triton compiles there), then restores the cache.
The graphs live as long as the cache: a model reuses its static cache across generate() calls
(`PFlowForCausalLM._prepare_cache_for_generation`), so later calls replay what the first one captured.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class DecodeGraphs:
    """Graphs of `step(**inputs) -> Tensor` on one static cache, keyed by the inputs' signature."""

    def __init__(self, cache):
        self.cache = cache
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}

    @staticmethod
    def _signature(inputs: dict[str, torch.Tensor | None]) -> tuple:
        return tuple(
            (name, None if t is None else (tuple(t.shape), t.dtype)) for name, t in sorted(inputs.items())
        )

    def _capture(self, step: Callable[..., torch.Tensor], inputs: dict) -> tuple:
        static = {name: None if t is None else t.clone() for name, t in inputs.items()}
        saved, seen = self.cache.snapshot(), self.cache.seen_tokens
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(**static)
                self.cache.restore(saved)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = step(**static)
        self.cache.restore(saved)
        self.cache.seen_tokens = seen
        return graph, static, output

    def run(
        self, step: Callable[..., torch.Tensor], owner: object, length: int, **inputs: torch.Tensor | None
    ) -> torch.Tensor:
        """step(**inputs) through its graph (captured on first use for this owner, the model whose weights
        the graph reads, and these input shapes); advances the cache by `length` tokens. Returns a copy of
        the step's output (the graph's output buffer is reused by the next replay)."""
        key = (id(owner), *self._signature(inputs))
        if key not in self.graphs:
            self.graphs[key] = self._capture(step, inputs)
        graph, static, output = self.graphs[key]
        for name, tensor in inputs.items():
            if tensor is not None:
                static[name].copy_(tensor)
        graph.replay()
        self.cache.seen_tokens += length  # the device-side position advanced inside the graph
        return output.clone()
