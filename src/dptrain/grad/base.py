"""What clipping needs from a per-example gradient engine, whatever way it computes them."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


_WIDE = (torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-example norms and sums are computed in: at least float32 (bfloat16 / float16 squares and sums
    lose precision, and float16 overflows past 65504)."""
    return dtype if dtype in _WIDE else torch.promote_types(dtype, torch.float32)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in ``compute_dtype`` (unchanged for float32 / float64 and for integer token ids)."""
    return t if t.dtype in _WIDE or not t.is_floating_point() else t.to(compute_dtype(t.dtype))


def per_example_squared_norms(grads: dict[Any, torch.Tensor]) -> dict[Any, torch.Tensor]:
    """Squared norm of each example's gradient, (batch,) per key, from per-example gradients (batch, ...), in at
    least float32. A 0-dim parameter's per-example gradients are (batch,)."""
    norms = {}
    for key, g in grads.items():
        flat = g.reshape(g.shape[0], math.prod(g.shape[1:]))
        norms[key] = upcast(flat).square().sum(1)
    return norms


def per_example_weighted_sums(grads: dict[Any, torch.Tensor], weights: torch.Tensor) -> dict[Any, torch.Tensor]:
    """sum_i weights[i] * g_i per key, from per-example gradients (batch, ...), in at least float32 (so the clip
    factors are not rounded to 16 bits either)."""
    sums = {}
    for key, g in grads.items():
        g = upcast(g)
        sums[key] = torch.einsum("b,b...->...", weights.to(g.device, g.dtype), g)
    return sums


def same_layout(a: object, b: torch.Tensor) -> bool:
    """Whether ``a`` holds ``b``'s elements in ``b``'s layout (the same tensor, or a view that changes nothing)."""
    return (
        isinstance(a, torch.Tensor) and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype
        and a.shape == b.shape and a.stride() == b.stride()
    )  # fmt: skip


def example_zero_objective(
    outputs: Iterable[object], batch_dim: int, batch_size: int, generator: torch.Generator
) -> torch.Tensor | None:
    """A random linear function of example 0's outputs (the batched tensors among ``outputs`` that need gradient),
    weights from ``generator``: its gradient is non-zero exactly where example 0's outputs depend. None when no
    output is batched."""
    firsts = [
        t.select(batch_dim, 0) for t in outputs
        if isinstance(t, torch.Tensor) and t.requires_grad and t.dim() > batch_dim and t.shape[batch_dim] == batch_size
    ]  # fmt: skip
    if not firsts:
        return None
    return sum((t * torch.rand(t.shape, generator=generator).to(t)).sum() for t in firsts)


class PerExampleGradients(ABC):
    """The per-example gradients of one physical batch, exposed only through what DP-SGD needs.

    A fast engine can answer both questions without materialising a (batch x parameters) tensor; the reference
    engine materialises it.
    """

    batch_size: int
    #: The ids (``GradSampler.batch_tag``) of the physical chunks whose forward passes produced these gradients.
    tags: frozenset = frozenset()

    @abstractmethod
    def squared_norms(self) -> torch.Tensor:
        """Per-example squared L2 norm over all tracked parameters, shape (batch_size,)."""

    @abstractmethod
    def weighted_sum(self, weights: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """sum_i weights[i] * g_i for each tracked parameter."""

    def add_weighted_sum(self, weights: torch.Tensor, into: dict[nn.Parameter, torch.Tensor]) -> None:
        """``into[p] += sum_i weights[i] * g_i`` in place; the record may not be usable afterwards (an engine can
        free what it kept as it goes)."""
        for p, g in self.weighted_sum(weights).items():
            into[p].add_(g.to(into[p].dtype))

    @abstractmethod
    def materialize(self) -> dict[nn.Parameter, torch.Tensor]:
        """Every example's gradient, (batch_size, *param.shape) per parameter (for clipping by user)."""


class MaterializedGradients(PerExampleGradients):
    """Per-example gradients held as one tensor of shape (batch, *param.shape) per parameter."""

    def __init__(
        self, per_param: dict[nn.Parameter, torch.Tensor], batch_size: int, tags: Iterable[Hashable] = frozenset()
    ) -> None:
        self.per_param = per_param
        self.batch_size = batch_size
        self.tags = frozenset(tags)

    def squared_norms(self) -> torch.Tensor:
        if not self.per_param:
            raise RuntimeError("no parameters to clip")
        return sum(per_example_squared_norms(self.per_param).values())

    def weighted_sum(self, weights: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return per_example_weighted_sums(self.per_param, weights)

    def materialize(self) -> dict[nn.Parameter, torch.Tensor]:
        return self.per_param

    def __add__(self, other: "MaterializedGradients") -> "MaterializedGradients":
        """Sum of two records over the same examples (two backward passes before one step), with both's tags."""
        if other.batch_size != self.batch_size:
            raise RuntimeError(
                f"two backward passes over batches of different sizes ({self.batch_size} and {other.batch_size}) "
                "before one optimizer.step(): per-example gradients cannot be matched to examples"
            )
        merged = dict(self.per_param)
        for p, g in other.per_param.items():
            merged[p] = merged[p] + g if p in merged else g
        return MaterializedGradients(merged, self.batch_size, self.tags | other.tags)


class GradSampler(ABC):
    """Attaches to the user's module (hooks only, no wrapper) and yields per-example gradients after backward."""

    #: Set by the engine after construction: returns the id of the private data loader's current physical chunk.
    #: Engines record it at each forward pass and report it in ``PerExampleGradients.tags``.
    batch_tag: Callable[[], Hashable] | None = None

    @abstractmethod
    def collect(self, params: list[nn.Parameter]) -> PerExampleGradients | None:
        """Per-example gradients of every backward pass since the last collect, for ``params``; None if none ran."""

    @abstractmethod
    def discard(self) -> None:
        """Drop pending per-example gradients (optimizer.zero_grad)."""

    @abstractmethod
    def pending_forward_passes(self) -> int:
        """How many forward passes have per-example gradients waiting for the next collect (several backward
        passes through one forward pass count once: their gradients are the same examples')."""

    @abstractmethod
    def detach(self) -> None:
        """Remove every hook from the module."""


class ReplayGuard:
    """Shared by every hook of one engine: while a replay (a vmap re-run of a forward) runs, hooks record nothing."""

    def __init__(self) -> None:
        self.active = False

    @contextmanager
    def replaying(self) -> Iterator[None]:
        previous, self.active = self.active, True
        try:
            yield
        finally:
            self.active = previous
