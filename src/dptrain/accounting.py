"""Privacy accounting: events describe what was released, accountants turn events into epsilon.

Everything that computes epsilon in dptrain goes through this module, which is a thin layer over Google's
``dp_accounting`` library (RDP and PLD accountants). A training run is a sequence of Poisson-subsampled Gaussian
mechanisms; identical consecutive steps are run-length encoded so that composing 10^5 steps costs one
``SelfComposedDpEvent`` rather than 10^5 compose calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import dp_accounting
from dp_accounting import pld, rdp

AccountantKind = Literal["pld", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")

#: PLD discretisation used for every reported epsilon. Finer is tighter (coarser is pessimistic, never unsafe);
#: 1e-4 is dp_accounting's default and computes 10^4 steps in well under a second.
PLD_VALUE_DISCRETIZATION = 1e-4


def check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def check_delta(delta: float, name: str = "delta") -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {delta!r}")


def check_sample_rate(sample_rate: float) -> None:
    if not (isinstance(sample_rate, (int, float)) and 0.0 <= sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")


def check_noise_multiplier(noise_multiplier: float) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")


def check_steps(steps: int, name: str = "steps") -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {steps!r}")


@dataclass(frozen=True)
class StepRecord:
    """``count`` identical DP-SGD steps: Poisson sampling with rate ``sample_rate``, Gaussian noise ``noise_multiplier``."""

    sample_rate: float
    noise_multiplier: float
    count: int

    def to_event(self) -> dp_accounting.DpEvent:
        return sampled_gaussian_event(self.sample_rate, self.noise_multiplier, self.count)


def sampled_gaussian_event(sample_rate: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """The dp_accounting event for ``steps`` Poisson-subsampled Gaussian mechanisms (add/remove-one neighbours)."""
    check_sample_rate(sample_rate)
    check_noise_multiplier(noise_multiplier)
    check_steps(steps)
    if steps == 0 or sample_rate == 0:
        return dp_accounting.NoOpDpEvent()
    if noise_multiplier == 0:
        return dp_accounting.NonPrivateDpEvent()
    step: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        step = dp_accounting.PoissonSampledDpEvent(sample_rate, step)
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _new_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    check_accountant(accountant)
    if accountant == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    return rdp.RdpAccountant()


def epsilon_of_event(event: dp_accounting.DpEvent, delta: float, accountant: str = "pld") -> float:
    """Epsilon at ``delta`` of any dp_accounting event, composed in a fresh accountant."""
    check_delta(delta)
    if isinstance(event, dp_accounting.NonPrivateDpEvent):
        return math.inf
    acc = _new_accountant(accountant)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def compute_epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """Epsilon of ``steps`` DP-SGD steps with Poisson rate ``sample_rate`` and noise ``noise_multiplier``, at ``delta``."""
    return epsilon_of_event(sampled_gaussian_event(sample_rate, noise_multiplier, steps), delta, accountant)


def calibrate_noise(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to within ``tolerance``) whose epsilon is <= ``target_epsilon``.

    The returned sigma satisfies ``(1 - tolerance) * target_epsilon <= eps(sigma) <= target_epsilon``, found by
    bracketing then bisection; epsilon decreases with sigma.
    """
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    check_delta(target_delta, "target_delta")
    check_sample_rate(sample_rate)
    check_steps(steps)
    check_accountant(accountant)
    if steps == 0 or sample_rate == 0:
        raise ValueError("calibrate_noise needs steps > 0 and sample_rate > 0: nothing is released otherwise")

    def eps(sigma: float) -> float:
        return compute_epsilon(sample_rate, sigma, steps, target_delta, accountant)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(
                f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon} at delta {target_delta} "
                f"with sample_rate {sample_rate} and {steps} steps; raise the target or take fewer steps"
            )
    # Invariant: eps(high) <= target < eps(low) (eps(0) is infinite).
    for _ in range(100):
        if high - low < 1e-9 * high:
            break
        mid = (low + high) / 2
        e = eps(mid)
        if e > target_epsilon:
            low = mid
        else:
            high = mid
            if e >= (1 - tolerance) * target_epsilon:
                break
    return high


class Accountant:
    """The history of a training run's steps, composed on demand by a dp_accounting accountant.

    Consecutive steps with the same (sample_rate, noise_multiplier) are merged, so the history of a run with one
    setting is a single record whatever its length.
    """

    def __init__(self, kind: str = "pld") -> None:
        check_accountant(kind)
        self.kind = kind
        self.history: list[StepRecord] = []

    def step(self, sample_rate: float, noise_multiplier: float, count: int = 1) -> None:
        check_sample_rate(sample_rate)
        check_noise_multiplier(noise_multiplier)
        check_steps(count, "count")
        if count == 0:
            return
        last = self.history[-1] if self.history else None
        if last and last.sample_rate == sample_rate and last.noise_multiplier == noise_multiplier:
            self.history[-1] = StepRecord(sample_rate, noise_multiplier, last.count + count)
        else:
            self.history.append(StepRecord(sample_rate, noise_multiplier, count))

    @property
    def steps(self) -> int:
        return sum(r.count for r in self.history)

    def event(self) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent([r.to_event() for r in self.history])

    def get_epsilon(self, delta: float) -> float:
        if not self.history:
            check_delta(delta)
            return 0.0
        if any(r.noise_multiplier == 0 for r in self.history):
            check_delta(delta)
            return math.inf
        return epsilon_of_event(self.event(), delta, self.kind)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "history": [(r.sample_rate, r.noise_multiplier, r.count) for r in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        check_accountant(state["kind"])
        self.kind = state["kind"]
        self.history = [StepRecord(float(q), float(s), int(n)) for q, s, n in state["history"]]
