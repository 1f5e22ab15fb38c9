"""ROC curves of membership attacks and the region that (eps, delta)-DP allows them.

An attack gives every target a score, higher meaning "more likely a member". Thresholding the score at t gives a
test whose true positive rate is TPR(t) = P[score >= t | member] and false positive rate FPR(t) =
P[score >= t | non-member]; the ROC curve is the set of (FPR(t), TPR(t)) over all t.

**The DP region** (Kairouz, Oh, Viswanath, "The composition theorem for differential privacy", ICML 2015, Thm 2.1;
also Wasserman & Zhou 2010): a mechanism is (eps, delta)-DP if and only if every test between neighbouring
datasets has false positive rate alpha and false negative rate beta with

    alpha + e^eps * beta >= 1 - delta    and    e^eps * alpha + beta >= 1 - delta.

With TPR = 1 - beta and FPR = alpha these read TPR <= e^eps * FPR + delta and
TPR <= 1 - e^-eps * (1 - delta - FPR), so every ROC point of a membership attack on one target must lie on or
below

    bound(FPR) = min(1, e^eps * FPR + delta, 1 - e^-eps * (1 - delta - FPR)).

**Sampling error.** An empirical ROC point estimates TPR and FPR from finitely many members and non-members, so
an empirical point above the curve is not yet a proof. ``epsilon_lower_bound`` replaces each point by a
Clopper-Pearson lower confidence bound on TPR and upper confidence bound on FPR, with a Bonferroni correction over
all the points it examines, and returns the smallest eps whose region contains every such conservative point
(the auditing method of Jagielski, Ullman, Oprea, "Auditing differentially private machine learning",
NeurIPS 2020). With probability >= 1 - significance it does not exceed the true eps, treating the targets'
outcomes as independent trials (exact for independent targets; the one-run audit handles the dependence that
training one model on all targets creates).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def _as_scores(scores: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty: a ROC curve needs at least one member and one non-member score")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite scores")
    return array


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the test "score >= threshold", one point per distinct score plus (0, 0).

    Thresholds decrease from +inf; tied scores form one point, so the curve joins tied members and non-members by
    a straight segment (the usual convention, and what makes the trapezoid AUC equal the Mann-Whitney statistic).
    """
    members = _as_scores(member_scores, "member_scores")
    nonmembers = _as_scores(nonmember_scores, "nonmember_scores")
    scores = np.concatenate([members, nonmembers])
    is_member = np.concatenate([np.ones(members.size, dtype=bool), np.zeros(nonmembers.size, dtype=bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    # The last index of every run of equal scores: the point after all examples with that score are accepted.
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    true_pos = np.cumsum(is_member)[last]
    false_pos = (last + 1) - true_pos
    tpr = np.r_[0.0, true_pos / members.size]
    fpr = np.r_[0.0, false_pos / nonmembers.size]
    thresholds = np.r_[np.inf, scores[last]]
    return fpr, tpr, thresholds


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve given by increasing ``fpr`` (trapezoid rule)."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def balanced_accuracy(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Best accuracy over thresholds on a balanced population: max (TPR + 1 - FPR) / 2."""
    return float(np.max((np.asarray(tpr) + 1.0 - np.asarray(fpr)) / 2.0))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target_fpr: float) -> float:
    """Highest TPR among ROC points with FPR <= ``target_fpr`` (no interpolation: an attained point).

    With n non-members the smallest non-zero FPR is 1/n, so TPR at FPR 0.1% needs n >= 1000 to say more than
    "TPR at FPR 0".
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    return float(np.max(tpr[fpr <= target_fpr + 1e-12]))


def dp_tpr_bound(fpr: np.ndarray | float, epsilon: float, delta: float) -> np.ndarray:
    """The largest TPR an (epsilon, delta)-DP mechanism allows at each ``fpr`` (see the module docstring)."""
    fpr = np.asarray(fpr, dtype=np.float64)
    if epsilon < 0 or math.isnan(epsilon):
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if math.isinf(epsilon):
        return np.ones_like(fpr)
    upper = np.minimum(math.exp(epsilon) * fpr + delta, 1.0 - math.exp(-epsilon) * (1.0 - delta - fpr))
    return np.clip(upper, 0.0, 1.0)


def point_epsilon(fpr: np.ndarray | float, tpr: np.ndarray | float, delta: float) -> np.ndarray:
    """The smallest eps whose (eps, delta) region contains each (fpr, tpr) point (0 below the diagonal).

    Solves TPR <= e^eps FPR + delta and 1 - FPR - delta <= e^eps (1 - TPR) for eps: the larger of
    log((TPR - delta) / FPR) and log((1 - delta - FPR) / (1 - TPR)), infinite when a denominator is 0.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(tpr - delta > 0, np.log(np.maximum(tpr - delta, 1e-300) / fpr), 0.0)
        second = np.where(1.0 - delta - fpr > 0, np.log(np.maximum(1.0 - delta - fpr, 1e-300) / (1.0 - tpr)), 0.0)
    return np.maximum(np.maximum(first, second), 0.0)


def clopper_pearson(successes: np.ndarray, trials: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper-Pearson bounds: P[p < lower] <= level and P[p > upper] <= level, for each count."""
    k = np.asarray(successes, dtype=np.float64)
    lower = np.where(k > 0, stats.beta.ppf(level, np.maximum(k, 1e-12), trials - k + 1), 0.0)
    upper = np.where(k < trials, stats.beta.ppf(1.0 - level, k + 1, np.maximum(trials - k, 1e-12)), 1.0)
    return lower, upper


def epsilon_lower_bound(
    fpr: np.ndarray, tpr: np.ndarray, num_members: int, num_nonmembers: int, delta: float, significance: float = 0.05
) -> float:
    """A (1 - ``significance``) lower confidence bound on eps from an empirical ROC curve.

    Only the "upper-left corners" of the curve matter (the highest TPR at each FPR); each is replaced by its
    Clopper-Pearson (lower TPR, upper FPR) bounds at level significance / (2K), K the number of corners
    (Bonferroni), and the result is the largest ``point_epsilon`` over them.
    """
    if not 0.0 < significance < 1.0:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    # Corners: the last point at each distinct FPR (tpr is non-decreasing along the curve).
    corners = np.r_[np.nonzero(np.diff(fpr))[0], fpr.size - 1]
    level = significance / (2 * corners.size)
    tpr_low, _ = clopper_pearson(np.rint(tpr[corners] * num_members), num_members, level)
    _, fpr_high = clopper_pearson(np.rint(fpr[corners] * num_nonmembers), num_nonmembers, level)
    return float(np.max(point_epsilon(fpr_high, tpr_low, delta)))
