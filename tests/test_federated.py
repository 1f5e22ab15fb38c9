"""dptrain.federated on Flower's own simulation runtime (Ray backend): 10 virtual clients on digits, a few rounds.

Each run is Flower's ``run_simulation`` of the app in tests/fl_app (the one the deployment test ships to real
SuperNodes); the ServerApp writes what it saw to JSON. Client training is seeded per (seed, client, round), so the
test can redo a client's local training outside Flower and check the server's aggregate against a hand computation.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from federated_helpers import CLIPPED_RUN, SEED, arrays, load_app, local_update, norm, simulate
from test_report import _chromium

from dptrain.accounting import compute_epsilon
from dptrain.budget import BudgetLedger
from dptrain.federated import ClientCanaries
from dptrain.report.federated import validate_federated_card

K, Q = 10, 0.5


def test_noise_free_rounds_with_client_side_clipping_are_hand_computed_clipped_fedavg(clipped_run: dict):
    report, settings = clipped_run, CLIPPED_RUN
    k, q, clip = settings["num-clients"], settings["sample-rate"], settings["max-norm"]
    assert report["rounds_run"] == 2 and len(report["rounds"]) == 2
    for r, record in enumerate(report["rounds"], start=1):
        assert record["contributed"] == record["sampled"] and record["dropped"] == {}
        # The server only ever saw updates the clients had clipped: every norm it received is <= C.
        assert all(n <= clip * (1 + 1e-9) for n in record["norms"])
        before = arrays(report["globals"][r - 1])
        expected = {name: v.astype(np.float64) for name, v in before.items()}
        for client in record["sampled"]:
            update = local_update(before, client, r, k)
            assert norm(update) > clip
            for name in expected:  # FedAvgM: the global moves by server-lr times the clipped mean update
                expected[name] += settings["server-lr"] * update[name] * (clip / norm(update)) / (q * k)
        after = arrays(report["globals"][r])
        for name in expected:
            np.testing.assert_allclose(after[name], expected[name], rtol=0, atol=2e-6)
    assert report["epsilon"] == math.inf


def test_noised_rounds_match_sigma_c_over_q_k_stop_at_the_budget_and_are_accounted(tmp_path: Path):
    sigma, clip, delta = 1.0, 1.0, 1e-3
    ledger = BudgetLedger(tmp_path / "server.db")
    two_rounds = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    two_rounds.compose(dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(sigma)), 2)
    cap = two_rounds.get_epsilon(delta) * 1.02  # room for 2 rounds, not 3
    ledger.create("federation", epsilon=cap, delta=delta, privacy_unit="client")
    assert ledger.max_steps("federation", Q, sigma, client_level=True) == 2
    report = simulate(
        tmp_path, "noise", **{"num-clients": K, "sample-rate": Q, "num-rounds": 3, "noise-multiplier": sigma,
                              "max-norm": clip, "clipping": "server", "seed": SEED, "ledger": str(ledger.path),
                              "canaries": 300, "report-dir": str(tmp_path / "run")}
    )
    # The budget allowed 2 of the 3 rounds asked: the run stopped there and was charged 2 rounds.
    assert report["rounds_run"] == 2 and len(report["rounds"]) == 2 and len(report["globals"]) == 3
    [entry] = ledger.history("federation")
    assert (entry.status, entry.steps, entry.privacy_unit, entry.sample_rate) == ("spent", 2, "client", Q)
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(sigma)), 2)
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    # The run's privacy card and report: client-level, stopped by the budget, epsilon round by round.
    card = json.loads((tmp_path / "run" / "privacy_card.json").read_text())
    validate_federated_card(card)
    assert card["privacy_unit"]["unit"] == "client" and card["run"]["status"] == "budget_exhausted"
    assert card["guarantee"]["epsilon"] == report["epsilon"] and card["mechanism"]["rounds"] == 2
    assert card["guarantee"]["neighbouring_relation"] == "add or remove one client"
    assert len(card["epsilon_by_round"]) == 2 and 0 < card["epsilon_by_round"][0] < card["epsilon_by_round"][1]
    assert card["epsilon_by_round"][-1] == report["epsilon"] and card["audit"]["num_canaries"] == 300
    assert card["ledger"]["spent_epsilon"] <= card["ledger"]["cap_epsilon"] == cap
    assert "per client" in card["statement"] and "stopped after 2 of 3 planned rounds" in card["statement"]
    assert any("not against the server" in item for item in card["limitations"])
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", str(tmp_path / "run" / "report.html"),
                    profile=tmp_path / "profile").stdout  # fmt: skip
    assert 'data-images-loaded="1/1"' in dom and "Canary-client audit" in dom
    # The canary clients' audit ran on the final model, against the epsilon the run claims, and found no excess.
    audit = report["audit"]
    assert audit["num_canaries"] == 300 and audit["claimed_epsilon"] == report["epsilon"] and not audit["suspicious"]
    # The noise: new global - old global - (sum of clipped updates, canaries' included) / (q K), redone here, has
    # std sigma C / (q K). The canaries' picks replay from their seed.
    canaries = ClientCanaries(300, seed=SEED)
    residuals = []
    for r, record in enumerate(report["rounds"], start=1):
        before, after = arrays(report["globals"][r - 1]), arrays(report["globals"][r])
        injected = canaries.round_updates({k: v.astype(np.float64) for k, v in before.items()}, Q, clip)
        assert record["canaries"] == len(injected) > 0
        clipped_sum = {k: sum(u[k] for u in injected) for k in before}
        for client in record["contributed"]:
            update = local_update(before, client, r, K)
            scale = min(1.0, clip / norm(update))
            for k in clipped_sum:
                clipped_sum[k] += update[k] * scale
        residuals.append(np.concatenate(
            [(after[k].astype(np.float64) - before[k] - clipped_sum[k] / (Q * K)).ravel() for k in before]
        ))
    noise = np.concatenate(residuals)
    # 2 x 2410 coordinates: the sample std is within 5% of sigma C / (q K) = 0.2 with probability > 0.999 (seeded).
    assert noise.size == 2 * 2410
    assert np.std(noise) == pytest.approx(sigma * clip / (Q * K), rel=0.05)
    assert abs(np.mean(noise)) < 4 * 0.2 / math.sqrt(noise.size)


def test_sample_level_clients_are_charged_cumulatively_and_decline_when_their_budget_is_spent(tmp_path: Path):
    ledgers = tmp_path / "clients"
    report = simulate(
        tmp_path, "sample", **{"num-clients": K, "sample-rate": 0.6, "num-rounds": 4, "clipping": "none",
                               "seed": SEED, "sample-level-dir": str(ledgers), "sample-level-epsilon": 4.0}
    )
    assert report["rounds_run"] == 4
    times_sampled = {c: sum(c in s for s in report["sampled"]) for c in range(K)}
    declined = trained = 0
    for client, sampled in times_sampled.items():
        path = ledgers / f"client-{client}.db"
        history = BudgetLedger(path).history(f"client-{client}") if sampled else []
        # One settled entry per round the client trained in: its epsilon composes every round it took part in.
        assert all(e.status == "spent" and e.steps > 0 and e.privacy_unit == "example" for e in history)
        assert len(history) <= sampled
        if history:
            ledger = BudgetLedger(path)
            assert ledger.spent(f"client-{client}") <= 4.0
            if len(history) > 1:
                first = compute_epsilon(history[0].sample_rate, history[0].noise_multiplier, history[0].steps, 1e-3)
                assert ledger.spent(f"client-{client}") > first * 1.2
            if len(history) < sampled:  # it declined: another round would not have fitted its budget
                round_steps = math.ceil(len(load_app().data_fn(client, K)) / 32)  # Poisson at 1 / round_steps
                assert history[0].sample_rate == 1 / round_steps
                assert ledger.max_steps(f"client-{client}", 1 / round_steps, 1.0) < round_steps
                declined += 1
        trained += len(history)
    assert trained == sum(m["clients"] for m in report["train_metrics"].values())
    assert declined > 0 and trained > K // 2


def test_readme_example_stops_at_the_budget_and_prints_what_it_shows(tmp_path: Path, monkeypatch, capsys):
    from readme import readme_section

    section = readme_section("Federated learning")
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shown = section.split("\nprints `", 1)[1].split("`", 1)[0]
    monkeypatch.chdir(tmp_path)
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert shown in capsys.readouterr().out.splitlines()
    ledger = BudgetLedger(tmp_path / "privacy.db")
    [entry] = ledger.history("hospitals")
    assert (entry.status, entry.steps, entry.privacy_unit) == ("spent", 5, "client")
    assert ledger.max_steps("hospitals", 0.25, 1.5, client_level=True) == 0  # the budget allowed those 5 rounds
