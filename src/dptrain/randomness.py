"""Random sources for privacy-critical draws: a seedable torch generator, or the OS's cryptographic generator.

``secure_mode`` uses ``os.urandom`` (the kernel CSPRNG: getrandom(2) on Linux, ChaCha20-based) for both Poisson
sampling and Gaussian noise. Normals are made by Box-Muller from 53-bit uniforms, and each noise value is the
average of four such normals scaled back to unit variance, which smooths the gaps in floating-point Gaussian
samples that Mironov (CCS 2012) showed can leak. Cost: roughly 32 random bytes and a few float ops per noise
coordinate, several times slower than torch's generator; negligible next to a training step for models of a few
million parameters.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch


def secure_uniform(n: int) -> torch.Tensor:
    """``n`` float64 uniforms in [0, 1) with 53 random bits each, from the OS CSPRNG."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return torch.from_numpy(raw.astype(np.float64) * (1.0 / (1 << 53)))


def secure_normal(n: int) -> torch.Tensor:
    """``n`` standard normals from the OS CSPRNG (mean of four Box-Muller normals times 2)."""
    pairs = 2 * math.ceil(n / 2)
    total = torch.zeros(pairs, dtype=torch.float64)
    for _ in range(4):
        u1 = 1.0 - secure_uniform(pairs // 2)  # in (0, 1]: log is finite
        u2 = secure_uniform(pairs // 2)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = 2.0 * math.pi * u2
        total += torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])
    return (total / 2.0)[:n]


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the OS: never the stream of ``torch.manual_seed`` (which scripts call with the
    same seed every time, so a resumed or repeated run would repeat its noise and batches)."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)


class RandomSource:
    """Uniforms and normals from a seeded torch generator, or from the OS CSPRNG when ``secure``; without either, a
    generator seeded from the OS (``fresh_generator``), never torch's global generator."""

    def __init__(self, secure: bool = False, generator: torch.Generator | None = None) -> None:
        if secure and generator is not None:
            raise ValueError("secure_mode draws from the OS CSPRNG and cannot use a seeded generator; pass one or the other")
        self.secure = secure
        self.generator = generator if secure or generator is not None else fresh_generator()

    def uniform(self, n: int) -> torch.Tensor:
        if self.secure:
            return secure_uniform(n)
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def normal(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.secure:
            return secure_normal(math.prod(shape)).reshape(shape).to(dtype=dtype, device=device)
        noise = torch.randn(shape, generator=self.generator, dtype=dtype, device=self.generator.device)
        return noise.to(device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
