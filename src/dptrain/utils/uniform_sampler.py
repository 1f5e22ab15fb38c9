"""Opacus' ``opacus.utils.uniform_sampler.UniformWithReplacementSampler`` under its name: Poisson sampling.

Despite the name (Opacus' own), each batch contains every index independently with probability ``sample_rate``
(so the batch size varies, zero included), for ``int(1 / sample_rate)`` batches: one epoch sees the dataset once
in expectation. It is dptrain's :class:`~dptrain.sampling.PoissonBatchSampler`, drawing from ``generator`` (a
``torch.Generator``; None: seeded by the OS).
"""

from __future__ import annotations

import torch

from dptrain.randomness import RandomSource
from dptrain.sampling import PoissonBatchSampler


class UniformWithReplacementSampler(PoissonBatchSampler):
    def __init__(self, *, num_samples: int, sample_rate: float, generator: torch.Generator | None = None) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        super().__init__(num_samples, sample_rate, int(1 / sample_rate), RandomSource(generator=generator))
