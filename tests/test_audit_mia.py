"""Issue #5: ROC curves, the DP region of membership tests, the loss-threshold attack and LiRA.

Tolerances: ROC/AUC against scikit-learn are exact up to float rounding (1e-12). Simulated attacks use fixed seeds;
the stated ranges are several standard errors wide (for an AUC from n members and n non-members the standard error
is at most sqrt((2n + 1) / (12 n^2)), 0.006 for n = 5000).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from dptrain.audit import (
    MembershipAuditResult,
    dp_tpr_bound,
    epsilon_lower_bound,
    lira_scores,
    membership_audit,
    replace_one_guarantee,
    roc_curve,
    run_lira,
    tpr_at_fpr,
)
from dptrain.audit.roc import auc, balanced_accuracy, clopper_pearson, point_epsilon


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_and_auc_match_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    members = np.round(rng.normal(0.5, 1, 300), 1)  # rounding makes many ties
    nonmembers = np.round(rng.normal(0, 1, 200), 1)
    fpr, tpr, thresholds = roc_curve(members, nonmembers)
    labels = np.r_[np.ones(300), np.zeros(200)]
    scores = np.r_[members, nonmembers]
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    assert auc(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert thresholds[0] == np.inf and np.all(np.diff(thresholds) < 0)
    # balanced accuracy: the best threshold, by brute force over all cut points
    brute = max(((members >= t).mean() + (nonmembers < t).mean()) / 2 for t in np.r_[scores, np.inf])
    assert balanced_accuracy(fpr, tpr) == pytest.approx(brute, abs=1e-12)


def test_tpr_at_fpr_takes_the_best_attained_point():
    fpr = np.array([0.0, 0.0, 0.005, 0.02, 1.0])
    tpr = np.array([0.0, 0.1, 0.3, 0.5, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.001) == 0.1
    assert tpr_at_fpr(fpr, tpr, 0.01) == 0.3
    assert tpr_at_fpr(fpr, tpr, 1.0) == 1.0


def test_dp_region_closed_form_and_randomised_response():
    eps, delta = 1.0, 1e-5
    fpr = np.linspace(0, 1, 101)
    bound = dp_tpr_bound(fpr, eps, delta)
    expected = np.minimum.reduce([np.exp(eps) * fpr + delta, 1 - np.exp(-eps) * (1 - delta - fpr), np.ones_like(fpr)])
    np.testing.assert_allclose(bound, expected, atol=1e-15)
    assert np.all(bound >= fpr - 1e-15) and np.all(np.diff(bound) >= 0)
    # Randomised response is exactly eps-DP and its ROC corner (1/(1+e^eps), e^eps/(1+e^eps)) lies on the curve.
    corner_fpr, corner_tpr = 1 / (1 + math.e), math.e / (1 + math.e)
    assert dp_tpr_bound(corner_fpr, 1.0, 0.0) == pytest.approx(corner_tpr, abs=1e-12)
    assert point_epsilon(corner_fpr, corner_tpr, 0.0) == pytest.approx(1.0, abs=1e-12)
    assert np.all(dp_tpr_bound(fpr, math.inf, delta) == 1.0)


def test_replace_one_guarantee_is_group_privacy():
    assert replace_one_guarantee(1.0, 1e-5) == pytest.approx((2.0, (1 + math.e) * 1e-5))
    assert replace_one_guarantee(math.inf, 1e-5)[0] == math.inf


def test_clopper_pearson_bounds():
    low, high = clopper_pearson(np.array([0, 5, 10]), 10, 0.025)
    assert low[0] == 0 and high[2] == 1
    assert high[0] == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9)  # 0 of n: 1 - level^(1/n)
    assert low[1] < 0.5 < high[1]


def _randomised_response(eps, n, rng):
    """Scores of an exactly eps-DP membership test: 1 ("member") with prob e^eps/(1+e^eps) for members."""
    q = math.exp(eps) / (1 + math.exp(eps))
    return (rng.random(n) < q).astype(float), (rng.random(n) < 1 - q).astype(float)


@pytest.mark.parametrize("seed", range(5))
def test_epsilon_lower_bound_is_valid_and_tight_for_randomised_response(seed):
    members, nonmembers = _randomised_response(1.0, 20_000, np.random.default_rng(seed))
    fpr, tpr, _ = roc_curve(members, nonmembers)
    bound = epsilon_lower_bound(fpr, tpr, 20_000, 20_000, delta=0.0)
    assert 0.9 <= bound <= 1.0  # valid (<= true eps) and, with 20 000 samples, within 10 %


def _gaussian_epsilon(mu, delta):
    """eps of the Gaussian mechanism with sensitivity/sigma = mu at delta (Balle & Wang 2018, analytic)."""
    def delta_of(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_membership_audit_flags_only_real_violations():
    # Scores of a Gaussian mechanism: members N(2, 1), non-members N(0, 1): (eps, 1e-5)-DP with eps ~ 8.6.
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(2.0, 1.0, 5000), rng.normal(0.0, 1.0, 5000)
    true_eps = _gaussian_epsilon(2.0, 1e-5)
    honest = membership_audit(members, nonmembers, claimed_epsilon=true_eps, delta=1e-5, attack="gauss")
    assert isinstance(honest, MembershipAuditResult) and not honest.violates_bound
    assert honest.auc == pytest.approx(stats.norm.cdf(2 / math.sqrt(2)), abs=0.02)
    assert honest.epsilon_lower_bound <= true_eps
    # The raw empirical ROC pokes above the curve (one member above every non-member: TPR 2e-4 at FPR 0 > delta),
    # which is sampling noise, not a violation: the Clopper-Pearson check does not flag it.
    assert np.any(honest.roc_tpr > honest.bound_tpr)
    lying = membership_audit(members, nonmembers, claimed_epsilon=1.0, delta=1e-5)
    assert lying.violates_bound and lying.epsilon_lower_bound > 1.0 and "CROSSES" in lying.message()
    assert np.any(lying.roc_tpr > lying.bound_tpr)
    fixed_split = membership_audit(members, nonmembers, claimed_epsilon=1.0, delta=1e-5, independent_inclusion=False)
    assert fixed_split.bound_epsilon == 2.0
    d = lying.to_dict(curves=True)
    assert len(d["roc"]["fpr"]) == len(lying.roc_fpr) and d["violates_bound"] is True
    # An uninformative attack: AUC ~ 0.5 and no violation of even a small epsilon.
    noise = membership_audit(rng.normal(size=5000), rng.normal(size=5000), claimed_epsilon=0.1, delta=1e-5)
    assert abs(noise.auc - 0.5) < 0.03 and not noise.violates_bound


def _synthetic_lira_data(num_models=16, n=2000, seed=0):
    """Per-example difficulty a_j ~ N(0, 2^2); a model's logit score is a_j + 1 (if trained on j) + N(0, 0.5^2)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 2, n)
    inclusion = rng.random((num_models, n)) < 0.5
    scores = difficulty + inclusion + rng.normal(0, 0.5, (num_models, n))
    return scores, inclusion


def test_lira_calibrates_per_example():
    scores, inclusion = _synthetic_lira_data()
    target, shadows, shadow_in = scores[0], scores[1:], inclusion[1:]
    member = inclusion[0]
    raw = membership_audit(target[member], target[~member])
    # Known parameters: online and offline LiRA reach AUC Phi(1 / (0.5 sqrt 2)) = 0.921; the raw score only
    # Phi(1 / sqrt(2 (4 + 0.25))) = 0.634.
    assert raw.auc == pytest.approx(0.634, abs=0.03)
    for online in (True, False):
        s = lira_scores(target, shadows, shadow_in, online=online)
        assert np.all(np.isfinite(s))
        result = membership_audit(s[member], s[~member])
        assert result.auc == pytest.approx(0.921, abs=0.03)
        assert result.tpr_at_fpr[0.01] > 0.3 > raw.tpr_at_fpr[0.01]
    per_example = lira_scores(target, shadows, shadow_in, online=True, fixed_variance=False)
    ok = np.isfinite(per_example)  # NaN where fewer than 2 IN or 2 OUT shadows
    assert 0.9 < ok.mean() < 1.0
    assert membership_audit(per_example[ok & member], per_example[ok & ~member]).auc > 0.85


def test_lira_leaves_out_examples_without_shadows_and_checks_shapes():
    scores = np.zeros((3, 4))
    shadow_in = np.array([[True, True, False, True], [True, False, False, True], [True, True, False, False]])
    s = lira_scores(np.zeros(4), scores, shadow_in, online=True)
    assert np.isnan(s[0]) and np.isnan(s[2]) and np.isfinite(s[1]) and np.isfinite(s[3])  # 0: no OUT, 2: no IN
    assert np.isfinite(lira_scores(np.zeros(4), scores, shadow_in, online=False)[2])
    with pytest.raises(ValueError):
        lira_scores(np.zeros(5), scores, shadow_in)


def test_lira_on_digits_nonprivate_leaks_and_eps1_does_not():
    # 6 models on random halves of the 1437 training digits, each the target in turn (~4300 targets per class).
    # Measured: non-private online AUC 0.589, TPR@1% 0.045 (4.5x chance); eps=1 online 0.506, offline 0.541.
    from dptrain.audit.digits import make_digits_train_fn
    from dptrain.datasets import load_digits_split

    train, _ = load_digits_split()
    leaky = run_lira(make_digits_train_fn(None, epochs=100), train, num_models=6)
    assert math.isinf(leaky.claimed_epsilon) and not leaky.suspicious
    assert leaky.online.auc > 0.55 and leaky.online.tpr_at_fpr[0.01] > 0.03
    private = run_lira(make_digits_train_fn(1.0, epochs=60), train, num_models=6)
    assert 0.9 <= private.claimed_epsilon <= 1.0 and not private.suspicious
    assert private.online.auc <= 0.55 and private.offline.auc <= 0.56
    assert set(private.to_dict()) == {"num_models", "claimed_epsilon", "online", "offline"}
