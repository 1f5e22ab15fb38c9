"""Random sources for privacy-critical draws: a seedable torch generator, or the OS's cryptographic generator.

``secure_mode`` uses ``os.urandom`` (the kernel CSPRNG: getrandom(2) on Linux, ChaCha20-based) for both Poisson
sampling and Gaussian noise. Normals are made by Box-Muller from 53-bit uniforms, and each noise value is the
average of four such normals scaled back to unit variance, which smooths the gaps in floating-point Gaussian
samples that Mironov (CCS 2012) showed can leak. Cost: roughly 32 random bytes and a few float ops per noise
coordinate, several times slower than torch's generator; negligible next to a training step for models of a few
million parameters.

Without ``secure_mode``, a large CPU draw (at least ``PARALLEL_MIN_NUMEL`` normals, more than one torch thread) is
split into ``k = torch.get_num_threads()`` contiguous chunks filled concurrently (torch releases the GIL), each by its
own Mersenne Twister whose whole 624-word state is drawn from the source's generator (or torch's global one). The
noise is a function of that generator's state and ``k`` only, not of thread scheduling, and checkpoints need only
that generator's state. Seeding the chunks by ``manual_seed`` instead would give only 2^32 distinct streams (torch's
mt19937 keeps the low 32 bits of a seed), so over a long run two steps would, by the birthday bound, reuse a noise
chunk, which an observer of both updates could cancel.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

#: Smallest CPU draw of normals that is split across threads (below it the hand-off costs more than it saves).
PARALLEL_MIN_NUMEL = 1 << 16
_MT_WORDS = 624  # mt19937 state words
# In torch's CPU generator state (CPUGeneratorImplStateLegacy) the mt19937 words follow the initial seed (8 bytes),
# left and seeded (4 + 4) and next (8), one uint64 per 32-bit word.
_MT_STATE_BYTES = slice(24, 24 + 8 * _MT_WORDS)
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


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


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """The module's persistent pool for parallel draws, (re)created with at least ``workers`` threads."""
    global _pool, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_workers < workers:
            # A smaller pool is not shut down (a draw may still be using it); its idle threads exit when it is freed.
            _pool, _pool_workers = ThreadPoolExecutor(workers, thread_name_prefix="dptrain-noise"), workers
        return _pool


def _mt_generator(words: torch.Tensor) -> torch.Generator:
    """A CPU generator whose mt19937 state is the 624 32-bit ``words`` (int64), twisted before its first output."""
    generator = torch.Generator()
    state = generator.get_state()  # a fresh generator's: left = 1 (twist before the first output), no cached normal
    state[_MT_STATE_BYTES] = words.to(torch.int64).view(torch.uint8)
    generator.set_state(state)
    return generator


@functools.cache
def state_layout_is_known() -> bool:
    """Whether this torch's generator state holds the mt19937 words where ``_mt_generator`` writes them: a generator
    built from the words of mt19937's seeding recurrence must draw exactly what ``manual_seed`` gives. Checked once
    per process; when it fails (another torch layout) large draws stay serial instead of risking degenerate states."""
    seed, words = 20240607, [20240607]
    for i in range(1, _MT_WORDS):
        words.append((1812433253 * (words[-1] ^ (words[-1] >> 30)) + i) & 0xFFFFFFFF)
    try:
        built = _mt_generator(torch.tensor(words))
    except RuntimeError:
        return False
    return torch.equal(torch.randn(64, generator=built), torch.randn(64, generator=torch.Generator().manual_seed(seed)))


def parallel_normal(n: int, dtype: torch.dtype, chunks: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` standard normals on the CPU, ``chunks`` contiguous chunks filled concurrently, each by its own generator
    whose state is drawn from ``generator`` (torch's global generator when None). Deterministic given that
    generator's state and ``chunks``."""
    words = torch.randint(0, 1 << 32, (chunks, _MT_WORDS), generator=generator)
    out = torch.empty(n, dtype=dtype)
    parts = [(part, _mt_generator(w)) for part, w in zip(out.tensor_split(chunks), words)]
    pool = _thread_pool(chunks - 1)
    pending = [pool.submit(part.normal_, generator=g) for part, g in parts[1:]]
    parts[0][0].normal_(generator=parts[0][1])  # the calling thread fills the first chunk
    for future, (part, g) in zip(pending, parts[1:]):
        if future.cancel():  # no pool thread has picked it up yet: fill it here, with the same generator
            part.normal_(generator=g)
        else:
            future.result()
    return out


class RandomSource:
    """Uniforms and normals from a seeded torch generator, or from the OS CSPRNG when ``secure``."""

    def __init__(self, secure: bool = False, generator: torch.Generator | None = None) -> None:
        if secure and generator is not None:
            raise ValueError("secure_mode draws from the OS CSPRNG and cannot use a seeded generator; pass one or the other")
        self.secure = secure
        self.generator = generator

    def uniform(self, n: int) -> torch.Tensor:
        if self.secure:
            return secure_uniform(n)
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def normal(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Standard normals of ``shape``; large CPU draws are filled in parallel (see ``parallel_normal``)."""
        if self.secure:
            return secure_normal(math.prod(shape)).reshape(shape).to(dtype=dtype, device=device)
        # The draw happens on the generator's device (then moves to ``device``), or on ``device`` without one.
        draw_device = self.generator.device if self.generator is not None else torch.device(device)
        n, threads = math.prod(shape), torch.get_num_threads()
        if draw_device.type == "cpu" and n >= PARALLEL_MIN_NUMEL and threads > 1 and state_layout_is_known():
            noise = parallel_normal(n, dtype, threads, self.generator).view(shape)
        else:
            noise = torch.randn(shape, generator=self.generator, dtype=dtype, device=draw_device)
        return noise.to(device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
