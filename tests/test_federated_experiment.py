"""``dptrain experiment federated`` on small settings (the full run and --quick take minutes: README and the note)."""

from __future__ import annotations

import json
import os

from dptrain.cli import main
from dptrain.cli.experiment import format_federated_report


def test_federated_experiment_rows_are_accounted_and_printed(capsys):
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    argv = ["experiment", "federated", "--json", "--clients", "6", "--rounds", "1", "--epsilon", "3", "--seed", "1"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["setting"]: row for row in result["rows"]}
    assert list(rows) == ["non-private FedAvg", "client-level DP, eps 3", "sample-level DP in clients, eps 3"]
    for row in rows.values():
        assert {"setting", "privacy_unit", "epsilon", "delta", "rounds", "accuracy", "sampling"} <= set(row)
        assert row["rounds"] == 1 and row["sampling"] == "poisson" and 0 <= row["accuracy"] <= 1
    assert rows["non-private FedAvg"]["epsilon"] is None and rows["non-private FedAvg"]["delta"] is None
    client = rows["client-level DP, eps 3"]
    assert client["privacy_unit"] == "client" and 0.97 * 3 <= client["epsilon"] <= 3 and client["delta"] == 1e-5
    sample = rows["sample-level DP in clients, eps 3"]
    assert sample["privacy_unit"] == "example" and 0 < sample["epsilon"] <= 3
    text = format_federated_report(result)
    assert "client-level DP, eps 3" in text and "K=6 clients" in text and "no replication needed" in text


def test_options_of_the_other_experiment_are_refused(capsys):
    assert main(["experiment", "federated", "--users", "5"]) == 2
    assert "--users: not an option of the federated experiment" in capsys.readouterr().err
    assert main(["experiment", "memorization", "--rounds", "5"]) == 2
    assert "--rounds: not an option of the memorization experiment" in capsys.readouterr().err
