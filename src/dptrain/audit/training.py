"""Audit a real training run: canaries ride along, one training, three or four checks.

``audit_training_run(train_fn, train_set, canaries, test_set=...)`` appends the included canaries to the training
set, calls the user's ``train_fn`` once (the real run; its model is returned), and then runs

1. the one-run audit on the canaries (``empirical_epsilon_lower_bound``),
2. the loss-threshold membership attack on the canaries (random inclusion: compared with the claimed (eps, delta)),
3. with a ``test_set``, the loss-threshold attack on the real data, training set against held-out data (a fixed
   split: compared with the replace-one guarantee, see ``dptrain.audit.mia``),
4. with ``gradient_canaries``, the white-box one-run audit of the engine's noise (``white_box``; see
   ``dptrain.audit.gradient_canaries``), in the same run.

The run is ``suspicious`` when any check finds more leakage than the claimed eps allows. Each check runs at
significance / (number of checks) so that a correct implementation raises a false alarm with probability at most
``significance`` in all (Bonferroni). A suspicious run issues a ``PrivacyViolationWarning`` (or raises
``PrivacyViolationError`` with ``raise_on_violation``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dptrain.audit.gradient_canaries import GradientCanaries
from dptrain.audit.mia import MembershipAuditResult, loss_threshold_attack, membership_audit
from dptrain.audit.one_run import CanarySet, OneRunAuditResult, TrainFn, one_run_audit, report_violation
from dptrain.audit.scores import score_examples
from dptrain.rundir import json_number


@dataclass(frozen=True, eq=False)
class TrainingAuditReport:
    """Everything one audited training run produced. ``membership`` is None without a test set."""

    name: str
    claimed_epsilon: float
    delta: float
    significance: float
    one_run: OneRunAuditResult
    canary_membership: MembershipAuditResult
    membership: MembershipAuditResult | None = None
    test_accuracy: float | None = None
    white_box: OneRunAuditResult | None = None

    @property
    def empirical_epsilon_lower_bound(self) -> float:
        return self.one_run.empirical_epsilon_lower_bound

    @property
    def suspicious(self) -> bool:
        checks = [self.one_run.suspicious, self.canary_membership.violates_bound]
        if self.membership is not None:
            checks.append(self.membership.violates_bound)
        if self.white_box is not None:
            checks.append(self.white_box.suspicious)
        return any(checks)

    def message(self) -> str:
        lines = [f"audit of {self.name!r}:", "  " + self.one_run.message(), "  " + self.canary_membership.message()]
        if self.membership is not None:
            lines.append("  " + self.membership.message())
        if self.white_box is not None:
            lines.append("  " + self.white_box.message())
        if self.suspicious:
            lines.append(
                f"  PROBABLE PRIVACY BUG: run {self.name!r} leaks more than its claimed epsilon "
                f"{self.claimed_epsilon:.3f} allows (false-alarm probability <= {self.significance:g})"
            )
        return "\n".join(lines)

    def to_dict(self, curves: bool = False) -> dict[str, Any]:
        return {
            "name": self.name,
            "claimed_epsilon": json_number(self.claimed_epsilon),
            "delta": self.delta,
            "significance": self.significance,
            "test_accuracy": self.test_accuracy,
            "empirical_epsilon_lower_bound": self.empirical_epsilon_lower_bound,
            "suspicious": self.suspicious,
            "one_run": self.one_run.to_dict(),
            "canary_membership": self.canary_membership.to_dict(curves),
            "membership": None if self.membership is None else self.membership.to_dict(curves),
            "white_box": None if self.white_box is None else self.white_box.to_dict(),
        }


@torch.no_grad()
def classification_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 1024) -> float:
    """Fraction of ``dataset`` whose argmax prediction equals the label."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += int((model(x.to(device)).argmax(dim=1) == y.to(device)).sum())
    model.train(was_training)
    return correct / len(dataset)


def audit_training_run(
    train_fn: TrainFn,
    train_set: Dataset,
    canaries: CanarySet,
    *,
    delta: float,
    test_set: Dataset | None = None,
    num_positive_guesses: int | None = None,
    num_negative_guesses: int | None = None,
    significance: float = 0.05,
    name: str = "run",
    raise_on_violation: bool = False,
    gradient_canaries: GradientCanaries | None = None,
) -> tuple[nn.Module, TrainingAuditReport]:
    """Train once on ``train_set`` plus the included canaries and audit the run; returns (model, report).

    ``train_fn(dataset) -> (model, claimed_epsilon)``; default guesses k+ = k- = m / 10 (fixed in advance, as the
    one-run bound requires). ``delta`` should be the delta of the run's claimed epsilon. With
    ``gradient_canaries`` the same run is also audited white-box: it calls ``train_fn(dataset, gradient_canaries)``,
    which must ``attach`` them to its model before ``make_private`` and ``watch`` the optimizer after it (see
    ``dptrain.audit.gradient_canaries``); they are detached from the model afterwards.
    """
    m = canaries.num_canaries
    k_pos = max(1, m // 10) if num_positive_guesses is None else num_positive_guesses
    k_neg = max(1, m // 10) if num_negative_guesses is None else num_negative_guesses
    checks = 2 + (test_set is not None) + (gradient_canaries is not None)
    level = significance / checks

    white_box = None
    if gradient_canaries is None:
        model, claimed_epsilon = train_fn(canaries.insert_into(train_set))
    else:
        try:
            model, claimed_epsilon = train_fn(canaries.insert_into(train_set), gradient_canaries)
        finally:
            gradient_canaries.detach()
        white_box = gradient_canaries.result(float(claimed_epsilon), delta, significance=level)
    claimed_epsilon = float(claimed_epsilon)
    scores = score_examples(model, canaries.dataset(), "loss")
    included = np.asarray(canaries.included, dtype=bool)
    one_run = one_run_audit(
        scores,
        included,
        num_positive_guesses=k_pos,
        num_negative_guesses=k_neg,
        delta=delta,
        claimed_epsilon=claimed_epsilon,
        significance=level,
        score="loss",
        seed=canaries.seed,
    )
    canary_membership = membership_audit(
        scores[included],
        scores[~included],
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        independent_inclusion=True,
        significance=level,
        attack="loss_threshold_canaries",
    )
    membership = None
    accuracy = None
    if test_set is not None:
        membership = loss_threshold_attack(
            model, train_set, test_set, claimed_epsilon=claimed_epsilon, delta=delta, significance=level
        )
        accuracy = classification_accuracy(model, test_set)
    report = TrainingAuditReport(
        name=name,
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        significance=significance,
        one_run=one_run,
        canary_membership=canary_membership,
        membership=membership,
        test_accuracy=accuracy,
        white_box=white_box,
    )
    report_violation(report, raise_on_violation)
    return model, report
