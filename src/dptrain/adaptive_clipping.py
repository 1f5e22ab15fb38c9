"""Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021): the clipping bound C follows a target
quantile of the per-example gradient norms, learnt privately, step by step.

Each logical step also releases the number of examples whose gradient norm was at most C, with Gaussian noise of
standard deviation ``unclipped_num_std`` (sigma_b): b~ = (count + N(0, sigma_b^2)) / expected batch size. The bound
then moves geometrically towards the target quantile gamma: C <- C exp(-eta (b~ - gamma)), kept within
[``min_clipbound``, ``max_clipbound``].

Accounting. The step releases two Gaussian queries of the same batch: the clipped gradient sum (sensitivity C,
noise z_g C) and the count (sensitivity 1 under add/remove-one, noise sigma_b). Together they are one Gaussian
mechanism with noise multiplier z, 1/z^2 = 1/z_g^2 + 1/sigma_b^2. The user's ``noise_multiplier`` is that z (the one
the accountant and the ledger charge), and the gradient's own noise multiplier is raised to
z_g = (z^-2 - sigma_b^-2)^-1/2 to pay for the count. (Opacus uses (2 sigma_b)^-2, the count's sensitivity taken as
1/2; dptrain charges the count at sensitivity 1, the conservative reading when the batch size itself is private.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dptrain.accounting import check_positive
from dptrain.randomness import RandomSource


@dataclass
class AdaptiveClipping:
    """Opacus' ``clipping="adaptive"`` options and the current step's count of unclipped examples."""

    target_unclipped_quantile: float
    clipbound_learning_rate: float
    max_clipbound: float
    min_clipbound: float
    unclipped_num_std: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_unclipped_quantile <= 1.0:
            raise ValueError(f"target_unclipped_quantile must be in [0, 1], got {self.target_unclipped_quantile!r}")
        for name in ("clipbound_learning_rate", "max_clipbound", "min_clipbound", "unclipped_num_std"):
            check_positive(getattr(self, name), name)
        if self.min_clipbound > self.max_clipbound:
            raise ValueError(f"min_clipbound {self.min_clipbound} is above max_clipbound {self.max_clipbound}")
        self.unclipped: torch.Tensor | float = 0.0

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        """z_g, so that the gradient sum and the count together are a Gaussian mechanism at ``noise_multiplier``."""
        if noise_multiplier == 0:
            return 0.0  # no privacy claimed (tests)
        rest = noise_multiplier**-2 - self.unclipped_num_std**-2
        if rest <= 0:
            raise ValueError(
                f"adaptive clipping with unclipped_num_std={self.unclipped_num_std} leaves no privacy for the "
                f"gradient at noise_multiplier={noise_multiplier}: the count alone costs more. Use unclipped_num_std "
                f"> noise_multiplier (e.g. {2 * noise_multiplier:g}, the gradient's noise is then raised by 15%)"
            )
        return rest**-0.5

    def count(self, norms: torch.Tensor, max_grad_norm: float) -> None:
        """Add a chunk's examples whose norm is at most the current bound (on the norms' device: no synchronisation
        until the step's end)."""
        self.unclipped = self.unclipped + (norms <= max_grad_norm).sum()

    def next_bound(self, max_grad_norm: float, random: RandomSource, expected_batch_size: float) -> float:
        """The bound for the next step, from this step's noisy count (which it resets)."""
        noise = float(random.normal(torch.Size([1]), dtype=torch.float64, device=torch.device("cpu"))[0])
        fraction = (float(self.unclipped) + self.unclipped_num_std * noise) / expected_batch_size
        self.unclipped = 0.0
        bound = max_grad_norm * math.exp(-self.clipbound_learning_rate * (fraction - self.target_unclipped_quantile))
        return min(max(bound, self.min_clipbound), self.max_clipbound)

    def abandon(self) -> None:
        """Forget the count of a logical step that never completes."""
        self.unclipped = 0.0
