"""White-box one-run audit with gradient canaries: does the engine add the noise its accountant charges for?

Input-space canaries (``one_run``) see the mechanism through a trained model and catch only gross bugs: a run
claiming eps = 1 with a quarter of its noise (true eps 4.9) gives them a lower bound of 0. Gradient canaries see the
mechanism itself, as in the white-box setting of Steinke, Nasr and Jagielski (2023) and JAX Privacy's canary
auditing: each canary is an example whose clipped gradient is a Dirac vector C * e_i, the strongest (norm C)
gradient a real example can contribute and orthogonal to every other one.

How it runs alongside a real training run:

- ``attach(model)`` (before ``make_private``) adds one parameter of m coordinates, ``model.dptrain_canaries``,
  that no forward pass uses: real examples contribute exactly 0 to it, so the engine releases there only
  its Gaussian noise plus the canaries. The model's own parameters, and so its training, are unchanged.
- ``watch(optimizer)`` (after ``make_private``) registers a ``DPOptimizer.clipped_sum_hooks`` hook. Each canary is
  in the training set with probability 1/2 (secret, from ``seed``); at every logical step each included canary is
  in the batch with the optimizer's sample rate q (as a real example of a Poisson batch) and adds C to its
  coordinate of the step's noisy clipped sum. The hook keeps the released coordinates (noise plus canaries).
- ``audit(claimed_epsilon, delta)``: each canary's score is the sum of its coordinate over the steps (the white-box
  auditor sees every step's release); guess "in" for the k+ highest, "out" for the k- lowest, and bound eps with
  the one-run theorem (``one_run.one_run_audit``). ``detach()`` removes the parameter and the hook.

What it checks: the noise the engine really adds, per step, against the noise multiplier, sample rate and number
of steps its accountant charges (a noise x0.25 run claiming eps = 1 is flagged). It does not see how real examples
are clipped or sampled: the black-box input-canary audit (``one_run``, ``audit_training_run``) stays for that.
Measured on the audit's digits recipe (q = 1/5, 300 steps, m = 2000, k+ = k- = 100): correct eps = 1 runs give
bounds 0-0.5, noise x0.25 runs 1.4-2.2 (``tests/misuse/test_auditor_catches_under_noise.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dptrain.audit.one_run import OneRunAuditResult, one_run_audit, report_violation
from dptrain.optim import DPOptimizer

#: The parameter ``attach`` adds to the model, one coordinate per canary.
SLOT_NAME = "dptrain_canaries"
#: ``OneRunAuditResult.audit`` of this audit, naming it in messages and reports.
AUDIT_NAME = "white-box gradient canaries"


class GradientCanaries:
    """m Dirac gradient canaries, each included with probability 1/2; see the module docstring for the protocol."""

    def __init__(self, num_canaries: int = 2000, *, seed: int = 0) -> None:
        if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 2:
            raise ValueError(f"num_canaries must be an integer >= 2, got {num_canaries!r}")
        self.num_canaries = num_canaries
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.included = self._rng.random(num_canaries) < 0.5
        self.scores = np.zeros(num_canaries)
        self.steps = 0
        self._model: nn.Module | None = None
        self._optimizer: DPOptimizer | None = None

    @property
    def parameter(self) -> nn.Parameter:
        if self._model is None:
            raise RuntimeError("attach(model) first: the canaries have no parameter yet")
        return getattr(self._model, SLOT_NAME)

    def attach(self, model: nn.Module) -> nn.Module:
        """Add the canaries' parameter to ``model`` (before ``make_private`` and before building the optimizer from
        ``model.parameters()``, so that both privatise it). Returns ``model``."""
        if self._model is not None:
            raise RuntimeError("these canaries are already attached to a model; make new ones for another run")
        if hasattr(model, SLOT_NAME):
            raise RuntimeError(f"the model already has a {SLOT_NAME!r} attribute (canaries of another audit?)")
        reference = next(model.parameters(), None)
        device = reference.device if reference is not None else None
        # A parameter of the model itself, no submodule: containers such as nn.Sequential call every submodule.
        model.register_parameter(SLOT_NAME, nn.Parameter(torch.zeros(self.num_canaries, device=device)))
        self._model = model
        return model

    def watch(self, optimizer: DPOptimizer) -> None:
        """Insert the canaries into every logical step of ``optimizer`` (the one ``make_private`` returned)."""
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(f"watch needs the DPOptimizer returned by make_private, got {type(optimizer).__name__}")
        if not any(p is self.parameter for p in optimizer.params):
            raise RuntimeError(
                "the canaries' parameter is not privatised by this optimizer: call attach(model) before building the "
                "optimizer from model.parameters() and before make_private"
            )
        if optimizer.distributed:
            raise NotImplementedError("gradient canaries audit a single-process run; audit without DDP")
        if self._optimizer is not None:
            raise RuntimeError("these canaries already watch an optimizer")
        self._optimizer = optimizer
        optimizer.clipped_sum_hooks.append(self._insert)

    def _insert(self, optimizer: DPOptimizer, total: dict[nn.Parameter, torch.Tensor]) -> None:
        """Add C for each included canary sampled into this step (rate q), then keep the released coordinates."""
        coordinates = total[self.parameter]
        sampled = self.included & (self._rng.random(self.num_canaries) < optimizer.sample_rate)
        if sampled.any():
            index = torch.from_numpy(np.nonzero(sampled)[0]).to(coordinates.device)
            coordinates.index_add_(0, index, coordinates.new_full((len(index),), optimizer.max_grad_norm))
        self.scores += coordinates.detach().double().cpu().numpy() / optimizer.max_grad_norm
        self.steps += 1

    def detach(self) -> None:
        """Remove the hook and the parameter (the model is left as it was before ``attach``)."""
        if self._optimizer is not None and self._insert in self._optimizer.clipped_sum_hooks:
            self._optimizer.clipped_sum_hooks.remove(self._insert)
        if self._model is not None and hasattr(self._model, SLOT_NAME):
            delattr(self._model, SLOT_NAME)

    def result(
        self,
        claimed_epsilon: float,
        delta: float,
        *,
        num_positive_guesses: int | None = None,
        num_negative_guesses: int | None = None,
        significance: float = 0.05,
    ) -> OneRunAuditResult:
        """Guess membership from the summed released coordinates and bound eps (default k+ = k- = m / 20, fixed
        before any score is seen); no warning (``audit`` warns)."""
        if self.steps == 0:
            raise RuntimeError("no step was observed: watch(optimizer) before training, audit after it")
        k = max(1, self.num_canaries // 20)
        return one_run_audit(
            self.scores,
            self.included,
            num_positive_guesses=k if num_positive_guesses is None else num_positive_guesses,
            num_negative_guesses=k if num_negative_guesses is None else num_negative_guesses,
            delta=delta,
            claimed_epsilon=claimed_epsilon,
            significance=significance,
            score="released noisy gradient sum",
            seed=self.seed,
            audit=AUDIT_NAME,
        )

    def audit(
        self,
        claimed_epsilon: float,
        delta: float,
        *,
        significance: float = 0.05,
        raise_on_violation: bool = False,
        **guesses: int,
    ) -> OneRunAuditResult:
        """``result``, and a ``PrivacyViolationWarning`` (or ``PrivacyViolationError``) when the bound exceeds
        ``claimed_epsilon``."""
        outcome = self.result(claimed_epsilon, delta, significance=significance, **guesses)
        report_violation(outcome, raise_on_violation)
        return outcome
