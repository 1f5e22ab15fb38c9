"""What clipping needs from a per-example gradient engine, whatever way it computes them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def per_example_squared_norms(grads: dict[Any, torch.Tensor]) -> dict[Any, torch.Tensor]:
    """Squared norm of each example's gradient, (batch,) per key, from per-example gradients (batch, ...)."""
    return {key: g.flatten(1).pow(2).sum(1) for key, g in grads.items()}


def per_example_weighted_sums(grads: dict[Any, torch.Tensor], weights: torch.Tensor) -> dict[Any, torch.Tensor]:
    """sum_i weights[i] * g_i per key, from per-example gradients (batch, ...)."""
    return {key: torch.einsum("b,b...->...", weights.to(g.device, g.dtype), g) for key, g in grads.items()}


class PerExampleGradients(ABC):
    """The per-example gradients of one physical batch, exposed only through what DP-SGD needs.

    A fast engine can answer both questions without materialising a (batch x parameters) tensor; the reference
    engine materialises it.
    """

    batch_size: int

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

    def __init__(self, per_param: dict[nn.Parameter, torch.Tensor], batch_size: int) -> None:
        self.per_param = per_param
        self.batch_size = batch_size

    def squared_norms(self) -> torch.Tensor:
        if not self.per_param:
            raise RuntimeError("no parameters to clip")
        return sum(per_example_squared_norms(self.per_param).values())

    def weighted_sum(self, weights: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return per_example_weighted_sums(self.per_param, weights)

    def materialize(self) -> dict[nn.Parameter, torch.Tensor]:
        return self.per_param

    def __add__(self, other: "MaterializedGradients") -> "MaterializedGradients":
        """Sum of two records over the same examples (two backward passes before one step)."""
        if other.batch_size != self.batch_size:
            raise RuntimeError(
                f"two backward passes over batches of different sizes ({self.batch_size} and {other.batch_size}) "
                "before one optimizer.step(): per-example gradients cannot be matched to examples"
            )
        merged = dict(self.per_param)
        for p, g in other.per_param.items():
            merged[p] = merged[p] + g if p in merged else g
        return MaterializedGradients(merged, self.batch_size)


class GradSampler(ABC):
    """Attaches to the user's module (hooks only, no wrapper) and yields per-example gradients after backward."""

    @abstractmethod
    def collect(self, params: list[nn.Parameter]) -> PerExampleGradients | None:
        """Per-example gradients of every backward pass since the last collect, for ``params``; None if none ran."""

    @abstractmethod
    def discard(self) -> None:
        """Drop pending per-example gradients (optimizer.zero_grad)."""

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
