"""The DP optimizer: clip each example's gradient, sum, add Gaussian noise once per logical step, scale, step.

It wraps the user's optimizer (SGD, Adam, ...) and delegates ``param_groups`` and ``state`` to it, so learning-rate
schedulers and ``state_dict`` work as before. The update it hands to the wrapped optimizer is

    (sum_i clip(g_i, C) + N(0, (sigma * C)^2 I)) / expected_batch_size

where clip(g, C) = g * min(1, C / ||g||) over all privatised parameters together (flat clipping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from dptrain.grad.base import GradSampler
from dptrain.randomness import RandomSource
from dptrain.sampling import ChunkSignal


class BudgetExhausted(Exception):
    """The privacy budget allows no further step: raised by ``optimizer.step()`` before it changes anything.

    Catch it to end the training loop; the steps already taken stay recorded and are settled by
    ``PrivacyEngine.close()``.
    """

    def __init__(self, budget: str, steps_taken: int) -> None:
        self.budget = budget
        self.steps_taken = steps_taken
        super().__init__(
            f"privacy budget {budget!r} is spent: {steps_taken} steps were taken, one more would exceed its cap"
        )


class NonFiniteGradientError(RuntimeError):
    """A per-example gradient was NaN or infinite: clipping it would silently turn it into noise."""


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / ||g_i||) per example (1 for a zero gradient)."""
    return max_grad_norm / torch.clamp(norms, min=max_grad_norm)


class DPOptimizer(Optimizer):
    """Wraps ``optimizer`` so that each of its steps uses a clipped, noised, averaged gradient."""

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        params: list[nn.Parameter],
        grad_sampler: GradSampler,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        random: RandomSource,
        signal: ChunkSignal | None = None,
        on_step: Callable[["DPOptimizer"], None] | None = None,
        distributed: bool = False,
    ) -> None:
        """With ``distributed``, each rank clips its own examples, the clipped sums are summed across ranks and
        rank 0 alone adds the noise, so each logical step carries the noise once."""
        # Deliberately no super().__init__: parameter groups and state live in the wrapped optimizer.
        self.original_optimizer = optimizer
        self.params = params
        self.grad_sampler = grad_sampler
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.random = random
        self.signal = signal or ChunkSignal()
        self.on_step = on_step
        self.distributed = distributed
        self.steps_taken = 0
        #: Steps the privacy budget allows this optimizer (None: no budget); set by the engine.
        self.step_allowance: int | None = None
        self.budget_name = ""
        self._clipped_sum: dict[nn.Parameter, torch.Tensor] | None = None

    # Delegation to the wrapped optimizer.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> dict:
        return self.original_optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.original_optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise RuntimeError("parameters cannot be added to a private optimizer; add them before make_private")

    def __repr__(self) -> str:
        return (
            f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
            f"expected_batch_size={self.expected_batch_size}, optimizer={self.original_optimizer!r})"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimizer's gradients and drop per-example gradients not yet consumed by ``step``."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.grad_sampler.discard()

    def _accumulate_chunk(self) -> None:
        grads = self.grad_sampler.collect(self.params)
        if grads is None:
            if self.signal.chunk_size == 0:
                return  # an empty Poisson batch whose forward pass the user skipped: noise only
            raise RuntimeError(
                "optimizer.step() found no per-example gradients: call loss.backward() on the output of the "
                "private model before optimizer.step()"
            )
        norms = grads.squared_norms().sqrt()
        if not torch.isfinite(norms).all():
            bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
            raise NonFiniteGradientError(
                f"non-finite per-example gradient at step {self.steps_taken + 1} for example(s) {bad[:10]} of the "
                "batch; clipping would hide it in the noise. Check the inputs and the loss (log of 0, overflow)"
            )
        summed = grads.weighted_sum(clip_factors(norms, self.max_grad_norm))
        if self._clipped_sum is None:
            self._clipped_sum = summed
        else:
            for p, g in summed.items():
                self._clipped_sum[p] = self._clipped_sum[p] + g if p in self._clipped_sum else g

    def _noisy_average(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        add_noise = std > 0 and (not self.distributed or dist.get_rank() == 0)
        totals = []
        for p in self.params:
            # A parameter no example's loss touched (an unused branch) has a zero clipped sum.
            clipped = self._clipped_sum.get(p) if self._clipped_sum is not None else None
            total = clipped.to(p.dtype) if clipped is not None else torch.zeros_like(p)
            if add_noise:
                total = total + std * self.random.normal(p.shape, dtype=p.dtype, device=p.device)
            totals.append(total)
        if self.distributed:
            flat = torch.cat([t.flatten() for t in totals])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            totals = list(flat.split([t.numel() for t in totals]))
        for p, total in zip(self.params, totals):
            p.grad = (total / self.expected_batch_size).view_as(p)
        self._clipped_sum = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Clip this chunk's per-example gradients; at the end of a logical batch, noise, scale and step.

        Returns the closure's loss on a real step, None when only a physical chunk was accumulated.
        """
        if self.step_allowance is not None and self.steps_taken >= self.step_allowance:
            self.grad_sampler.discard()
            raise BudgetExhausted(self.budget_name, self.steps_taken)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._accumulate_chunk()
        if not self.signal.is_last_chunk:
            return None
        self._noisy_average()
        self.original_optimizer.step()
        self.steps_taken += 1
        if self.on_step is not None:
            self.on_step(self)
        return loss
