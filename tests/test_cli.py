"""The ``dptrain`` command line: numbers match dp_accounting, --json parses, budgets round-trip, errors exit 1 or 2."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from readme import readme_section
from dptrain.accounting import compute_epsilon
from dptrain.cli import main

SRC = Path(__file__).parents[1] / "src"
EPSILON_ARGS = ["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "10000", "--delta", "1e-5"]


def _run_json(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object, on one line
    return json.loads(out)


def _dp_accounting_epsilon(accountant: dp_accounting.PrivacyAccountant) -> float:
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 10000
        )
    )
    return accountant.get_epsilon(1e-5)


def test_epsilon_matches_dp_accounting(capsys):
    out = _run_json(capsys, EPSILON_ARGS)
    assert out["accountant"] == "pld" and out["delta"] == 1e-5 and out["steps"] == 10000
    assert out["epsilon"] == pytest.approx(_dp_accounting_epsilon(pld.PLDAccountant()), rel=1e-6)
    out = _run_json(capsys, [*EPSILON_ARGS, "--accountant", "rdp"])
    assert out["accountant"] == "rdp"
    assert out["epsilon"] == pytest.approx(_dp_accounting_epsilon(rdp.RdpAccountant()), rel=1e-12)
    assert out["epsilon"] == pytest.approx(6.7128, abs=1e-4)


def test_epsilon_text_output(capsys):
    assert main(EPSILON_ARGS) == 0
    assert capsys.readouterr().out.startswith("epsilon = 6.18")


def test_epsilon_with_group_size(capsys):
    args = ["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "2.0", "--steps", "100", "--delta", "1e-5"]
    out = _run_json(capsys, [*args, "--group-size", "2"])
    assert out["group_size"] == 2
    assert out["epsilon"] == compute_epsilon(0.01, 2.0, 100, 1e-5, group_size=2)


def test_python_dash_m_prints_one_json_object():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "dptrain", *EPSILON_ARGS, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) >= {"epsilon", "delta", "accountant"}
    assert out["epsilon"] == pytest.approx(6.19, abs=0.01)


def test_calibrate_by_epochs(capsys):
    # The README section calibrates with --steps 100; 10 epochs at rate 0.1 must be the same 100 steps.
    argv = ["calibrate", "--target-epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.1", "--epochs", "10"]
    out = _run_json(capsys, [*argv, "--accountant", "rdp"])
    assert out["steps"] == 100  # not 101 from a floating-point 100.00000000000001
    assert out["accountant"] == "rdp"
    assert 0.99 * 2 <= out["epsilon"] <= 2
    assert out["epsilon"] == compute_epsilon(0.1, out["noise_multiplier"], 100, 1e-5, accountant="rdp")


def test_budget_create_spend_show_history_round_trip(tmp_path, capsys):
    ledger = ["--ledger", str(tmp_path / "privacy.db")]
    created = _run_json(capsys, ["budget", "create", "patients", "--epsilon", "3", "--delta", "1e-5", *ledger])
    assert (created["name"], created["epsilon"], created["delta"]) == ("patients", 3.0, 1e-5)
    spend = ["--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "1000"]
    first = _run_json(capsys, ["budget", "spend", "patients", *spend, "--note", "tuning run 1", *ledger])
    assert first["entry"] == 1
    assert first["spent"] == pytest.approx(compute_epsilon(0.01, 1.0, 1000, 1e-5), rel=1e-2)
    second = _run_json(capsys, ["budget", "spend", "patients", *spend, "--note", "tuning run 2", *ledger])
    assert first["spent"] < second["spent"] < 2 * first["spent"]
    shown = _run_json(capsys, ["budget", "show", "patients", *ledger])
    assert shown["spent"] == second["spent"]
    assert shown["remaining"] == pytest.approx(3 - second["spent"])
    assert shown["entries"] == 2
    assert [b["name"] for b in _run_json(capsys, ["budget", "show", *ledger])["budgets"]] == ["patients"]
    history = _run_json(capsys, ["budget", "history", "patients", *ledger])
    assert [e["note"] for e in history["entries"]] == ["tuning run 1", "tuning run 2"]
    assert all(e["status"] == "spent" and e["steps"] == 1000 for e in history["entries"])
    assert main(["budget", "history", "patients", *ledger]) == 0
    assert "tuning run 2" in capsys.readouterr().out
    closed = _run_json(capsys, ["budget", "close", "patients", *ledger])
    assert closed["closed_at"] is not None


def test_budget_refusal_exits_1_with_message_and_records_nothing(tmp_path, capsys):
    ledger = ["--ledger", str(tmp_path / "privacy.db")]
    assert main(["budget", "create", "patients", "--epsilon", "1", "--delta", "1e-5", *ledger]) == 0
    capsys.readouterr()
    code = main(
        ["budget", "spend", "patients", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "10000", *ledger]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert "would be exceeded" in captured.err and "cap epsilon=1" in captured.err
    assert _run_json(capsys, ["budget", "show", "patients", *ledger])["entries"] == 0


EPS = ["epsilon", "--steps", "1", "--delta", "1e-5"]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        ([], 2, "required"),
        (["epsilon", "--sample-rate", "0.01"], 2, "required"),
        ([*EPS, "--sample-rate", "x", "--noise-multiplier", "1"], 2, "invalid float value"),
        ([*EPS, "--sample-rate", "2", "--noise-multiplier", "1"], 2, "sample_rate"),
        ([*EPS, "--sample-rate", "0.1", "--noise-multiplier", "0"], 2, "not private"),
        ([*EPS, "--sample-rate", "0.1", "--noise-multiplier", "1", "--group-size", "0"], 2, "group_size"),
        (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "1", "--delta", "0"], 2, "delta"),
        (["calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.1"], 2, "--steps --epochs"),
        (["calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "0", "--epochs", "3"], 2, "epochs"),
        (["budget", "show", "x", "--ledger", "{tmp}/missing.db"], 1, "no privacy ledger"),
        (["budget", "create", "x", "--epsilon", "-1", "--delta", "1e-5", "--ledger", "{tmp}/l.db"], 2, "epsilon"),
        (["budget", "frobnicate", "--ledger", "{tmp}/l.db"], 2, "invalid choice"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message(tmp_path, capsys, argv, code, message):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == code
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


def test_unknown_budget_and_duplicate_create_exit_1(tmp_path, capsys):
    ledger = ["--ledger", str(tmp_path / "privacy.db")]
    assert main(["budget", "create", "patients", "--epsilon", "3", "--delta", "1e-5", *ledger]) == 0
    assert main(["budget", "create", "patients", "--epsilon", "3", "--delta", "1e-5", *ledger]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["budget", "history", "nobody", *ledger]) == 1
    assert "no budget named 'nobody'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["--help"], ["epsilon", "--help"], ["calibrate", "--help"], ["budget", "spend", "--help"]]
)
def test_help_shows_an_example(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: dptrain" in out
    if len(argv) > 1:
        assert "example:\n  dptrain " in out


HEAVY = ("torch", "dp_accounting", "matplotlib", "transformers", "rich")


@pytest.mark.parametrize(
    "argv",
    [["--help"], *([command, "--help"] for command in ("demo", "train", "report", "epsilon", "calibrate", "audit",
                                                        "experiment")), ["budget", "create", "--help"]],
)
def test_help_loads_no_heavy_library(argv):
    """Answering --help needs argparse only: torch, dp_accounting, matplotlib, transformers and rich load when a
    command runs (each is a second or more of a cold start)."""
    code = (
        "import sys\nfrom dptrain.cli import main\ncode = main(sys.argv[1:])\n"
        f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))\nraise SystemExit(code)"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    assert "usage: dptrain" in done.stdout and done.stdout.rstrip().endswith("LOADED []"), done.stdout[-300:]


def test_an_accounting_command_loads_no_torch():
    code = (
        "import sys\nfrom dptrain.cli import main\n"
        f"code = main({EPSILON_ARGS!r})\nprint('TORCH', 'torch' in sys.modules)\nraise SystemExit(code)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0 and done.stdout.rstrip().endswith("TORCH False"), done.stdout + done.stderr


def test_the_parser_spells_the_library_choices_as_the_library_does():
    from dptrain.accounting import ACCOUNTANTS
    from dptrain.budget import PRIVACY_UNITS
    from dptrain.cli import common

    assert common.ACCOUNTANTS == ACCOUNTANTS and common.PRIVACY_UNITS == PRIVACY_UNITS


def _rounded(text: str) -> str:
    """``text`` with decimals cut to 4 significant digits: last-digit drift across platforms is not a doc error."""
    return re.sub(r"\d+\.\d+", lambda m: f"{float(m.group()):.4g}", text)


def test_readme_section_commands_run_and_print_what_they_show(tmp_path, monkeypatch, capsys):
    text = readme_section("Privacy budgets")
    block = re.search(r"```console\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    commands = re.split(r"^\$ ", block, flags=re.M)[1:]
    assert len(commands) >= 5
    for command in commands:
        line, _, shown = command.partition("\n")
        argv = shlex.split(line)
        assert argv[0] == "dptrain"
        assert main(argv[1:]) == 0, line
        out = capsys.readouterr().out
        if "--json" in argv:
            json.loads(out)
        if shown:
            assert _rounded(out) == _rounded(shown), line


def test_audit_is_delegated_to_the_audit_command(capsys):
    assert main(["audit", "--help"]) == 0
    assert "usage: dptrain audit" in capsys.readouterr().out
    code = main(["audit", "--quick", "--json", "--canaries", "60", "--epochs", "3", "--no-nonprivate", "--guesses", "10"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["runs"] and all("empirical_epsilon_lower_bound" in json.dumps(run) for run in report["runs"])
    # Private runs are audited both ways, each named.
    assert all(run["one_run"]["audit"] == "black-box input canaries" for run in report["runs"])
    assert all(run["white_box"]["audit"] == "white-box gradient canaries" for run in report["runs"])


def test_experiment_is_delegated_to_the_lm_experiments(capsys):
    assert main(["experiment", "--help"]) == 0
    assert "usage: dptrain experiment" in capsys.readouterr().out
    assert main(["experiment", "nonsense"]) == 2
