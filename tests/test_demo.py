"""The demo (``make demo`` = ``dptrain demo``), in its ``--quick`` form: non-private and eps = 3 on digits, each
audited, the DP run charged to the ledger, one report, a privacy card per model, the report path printed last.

Accuracies were measured with the recipe of ``dptrain.app.demo.train_digits`` (seed 0, 2 CPU cores): non-private
96.7 %, eps = 3 92.5 %; the bounds below leave room for a better recipe and for platform noise.
"""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

from dptrain.budget import BudgetLedger
from dptrain.cli import main
from dptrain.app.demo import train_digits
from dptrain.report.card import validate_card

SRC = Path(__file__).parents[1] / "src"


def test_quick_demo_trains_audits_charges_the_ledger_and_prints_the_report_path(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.rstrip().splitlines()[-1] == f"report: {out / 'report.html'}"
    assert (out / "report.html").is_file()
    suite = json.loads((out / "suite.json").read_text())
    assert suite["runs"] == ["nonprivate", "eps3"] and suite["status"] == "completed"

    plain = json.loads((out / "nonprivate" / "run.json").read_text())
    dp = json.loads((out / "eps3" / "run.json").read_text())
    assert plain["status"] == dp["status"] == "completed"
    assert not plain["privacy"]["differentially_private"] and plain["ledger"] is None
    assert 0.99 * 3 <= dp["privacy"]["epsilon"] <= 3 and dp["privacy"]["delta"] == 1e-5
    assert plain["results"]["test_accuracy"] > 0.93 and dp["results"]["test_accuracy"] > 0.85
    for run in (plain, dp):  # each model audited; a correct DP run is never flagged
        assert run["audit"]["num_members"] == 1437 and run["audit"]["num_nonmembers"] == 360
    assert not dp["audit"]["violates_bound"] and dp["audit"]["auc"] < 0.56

    ledger = BudgetLedger(out / "privacy.db", create=False)
    (entry,) = ledger.history("digits")  # only the DP run is charged
    assert entry.status == "spent" and entry.steps == dp["privacy"]["steps"]
    assert ledger.budget("digits").epsilon == 4.0  # 1.25 x the sum of the demo's epsilons, rounded up
    assert ledger.spent("digits") <= 3.0 * 1.001

    for name in ("nonprivate", "eps3"):
        validate_card(json.loads((out / name / "privacy_card.json").read_text()))
        assert (out / name / "privacy_card.md").is_file() and (out / name / "checkpoint.pt").is_file()
    for expected in ("non-private", "eps=3", "privacy cards:", "budget 'digits' spent eps"):
        assert expected in stdout, expected


def test_demo_refuses_a_non_empty_output_dir(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_train_digits_is_the_one_recipe_entry_point_and_writes_nothing_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train_digits(None, epochs=3)
    batch_size = inspect.signature(train_digits).parameters["batch_size"].default  # the recipe's
    assert result["status"] == "completed" and math.isinf(result["epsilon"])
    assert result["steps"] == 3 * math.ceil(1437 / batch_size)
    assert result["noise_multiplier"] is None and result["run_dir"] is None
    assert 0.5 < result["test_accuracy"] <= 1.0
    assert list(tmp_path.iterdir()) == []


def test_python_dash_m_dptrain_demo_is_the_cli_demo():
    done = subprocess.run(
        [sys.executable, "-m", "dptrain", "demo", "--help"], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: dptrain demo")
