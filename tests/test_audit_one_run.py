"""Issue #5: the one-run audit bound of Steinke, Nasr, Jagielski (NeurIPS 2023), its guesses and its procedure.

The p-value is checked against a direct, exact evaluation of the formula of GUIDE section 4 with Python integers
and fractions-free float sums (math.comb), at several points: relative tolerance 1e-9 (both are float64 sums of the
same terms in a different order). The bound is the largest eps with p(eps) < significance: checked by evaluating p
just below and just above it (bisection tolerance 1e-6).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.audit import (
    OneRunAuditResult,
    PrivacyViolationError,
    PrivacyViolationWarning,
    guess_membership,
    mislabeled_canaries,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    random_input_canaries,
    run_one_run_audit,
)


def direct_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """GUIDE section 4, term by term."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def pmf(k: int) -> float:
        return math.comb(r, k) * q**k * (1 - q) ** (r - k)

    beta = sum(pmf(k) for k in range(v, r + 1))
    alpha = max(sum(pmf(k) for k in range(v - i, v)) / i for i in range(1, v + 1))
    return min(1.0, beta + alpha * 2 * m * delta)


POINTS = [
    (1000, 100, 80, 1.0, 1e-5),
    (1000, 100, 60, 0.3, 1e-5),
    (200, 50, 50, 2.0, 1e-3),
    (1000, 200, 150, 1.5, 1e-4),
    (10, 10, 7, 0.5, 1e-2),
    (500, 80, 75, 1.75, 1e-5),
    (100, 30, 1, 0.0, 1e-3),
]


@pytest.mark.parametrize("m,r,v,eps,delta", POINTS)
def test_p_value_matches_direct_formula(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(direct_p_value(m, r, v, eps, delta), rel=1e-9)


@pytest.mark.parametrize("m,r,v,delta,significance", [(1000, 100, 80, 1e-5, 0.05), (1000, 200, 170, 1e-4, 0.05),
                                                      (500, 80, 75, 1e-5, 0.05 / 3), (50, 50, 50, 1e-3, 0.1)])
def test_bound_is_the_largest_rejected_epsilon(m, r, v, delta, significance):
    bound = one_run_epsilon_lower_bound(m, r, v, delta, significance)
    assert bound > 0
    assert direct_p_value(m, r, v, bound, delta) < significance
    assert direct_p_value(m, r, v, bound + 2e-6, delta) >= significance


def test_all_correct_without_delta_has_closed_form():
    # delta -> 0: p(eps) = q^r, so the bound solves q = significance^(1/r), eps = log(q / (1 - q)).
    r, significance = 100, 0.05
    q = significance ** (1 / r)
    expected = math.log(q / (1 - q))
    assert one_run_epsilon_lower_bound(r, r, r, 1e-15, significance) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("m,r,delta", [(1000, 100, 1e-5), (1000, 400, 1e-4), (100, 100, 5e-3)])
def test_bound_is_monotone_in_num_correct(m, r, delta):
    bounds = [one_run_epsilon_lower_bound(m, r, v, delta) for v in range(0, r + 1)]
    assert np.all(np.diff(bounds) >= 0)
    assert bounds[-1] > 1.0  # all correct is strong evidence


@pytest.mark.parametrize("m,r,delta", [(1000, 100, 1e-5), (200, 200, 1e-3)])
def test_p_value_grows_with_epsilon(m, r, delta):
    # The bisection relies on it.
    grid = np.linspace(0, 8, 81)
    for v in range(1, r + 1, 7):
        p = [one_run_p_value(m, r, v, e, delta) for e in grid]
        assert np.all(np.diff(p) >= -1e-12), v


@pytest.mark.parametrize("r", [10, 100, 1000, 100_000])
def test_bound_is_zero_at_chance(r):
    for v in (0, r // 4, r // 2):
        assert one_run_epsilon_lower_bound(10 * r, r, v, 1e-6) == 0.0
    assert one_run_epsilon_lower_bound(10, 0, 0, 1e-3) == 0.0  # no guesses


def test_large_m_is_close_to_the_normal_approximation():
    bound = one_run_epsilon_lower_bound(10**6, 10**5, 60_000, 1e-7)
    # 60 % correct of 1e5: q_hat = 0.6, the 95 % one-sided lower bound on q is about 0.6 - 1.645 * 0.00155.
    q_low = 0.6 - 1.645 * math.sqrt(0.24 / 1e5)
    assert bound == pytest.approx(math.log(q_low / (1 - q_low)), abs=0.01)


def test_bound_rarely_exceeds_the_true_epsilon_of_an_exactly_dp_guesser():
    # The worst case for eps-DP: each guess is right independently with probability e^eps / (1 + e^eps)
    # (randomised response). Over 300 seeded trials the bound may exceed eps in at most ~5 % of them:
    # Binomial(300, 0.05) has mean 15 and P[> 30] < 1e-4.
    eps, r, m, delta = 1.0, 100, 200, 1e-5
    rng = np.random.default_rng(0)
    correct = rng.binomial(r, math.exp(eps) / (1 + math.exp(eps)), size=300)
    cache = {v: one_run_epsilon_lower_bound(m, r, int(v), delta) for v in np.unique(correct)}
    exceed = sum(cache[v] > eps for v in correct)
    assert exceed <= 30
    assert np.median([cache[v] for v in correct]) > 0.2  # and it is not vacuous


@pytest.mark.parametrize("args", [(10, 5, 6, 1e-5), (10, 11, 3, 1e-5), (10, 5, 3, 0.0), (10, 5, 3, 1.0), (-1, 0, 0, 1e-5)])
def test_invalid_arguments_raise(args):
    with pytest.raises(ValueError):
        one_run_epsilon_lower_bound(*args)


def test_guesses_top_in_bottom_out_and_ties_independent_of_order():
    scores = np.array([0.1, 5.0, 3.0, -2.0, 0.0, 4.0])
    guesses = guess_membership(scores, 2, 1)
    assert guesses.tolist() == [0, 1, 0, -1, 0, 1]
    tied = np.zeros(1000)
    ins = [np.flatnonzero(guess_membership(tied, 100, 0, seed=s) == 1) for s in range(2)]
    assert not np.array_equal(ins[0], ins[1])  # random tie-breaking, not the first 100 indices
    assert ins[0].mean() == pytest.approx(500, abs=60)  # spread over positions (std of the mean of 100 ~ 29)
    with pytest.raises(ValueError):
        guess_membership(scores, 4, 3)


def test_one_run_audit_counts_and_flags():
    rng = np.random.default_rng(1)
    included = rng.random(500) < 0.5
    perfect = included.astype(float) + 0.01 * rng.random(500)
    result = one_run_audit(perfect, included, num_positive_guesses=50, num_negative_guesses=50, delta=1e-5,
                           claimed_epsilon=1.0)
    assert (result.num_guesses, result.num_correct) == (100, 100)
    assert result.empirical_epsilon_lower_bound == pytest.approx(one_run_epsilon_lower_bound(500, 100, 100, 1e-5))
    assert result.suspicious and "EXCEEDS" in result.message()
    assert result.to_dict()["suspicious"] is True
    honest = one_run_audit(perfect, included, num_positive_guesses=50, num_negative_guesses=50, delta=1e-5,
                           claimed_epsilon=8.0)
    assert not honest.suspicious
    unrelated = one_run_audit(rng.random(500), included, num_positive_guesses=50, num_negative_guesses=50,
                              delta=1e-5, claimed_epsilon=0.1)
    assert 30 <= unrelated.num_correct <= 70 and unrelated.empirical_epsilon_lower_bound < 0.5  # chance: 50 +- 5


def test_canary_sets():
    c = random_input_canaries(100, (3, 4), 5, low=-1, high=1, seed=3)
    assert c.inputs.shape == (100, 3, 4) and c.inputs.min() >= -1 and c.inputs.max() < 1
    assert set(c.labels.tolist()) <= set(range(5)) and 30 <= c.included.sum() <= 70
    again = random_input_canaries(100, (3, 4), 5, low=-1, high=1, seed=3)
    assert torch.equal(c.inputs, again.inputs) and np.array_equal(c.included, again.included)
    pool = TensorDataset(torch.randn(50, 2), torch.randint(0, 3, (50,)))
    mis = mislabeled_canaries(pool, 20, 3, seed=0)
    originals = {tuple(x.tolist()): int(y) for x, y in zip(*pool.tensors)}
    assert all(originals[tuple(x.tolist())] != int(y) for x, y in zip(mis.inputs, mis.labels))
    base = TensorDataset(torch.zeros(7, 3, 4), torch.zeros(7, dtype=torch.long))
    merged = c.insert_into(base)
    assert isinstance(merged, TensorDataset) and len(merged) == 7 + int(c.included.sum())


def _memorising_train_fn(claimed):
    """A 'training function' whose model remembers its training inputs exactly: the worst possible leak."""

    def train(dataset):
        x, y = dataset.tensors

        class Lookup(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.zeros(1))

            def forward(self, inputs):
                d = torch.cdist(inputs.flatten(1), x.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
                hit = d.min(dim=1).values < 1e-6
                label = nn.functional.one_hot(y[d.argmin(dim=1)], 5).float()
                return 5.0 * hit.float().unsqueeze(1) * label  # confident on seen inputs, uniform otherwise

        return Lookup(), claimed

    return train


def test_run_one_run_audit_warns_or_raises_on_a_leaky_training_function():
    data = TensorDataset(torch.rand(30, 3, 4) + 5.0, torch.randint(0, 5, (30,)))
    canaries = random_input_canaries(200, (3, 4), 5, seed=0)
    with pytest.warns(PrivacyViolationWarning, match="probably an implementation bug"):
        _, result = run_one_run_audit(_memorising_train_fn(1.0), data, canaries, delta=1e-5)
    assert isinstance(result, OneRunAuditResult) and result.num_correct == result.num_guesses == 40
    with pytest.raises(PrivacyViolationError):
        run_one_run_audit(_memorising_train_fn(1.0), data, canaries, delta=1e-5, raise_on_violation=True)
