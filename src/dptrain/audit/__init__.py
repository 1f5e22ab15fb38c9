"""Privacy auditing: does a trained model leak more than its claimed epsilon allows?

Composable pieces, each returning a plain result object (a dataclass with ``to_dict()``):

- ``roc``: ROC curves, AUC, TPR at low FPR, the (eps, delta)-DP region of any membership test and the eps lower
  bound an empirical ROC implies (Clopper-Pearson).
- ``mia``: membership inference, the loss-threshold attack and LiRA (online and offline) ->
  ``MembershipAuditResult`` (``violates_bound`` when the ROC crosses the DP bound beyond sampling error).
- ``one_run``: the one-run audit of Steinke, Nasr and Jagielski (2023): ``one_run_epsilon_lower_bound`` and the
  procedure (canaries included with probability 1/2, one training run, guesses) -> ``OneRunAuditResult``.
- ``gradient_canaries``: the white-box one-run audit (Dirac gradient canaries inserted into the DP optimizer's
  clipped sum) -> ``GradientCanaries``; catches a run whose noise is a quarter of what its accountant charges.
- ``training``: ``audit_training_run``, all of the above alongside a real training run.
- ``exposure``: Secret Sharer exposure of planted secrets in sequence models -> ``ExposureResult``.
- ``digits``: the digits MLP the ``dptrain audit`` command trains and audits (the command: ``dptrain.cli.audit``).

Every audit trains through a ``TrainFn``: ``train_fn(dataset) -> (model, claimed_epsilon)``, so it works with any
training code; dptrain's ``PrivacyEngine`` supplies the claimed epsilon of private runs.
"""

from dptrain.audit.exposure import ExposureResult, SecretFormat, canary_exposure
from dptrain.audit.gradient_canaries import GradientCanaries
from dptrain.audit.mia import (
    LiRAAuditResult,
    MembershipAuditResult,
    lira_scores,
    loss_threshold_attack,
    membership_audit,
    replace_one_guarantee,
    run_lira,
)
from dptrain.audit.one_run import (
    CanarySet,
    OneRunAuditResult,
    PrivacyViolationError,
    PrivacyViolationWarning,
    TrainFn,
    guess_membership,
    mislabeled_canaries,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    random_input_canaries,
    run_one_run_audit,
)
from dptrain.audit.roc import auc, dp_tpr_bound, epsilon_lower_bound, roc_curve, tpr_at_fpr
from dptrain.audit.scores import logit_scores, loss_scores, score_examples
from dptrain.audit.training import TrainingAuditReport, audit_training_run

__all__ = [
    "CanarySet",
    "ExposureResult",
    "GradientCanaries",
    "LiRAAuditResult",
    "MembershipAuditResult",
    "OneRunAuditResult",
    "PrivacyViolationError",
    "PrivacyViolationWarning",
    "SecretFormat",
    "TrainFn",
    "TrainingAuditReport",
    "audit_training_run",
    "auc",
    "canary_exposure",
    "dp_tpr_bound",
    "epsilon_lower_bound",
    "guess_membership",
    "lira_scores",
    "logit_scores",
    "loss_scores",
    "loss_threshold_attack",
    "membership_audit",
    "mislabeled_canaries",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "random_input_canaries",
    "replace_one_guarantee",
    "roc_curve",
    "run_lira",
    "run_one_run_audit",
    "score_examples",
    "tpr_at_fpr",
]
