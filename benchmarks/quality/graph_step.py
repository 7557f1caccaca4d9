"""A whole training step (forward, backward, gradient clipping, AdamW) captured in CUDA graphs, for small
models whose eager steps are bound by kernel launches (the 2-layer MQAR models: ~20 ms a step on an H200,
nearly all of it host time).

One graph per input shape (MQAR cycles over tasks of different lengths), each with its own memory pool. Before
a shape is captured, its first `warmup` steps run eagerly on a side stream (they compile the Triton kernels
and create the optimizer state); they are real training steps, counted like the rest. The learning rate is a
device tensor that the step's caller sets before every step, so a schedule reaches the captured optimizer.

    step = GraphTrainStep(loss_fn, model.parameters(), optimizer, lr=3e-3, device=cuda)
    for i in range(steps):
        loss = step(schedule(i), inputs, labels)   # inputs and labels: new tensors of a captured shape

`loss_fn(*tensors) -> scalar loss` must be free of host synchronisation and data-dependent shapes (gather at
fixed positions, not boolean indexing), and autocast inside it must run with `cache_enabled=False`. If a
capture fails anyway, the step runs eagerly, then and from then on, and `failed` says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch


class GraphTrainStep:
    def __init__(
        self,
        loss_fn: Callable[..., torch.Tensor],
        params: Iterable[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        *,
        lr: float,
        device: torch.device,
        max_norm: float = 1.0,
        warmup: int = 3,
    ):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        for group in optimizer.param_groups:
            if not group.get("capturable"):
                raise ValueError("the optimizer must be built with capturable=True to be captured")
        self.loss_fn, self.optimizer, self.max_norm, self.warmup = loss_fn, optimizer, max_norm, warmup
        self.params = [p for p in params if p.requires_grad]
        self.lr = torch.tensor(float(lr), device=device)
        for group in optimizer.param_groups:  # every group reads the one lr tensor, also inside the graphs
            group["lr"] = self.lr
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.eager_steps: dict[tuple, int] = {}
        self.failed: str | None = None  # why a capture failed; from then on every step runs eagerly

    def _eager(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(*tensors)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, lr: float, *tensors: torch.Tensor) -> torch.Tensor:
        """One training step at learning rate `lr` on `tensors`; returns the step's loss (a new tensor)."""
        self.lr.fill_(lr)
        if self.failed is not None:
            return self._eager(tensors)
        key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        if key in self.graphs:
            graph, inputs, loss = self.graphs[key]
            for buffer, t in zip(inputs, tensors, strict=True):
                buffer.copy_(t)
            graph.replay()
            return loss.clone()
        done = self.eager_steps.get(key, 0)
        if done < self.warmup:  # warm-up on a side stream, as torch.cuda.graph asks
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._eager(tensors)
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps[key] = done + 1
            return loss
        inputs = [t.clone() for t in tensors]
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward writes the gradients afresh
        try:
            with torch.cuda.graph(graph):
                loss = self.loss_fn(*inputs)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
                self.optimizer.step()
        except Exception as error:  # a capture that fails runs nothing: the step is taken eagerly instead
            self.failed = f"{type(error).__name__}: {error}"[:500]
            warnings.warn(
                f"CUDA graph capture failed, steps run eagerly from here: {self.failed}", stacklevel=2
            )
            torch.cuda.synchronize()
            return self._eager(tensors)
        loss = loss.detach()
        self.graphs[key] = (graph, inputs, loss)
        graph.replay()  # capture records the step without running it
        return loss.clone()
