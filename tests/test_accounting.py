"""Accounting: our numbers against dp_accounting and the published table, calibration, group privacy, bad input."""

from __future__ import annotations

import math
import random

import dp_accounting
import pytest
from dp_accounting import dp_event, pld, rdp

from dptrain import accounting
from dptrain.accounting import (
    COARSE_PLD_VALUE_DISCRETIZATION,
    PLD_VALUE_DISCRETIZATION,
    Accountant,
    StepRecord,
    calibrate_noise,
    composed_epsilon,
    composed_event,
    compute_epsilon,
    run_length_encode,
)

# GUIDE section 3: (q, sigma, steps, delta, RDP eps, PLD eps range), dp_accounting 0.6.0.
TABLE = [
    (256 / 60000, 1.1, 14062, 1e-5, 2.5966, (2.38, 2.39)),
    (0.01, 1.0, 10000, 1e-5, 6.7128, (6.19, 6.19)),
    (0.001, 0.8, 100000, 1e-6, 3.1878, (2.92, 2.98)),
    (1.0, 10.0, 100, 1e-5, 4.7285, (4.38, 4.38)),
    (0.04, 1.5, 2250, 1e-5, 7.3293, (6.77, 6.77)),
]


def _direct(event: dp_accounting.DpEvent, delta: float, accountant: dp_accounting.PrivacyAccountant) -> float:
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def _sampled_gaussian(q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
    step = dp_accounting.GaussianDpEvent(sigma)
    if q < 1:
        step = dp_accounting.PoissonSampledDpEvent(q, step)
    return dp_accounting.SelfComposedDpEvent(step, steps)


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "rdp_eps", "pld_range"), TABLE)
def test_rdp_matches_table_and_dp_accounting(q, sigma, steps, delta, rdp_eps, pld_range):
    eps = compute_epsilon(q, sigma, steps, delta, accountant="rdp")
    assert eps == pytest.approx(rdp_eps, abs=1e-4)
    assert eps == _direct(_sampled_gaussian(q, sigma, steps), delta, rdp.RdpAccountant())


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "rdp_eps", "pld_range"), TABLE)
def test_pld_matches_table_and_dp_accounting(q, sigma, steps, delta, rdp_eps, pld_range):
    eps = compute_epsilon(q, sigma, steps, delta)
    low, high = pld_range
    assert low * 0.99 <= eps <= high * 1.01
    direct = _direct(
        _sampled_gaussian(q, sigma, steps), delta, pld.PLDAccountant(value_discretization_interval=1e-4)
    )
    assert eps == pytest.approx(direct, rel=1e-2)
    assert eps < rdp_eps  # PLD is the tighter accountant


def test_calibrate_noise_lands_just_under_target_and_pld_needs_less_noise():
    target, delta, q, steps = 2.0, 1e-5, 0.1, 100
    sigmas = {}
    for accountant in ("pld", "rdp"):
        sigmas[accountant] = calibrate_noise(target, delta, q, steps, accountant=accountant)
        eps = compute_epsilon(q, sigmas[accountant], steps, delta, accountant=accountant)
        assert 0.99 * target <= eps <= target
    assert sigmas["pld"] < sigmas["rdp"]


@pytest.mark.parametrize(
    ("target", "delta", "q", "steps", "refined"),
    [(0.3, 1e-5, 0.01, 2000, True), (0.5, 1e-6, 0.002, 5000, True), (8.0, 1e-5, 0.5, 50, False)],
)
def test_calibrated_noise_meets_the_target_at_the_reporting_discretisation(target, delta, q, steps, refined, monkeypatch):
    """The search runs on a coarse PLD grid; when the reporting grid disagrees it refines there. Either way the
    returned sigma's reported epsilon is within 1 % under the target, never over it."""
    searches = []
    search = accounting.smallest_noise_multiplier
    monkeypatch.setattr(accounting, "smallest_noise_multiplier", lambda *a, **k: searches.append(a) or search(*a, **k))
    sigma = calibrate_noise(target, delta, q, steps)
    eps = compute_epsilon(q, sigma, steps, delta)
    assert 0.99 * target <= eps <= target
    assert (len(searches) > 1) == refined  # both branches of the calibration are exercised


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: compute_epsilon(-0.1, 1.0, 10, 1e-5), "sample_rate"),
        (lambda: compute_epsilon(1.5, 1.0, 10, 1e-5), "sample_rate"),
        (lambda: compute_epsilon(0.1, -1.0, 10, 1e-5), "noise_multiplier"),
        (lambda: compute_epsilon(0.1, math.nan, 10, 1e-5), "noise_multiplier"),
        (lambda: compute_epsilon(0.1, 1.0, 10.5, 1e-5), "steps"),
        (lambda: compute_epsilon(0.1, 1.0, -1, 1e-5), "steps"),
        (lambda: compute_epsilon(0.1, 1.0, 10, 0.0), "delta"),
        (lambda: compute_epsilon(0.1, 1.0, 10, 1.0), "delta"),
        (lambda: compute_epsilon(0.1, 1.0, 10, 1e-5, accountant="prv"), "accountant"),
        (lambda: compute_epsilon(0.1, 1.0, 10, 1e-5, group_size=0), "group_size"),
        (lambda: compute_epsilon(0.1, 1.0, 10, 1e-5, group_size=2.0), "group_size"),
        (lambda: calibrate_noise(0.0, 1e-5, 0.1, 10), "target_epsilon"),
        (lambda: calibrate_noise(math.inf, 1e-5, 0.1, 10), "target_epsilon"),
        (lambda: calibrate_noise(1.0, 2.0, 0.1, 10), "target_delta"),
        (lambda: calibrate_noise(1.0, 1e-5, 0.1, 0), "steps"),
        (lambda: Accountant("prv"), "accountant"),
        (lambda: Accountant().step(0.1, 1.0, count=-1), "count"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_no_noise_is_infinite_epsilon_and_no_steps_is_zero():
    assert compute_epsilon(0.1, 0.0, 10, 1e-5) == math.inf
    assert compute_epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    assert compute_epsilon(0.0, 1.0, 10, 1e-5) == 0.0


def test_accountant_merges_consecutive_identical_steps():
    acc = Accountant()
    for _ in range(500):
        acc.step(0.01, 1.0)
    acc.step(0.02, 1.0, count=10)
    acc.step(0.01, 1.0)
    assert acc.records == [StepRecord(0.01, 1.0, 500), StepRecord(0.02, 1.0, 10), StepRecord(0.01, 1.0, 1)]
    assert acc.history == [(1.0, 0.01, 500), (1.0, 0.02, 10), (1.0, 0.01, 1)]  # Opacus' (sigma, q, steps)
    assert acc.steps == 511


def test_accountant_epsilon_equals_compute_epsilon_and_state_dict_round_trips():
    acc = Accountant("rdp")
    acc.step(0.01, 1.0, count=300)
    acc.step(0.02, 1.5, count=20)
    restored = Accountant()
    restored.load_state_dict(acc.state_dict())
    assert restored.kind == "rdp"
    assert restored.records == acc.records
    assert restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    single = Accountant("rdp")
    single.step(0.01, 1.0, count=300)
    assert single.get_epsilon(1e-5) == compute_epsilon(0.01, 1.0, 300, 1e-5, accountant="rdp")
    assert Accountant().get_epsilon(1e-5) == 0.0


# -- group privacy ---------------------------------------------------------------------------------------------------

Q, SIGMA, STEPS, DELTA = 0.01, 2.0, 200, 1e-5


def _group_event(q: float, sigma: float, steps: int, k: int) -> dp_accounting.DpEvent:
    """The group-of-k event built by hand: sensitivity j (clip norms) with probability Binomial(k, q) at j."""
    probs = [math.comb(k, j) * q**j * (1 - q) ** (k - j) for j in range(k + 1)]
    mixture = dp_event.MixtureOfGaussiansDpEvent(sigma, [float(j) for j in range(k + 1)], probs)
    return dp_accounting.SelfComposedDpEvent(mixture, steps)


def test_group_size_one_is_the_example_level_epsilon():
    for accountant in ("pld", "rdp"):
        assert compute_epsilon(Q, SIGMA, STEPS, DELTA, accountant, group_size=1) == compute_epsilon(
            Q, SIGMA, STEPS, DELTA, accountant
        )


def test_group_epsilon_matches_a_direct_mixture_of_gaussians_computation():
    eps = compute_epsilon(Q, SIGMA, STEPS, DELTA, group_size=3)
    direct = _direct(
        _group_event(Q, SIGMA, STEPS, 3),
        DELTA,
        pld.PLDAccountant(value_discretization_interval=COARSE_PLD_VALUE_DISCRETIZATION),
    )
    assert eps == pytest.approx(direct, rel=1e-9)


def test_mixture_with_one_example_is_the_subsampled_gaussian():
    # Checks the event's units: a group of one is exactly the ordinary Poisson-sampled Gaussian.
    vdi = COARSE_PLD_VALUE_DISCRETIZATION
    mixture = _direct(_group_event(Q, SIGMA, STEPS, 1), DELTA, pld.PLDAccountant(value_discretization_interval=vdi))
    plain = _direct(_sampled_gaussian(Q, SIGMA, STEPS), DELTA, pld.PLDAccountant(value_discretization_interval=vdi))
    assert mixture == pytest.approx(plain, rel=1e-3)


def test_group_epsilon_grows_with_group_size_and_beats_generic_group_privacy():
    eps = [composed_epsilon([StepRecord(Q, SIGMA, STEPS, k)], DELTA) for k in (1, 2, 3)]
    assert eps[0] < eps[1] < eps[2]
    # Generic group privacy turns (e, d)-DP into (k e, k exp((k - 1) e) d)-DP; the mixture event must not be looser.
    for k in (2, 3):
        delta_k = k * math.exp((k - 1) * eps[0]) * DELTA
        assert composed_epsilon([StepRecord(Q, SIGMA, STEPS, k)], delta_k) <= k * eps[0]


def test_group_rdp_uses_the_dominating_subsampled_gaussian():
    k = 2
    eps = compute_epsilon(Q, SIGMA, STEPS, DELTA, "rdp", group_size=k)
    q_group = 1 - (1 - Q) ** k
    direct = _direct(_sampled_gaussian(q_group, SIGMA / k, STEPS), DELTA, rdp.RdpAccountant())
    assert eps == pytest.approx(direct, rel=1e-6)
    assert eps > compute_epsilon(Q, SIGMA, STEPS, DELTA, "pld", group_size=k)


def test_full_batch_group_is_a_gaussian_of_sensitivity_k():
    assert compute_epsilon(1.0, 6.0, 10, DELTA, group_size=3) == pytest.approx(
        compute_epsilon(1.0, 2.0, 10, DELTA), rel=1e-3
    )


# -- composition of records (the ledger's arithmetic) ----------------------------------------------------------------


def test_run_length_encode_merges_equal_steps_in_canonical_order():
    records = [StepRecord(0.02, 1.0, 5), StepRecord(0.01, 1.0, 3), StepRecord(0.02, 1.0, 7), StepRecord(0.01, 1.0, 0)]
    assert run_length_encode(records) == [StepRecord(0.01, 1.0, 3), StepRecord(0.02, 1.0, 12)]


def test_composed_epsilon_equals_a_fresh_pld_accountant_and_ignores_order():
    records = [
        StepRecord(0.01, 1.0, 300),
        StepRecord(0.02, 1.5, 100),
        StepRecord(0.01, 1.0, 200),
        StepRecord(1.0, 20.0, 5),
        StepRecord(0.0, 1.0, 5),
        StepRecord(0.01, 3.0, 50, group_size=2),
    ]
    eps = composed_epsilon(records, DELTA, COARSE_PLD_VALUE_DISCRETIZATION)
    accountant = pld.PLDAccountant(value_discretization_interval=COARSE_PLD_VALUE_DISCRETIZATION)
    accountant.compose(composed_event(records))
    assert eps == accountant.get_epsilon(DELTA)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert composed_epsilon(shuffled, DELTA, COARSE_PLD_VALUE_DISCRETIZATION) == eps
    # Composition is tighter than adding the parts' epsilons.
    parts = sum(composed_epsilon([r], DELTA, COARSE_PLD_VALUE_DISCRETIZATION) for r in records)
    assert eps < parts


def test_composed_epsilon_defaults_to_the_reporting_discretization():
    records = [StepRecord(0.01, 1.0, 1000)]
    assert composed_epsilon(records, DELTA) == compute_epsilon(0.01, 1.0, 1000, DELTA)
    assert PLD_VALUE_DISCRETIZATION < COARSE_PLD_VALUE_DISCRETIZATION
    # Coarser discretisation is pessimistic: never below the finer figure.
    assert composed_epsilon(records, DELTA, COARSE_PLD_VALUE_DISCRETIZATION) >= composed_epsilon(records, DELTA)


def test_composed_epsilon_of_non_private_or_empty_records():
    assert composed_epsilon([StepRecord(0.01, 0.0, 10), StepRecord(0.01, 1.0, 10)], DELTA) == math.inf
    assert composed_epsilon([], DELTA) == 0.0
    with pytest.raises(ValueError, match="delta"):
        composed_epsilon([StepRecord(0.01, 1.0, 10)], 0.0)


def test_calibration_reports_each_evaluation_and_refuses_an_unreachable_target():
    from dptrain.accounting import calibrate_noise

    seen: list[tuple[float, float]] = []
    sigma = calibrate_noise(2.0, 1e-5, 0.01, 1000, progress=lambda s, e: seen.append((s, e)))
    assert len(seen) >= 3 and any(abs(s - sigma) < 1e-12 for s, _ in seen)  # the answer was one of them
    assert all(e > 2.0 for s, e in seen if s < sigma * (1 - 1e-9))  # below the answer: over the target
    with pytest.raises(ValueError, match="no noise multiplier up to 1e6 reaches epsilon 0.001"):
        calibrate_noise(1e-3, 1e-5, 0.5, 10_000, accountant="rdp")
