"""The one-run privacy audit (Steinke, Nasr, Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023,
arXiv 2305.08846).

The procedure: make m canaries and include each in the training set independently with probability 1/2; train
once, exactly as the real run would (the canaries ride along with the real data); score every canary with the
trained model; guess "in" for the k+ highest scores and "out" for the k- lowest, abstain on the rest; count the
correct guesses v among the r = k+ + k- guesses. If the training algorithm is (eps, delta)-DP, v is unlikely to be
much larger than a Binomial(r, e^eps / (1 + e^eps)): the paper's Theorem 5.2 bounds

    P[v or more correct] <= p(eps) = min(1, beta + alpha * 2 * m * delta),
    q = e^eps / (1 + e^eps),
    beta = P[Binomial(r, q) >= v],
    alpha = max over i = 1..v of P[v - i <= Binomial(r, q) < v] / i.

Every eps with p(eps) < significance is rejected, so the largest such eps is a lower bound on the true eps, with
confidence 1 - significance. A correct DP implementation with claimed eps never gives a lower bound above the
claimed eps except with probability <= significance; a lower bound above it is evidence of a bug (noise not added,
a gradient that bypasses clipping, a sampling rate the accountant does not know about, ...).

The bound is a lower bound: a small value proves nothing about privacy. With input-space canaries on a DP model it
is typically far below the claimed eps (DP-SGD's analysis is tight only for worst-case, gradient-space canaries
with all intermediate models released). Its strength is catching implementations that are grossly wrong.

Cost of running alongside a real run: the model trains on the m/2 included canaries as well as the real data.
Canaries with random labels are hard examples; with DP they mostly take a share of the clipped gradient sum. Keep
m small next to the dataset size (a few percent) for a real run; a dedicated audit run can use more.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from dptrain.audit.scores import SCORES, score_examples
from dptrain.rundir import json_number

#: A training function: trains on the dataset it is given and returns the model and the eps it claims.
TrainFn = Callable[[Dataset], tuple[nn.Module, float]]


class PrivacyViolationWarning(UserWarning):
    """An audit found more leakage than the claimed epsilon allows: probably an implementation bug."""


class PrivacyViolationError(RuntimeError):
    """Raised instead of the warning when an audit asks for it (``raise_on_violation=True``)."""


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    for name, value in (("num_canaries", num_canaries), ("num_guesses", num_guesses), ("num_correct", num_correct)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            f"need num_correct <= num_guesses <= num_canaries, got {num_correct}, {num_guesses}, {num_canaries}"
        )


def _check_probability(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")


def one_run_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """p(eps) of the module docstring: how likely ``num_correct`` or more correct guesses are under (eps, delta)-DP.

    Tail probabilities come from ``scipy.stats.binom`` (``sf`` for beta, ``logpmf`` for the terms of alpha), which
    stay accurate for r in the millions (m = 10^6, r = 10^5 takes well under a second). Non-increasing in
    ``num_correct`` whenever 2 * m * delta <= 1: when v grows by one, beta drops by pmf(v) and, by the mediant
    inequality, alpha grows by at most pmf(v). beta grows with eps; like the paper's procedure, the bisection in
    ``one_run_epsilon_lower_bound`` relies on p growing with eps (verified on grids of m, r, v, delta in the tests).
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if epsilon < 0 or math.isnan(epsilon):
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    r, v = num_guesses, num_correct
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon)) if math.isfinite(epsilon) else 1.0
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if delta > 0:
        # S_i = P[v - i <= B < v] = sum_{k = v-i}^{v-1} pmf(k): a cumulative sum from k = v - 1 downwards.
        pmf = np.exp(stats.binom.logpmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * 2.0 * num_canaries * delta)


def one_run_epsilon_lower_bound(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float,
    significance: float = 0.05,
    tolerance: float = 1e-6,
) -> float:
    """The largest eps with ``one_run_p_value(...) < significance`` (0 if none), by bisection to ``tolerance``.

    0 when the guesses are no better than chance. Non-decreasing in ``num_correct`` (for 2 * m * delta <= 1).
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    _check_probability(delta, "delta")
    _check_probability(significance, "significance")

    def rejected(eps: float) -> bool:
        return one_run_p_value(num_canaries, num_guesses, num_correct, eps, delta) < significance

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):  # p(eps) >= beta = P[Binomial(r, q) >= v] -> 1 as eps grows, so this ends
        low, high = high, 2.0 * high
    while high - low > tolerance:
        mid = (low + high) / 2.0
        if rejected(mid):
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True, eq=False)
class CanarySet:
    """m audit canaries (inputs and labels) and which of them were included in training.

    ``included[i]`` is drawn independently with probability 1/2 from ``seed``; the auditor keeps it secret from the
    training code, which only sees the dataset with the included canaries appended.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    included: np.ndarray
    kind: str
    seed: int

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels) or len(self.labels) != len(self.included):
            raise ValueError("inputs, labels and included must have one entry per canary")

    @property
    def num_canaries(self) -> int:
        return len(self.labels)

    def dataset(self) -> TensorDataset:
        """All m canaries (included or not), for scoring."""
        return TensorDataset(self.inputs, self.labels)

    def insert_into(self, dataset: Dataset) -> Dataset:
        """``dataset`` with the included canaries appended (a TensorDataset if ``dataset`` is one)."""
        keep = torch.from_numpy(np.nonzero(self.included)[0])
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
            x, y = dataset.tensors
            return TensorDataset(
                torch.cat([x, self.inputs[keep].to(x.dtype)]), torch.cat([y, self.labels[keep].to(y.dtype)])
            )
        return ConcatDataset([dataset, Subset(self.dataset(), keep.tolist())])


def _inclusion(num_canaries: int, rng: np.random.Generator) -> np.ndarray:
    return rng.random(num_canaries) < 0.5


def random_input_canaries(
    num_canaries: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    low: float = 0.0,
    high: float = 1.0,
    seed: int = 0,
) -> CanarySet:
    """Canaries with uniform random inputs in [low, high) and uniform random labels (out of distribution).

    Use the data's known range for [low, high) (for example the pixel range), never statistics of private data.
    """
    if num_canaries <= 0 or num_classes < 2:
        raise ValueError(f"need num_canaries > 0 and num_classes >= 2, got {num_canaries}, {num_classes}")
    rng = np.random.default_rng(seed)
    inputs = torch.from_numpy(rng.uniform(low, high, size=(num_canaries, *input_shape))).float()
    labels = torch.from_numpy(rng.integers(0, num_classes, size=num_canaries)).long()
    return CanarySet(inputs, labels, _inclusion(num_canaries, rng), "random_inputs", seed)


def mislabeled_canaries(pool: TensorDataset, num_canaries: int, num_classes: int, *, seed: int = 0) -> CanarySet:
    """Canaries made of ``num_canaries`` examples of ``pool`` (data NOT otherwise in training) with a random wrong label."""
    x, y = pool.tensors
    if not 0 < num_canaries <= len(y):
        raise ValueError(f"num_canaries must be in [1, {len(y)}] (the pool size), got {num_canaries}")
    rng = np.random.default_rng(seed)
    chosen = torch.from_numpy(rng.choice(len(y), size=num_canaries, replace=False))
    shift = torch.from_numpy(rng.integers(1, num_classes, size=num_canaries))
    labels = (y[chosen] + shift) % num_classes
    return CanarySet(x[chosen].clone(), labels.long(), _inclusion(num_canaries, rng), "mislabeled", seed)


@dataclass(frozen=True)
class OneRunAuditResult:
    """The outcome of a one-run audit. ``suspicious``: the lower bound exceeds the claimed eps."""

    num_canaries: int
    num_guesses: int
    num_correct: int
    empirical_epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    significance: float
    num_positive_guesses: int
    num_negative_guesses: int
    score: str = "loss"
    #: Which audit produced it: input canaries scored through the trained model, or gradient canaries.
    audit: str = "black-box input canaries"
    suspicious: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "suspicious", bool(self.empirical_epsilon_lower_bound > self.claimed_epsilon))

    def message(self) -> str:
        text = (
            f"one-run audit ({self.audit}): {self.num_correct}/{self.num_guesses} correct guesses on {self.num_canaries} canaries, "
            f"empirical eps lower bound {self.empirical_epsilon_lower_bound:.3f} (confidence "
            f"{1 - self.significance:.0%}, delta {self.delta:g}), claimed eps {self.claimed_epsilon:.3f}"
        )
        if self.suspicious:
            text += (
                ": the lower bound EXCEEDS the claimed epsilon. The training run leaks more than its accounting "
                "allows; this is probably an implementation bug (noise not added, unclipped gradients, wrong "
                "sampling rate), not bad luck (chance of a false alarm <= "
                f"{self.significance:g})"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_canaries": self.num_canaries,
            "num_guesses": self.num_guesses,
            "num_correct": self.num_correct,
            "num_positive_guesses": self.num_positive_guesses,
            "num_negative_guesses": self.num_negative_guesses,
            "empirical_epsilon_lower_bound": self.empirical_epsilon_lower_bound,
            "claimed_epsilon": json_number(self.claimed_epsilon),
            "delta": self.delta,
            "significance": self.significance,
            "score": self.score,
            "audit": self.audit,
            "suspicious": self.suspicious,
        }




def guess_membership(
    scores: np.ndarray, num_positive_guesses: int, num_negative_guesses: int, seed: int = 0
) -> np.ndarray:
    """+1 ("in") for the ``num_positive_guesses`` highest scores, -1 ("out") for the lowest, 0 (abstain) otherwise.

    Ties are broken by a random permutation (from ``seed``), never by position, so the guesses do not depend on the
    canaries' order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.size
    if num_positive_guesses < 0 or num_negative_guesses < 0 or num_positive_guesses + num_negative_guesses > m:
        raise ValueError(
            f"need 0 <= k+ and 0 <= k- with k+ + k- <= m = {m}, got {num_positive_guesses}, {num_negative_guesses}"
        )
    tiebreak = np.random.default_rng(seed).permutation(m)
    order = np.lexsort((tiebreak, -scores))  # by score descending, ties by the random key
    guesses = np.zeros(m, dtype=np.int8)
    guesses[order[:num_positive_guesses]] = 1
    if num_negative_guesses:
        guesses[order[m - num_negative_guesses :]] = -1
    return guesses


def one_run_audit(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    num_positive_guesses: int,
    num_negative_guesses: int,
    delta: float,
    claimed_epsilon: float = math.inf,
    significance: float = 0.05,
    score: str = "loss",
    seed: int = 0,
    audit: str = "black-box input canaries",
) -> OneRunAuditResult:
    """Guess membership from canary ``scores`` (higher = more likely included), count, and bound eps.

    ``num_positive_guesses`` and ``num_negative_guesses`` must be fixed before looking at the scores (choosing them
    to maximise the bound would need a multiple-testing correction).
    """
    included = np.asarray(included, dtype=bool)
    guesses = guess_membership(scores, num_positive_guesses, num_negative_guesses, seed)
    made = guesses != 0
    correct = int(np.sum((guesses == 1) & included) + np.sum((guesses == -1) & ~included))
    bound = one_run_epsilon_lower_bound(included.size, int(made.sum()), correct, delta, significance)
    return OneRunAuditResult(
        num_canaries=int(included.size),
        num_guesses=int(made.sum()),
        num_correct=correct,
        empirical_epsilon_lower_bound=bound,
        claimed_epsilon=float(claimed_epsilon),
        delta=delta,
        significance=significance,
        num_positive_guesses=num_positive_guesses,
        num_negative_guesses=num_negative_guesses,
        score=score,
        audit=audit,
    )


def report_violation(result: Any, raise_on_violation: bool = False) -> None:
    """Warn loudly (or raise) when an audit result is suspicious; do nothing otherwise."""
    if not getattr(result, "suspicious", False):
        return
    if raise_on_violation:
        raise PrivacyViolationError(result.message())
    warnings.warn(result.message(), PrivacyViolationWarning, stacklevel=3)


def run_one_run_audit(
    train_fn: TrainFn,
    dataset: Dataset,
    canaries: CanarySet,
    *,
    delta: float,
    num_positive_guesses: int | None = None,
    num_negative_guesses: int | None = None,
    significance: float = 0.05,
    score: str = "loss",
    raise_on_violation: bool = False,
) -> tuple[nn.Module, OneRunAuditResult]:
    """Train once with the included canaries added to ``dataset``, then audit: returns (model, result).

    ``train_fn(dataset) -> (model, claimed_epsilon)`` is the user's real training code (for example built on
    ``PrivacyEngine.make_private_with_epsilon``, returning ``engine.get_epsilon(delta)``); it is called once, on the
    real data plus canaries, so the audit runs alongside the real training run and the model it returns is the
    run's model. Default guesses: k+ = k- = m / 10. A suspicious result issues a ``PrivacyViolationWarning`` (or
    raises ``PrivacyViolationError`` with ``raise_on_violation``).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    m = canaries.num_canaries
    k_pos = max(1, m // 10) if num_positive_guesses is None else num_positive_guesses
    k_neg = max(1, m // 10) if num_negative_guesses is None else num_negative_guesses
    model, claimed_epsilon = train_fn(canaries.insert_into(dataset))
    scores = score_examples(model, canaries.dataset(), score)
    result = one_run_audit(
        scores,
        canaries.included,
        num_positive_guesses=k_pos,
        num_negative_guesses=k_neg,
        delta=delta,
        claimed_epsilon=claimed_epsilon,
        significance=significance,
        score=score,
        seed=canaries.seed,
    )
    report_violation(result, raise_on_violation)
    return model, result
