"""Client-level DP-FedAvg's mechanism and the client partitions, without Flower's runtime (tests/test_federated.py
runs them on it): each aggregate against a per-client Python reference, the noise's std, the accounting, bad input."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from dptrain.federated import ClientLevelGaussian, ClientSampler, dirichlet_partition
from dptrain.federated.mechanism import clip_update, update_norm

DELTA = 1e-5


def _global(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"w": rng.normal(size=(8, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}


def _reference_mean(global_arrays, replies, clip, divisor):
    """The clipped mean update, one client at a time, in plain Python floats."""
    names = list(global_arrays)
    total = {n: np.zeros(global_arrays[n].shape) for n in names}
    for reply in replies:
        update = {n: reply[n].astype(np.float64) - global_arrays[n].astype(np.float64) for n in names}
        norm = math.sqrt(sum(float(x) ** 2 for n in names for x in update[n].ravel()))
        scale = min(1.0, clip / norm) if norm else 1.0
        for n in names:
            total[n] += update[n] * scale
    return {n: global_arrays[n].astype(np.float64) + total[n] / divisor for n in names}


def test_noise_free_round_is_the_clipped_mean_over_q_k_of_a_per_client_reference():
    rng = np.random.default_rng(0)
    global_arrays = _global(rng)
    mechanism = ClientLevelGaussian(num_clients=8, sample_rate=0.5, noise_multiplier=0.0, max_norm=1.0, seed=1)
    sampled = mechanism.sample(1)
    assert sampled and len(sampled) < 8
    # Small, large and adversarially large updates (1e30: the norm's squares overflow float32, not float64).
    scales = [0.01, 3.0, 1e30, 0.5, 1e-20, 7.0, 2.0, 1.0]
    replies = {c: {n: a + scales[c] * rng.normal(size=a.shape).astype(np.float32) for n, a in global_arrays.items()}
               for c in sampled}
    new = mechanism.aggregate(global_arrays, replies)
    expected = _reference_mean(global_arrays, [replies[c] for c in sorted(replies)], 1.0, 0.5 * 8)
    for n in global_arrays:
        assert new[n].dtype == np.float32
        np.testing.assert_allclose(new[n], expected[n].astype(np.float32), rtol=1e-6, atol=1e-6)
    record = mechanism.rounds[0]
    assert record.contributed == sorted(replies) and record.dropped == {}
    # No client moves the model by more than C / (q K), whatever it sends.
    move = update_norm({n: new[n].astype(np.float64) - global_arrays[n] for n in new})
    assert move <= len(sampled) * 1.0 / 4 + 1e-5


def test_clip_update_bounds_every_norm_and_keeps_small_updates():
    rng = np.random.default_rng(1)
    for scale in (1e-8, 0.3, 1.0, 5.0, 1e150):
        update = {"a": scale * rng.normal(size=(3, 4)), "b": scale * rng.normal(size=2)}
        clipped, norm = clip_update(update, 1.0)
        assert update_norm(clipped) <= 1.0 * (1 + 1e-12)
        if norm <= 1.0:
            assert all(np.array_equal(clipped[k], update[k]) for k in update)
        else:
            assert update_norm(clipped) == pytest.approx(1.0, rel=1e-12)


def test_noise_std_of_the_aggregate_is_sigma_c_over_q_k():
    # Clients that send the global model back contribute 0: what moves the model is the noise alone.
    global_arrays = {"w": np.zeros(40_000, dtype=np.float64)}
    mechanism = ClientLevelGaussian(num_clients=20, sample_rate=0.25, noise_multiplier=1.5, max_norm=0.4, seed=3)
    sampled = mechanism.sample(1)
    new = mechanism.aggregate(global_arrays, {c: global_arrays for c in sampled})
    expected = 1.5 * 0.4 / (0.25 * 20)
    # 40,000 draws: the sample std is within 2% of the truth with probability > 1 - 1e-9 (seeded).
    assert np.std(new["w"]) == pytest.approx(expected, rel=0.02)
    assert abs(np.mean(new["w"])) < 5 * expected / math.sqrt(40_000)


def test_seeded_rounds_repeat_and_seeds_differ():
    def run(seed):
        mechanism = ClientLevelGaussian(num_clients=10, sample_rate=0.3, noise_multiplier=1.0, max_norm=1.0, seed=seed)
        return mechanism.sample(1), mechanism.aggregate({"w": np.zeros(4)}, {})["w"]

    (s1, w1), (s2, w2), (_, w3) = run(5), run(5), run(6)
    assert s1 == s2 and np.array_equal(w1, w2)
    assert not np.array_equal(w1, w3)


def test_poisson_client_sampling_varies_includes_zero_and_matches_q():
    sampler = ClientSampler(num_clients=5, sample_rate=0.2, seed=0)
    counts = [len(sampler.sample()) for _ in range(4000)]
    # Binomial(5, 0.2): mean 1, P[0] = 0.328. Tolerances are > 5 standard errors of 4000 draws.
    assert np.mean(counts) == pytest.approx(1.0, abs=0.08)
    assert np.mean(np.array(counts) == 0) == pytest.approx(0.8**5, abs=0.04)
    assert ClientSampler(num_clients=3, sample_rate=1.0).sample() == [0, 1, 2]


def test_epsilon_is_dp_accountings_for_the_rounds_aggregated():
    mechanism = ClientLevelGaussian(num_clients=10, sample_rate=0.3, noise_multiplier=1.2, max_norm=1.0, seed=0)
    for r in range(1, 6):
        mechanism.sample(r)
        mechanism.aggregate({"w": np.zeros(3)}, {})
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(1.2)), 5
    )
    assert mechanism.epsilon(DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-6)
    assert mechanism.accountant.history == [(1.2, 0.3, 5)]


def test_malformed_replies_are_dropped_and_the_round_still_charged():
    global_arrays = {"w": np.zeros((2, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    mechanism = ClientLevelGaussian(num_clients=4, sample_rate=1.0, noise_multiplier=0.0, max_norm=1.0, seed=0)
    mechanism.sample(1)
    good = {"w": np.full((2, 2), 0.1, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    replies = {
        0: good,
        1: {"w": np.full((2, 2), np.nan, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)},
        2: {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)},
        3: {"w": np.zeros((2, 2), dtype=np.float32)},
    }
    new = mechanism.aggregate(global_arrays, replies)
    record = mechanism.rounds[0]
    assert record.contributed == [0] and set(record.dropped) == {1, 2, 3}
    assert "NaN" in record.dropped[1] and "shape" in record.dropped[2] and "missing ['b']" in record.dropped[3]
    np.testing.assert_allclose(new["w"], 0.1 / 4)  # divided by q K = 4, not by the one that contributed
    assert mechanism.accountant.steps == 1


def test_client_clipped_updates_over_the_norm_are_dropped():
    mechanism = ClientLevelGaussian(num_clients=2, sample_rate=1.0, noise_multiplier=0.0, max_norm=1.0, seed=0)
    mechanism.sample(1)
    inside, outside = {"w": np.array([0.6, 0.8])}, {"w": np.array([1.2, 1.6])}
    new = mechanism.aggregate({"w": np.zeros(2)}, {0: inside, 1: outside}, clipped_by_clients=True)
    assert mechanism.rounds[0].contributed == [0] and "not clipped" in mechanism.rounds[0].dropped[1]
    np.testing.assert_allclose(new["w"], [0.3, 0.4])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sample_rate": 0.0}, "in \\(0, 1\\]"),
        ({"sample_rate": 1.5}, "in \\(0, 1\\]"),
        ({"max_norm": 0.0}, "max_norm"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"num_clients": 0}, "num_clients"),
        ({"seed": 1, "secure_mode": True}, "secure_mode"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    settings = {"num_clients": 4, "sample_rate": 0.5, "noise_multiplier": 1.0, "max_norm": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        ClientLevelGaussian(**settings)


def test_misuse_of_rounds_is_refused():
    mechanism = ClientLevelGaussian(num_clients=4, sample_rate=0.5, noise_multiplier=1.0, max_norm=1.0, seed=2)
    with pytest.raises(RuntimeError, match="follows sample"):
        mechanism.aggregate({"w": np.zeros(2)}, {})
    sampled = mechanism.sample(1)
    outsider = next(c for c in range(4) if c not in sampled)
    with pytest.raises(ValueError, match="not sampled"):
        mechanism.aggregate({"w": np.zeros(2)}, {outsider: {"w": np.zeros(2)}})
    with pytest.raises(ValueError, match="integer buffers"):
        mechanism.aggregate({"steps": np.zeros(2, dtype=np.int64)}, {})
    mechanism.aggregate({"w": np.zeros(2)}, {})
    with pytest.raises(RuntimeError, match="once per round"):
        mechanism.aggregate({"w": np.zeros(2)}, {})
    assert mechanism.accountant.steps == 1


def test_secure_mode_draws_from_the_os():
    mechanism = ClientLevelGaussian(num_clients=4, sample_rate=1.0, noise_multiplier=1.0, max_norm=1.0, secure_mode=True)
    mechanism.sample(1)
    assert np.std(mechanism.aggregate({"w": np.zeros(10_000)}, {})["w"]) == pytest.approx(0.25, rel=0.05)


# -- partitions -------------------------------------------------------------------------------------------------------


def test_dirichlet_partition_is_a_seeded_non_iid_partition():
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(labels, 20, alpha=0.5, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))  # disjoint and complete
    assert min(len(p) for p in parts) >= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, dirichlet_partition(labels, 20, alpha=0.5, seed=0)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, dirichlet_partition(labels, 20, alpha=0.5, seed=1)))

    def mean_classes(alpha):
        split = dirichlet_partition(labels, 20, alpha=alpha, seed=0)
        # Classes holding 90% of a client's examples: few when non-IID, most of the 10 when IID.
        counts = [np.sort(np.bincount(labels[p], minlength=10))[::-1] for p in split]
        return np.mean([np.searchsorted(np.cumsum(c) / c.sum(), 0.9) + 1 for c in counts])

    assert mean_classes(0.1) < 3 < 8 < mean_classes(1000.0)


@pytest.mark.parametrize(
    "args, message",
    [
        (([], 3), "non-empty"),
        (([0, 1, 2], 0), "num_clients"),
        (([0, 1, 2], 2, 0.0), "alpha"),
        (([0, 1, 2], 4), "cannot give 4 clients"),
    ],
)
def test_dirichlet_partition_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        dirichlet_partition(*args)


# -- the strategy's settings (no runtime needed) ----------------------------------------------------------------------


def test_strategy_calibrates_sigma_and_keeps_sigma_and_c_fixed(tmp_path):
    from dptrain.accounting import compute_epsilon
    from dptrain.federated import DPFedAvg

    strategy = DPFedAvg(num_clients=100, sample_rate=0.1, max_norm=0.5, target_epsilon=2.0, delta=DELTA, num_rounds=50)
    assert 0.98 * 2.0 <= compute_epsilon(0.1, strategy.noise_multiplier, 50, DELTA) <= 2.0
    with pytest.raises(AttributeError):
        strategy.max_norm = 1.0  # a clipping norm changed mid-run: refused
    with pytest.raises(AttributeError):
        strategy.noise_multiplier = 0.1
    assert strategy.extra_config() == {"dptrain.clip-norm": 0.5, "dptrain.clipping": "server"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"noise_multiplier": 1.0, "clipping": "both"}, "'server' or 'client'"),
        ({}, "noise_multiplier=, or target_epsilon="),
        ({"target_epsilon": 1.0, "num_rounds": 10}, "noise_multiplier=, or target_epsilon="),
        ({"noise_multiplier": 1.0, "target_epsilon": 1.0, "delta": DELTA}, "not both"),
        ({"noise_multiplier": 1.0, "delta": 2.0}, "delta"),
        ({"noise_multiplier": 1.0, "budget": "x"}, "both ledger= and budget="),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0}, "in \\(0, 1\\]"),
        ({"noise_multiplier": 1.0, "max_norm": 0.0}, "max_norm"),
        ({"noise_multiplier": 1.0, "sample_rate": None, "clients_per_round": 3, "canaries": "any"}, "canary clients"),
        ({"noise_multiplier": 1.0, "num_clients": 1, "server_strategy": "fedavgm"}, "min_available_nodes=2"),
    ],
)
def test_strategy_bad_settings_are_refused(kwargs, message):
    from dptrain.federated import DPFedAvg

    from flwr.serverapp.strategy import FedAvgM

    from dptrain.federated import ClientCanaries

    settings = {"num_clients": 10, "sample_rate": 0.5, "max_norm": 1.0, **kwargs}
    if "canaries" in settings:
        settings["canaries"] = ClientCanaries(10)
    if "server_strategy" in settings:
        settings["server_strategy"] = FedAvgM()  # waits for 2 nodes by default
    with pytest.raises(ValueError, match=message):
        DPFedAvg(**settings)


def test_strategy_refuses_a_budget_that_does_not_protect_clients(tmp_path):
    from dptrain.budget import BudgetLedger
    from dptrain.federated import DPFedAvg

    ledger = BudgetLedger(tmp_path / "l.db")
    ledger.create("patients", 3.0, DELTA)
    with pytest.raises(ValueError, match="privacy_unit='client'"):
        DPFedAvg(num_clients=10, sample_rate=0.5, max_norm=1.0, noise_multiplier=1.0, ledger=ledger, budget="patients")


# -- fixed-size client sampling ---------------------------------------------------------------------------------------


def test_fixed_size_sampling_draws_m_distinct_clients_uniformly():
    sampler = ClientSampler(num_clients=8, sample_size=3, seed=4)
    draws = [sampler.sample() for _ in range(4000)]
    assert all(len(d) == 3 == len(set(d)) and d == sorted(d) for d in draws)
    frequency = np.bincount(np.concatenate(draws), minlength=8) / 4000
    np.testing.assert_allclose(frequency, 3 / 8, atol=0.03)  # > 4 standard errors


def test_fixed_size_rounds_divide_by_m_and_are_accounted_as_sampling_without_replacement():
    mechanism = ClientLevelGaussian(num_clients=10, clients_per_round=4, noise_multiplier=0.0, max_norm=1.0, seed=0)
    sampled = mechanism.sample(1)
    assert len(sampled) == 4 and mechanism.sampling == "fixed" and mechanism.accountant is None
    new = mechanism.aggregate({"w": np.zeros(2)}, {c: {"w": np.array([3.0, 4.0])} for c in sampled})
    np.testing.assert_allclose(new["w"], [0.6, 0.8])  # four updates clipped to norm 1, summed, divided by m = 4
    noisy = ClientLevelGaussian(num_clients=10, clients_per_round=4, noise_multiplier=1.3, max_norm=1.0, seed=0)
    for r in range(1, 4):
        noisy.sample(r)
        noisy.aggregate({"w": np.zeros(2)}, {})
    rdp = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    # Replace-one moves a sum of clipped updates by up to 2C: the Gaussian's multiplier for sensitivity 1 is sigma/2.
    rdp.compose(dp_accounting.SampledWithoutReplacementDpEvent(10, 4, dp_accounting.GaussianDpEvent(1.3 / 2)), 3)
    assert noisy.epsilon(DELTA) == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-12)


def test_fixed_size_strategy_calibrates_by_rdp_and_refuses_a_ledger(tmp_path):
    from dptrain.accounting import fixed_size_epsilon
    from dptrain.budget import BudgetLedger
    from dptrain.federated import DPFedAvg

    strategy = DPFedAvg(num_clients=100, clients_per_round=10, max_norm=1.0, target_epsilon=4.0, delta=DELTA, num_rounds=20)
    assert strategy.sampling == "fixed"
    assert 0.99 * 4.0 <= fixed_size_epsilon(100, 10, strategy.noise_multiplier, 20, DELTA) <= 4.0
    ledger = BudgetLedger(tmp_path / "l.db")
    ledger.create("hospitals", 3.0, DELTA, privacy_unit="client")
    with pytest.raises(ValueError, match="replace-one guarantee"):
        DPFedAvg(num_clients=10, clients_per_round=3, max_norm=1.0, noise_multiplier=1.0, ledger=ledger, budget="hospitals")
    with pytest.raises(ValueError, match="one of them"):
        DPFedAvg(num_clients=10, sample_rate=0.3, clients_per_round=3, max_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="clients_per_round must be an integer in \\[1, 10\\]"):
        DPFedAvg(num_clients=10, clients_per_round=11, max_norm=1.0, noise_multiplier=1.0)


# -- canary clients ---------------------------------------------------------------------------------------------------


def _audited_run(true_sigma: float, claimed_sigma: float, seed: int):
    from dptrain.accounting import compute_epsilon
    from dptrain.federated import ClientCanaries

    rounds, q, k = 20, 0.5, 20
    rng = np.random.default_rng(seed)
    initial = {"w": rng.normal(size=(40, 50)), "b": np.zeros(50)}
    canaries = ClientCanaries(1000, seed=seed)
    mechanism = ClientLevelGaussian(num_clients=k, sample_rate=q, noise_multiplier=true_sigma, max_norm=1.0, seed=seed)
    arrays = initial
    for r in range(1, rounds + 1):
        sampled = mechanism.sample(r)
        replies = {c: {n: a + rng.normal(scale=0.05, size=a.shape) for n, a in arrays.items()} for c in sampled}
        before = canaries.participations.sum()
        arrays = mechanism.aggregate(arrays, replies, injected=canaries.round_updates(arrays, q, 1.0))
        assert mechanism.rounds[-1].canaries == canaries.participations.sum() - before
    claimed = compute_epsilon(q, claimed_sigma, rounds, DELTA)
    return canaries, canaries.audit(initial, arrays, claimed_epsilon=claimed, delta=DELTA)


def test_canary_clients_flag_a_run_with_a_quarter_of_its_noise_and_not_a_correct_one():
    from dptrain.accounting import calibrate_noise

    sigma = calibrate_noise(1.0, DELTA, 0.5, 20)
    for seed in (0, 1):
        canaries, correct = _audited_run(sigma, sigma, seed)
        assert canaries.rounds == 20 and canaries.participations[~canaries.included].sum() == 0
        assert canaries.participations[canaries.included].mean() == pytest.approx(10, abs=1.5)  # q R
        assert not correct.suspicious and correct.empirical_epsilon_lower_bound <= correct.claimed_epsilon
        _, broken = _audited_run(sigma / 4, sigma, seed)
        assert broken.suspicious, broken.message()
        assert broken.audit == "client-level canary clients" and broken.num_guesses == 200


def test_support_chat_corpus_split_by_user_gives_each_client_one_users_conversations():
    from dptrain.federated import partition_by_user, support_chat_clients
    from dptrain.lm import SimpleTokenizer, support_chat_corpus
    from dptrain.lm.corpus import vocabulary_text

    assert [p.tolist() for p in partition_by_user([3, 1, 3, 2, 1])] == [[1, 4], [3], [0, 2]]
    tokenizer = SimpleTokenizer.from_texts([vocabulary_text()])
    clients = support_chat_clients(tokenizer, num_users=12, max_length=64, seed=3)
    users = support_chat_corpus(num_users=12, validation_users=0, seed=3).user_ids("train")
    assert len(clients) == len(set(users)) == 12
    assert sorted(i for c in clients for i in c.indices) == list(range(len(users)))  # disjoint and complete
    assert all(len({users[i] for i in c.indices}) == 1 for c in clients)  # one user per client
    input_ids, attention_mask = clients[0][0]
    assert input_ids.shape == attention_mask.shape == (64,)
    with pytest.raises(ValueError, match="non-empty"):
        partition_by_user([])


def test_a_sample_level_client_declines_a_replayed_round_and_charges_it_once(tmp_path):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from dptrain.budget import BudgetLedger
    from dptrain.federated import SampleLevelDP
    from dptrain.federated.client import round_generator, train_privately

    privacy = SampleLevelDP(1.0, 1.0, epsilon=50.0, delta=DELTA, ledger_dir=str(tmp_path), seed=9)
    data = TensorDataset(torch.randn(40, 5), torch.randint(0, 2, (40,)))

    def round_of(server_round: int) -> float | None:
        torch.manual_seed(0)
        return train_privately(nn.Linear(5, 2), data, 3, privacy, 1, 8, 0.1, nn.functional.cross_entropy,
                               round_generator(privacy.seed, 3, server_round))  # fmt: skip

    first = round_of(1)
    assert first is not None and first > 0
    assert round_of(1) is None  # the same round again: the same noise stream, refused before any step
    second = round_of(2)
    assert second is not None and second > first
    history = BudgetLedger(tmp_path / "client-3.db").history("client-3")
    assert [e.status for e in history] == ["spent", "spent"] and len({e.seed for e in history}) == 2
    # The client's epsilon after round 2 is its accountant over both rounds, as dp_accounting composes them.
    from dptrain.accounting import composed_event, epsilon_of_event

    assert second == pytest.approx(epsilon_of_event(composed_event([e.record() for e in history]), DELTA), rel=1e-9)
    assert first == pytest.approx(epsilon_of_event(composed_event([history[0].record()]), DELTA), rel=1e-9)
