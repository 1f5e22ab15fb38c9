"""Membership-inference attacks and their comparison with the DP bound.

Two attacks, both producing a ``MembershipAuditResult``:

- **Loss threshold** (Yeom, Giacomelli, Fredrikson, Jha, CSF 2018): guess "member" when the model's loss on the
  example is low. Needs only the target model.
- **LiRA**, the likelihood-ratio attack (Carlini, Chien, Nasr, Song, Terzis, Tramer, S&P 2022). Shadow models are
  trained (by the caller's training function, so with dptrain's engine when it is private) on random halves of
  the data: each example is in each model's training set independently with probability 1/2. For a target model
  and example, the shadow models' logit scores log p_y - log sum_{y' != y} p_y' are split into IN (shadows trained
  on the example) and OUT; Gaussians are fitted to each. *Online* LiRA scores the target's logit score s by
  log N(s; mu_in, sd_in^2) - log N(s; mu_out, sd_out^2); *offline* LiRA uses the OUT Gaussian only, with the score
  (s - mu_out) / sd_out (a one-sided test: no shadow model needs to have trained on the target). With few shadow
  models the standard deviations are pooled over all examples ("fixed variance", which the paper suggests when
  shadow models are few). Every model in turn is the target, with the others as its shadows, and the (score,
  membership) pairs of all targets form one ROC.

Reading the result: AUC and balanced accuracy summarise the whole curve; the TPR at a low FPR (0.1 %, 1 %) is what
matters for privacy (an attack that is confidently right about a few members is a real leak even with AUC 0.5).
``bound_tpr`` is the DP curve of ``dptrain.audit.roc`` for the claimed eps, and ``violates_bound`` is set when the
ROC lies above it by more than sampling error explains (``epsilon_lower_bound`` > the eps of the bound).

Which guarantee the ROC is compared with: when targets were included in training independently with probability
1/2 (canaries, LiRA), each is an add/remove neighbour pair and the claimed (eps, delta) applies directly. For a
fixed train/test split (members = training set, non-members = held-out data) a member and a non-member are
exchanged between two datasets that differ in one replaced example, so the comparable guarantee is the replace-one
one, (2 eps, (1 + e^eps) delta) by group privacy; ``independent_inclusion=False`` uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from dptrain.audit import roc as roc_lib
from dptrain.audit.one_run import TrainFn
from dptrain.audit.scores import score_examples
from dptrain.rundir import json_number

DEFAULT_FPRS: tuple[float, ...] = (0.001, 0.01)


def replace_one_guarantee(epsilon: float, delta: float) -> tuple[float, float]:
    """(eps, delta) for replacing one example, from an add/remove (eps, delta) guarantee: (2 eps, (1 + e^eps) delta)."""
    if math.isinf(epsilon):
        return math.inf, delta
    return 2.0 * epsilon, min(1.0, (1.0 + math.exp(epsilon)) * delta)


@dataclass(frozen=True, eq=False)
class MembershipAuditResult:
    """A membership attack's ROC and its comparison with the DP region of the bound's (eps, delta).

    ``roc_fpr``/``roc_tpr``: the ROC points (increasing); ``bound_tpr``: the DP bound at each ``roc_fpr``;
    ``tpr_at_fpr``: {target FPR: TPR}; ``epsilon_lower_bound``: the (1 - significance) lower confidence bound on eps
    implied by the ROC (``roc.epsilon_lower_bound``); ``violates_bound``: it exceeds ``bound_epsilon``.
    """

    attack: str
    auc: float
    balanced_accuracy: float
    tpr_at_fpr: dict[float, float]
    roc_fpr: np.ndarray
    roc_tpr: np.ndarray
    bound_tpr: np.ndarray
    claimed_epsilon: float
    bound_epsilon: float
    bound_delta: float
    epsilon_lower_bound: float
    significance: float
    num_members: int
    num_nonmembers: int
    violates_bound: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "violates_bound", bool(self.epsilon_lower_bound > self.bound_epsilon))

    @property
    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        return self.roc_fpr, self.roc_tpr

    @property
    def suspicious(self) -> bool:
        return self.violates_bound

    def message(self) -> str:
        text = (
            f"{self.attack} membership attack: AUC {self.auc:.3f}, eps lower bound {self.epsilon_lower_bound:.3f} "
            f"vs bound eps {self.bound_epsilon:.3f} (claimed {self.claimed_epsilon:.3f})"
        )
        if self.violates_bound:
            text += (
                ": the attack's ROC CROSSES the DP bound beyond sampling error; the model leaks more than its "
                "claimed epsilon allows, probably an implementation bug"
            )
        return text

    def to_dict(self, curves: bool = False) -> dict[str, Any]:
        """JSON-ready fields; the ROC and bound curves only with ``curves`` (they have one point per score)."""
        out: dict[str, Any] = {
            "attack": self.attack,
            "auc": self.auc,
            "balanced_accuracy": self.balanced_accuracy,
            "tpr_at_fpr": {str(k): v for k, v in self.tpr_at_fpr.items()},
            "claimed_epsilon": json_number(self.claimed_epsilon),
            "bound_epsilon": json_number(self.bound_epsilon),
            "bound_delta": self.bound_delta,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "violates_bound": self.violates_bound,
            "significance": self.significance,
            "num_members": self.num_members,
            "num_nonmembers": self.num_nonmembers,
        }
        if curves:
            out["roc"] = {"fpr": self.roc_fpr.tolist(), "tpr": self.roc_tpr.tolist(), "bound_tpr": self.bound_tpr.tolist()}
        return out


def membership_audit(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    *,
    claimed_epsilon: float = math.inf,
    delta: float = 1e-5,
    independent_inclusion: bool = True,
    significance: float = 0.05,
    fprs: Sequence[float] = DEFAULT_FPRS,
    attack: str = "custom",
) -> MembershipAuditResult:
    """Audit any attack from its scores on members and non-members (higher score = guessed member)."""
    fpr, tpr, _ = roc_lib.roc_curve(member_scores, nonmember_scores)
    n_in, n_out = np.asarray(member_scores).size, np.asarray(nonmember_scores).size
    if independent_inclusion:
        bound_eps, bound_delta = float(claimed_epsilon), delta
    else:
        bound_eps, bound_delta = replace_one_guarantee(float(claimed_epsilon), delta)
    return MembershipAuditResult(
        attack=attack,
        auc=roc_lib.auc(fpr, tpr),
        balanced_accuracy=roc_lib.balanced_accuracy(fpr, tpr),
        tpr_at_fpr={float(f): roc_lib.tpr_at_fpr(fpr, tpr, f) for f in fprs},
        roc_fpr=fpr,
        roc_tpr=tpr,
        bound_tpr=roc_lib.dp_tpr_bound(fpr, bound_eps, bound_delta),
        claimed_epsilon=float(claimed_epsilon),
        bound_epsilon=bound_eps,
        bound_delta=bound_delta,
        epsilon_lower_bound=roc_lib.epsilon_lower_bound(fpr, tpr, n_in, n_out, bound_delta, significance),
        significance=significance,
        num_members=n_in,
        num_nonmembers=n_out,
    )


def loss_threshold_attack(
    model: nn.Module,
    members: Dataset,
    nonmembers: Dataset,
    *,
    claimed_epsilon: float = math.inf,
    delta: float = 1e-5,
    independent_inclusion: bool = False,
    significance: float = 0.05,
    fprs: Sequence[float] = DEFAULT_FPRS,
) -> MembershipAuditResult:
    """The loss-threshold attack on ``model``: members are guessed by low loss.

    The default ``independent_inclusion=False`` is for a fixed train/test split (compared with the replace-one
    guarantee); pass True when each target was included independently with probability 1/2.
    """
    return membership_audit(
        score_examples(model, members, "loss"),
        score_examples(model, nonmembers, "loss"),
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        independent_inclusion=independent_inclusion,
        significance=significance,
        fprs=fprs,
        attack="loss_threshold" if independent_inclusion else "loss_threshold_train_test",
    )


def lira_scores(
    target_scores: np.ndarray,
    shadow_scores: np.ndarray,
    shadow_in: np.ndarray,
    *,
    online: bool = True,
    fixed_variance: bool = True,
    min_std: float = 1e-3,
) -> np.ndarray:
    """LiRA membership scores (higher = member) for n examples.

    ``target_scores``: (n,) logit scores under the target model; ``shadow_scores``: (k, n) under k shadow models;
    ``shadow_in``: (k, n) bool, whether each shadow trained on each example. Online needs, per example, at least
    one IN and one OUT shadow (two of each without ``fixed_variance``); offline needs OUT ones. Examples without
    enough shadows get NaN. ``min_std`` keeps a Gaussian from collapsing to a point.
    """
    target = np.asarray(target_scores, dtype=np.float64)
    scores = np.asarray(shadow_scores, dtype=np.float64)
    is_in = np.asarray(shadow_in, dtype=bool)
    if scores.shape != is_in.shape or scores.ndim != 2 or scores.shape[1] != target.size:
        raise ValueError(
            f"need shadow_scores and shadow_in of shape (k, n) with n = {target.size}, got {scores.shape}, {is_in.shape}"
        )

    def fit(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = mask.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(mask, scores, 0.0).sum(axis=0) / count
            resid = np.where(mask, scores - mean, 0.0)
            if fixed_variance:
                pooled = math.sqrt(np.sum(resid**2) / max(1, int(mask.sum()) - int(np.sum(count > 0))))
                std = np.full(target.size, max(pooled, min_std))
                enough = count >= 1
            else:
                std = np.maximum(np.sqrt(np.sum(resid**2, axis=0) / (count - 1)), min_std)
                enough = count >= 2
        return mean, std, enough

    mean_out, std_out, ok_out = fit(~is_in)
    if not online:
        return np.where(ok_out, (target - mean_out) / std_out, np.nan)
    mean_in, std_in, ok_in = fit(is_in)
    ratio = stats.norm.logpdf(target, mean_in, std_in) - stats.norm.logpdf(target, mean_out, std_out)
    return np.where(ok_in & ok_out, ratio, np.nan)


@dataclass(frozen=True, eq=False)
class LiRAAuditResult:
    """Online and offline LiRA from the same models; ``claimed_epsilon`` is the largest any model claimed."""

    online: MembershipAuditResult
    offline: MembershipAuditResult
    num_models: int
    claimed_epsilon: float

    @property
    def suspicious(self) -> bool:
        return self.online.violates_bound or self.offline.violates_bound

    def to_dict(self, curves: bool = False) -> dict[str, Any]:
        return {
            "num_models": self.num_models,
            "claimed_epsilon": json_number(self.claimed_epsilon),
            "online": self.online.to_dict(curves),
            "offline": self.offline.to_dict(curves),
        }


def _subset(dataset: Dataset, indices: np.ndarray) -> Dataset:
    if isinstance(dataset, TensorDataset):
        idx = np.asarray(indices)
        return TensorDataset(*(t[idx] for t in dataset.tensors))
    return Subset(dataset, np.asarray(indices).tolist())


def run_lira(
    train_fn: TrainFn,
    dataset: Dataset,
    *,
    num_models: int = 8,
    delta: float = 1e-5,
    seed: int = 0,
    fixed_variance: bool = True,
    significance: float = 0.05,
    fprs: Sequence[float] = DEFAULT_FPRS,
) -> LiRAAuditResult:
    """Train ``num_models`` models with ``train_fn(subset) -> (model, claimed_eps)`` on random halves of ``dataset``
    (each example in each model independently with probability 1/2, from ``seed``) and run online and offline LiRA
    with every model as the target in turn and the others as shadows.

    The ROC pools num_models * len(dataset) (score, membership) pairs; examples without the shadows a variant needs
    are left out of that variant's ROC.
    """
    if num_models < 3:
        raise ValueError(f"num_models must be >= 3 (a target and IN and OUT shadows), got {num_models}")
    n = len(dataset)
    rng = np.random.default_rng(seed)
    inclusion = rng.random((num_models, n)) < 0.5
    scores = np.empty((num_models, n))
    claimed = []
    for k in range(num_models):
        model, eps = train_fn(_subset(dataset, np.nonzero(inclusion[k])[0]))
        claimed.append(float(eps))
        scores[k] = score_examples(model, dataset, "logit")
    claimed_epsilon = max(claimed)

    results = {}
    for online in (True, False):
        pooled, membership = [], []
        for target in range(num_models):
            shadows = np.arange(num_models) != target
            s = lira_scores(
                scores[target], scores[shadows], inclusion[shadows], online=online, fixed_variance=fixed_variance
            )
            keep = np.isfinite(s)
            pooled.append(s[keep])
            membership.append(inclusion[target][keep])
        s, m = np.concatenate(pooled), np.concatenate(membership)
        results[online] = membership_audit(
            s[m],
            s[~m],
            claimed_epsilon=claimed_epsilon,
            delta=delta,
            independent_inclusion=True,
            significance=significance,
            fprs=fprs,
            attack="lira_online" if online else "lira_offline",
        )
    return LiRAAuditResult(results[True], results[False], num_models, claimed_epsilon)
