"""Issue #5 acceptance, end to end on scikit-learn's digits (seeded; every number below was measured on 2 CPU cores).

Setup (``dptrain.audit.digits``): 400 examples of the training split become mislabelled canaries, each included in
training with probability 1/2; the other 1037 are the real training set and the 360 test digits stay held out.
``audit_training_run`` trains once and runs the one-run audit (k+ = k- = 40 guesses), the loss-threshold attack on
the canaries and the loss-threshold attack train vs test, each at significance 0.05 / 3.

Three runs, all with the same data and canaries:

- non-private, 200 epochs (overfits: train accuracy 100 %, test 83 %): measured train/test MIA AUC 0.675,
  one-run 80/80 correct, lower bound 2.93. Asserted: AUC > 0.6, bound > 1.
- "broken engine": dptrain's engine at eps = 1 (noise calibrated, accountant fed, get_epsilon = 0.991) with its
  Gaussian draws monkeypatched to zero, 60 epochs. Measured 75/80 correct, lower bound 1.75 > 0.991 claimed.
  Asserted: the run is flagged (warning issued, ``suspicious``), bound > claimed eps.
- correct eps = 1, 60 epochs: measured 45/80 correct (chance is 40), lower bound 0, train/test AUC 0.525, canary
  AUC 0.551. Asserted: not flagged, no warning, train/test MIA AUC <= 0.55, one-run bound <= 1.

Margins: a bound above 1 with r = 80 guesses at significance 0.05/3 needs about 68 correct, so the broken run
(75) and the non-private run (80) clear it by 7+ guesses; the correct run's guesses are at chance. The train/test
AUC has a standard error of about 0.017 (1037 vs 360 examples). Over data/training seeds 0..5 (same settings) the
measured ranges were: non-private AUC 0.637-0.675 and bound 2.53-2.93; broken 74-78 of 80 correct, bound
1.63-2.26, always flagged; correct eps = 1 AUC 0.517-0.530, bound 0 (44-50 of 80 correct), never flagged. The
canary attack's AUC at eps = 1 was 0.52-0.57: allowed by DP (an eps = 1 attack can reach AUC 0.73), so the
"AUC <= 0.55" acceptance check uses the train/test attack, the one that measures leakage of the real data.
"""

from __future__ import annotations

import io
import json
import math
import warnings

import pytest
import torch

from dptrain.audit import PrivacyViolationWarning, audit_training_run
from dptrain.cli.audit import EXIT_SUSPICIOUS, add_audit_arguments, run_audit_command
from dptrain.audit.digits import digits_audit_data, make_digits_train_fn
from dptrain.randomness import RandomSource

NUM_CANARIES = 400
DP_EPOCHS = 60
NONPRIVATE_EPOCHS = 200
DELTA = 1e-5


@pytest.fixture(scope="module")
def data():
    return digits_audit_data(NUM_CANARIES, seed=0)


def _audit(data, epsilon, epochs, name):
    train, test, canaries = data
    return audit_training_run(
        make_digits_train_fn(epsilon, delta=DELTA, epochs=epochs, seed=0), train, canaries,
        delta=DELTA, test_set=test, name=name,
    )[1]


def test_nonprivate_overfit_model_leaks(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivacyViolationWarning)  # claims eps = inf: never a violation
        report = _audit(data, None, NONPRIVATE_EPOCHS, "non-private")
    assert math.isinf(report.claimed_epsilon)
    assert report.membership.auc > 0.6
    assert report.empirical_epsilon_lower_bound > 1.0
    assert report.canary_membership.auc > 0.9
    assert not report.suspicious


def test_engine_with_noise_switched_off_is_flagged(data, monkeypatch):
    monkeypatch.setattr(
        RandomSource, "normal", lambda self, shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device)
    )
    with pytest.warns(PrivacyViolationWarning, match="PROBABLE PRIVACY BUG"):
        report = _audit(data, 1.0, DP_EPOCHS, "broken")
    assert 0.9 <= report.claimed_epsilon <= 1.0  # the engine's accountant still believes in its noise
    assert report.one_run.suspicious and report.suspicious
    assert report.empirical_epsilon_lower_bound > report.claimed_epsilon


def test_correct_eps1_run_is_not_flagged(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivacyViolationWarning)
        report = _audit(data, 1.0, DP_EPOCHS, "eps=1")
    assert 0.9 <= report.claimed_epsilon <= 1.0
    assert not report.suspicious
    assert report.membership.auc <= 0.55
    assert report.empirical_epsilon_lower_bound <= 1.0
    assert not report.canary_membership.violates_bound and not report.membership.violates_bound
    # The run's false-alarm rate is bounded by its significance over all three checks (Bonferroni): each check is
    # run at a third of it.
    checks = (report.one_run, report.canary_membership, report.membership)
    assert report.significance == 0.05 and all(c.significance == pytest.approx(0.05 / 3) for c in checks)


def _args(argv):
    import argparse

    return add_audit_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_json_in_process():
    out = io.StringIO()
    code = run_audit_command(_args(["--quick", "--json", "--canaries", "100", "--epochs", "8", "--lira", "3"]), out)
    payload = json.loads(out.getvalue())
    assert code == 0 and payload["suspicious"] is False
    assert set(payload["lira"]) == {"non-private", "eps=1"}
    assert 0.0 <= payload["lira"]["eps=1"]["online"]["auc"] <= 1.0
    names = [run["name"] for run in payload["runs"]]
    assert names == ["non-private", "eps=1"]
    private = payload["runs"][1]
    assert 0.9 <= private["claimed_epsilon"] <= 1.0
    assert payload["runs"][0]["claimed_epsilon"] is None  # infinite: JSON null
    for run in payload["runs"]:
        assert 0.0 <= run["membership"]["auc"] <= 1.0 and run["one_run"]["num_guesses"] == 20
        assert set(run["membership"]["tpr_at_fpr"]) == {"0.001", "0.01"}


def test_cli_table_and_exit_status_when_broken(monkeypatch):
    monkeypatch.setattr(
        RandomSource, "normal", lambda self, shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device)
    )
    out = io.StringIO()
    code = run_audit_command(_args(["--no-nonprivate", "--epsilon", "1", "--canaries", "400", "--epochs", "60"]), out)
    text = out.getvalue()
    assert code == EXIT_SUSPICIOUS
    assert "SUSPICIOUS" in text and "PROBABLE PRIVACY BUG" in text
    assert text.splitlines()[1].split()[:3] == ["run", "claimed", "eps"]


def test_cli_audits_a_saved_model(tmp_path):
    from dptrain.audit.digits import digits_mlp

    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(digits_mlp().state_dict(), path)  # an untrained model: nothing to leak
    out = io.StringIO()
    code = run_audit_command(_args(["--load", str(path), "--claimed-epsilon", "1", "--json", "--curves"]), out)
    payload = json.loads(out.getvalue())
    assert code == 0 and payload["suspicious"] is False
    assert abs(payload["membership"]["auc"] - 0.5) < 0.06  # 1437 vs 360 examples: standard error ~0.017
    assert payload["membership"]["bound_epsilon"] == 2.0  # train/test split: the replace-one guarantee
    assert len(payload["membership"]["roc"]["fpr"]) == len(payload["membership"]["roc"]["bound_tpr"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A short DP run of the demo's architecture (64-32-10 tanh on inputs mapped to [-1, 1]) written by the runner."""
    from dptrain.app import DatasetConfig, ModelConfig, PrivacyConfig, RunConfig, TrainingConfig, run_training

    run_dir = tmp_path_factory.mktemp("audited") / "run"
    config = RunConfig(
        name="audited", dataset=DatasetConfig(scale_to=(-1.0, 1.0)), model=ModelConfig(hidden=(32,), activation="tanh"),
        training=TrainingConfig(epochs=2, batch_size=700), privacy=PrivacyConfig(delta=1e-5, noise_multiplier=2.0),
    )  # fmt: skip
    result = run_training(config, output_dir=run_dir, handle_signals=False)
    return run_dir, result.summary


@pytest.mark.parametrize("target", ["", "model.pt", "checkpoint.pt"])
def test_cli_audits_a_model_dptrain_train_wrote_on_its_own_split(trained_run, target):
    """The run's architecture, data, split and claimed epsilon come from its run.json."""
    run_dir, summary = trained_run
    out = io.StringIO()
    assert run_audit_command(_args(["--load", str(run_dir / target), "--json"]), out) == 0
    payload = json.loads(out.getvalue())
    assert payload["claimed_epsilon"] == pytest.approx(summary["privacy"]["epsilon"])
    membership = payload["membership"]
    assert membership["num_members"] == summary["dataset"]["num_train"] == 1437
    assert membership["num_nonmembers"] == summary["dataset"]["num_test"]
    assert payload["test_accuracy"] == pytest.approx(summary["results"]["test_accuracy"])  # the same model and split


def test_cli_audit_refuses_what_it_cannot_audit_with_the_reason(trained_run, tmp_path, capsys):
    from dptrain.cli import main

    run_dir, _ = trained_run
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.pt").write_bytes((run_dir / "model.pt").read_bytes())  # no run.json beside it
    (tmp_path / "notes.txt").write_text("not a model")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "suite.json").write_text(json.dumps({"format": "dptrain-suite/1", "runs": ["nonprivate", "eps3"]}))
    cases = [
        (tmp_path / "missing", "does not exist"),
        (lone / "model.pt", "holds no run.json"),
        (tmp_path / "notes.txt", "holds no run.json"),
        (demo, "a demo directory of several runs: pass one of them (nonprivate, eps3)"),
    ]
    for path, message in cases:
        assert main(["audit", "--load", str(path)]) == 2
        assert message in capsys.readouterr().err, path
