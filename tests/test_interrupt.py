"""Ctrl-C stops a run cleanly: the current step finishes, a checkpoint is written, the ledger reservation is settled
to the steps actually taken, and a partial report and privacy card marked "interrupted" are produced; exit 130.

The end-to-end test starts ``dptrain train`` in a subprocess, waits until it has logged its first epoch, sends
SIGINT and checks every artefact. The others exercise the same path in-process (a stop request, a second signal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dptrain.budget import BudgetLedger
from dptrain.report.card import validate_card
from dptrain.app import (
    INTERRUPTED,
    DatasetConfig,
    LedgerConfig,
    PrivacyConfig,
    RunConfig,
    StopRequest,
    TrainingConfig,
    run_training,
    stop_on_signals,
)

SRC = Path(__file__).parents[1] / "src"

# Fixed noise (no calibration): the ledger reserves every step budget "b" allows (about 10^4), far more than the
# test lets it take, so only Ctrl-C can end it.
CONFIG = """
name = "long-run"
[dataset]
name = "digits"
[training]
epochs = 5000
batch_size = 256
[privacy]
noise_multiplier = 5.0
delta = 1e-5
[ledger]
path = "{ledger}"
budget = "b"
cap = 20.0
"""


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_sigint_to_dptrain_train_stops_cleanly(tmp_path):
    config = tmp_path / "long.toml"
    config.write_text(CONFIG.format(ledger=tmp_path / "privacy.db"))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dptrain", "train", str(config), "--output-dir", str(out), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        metrics = out / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2 or process.poll() is not None,
                  120, "the first epochs")
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "interrupted: stopped after the current step" in stdout
    assert f"report: {out / 'report.html'}" in stdout

    run = json.loads((out / "run.json").read_text())
    steps = run["privacy"]["steps"]
    assert run["status"] == INTERRUPTED
    assert 12 <= steps < run["privacy"]["planned_steps"] == 5000 * 6
    assert run["history"][-1]["step"] == steps  # the partial epoch is recorded too

    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["status"] == INTERRUPTED and checkpoint["steps"] == steps
    assert set(checkpoint) >= {"model", "optimizer", "privacy", "config"}
    assert sum(r[2] for r in checkpoint["privacy"]["accountant"]["history"]) == steps

    ledger = BudgetLedger(tmp_path / "privacy.db", create=False)
    (entry,) = ledger.history("b")
    assert entry.status == "spent" and entry.steps == steps and entry.planned_steps > 10 * steps  # settled
    assert run["ledger"]["entry_status"] == "spent"

    page = (out / "report.html").read_text()
    assert "This run was interrupted" in page
    card = json.loads((out / "privacy_card.json").read_text())
    validate_card(card)
    assert card["run"]["status"] == INTERRUPTED and card["mechanism"]["steps"] == steps
    assert f"interrupted after {steps} of 30000 planned steps" in card["statement"]
    assert "**Status: INTERRUPTED**" in (out / "privacy_card.md").read_text()


class _StopAfter:
    """A display that requests a stop once ``steps`` steps are done (as the SIGINT handler would)."""

    def __init__(self, request: StopRequest, steps: int) -> None:
        self.request, self.steps, self.messages = request, steps, []

    def start(self, name, total_steps, info):
        pass

    def advance(self, steps_done):
        if steps_done == self.steps:
            self.request.set(INTERRUPTED, signal.SIGINT)

    def epoch(self, record):
        pass

    def message(self, text):
        self.messages.append(text)

    def stop(self):
        pass


def test_a_stop_request_mid_epoch_settles_exactly_the_steps_taken(tmp_path):
    stop = StopRequest()
    display = _StopAfter(stop, 4)
    config = RunConfig(
        name="x", dataset=DatasetConfig(), training=TrainingConfig(epochs=50, batch_size=256),
        privacy=PrivacyConfig(delta=1e-5, target_epsilon=None, noise_multiplier=10.0),
        ledger=LedgerConfig(str(tmp_path / "l.db"), "b", cap=5.0),
    )
    result = run_training(config, display=display, stop=stop, handle_signals=False, write_files=False)
    assert result.status == INTERRUPTED and result.exit_code == 130
    assert result.summary["privacy"]["steps"] == 4
    (epoch,) = result.summary["history"]  # one partial epoch: 4 of the 6 steps of an epoch
    assert epoch["step"] == 4 and epoch["epoch"] == pytest.approx(4 / 6, abs=1e-4)
    (entry,) = BudgetLedger(tmp_path / "l.db").history("b")
    assert entry.status == "spent" and entry.steps == 4
    assert any("interrupted" in m for m in display.messages)


def test_first_signal_requests_a_stop_second_aborts_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for(lambda: bool(stop), 5, "the stop request")
        assert stop.reason == INTERRUPTED and stop.signal_number == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises in the main thread long before this ends
    assert signal.getsignal(signal.SIGINT) is before


def test_an_abort_mentions_a_ledger_only_when_the_run_has_one(tmp_path, monkeypatch, capsys):
    """A Ctrl-C the clean shutdown does not catch (the second one; or one in a command that does not train) exits
    130; the message names the ledger reservation kept in full only when there is one."""
    import dptrain.accounting
    import dptrain.app.train
    from dptrain.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dptrain.accounting, "calibrate_noise", interrupted)
    args = ["calibrate", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "100"]
    assert main(args) == 130
    assert capsys.readouterr().err.strip() == "dptrain calibrate: interrupted"

    monkeypatch.setattr(dptrain.app.train, "evaluate", interrupted)  # at the end of the first epoch
    for with_ledger in (False, True):
        config = tmp_path / f"run-{with_ledger}.toml"
        text = CONFIG.format(ledger=tmp_path / "privacy.db").replace("epochs = 5000", "epochs = 1")
        config.write_text(text if with_ledger else text.split("[ledger]")[0])
        assert main(["train", str(config), "--output-dir", str(tmp_path / f"out-{with_ledger}")]) == 130
        err = capsys.readouterr().err
        assert "dptrain train: interrupted" in err
        assert ("ledger entry 1 of budget 'b'" in err and "keeps the run's whole reservation" in err) is with_ledger
        assert ("ledger" in err) is with_ledger
    (entry,) = BudgetLedger(tmp_path / "privacy.db", create=False).history("b")
    assert entry.status == "reserved"  # kept in full: the ledger never under-counts
