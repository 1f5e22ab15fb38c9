"""Privacy accounting: events describe what was released, accountants turn events into epsilon.

Everything that computes epsilon in dptrain goes through this module, which is a thin layer over Google's
``dp_accounting`` library (RDP and PLD accountants). A training run is a sequence of Poisson-subsampled Gaussian
mechanisms; identical consecutive steps are run-length encoded so that composing 10^5 steps costs one
``SelfComposedDpEvent`` rather than 10^5 compose calls.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import dp_accounting
from dp_accounting import dp_event, pld, rdp
from dp_accounting.pld import privacy_loss_distribution
from scipy import stats

AccountantKind = Literal["pld", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")

#: PLD discretisation used for every reported epsilon. Finer is tighter (coarser is pessimistic, never unsafe);
#: 1e-4 is dp_accounting's default and computes 10^4 steps in well under a second.
PLD_VALUE_DISCRETIZATION = 1e-4

#: Coarser PLD discretisation, still pessimistic (q=0.01, sigma=1, 10^4 steps: 6.191 instead of 6.188). Used where
#: 1e-4 is too slow: group events (dp_accounting builds a mixture-of-Gaussians PLD by bisection at every grid point,
#: ~10x slower per grid point than a Gaussian) and the budget ledger, which composes dozens of times per decision.
COARSE_PLD_VALUE_DISCRETIZATION = 1e-3


def check_positive(value: float, name: str) -> None:
    """``value`` is a finite real number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def check_delta(delta: float, name: str = "delta") -> None:
    if not (isinstance(delta, numbers.Real) and not isinstance(delta, bool) and 0.0 < delta < 1.0):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {delta!r}")


def check_sample_rate(sample_rate: float) -> None:
    if not (isinstance(sample_rate, numbers.Real) and not isinstance(sample_rate, bool) and 0.0 <= sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")


def check_noise_multiplier(noise_multiplier: float) -> None:
    if not (isinstance(noise_multiplier, numbers.Real) and not isinstance(noise_multiplier, bool) and noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")


def check_steps(steps: int, name: str = "steps") -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {steps!r}")


def check_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")


@dataclass(frozen=True)
class StepRecord:
    """``count`` identical DP-SGD steps: Poisson sampling with rate ``sample_rate``, Gaussian noise ``noise_multiplier``.

    ``group_size`` > 1 accounts for a privacy unit that contributes up to that many examples (see
    :func:`sampled_gaussian_event`).
    """

    sample_rate: float
    noise_multiplier: float
    count: int
    group_size: int = 1

    def to_event(self) -> dp_accounting.DpEvent:
        return sampled_gaussian_event(self.sample_rate, self.noise_multiplier, self.count, self.group_size)


def _group_sensitivity_distribution(sample_rate: float, group_size: int) -> tuple[list[float], list[float]]:
    """Sensitivities 0..k (in units of the clipping norm) and their Binomial(k, q) probabilities."""
    counts = list(range(group_size + 1))
    probs = [float(p) for p in stats.binom.pmf(counts, group_size, sample_rate)]
    return [float(c) for c in counts], probs


def sampled_gaussian_event(
    sample_rate: float, noise_multiplier: float, steps: int, group_size: int = 1
) -> dp_accounting.DpEvent:
    """The dp_accounting event for ``steps`` Poisson-subsampled Gaussian mechanisms (add/remove-one neighbours).

    With ``group_size`` k > 1 the neighbouring datasets differ by a whole privacy unit (a user) owning up to k
    examples, each example Poisson-sampled independently with rate q and clipped to norm C, noise std sigma*C.
    Assumptions: no example appears in two units' groups, every step's sampling is independent, every
    intermediate model may be released. Then j ~ Binomial(k, q) of the unit's examples are in a batch and move the
    clipped sum by at most j*C, so one step is dominated by the mixture-of-Gaussians mechanism
    ``N(0, sigma^2)`` vs ``sum_j P[j] N(j, sigma^2)`` (Ganesh 2024, arXiv 2401.10294, Thm. for Poisson sampling;
    vector-to-scalar reduction: Choquette-Choo et al. 2023, arXiv 2310.15526, Cor. 4.7). That event is tight and
    is interpreted by the PLD accountant; for RDP see :func:`epsilon_of_event`. With q = 1 all k examples are
    always present: a Gaussian of sensitivity k, i.e. noise multiplier sigma / k.
    """
    check_sample_rate(sample_rate)
    check_noise_multiplier(noise_multiplier)
    check_steps(steps)
    check_group_size(group_size)
    sample_rate, noise_multiplier, steps, group_size = float(sample_rate), float(noise_multiplier), int(steps), int(group_size)
    if steps == 0 or sample_rate == 0:
        return dp_accounting.NoOpDpEvent()
    if noise_multiplier == 0:
        return dp_accounting.NonPrivateDpEvent()
    step: dp_accounting.DpEvent
    if sample_rate == 1.0:
        step = dp_accounting.GaussianDpEvent(noise_multiplier / group_size)
    elif group_size == 1:
        step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    else:
        sensitivities, probs = _group_sensitivity_distribution(sample_rate, group_size)
        step = dp_event.MixtureOfGaussiansDpEvent(noise_multiplier, sensitivities, probs)
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _contains_mixture(event: dp_accounting.DpEvent) -> bool:
    if isinstance(event, dp_event.MixtureOfGaussiansDpEvent):
        return True
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return _contains_mixture(event.event)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return any(_contains_mixture(e) for e in event.events)
    return False


def _pld_discretization(event: dp_accounting.DpEvent) -> float:
    """:data:`PLD_VALUE_DISCRETIZATION`, or the coarse one when a group (mixture) event would take minutes at it."""
    return COARSE_PLD_VALUE_DISCRETIZATION if _contains_mixture(event) else PLD_VALUE_DISCRETIZATION


def _rdp_dominating_event(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """``event`` with every mixture of Gaussians replaced by a Poisson-subsampled Gaussian that dominates it.

    dp_accounting's RDP accountant has no mixture event. A mixture ``p_0 N(0) + sum_{c_j > 0} p_j N(c_j)`` against
    ``N(0)`` is dominated, in both directions of add/remove, by ``(1 - p_0) N(max c) + p_0 N(0)`` against ``N(0)``:
    the hockey-stick divergence is convex in each argument and a Gaussian's grows with its shift. So a group event
    becomes "with probability 1 - (1-q)^k the whole group is present, sensitivity k": sound but much looser than
    the mixture under PLD.
    """
    if isinstance(event, dp_event.MixtureOfGaussiansDpEvent):
        present = math.fsum(p for c, p in zip(event.sensitivities, event.sampling_probs) if c > 0)
        gaussian = dp_accounting.GaussianDpEvent(event.standard_deviation / max(event.sensitivities))
        return dp_accounting.PoissonSampledDpEvent(min(1.0, present), gaussian)
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return dp_accounting.SelfComposedDpEvent(_rdp_dominating_event(event.event), event.count)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return dp_accounting.ComposedDpEvent([_rdp_dominating_event(e) for e in event.events])
    return event


def _new_accountant(
    accountant: str, value_discretization: float = PLD_VALUE_DISCRETIZATION
) -> dp_accounting.PrivacyAccountant:
    check_accountant(accountant)
    if accountant == "pld":
        return pld.PLDAccountant(value_discretization_interval=value_discretization)
    return rdp.RdpAccountant()


def epsilon_of_event(event: dp_accounting.DpEvent, delta: float, accountant: str = "pld") -> float:
    """Epsilon at ``delta`` of any dp_accounting event, composed in a fresh accountant.

    PLD uses :data:`PLD_VALUE_DISCRETIZATION`, or :data:`COARSE_PLD_VALUE_DISCRETIZATION` for events holding a group
    (mixture-of-Gaussians) event; RDP interprets group events through :func:`_rdp_dominating_event`.
    """
    check_delta(delta)
    if isinstance(event, dp_accounting.NonPrivateDpEvent):
        return math.inf
    if accountant == "rdp":
        event = _rdp_dominating_event(event)
    acc = _new_accountant(accountant, _pld_discretization(event))
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def compute_epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    group_size: int = 1,
) -> float:
    """Epsilon of ``steps`` DP-SGD steps with Poisson rate ``sample_rate`` and noise ``noise_multiplier``, at ``delta``.

    ``group_size`` k > 1 gives the guarantee for a unit (a user) contributing up to k examples, each sampled
    independently; see :func:`sampled_gaussian_event` for the event and its assumptions. Under PLD this is tight
    (and takes seconds: the mixture PLD is built by bisection); under RDP it is a looser, dominating bound.
    """
    event = sampled_gaussian_event(sample_rate, noise_multiplier, steps, group_size)
    return epsilon_of_event(event, delta, accountant)


def fixed_size_epsilon(population: int, sample_size: int, noise_multiplier: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Gaussian releases of a sum of ``sample_size`` units drawn uniformly without replacement from
    ``population``, each clipped to C with noise std sigma C: RDP under *replace-one* neighbours (sampling without
    replacement keeps the population size, so add/remove neighbours do not apply; Wang, Balle, Kasiviswanathan 2019).
    Replacing one unit moves the sum by up to 2C, so the Gaussian's noise multiplier for sensitivity 1 is sigma / 2.
    Not comparable with the add/remove epsilons of Poisson sampling: label it as a replace-one guarantee."""
    check_noise_multiplier(noise_multiplier)
    check_steps(steps)
    check_delta(delta)
    for value, name in ((population, "population"), (sample_size, "sample_size")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if sample_size > population:
        raise ValueError(f"sample_size {sample_size} exceeds the population {population}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    step = gaussian if sample_size == population else dp_accounting.SampledWithoutReplacementDpEvent(
        int(population), int(sample_size), gaussian
    )
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(step, int(steps))
    return float(accountant.get_epsilon(delta))


def run_length_encode(records: Iterable[StepRecord]) -> list[StepRecord]:
    """Merge records with equal (sample_rate, noise_multiplier, group_size), in a canonical (sorted) order.

    Composition is commutative, so the merged, sorted list describes the same release; the canonical order makes
    equal multisets of steps compose to bit-identical epsilons, whatever order they were recorded in.
    """
    counts: dict[tuple[float, float, int], int] = {}
    for r in records:
        key = (r.sample_rate, r.noise_multiplier, r.group_size)
        counts[key] = counts.get(key, 0) + r.count
    return [StepRecord(q, sigma, n, k) for (q, sigma, k), n in sorted(counts.items()) if n > 0]


def composed_event(records: Iterable[StepRecord]) -> dp_accounting.DpEvent:
    """One ComposedDpEvent for all ``records``, run-length encoded (one SelfComposedDpEvent per distinct step)."""
    return dp_accounting.ComposedDpEvent([r.to_event() for r in run_length_encode(records)])


@functools.lru_cache(maxsize=64)
def _single_step_pld(
    sample_rate: float, noise_multiplier: float, group_size: int, value_discretization: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """The PLD of one sampled step (0 < q < 1), built exactly as dp_accounting's PLDAccountant builds it."""
    if group_size == 1:
        return privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=noise_multiplier,
            value_discretization_interval=value_discretization,
            sampling_prob=sample_rate,
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        )
    sensitivities, probs = _group_sensitivity_distribution(sample_rate, group_size)
    return privacy_loss_distribution.from_mixture_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        sensitivities=sensitivities,
        sampling_probs=probs,
        value_discretization_interval=value_discretization,
    )


def composed_epsilon(
    records: Iterable[StepRecord], delta: float, value_discretization: float | None = None
) -> float:
    """PLD epsilon at ``delta`` of all ``records`` composed; the one composition used by the budget ledger.

    Returns the same number as a fresh ``PLDAccountant(value_discretization_interval=value_discretization)`` over
    :func:`composed_event` (a test checks equality), but caches each distinct step's PLD, whose construction is
    most of the cost (a group step's takes seconds), so repeated totals and searches pay only for composition.
    ``value_discretization`` defaults to what :func:`epsilon_of_event` would use.
    """
    check_delta(delta)
    merged = run_length_encode(records)
    events = [r.to_event() for r in merged]
    if value_discretization is None:
        value_discretization = _pld_discretization(dp_accounting.ComposedDpEvent(events))
    total = privacy_loss_distribution.identity(value_discretization_interval=value_discretization)
    for r, event in zip(merged, events):
        if isinstance(event, dp_accounting.NoOpDpEvent):
            continue
        if isinstance(event, dp_accounting.NonPrivateDpEvent):
            return math.inf
        assert isinstance(event, dp_accounting.SelfComposedDpEvent)
        if isinstance(event.event, dp_accounting.GaussianDpEvent):  # q = 1: one Gaussian of std sigma / sqrt(T)
            step = privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=event.event.noise_multiplier / math.sqrt(event.count),
                value_discretization_interval=value_discretization,
                neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            )
        else:
            single = _single_step_pld(r.sample_rate, r.noise_multiplier, r.group_size, value_discretization)
            step = single.self_compose(event.count)
        total = total.compose(step)
    return float(total.get_epsilon_for_delta(delta))


def calibrate_noise(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    tolerance: float = 0.01,
    progress: Callable[[float, float], None] | None = None,
) -> float:
    """Smallest noise multiplier (to within ``tolerance``) whose epsilon is <= ``target_epsilon``.

    The returned sigma satisfies ``(1 - tolerance) * target_epsilon <= eps(sigma) <= target_epsilon``, found by
    bracketing then bisection; epsilon decreases with sigma. ``progress(sigma, epsilon)`` is called after each
    evaluation (a long calibration can show where it is). No sigma up to 1e6 reaching the target: ValueError.
    """
    check_positive(target_epsilon, "target_epsilon")
    check_delta(target_delta, "target_delta")
    check_sample_rate(sample_rate)
    check_steps(steps)
    check_accountant(accountant)
    if steps == 0 or sample_rate == 0:
        raise ValueError("calibrate_noise needs steps > 0 and sample_rate > 0: nothing is released otherwise")

    def reported(value: float, sigma: float) -> float:
        if progress is not None:
            progress(sigma, value)
        return value

    def eps(sigma: float) -> float:
        return reported(compute_epsilon(sample_rate, sigma, steps, target_delta, accountant), sigma)

    if accountant != "pld":
        return smallest_noise_multiplier(eps, target_epsilon, tolerance, 0.0, 1.0)

    # PLD at the reporting discretisation costs ~0.5 s per evaluation: search with the coarse (pessimistic, 20x
    # faster) discretisation first, then check, and if needed refine, at the reporting one.
    def coarse_eps(sigma: float) -> float:
        record = StepRecord(sample_rate, sigma, steps)
        return reported(composed_epsilon([record], target_delta, COARSE_PLD_VALUE_DISCRETIZATION), sigma)

    sigma = smallest_noise_multiplier(coarse_eps, target_epsilon, tolerance / 2, 0.0, 1.0)
    final = eps(sigma)
    if (1 - tolerance) * target_epsilon <= final <= target_epsilon:
        return sigma
    low, high = (0.0, sigma) if final <= target_epsilon else (sigma, 2 * sigma)
    return smallest_noise_multiplier(eps, target_epsilon, tolerance, low, high)


def smallest_noise_multiplier(
    eps: Callable[[float], float], target_epsilon: float, tolerance: float, low: float = 0.0, high: float = 1.0
) -> float:
    """Smallest sigma in (low, ...) with (1 - tolerance) * target <= eps(sigma) <= target; eps decreases in sigma."""
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(
                f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon}; raise the target or take fewer steps"
            )
    # Invariant: eps(high) <= target, and low is below every sigma known to satisfy it.
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
    """The record of a training run's steps (``records``), composed on demand by a dp_accounting accountant.

    Consecutive steps with the same (sample_rate, noise_multiplier) are merged, so the history of a run with one
    setting is a single record whatever its length.
    """

    def __init__(self, kind: str = "pld") -> None:
        check_accountant(kind)
        self.kind = kind
        self.records: list[StepRecord] = []

    def step(self, sample_rate: float, noise_multiplier: float, count: int = 1) -> None:
        check_sample_rate(sample_rate)
        check_noise_multiplier(noise_multiplier)
        check_steps(count, "count")
        if count == 0:
            return
        last = self.records[-1] if self.records else None
        if last and last.sample_rate == sample_rate and last.noise_multiplier == noise_multiplier:
            self.records[-1] = StepRecord(sample_rate, noise_multiplier, last.count + count)
        else:
            self.records.append(StepRecord(sample_rate, noise_multiplier, count))

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Opacus' ``accountant.history``: one ``(noise_multiplier, sample_rate, steps)`` tuple per run of identical
        steps (``records`` holds them as :class:`StepRecord`)."""
        return [(r.noise_multiplier, r.sample_rate, r.count) for r in self.records]

    @property
    def steps(self) -> int:
        return sum(r.count for r in self.records)

    def mechanism(self) -> str:
        """The accountant's name ("pld" or "rdp"), as Opacus' ``accountant.mechanism()``."""
        return self.kind

    def __len__(self) -> int:
        """The number of records (runs of identical steps), as ``len(accountant)`` in Opacus."""
        return len(self.records)

    def event(self) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent([r.to_event() for r in self.records])

    def get_epsilon(self, delta: float) -> float:
        if not self.records:
            check_delta(delta)
            return 0.0
        if any(r.noise_multiplier == 0 for r in self.records):
            check_delta(delta)
            return math.inf
        return epsilon_of_event(self.event(), delta, self.kind)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "history": [(r.sample_rate, r.noise_multiplier, r.count) for r in self.records],
        }

    def load_state_dict(self, state: dict) -> None:
        check_accountant(state["kind"])
        self.kind = state["kind"]
        self.records = [StepRecord(float(q), float(s), int(n)) for q, s, n in state["history"]]
