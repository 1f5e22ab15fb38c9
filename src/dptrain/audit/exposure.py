"""Canary exposure for sequence models (Carlini, Liu, Erlingsson, Kos, Song, "The Secret Sharer", USENIX Security
2019).

Plant a secret of a known format (for example "my pin is 3141") in the training text, train, and rank the secret
among all candidates of that format R (here the 10^4 four-digit pins) by the model's likelihood:

    exposure = log2 |R| - log2 rank,

rank 1 being the most likely candidate. Exposure is log2 |R| (13.3 bits for 10^4 pins) when the model ranks the
secret first, about 1 bit for a model that knows nothing about it (a uniformly random rank gives an expected
exposure of 1 / ln 2 = 1.44 bits). Ties are split evenly: rank = 1 + #(candidates more likely) +
#(other candidates equally likely) / 2, so a model that gives every candidate the same likelihood gets rank
(|R| + 1) / 2 rather than 1.

**Exact** (default when |R| <= ``exact_limit``): every candidate is scored.

**Sampled** (larger R): n candidates are drawn uniformly from R without the secret (with replacement), and the
fraction f of them that are more likely (ties counting one half) estimates the fraction of R \\ {secret} that is:

    rank ~ 1 + (|R| - 1) * f.

f is an average of n independent draws with mean F = (rank - 1) / (|R| - 1), so the estimate is unbiased with
standard deviation (|R| - 1) * sqrt(F (1 - F) / n) (reported as ``rank_std`` with F replaced by f). When few or no
sampled candidates beat the secret the relative error of the rank is large, so a Clopper-Pearson 95 % interval on F
is also reported as an exposure interval: with no sampled candidate more likely than the secret, the estimate is
the maximum log2 |R| but the interval's lower end is about log2 n - log2 3.7, which is all the sample can show.
(The paper extrapolates small ranks by fitting a skew-normal to the sampled log-likelihoods; that is tighter when
the fit is right, but unverifiable, so it is not the default here.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Scores a batch of candidate strings: returns one log-likelihood per candidate (higher = more likely).
LogLikelihoodFn = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class SecretFormat:
    """All strings ``prefix + s + suffix`` with s a string of ``length`` symbols from ``alphabet``.

    Candidates are indexed 0 .. |R| - 1 in lexicographic order of s (most significant symbol first), so they can be
    enumerated or sampled without building the whole list.
    """

    alphabet: str
    length: int
    prefix: str = ""
    suffix: str = ""

    def __post_init__(self) -> None:
        if len(set(self.alphabet)) != len(self.alphabet) or len(self.alphabet) < 2:
            raise ValueError(f"alphabet must have >= 2 distinct symbols, got {self.alphabet!r}")
        if self.length <= 0:
            raise ValueError(f"length must be > 0, got {self.length}")

    @property
    def size(self) -> int:
        return len(self.alphabet) ** self.length

    def candidates(self, indices: np.ndarray | Sequence[int]) -> list[str]:
        """The candidates with the given indices."""
        digits = np.asarray(indices, dtype=object if self.size > 2**62 else np.int64).copy()
        base = len(self.alphabet)
        columns = []
        for _ in range(self.length):
            columns.append(digits % base)
            digits = digits // base
        symbols = np.array(list(self.alphabet))
        body = ["".join(row) for row in symbols[np.stack(columns[::-1], axis=1).astype(np.int64)]]
        return [self.prefix + b + self.suffix for b in body]

    def all(self) -> list[str]:
        return self.candidates(np.arange(self.size))

    def index(self, candidate: str) -> int:
        """The index of ``candidate``; ValueError if it does not have this format."""
        body = candidate[len(self.prefix) : len(candidate) - len(self.suffix) if self.suffix else None]
        if (
            not candidate.startswith(self.prefix)
            or not candidate.endswith(self.suffix)
            or len(body) != self.length
            or any(ch not in self.alphabet for ch in body)
        ):
            raise ValueError(f"{candidate!r} is not of the format {self.prefix!r} + {self.length} x {self.alphabet!r} + {self.suffix!r}")
        value = 0
        for ch in body:
            value = value * len(self.alphabet) + self.alphabet.index(ch)
        return value


@dataclass(frozen=True)
class ExposureResult:
    """Exposure of one secret. ``method``: "exact" or "sampled"; for "sampled", ``rank`` is an estimate with
    standard deviation ``rank_std`` and ``exposure_interval`` a 95 % confidence interval (exact: both are exact)."""

    secret: str
    exposure: float
    rank: float
    space_size: int
    method: str
    num_scored: int
    rank_std: float
    exposure_interval: tuple[float, float]

    def to_dict(self) -> dict:
        return {
            "secret": self.secret,
            "exposure": self.exposure,
            "rank": self.rank,
            "space_size": self.space_size,
            "method": self.method,
            "num_scored": self.num_scored,
            "rank_std": self.rank_std,
            "exposure_interval": list(self.exposure_interval),
        }


def _score(fn: LogLikelihoodFn, candidates: Sequence[str], batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start : start + batch_size]
        values = np.asarray(fn(chunk), dtype=np.float64).reshape(-1)
        if values.size != len(chunk):
            raise ValueError(f"log_likelihood_fn returned {values.size} values for {len(chunk)} candidates")
        out.append(values)
    scores = np.concatenate(out) if out else np.empty(0)
    if np.isnan(scores).any():
        raise ValueError("log_likelihood_fn returned NaN")
    return scores


def _exposure(space_size: int, rank: float) -> float:
    return math.log2(space_size) - math.log2(rank)


def canary_exposure(
    log_likelihood_fn: LogLikelihoodFn,
    secret: str,
    candidate_space: SecretFormat | Sequence[str],
    *,
    exact_limit: int = 100_000,
    num_samples: int = 10_000,
    seed: int = 0,
    batch_size: int = 4096,
    confidence: float = 0.95,
) -> ExposureResult:
    """Exposure of ``secret`` among ``candidate_space`` (a ``SecretFormat`` or an explicit list that contains it).

    ``log_likelihood_fn(candidates) -> array`` gives the model's log-likelihood of each candidate (for a language
    model, the sum of the log-probabilities of the candidate's tokens, or of the secret part given the prefix: the
    prefix's term is the same for every candidate and does not change ranks). Exact when |R| <= ``exact_limit`` or
    when R is a list; otherwise ``num_samples`` sampled candidates (seeded by ``seed``).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(candidate_space, SecretFormat):
        size = candidate_space.size
        secret_index = candidate_space.index(secret)
        exact = size <= exact_limit
    else:
        candidates = list(candidate_space)
        size = len(candidates)
        if secret not in candidates:
            raise ValueError("the secret must be one of the candidates")
        exact = True
    if size < 2:
        raise ValueError("the candidate space needs at least two candidates")
    secret_ll = float(_score(log_likelihood_fn, [secret], 1)[0])

    if exact:
        if isinstance(candidate_space, SecretFormat):
            candidates = candidate_space.all()
        scores = _score(log_likelihood_fn, candidates, batch_size)
        others = np.array([c != secret for c in candidates])
        greater = int(np.sum(scores[others] > secret_ll))
        ties = int(np.sum(scores[others] == secret_ll))
        rank = 1.0 + greater + ties / 2.0
        exposure = _exposure(size, rank)
        return ExposureResult(secret, exposure, rank, size, "exact", size, 0.0, (exposure, exposure))

    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    rng = np.random.default_rng(seed)
    # Uniform over R \ {secret}: draw from 0 .. |R| - 2 and skip the secret's index.
    indices = rng.integers(0, size - 1, size=num_samples, dtype=np.int64) if size - 1 < 2**62 else None
    if indices is None:
        raise ValueError("candidate spaces larger than 2^62 are not supported")
    indices = indices + (indices >= secret_index)
    scores = _score(log_likelihood_fn, candidate_space.candidates(indices), batch_size)
    wins = np.sum(scores > secret_ll) + 0.5 * np.sum(scores == secret_ll)
    fraction = float(wins / num_samples)
    rank = 1.0 + (size - 1) * fraction
    rank_std = (size - 1) * math.sqrt(fraction * (1.0 - fraction) / num_samples)
    tail = (1.0 - confidence) / 2.0
    # Clopper-Pearson on the count of wins (half-wins rounded conservatively outwards).
    low_count, high_count = math.floor(wins), math.ceil(wins)
    f_low = 0.0 if low_count == 0 else float(stats.beta.ppf(tail, low_count, num_samples - low_count + 1))
    f_high = 1.0 if high_count == num_samples else float(stats.beta.ppf(1 - tail, high_count + 1, num_samples - high_count))
    interval = (_exposure(size, 1.0 + (size - 1) * f_high), _exposure(size, 1.0 + (size - 1) * f_low))
    return ExposureResult(secret, _exposure(size, rank), rank, size, "sampled", num_samples, rank_std, interval)
