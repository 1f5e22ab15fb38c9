"""``dptrain train CONFIG.toml``: config validation (clear errors, all at once), CSV data, ledger, budget limits.

Runs that need no noise calibration use ``noise_multiplier`` (calibration takes seconds); the shipped example is
run once as written (with fewer epochs).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from dptrain.budget import BudgetLedger
from dptrain.cli import main
from dptrain.app import (
    ConfigError,
    DatasetConfig,
    ModelConfig,
    PrivacyConfig,
    TrainingConfig,
    load_config,
    load_dataset,
    parse_config,
    parse_override,
)
from dptrain.app.data import DataRangeWarning

EXAMPLE = Path(__file__).parents[1] / "examples" / "digits.toml"

VALID = """
name = "t"
[dataset]
name = "digits"
[training]
epochs = 2
batch_size = 700
[privacy]
noise_multiplier = 2.0
delta = 1e-5
"""


def _write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _errors(text: str) -> list[str]:
    import tomllib

    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text), "test.toml")
    return info.value.errors


def test_valid_config_parses_with_defaults():
    import tomllib

    config = parse_config(tomllib.loads(VALID))
    assert config.name == "t" and config.dataset.name == "digits" and config.dataset.test_fraction == 0.2
    assert config.training.epochs == 2 and config.training.optimizer == "adam" and config.training.max_grad_norm == 1.0
    assert config.privacy.noise_multiplier == 2.0 and config.privacy.target_epsilon is None
    assert config.model.hidden == (128,) and config.ledger is None
    assert not config.audit.membership  # off by default: computed from the training data without noise


@pytest.mark.parametrize(
    "edit, expected",
    [
        # unknown keys name the allowed ones and suggest the closest
        (("[training]", "[training]\nepoch = 3"),
         "[training] unknown key 'epoch' (did you mean 'epochs'?); allowed keys: batch_size, epochs, lr,"),
        (("name = \"t\"", "name = \"t\"\ncolour = 1"), "top level: unknown key 'colour'; allowed keys: audit, card, dataset"),
        (("name = \"t\"", "name = \"t\"\ntarget_epsilon = 1"),
         "top level: unknown key 'target_epsilon' (did you mean 'target_epsilon' in [privacy]?)"),
        (("[privacy]", "[optimiser]\nlr = 1\n[privacy]"),
         "unknown key 'optimiser' (did you mean 'optimizer' in [training]?)"),
        # wrong types name the key and the expected type
        (("epochs = 2", 'epochs = "2"'), "[training] epochs must be an integer, got '2' (string)"),
        (("batch_size = 700", "batch_size = 700.0"), "[training] batch_size must be an integer, got 700.0 (float)"),
        (("delta = 1e-5", 'delta = "tiny"'), "[privacy] delta must be a number, got 'tiny' (string)"),
        (("name = \"digits\"", "name = \"digits\"\ntest_fraction = true"),
         "[dataset] test_fraction must be a number, got True (boolean)"),
        (("[training]", "[model]\nhidden = [128, \"64\"]\n[training]"), "[model] hidden must be an array of integers"),
        # values out of range
        (("noise_multiplier = 2.0", "target_epsilon = 0"),
         "[privacy] target_epsilon must be a finite number > 0, got 0.0"),
        (("noise_multiplier = 2.0", "target_epsilon = -3"), "target_epsilon must be a finite number > 0, got -3.0"),
        (("delta = 1e-5", "delta = 1.5"), "[privacy] delta must be in the open interval (0, 1), got 1.5"),
        (("epochs = 2", "epochs = 0"), "[training] epochs must be >= 1, got 0"),
        (("[training]", "[model]\nactivation = \"relu6\"\n[training]"), "[model] activation must be one of 'relu'"),
        (("name = \"digits\"", "name = \"digits\"\nscale_to = [1, -1]"), "[dataset] scale_to needs low < high"),
        (("name = \"digits\"", "name = \"mnist\""), "[dataset] name must be one of 'digits', 'csv', got 'mnist'"),
        # missing pieces
        (("[dataset]\nname = \"digits\"", ""), "missing [dataset] section"),
        (("name = \"digits\"", "test_fraction = 0.3"), "[dataset] missing required key 'name'"),
        (("noise_multiplier = 2.0", ""), "[privacy] missing target_epsilon (or noise_multiplier)"),
        (("noise_multiplier = 2.0", "noise_multiplier = 2.0\ntarget_epsilon = 3.0"),
         "[privacy] set target_epsilon or noise_multiplier, not both"),
        (("epochs = 2\n", ""), "[training] missing required key 'epochs'"),
        (("[training]", "[training]\nmomentum = 0.9"), "momentum applies to optimizer = \"sgd\" only"),
        (("name = \"digits\"", "name = \"digits\"\npath = \"x.csv\""), "[dataset] path applies to name = \"csv\" only"),
        (("delta = 1e-5", "delta = 1e-5\n[ledger]\npath = \"l.db\""), "[ledger] missing required key 'budget'"),
    ],
)
def test_invalid_configs_exit_2_with_a_clear_message(tmp_path, capsys, edit, expected):
    old, new = edit
    assert old in VALID
    path = _write(tmp_path, VALID.replace(old, new, 1))
    assert main(["train", str(path), "--check"]) == 2
    captured = capsys.readouterr()
    assert f"invalid config {path}" in captured.err
    assert expected in captured.err
    assert captured.out == ""


def test_every_problem_is_reported_at_once():
    errors = _errors(VALID.replace("epochs = 2", 'epochs = "2"').replace("delta = 1e-5", "delta = 2")
                     .replace("[training]", "[training]\nlrr = 1"))
    assert len(errors) == 3
    assert any("epochs" in e for e in errors) and any("delta" in e for e in errors) and any("lrr" in e for e in errors)


def test_csv_needs_declared_feature_ranges_and_classes():
    errors = _errors(VALID.replace('name = "digits"', 'name = "csv"\npath = "x.csv"\nlabel_column = "y"'))
    assert any("a CSV dataset needs the known range of every feature" in e for e in errors)
    assert any("missing required key 'classes'" in e for e in errors)


def test_bad_toml_missing_file_and_bad_override(tmp_path, capsys):
    path = _write(tmp_path, "[dataset\nname = 1")
    assert main(["train", str(path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", str(EXAMPLE), "--set", "training.epochs", "--check"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert main(["train", str(EXAMPLE), "--set", "training.epochs=0", "--check"]) == 2
    assert "[training] epochs must be >= 1, got 0" in capsys.readouterr().err


def test_overrides_are_read_as_toml():
    assert parse_override("training.epochs=5") == (["training", "epochs"], 5)
    assert parse_override("privacy.delta = 1e-6") == (["privacy", "delta"], 1e-6)
    assert parse_override("model.hidden=[64, 32]") == (["model", "hidden"], [64, 32])
    assert parse_override("name=my run") == (["name"], "my run")  # not TOML: taken as a string
    config = load_config(EXAMPLE, ["training.epochs=7", "model.hidden=[]", "privacy.target_epsilon=1"])
    assert config.training.epochs == 7 and config.model.hidden == () and config.privacy.target_epsilon == 1.0
    assert config.name == "digits-eps3"


def test_the_example_config_trains_charges_its_ledger_and_writes_the_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example's ledger path, runs/privacy.db, is relative to the current directory
    out = tmp_path / "run"
    code = main(["train", str(EXAMPLE), "--output-dir", str(out), "--set", "training.epochs=10", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    names = ("run.json", "metrics.jsonl", "model.pt", "checkpoint.pt", "report.html", "privacy_card.json",
             "privacy_card.md")
    for name in names:
        assert (out / name).is_file(), name
    assert f"report: {out / 'report.html'}" in captured.out
    assert re.search(r"digits-eps3: step \d+/20 +epoch \d+/10 +loss [\d.]+ +acc [\d.]+% +ε [\d.]+/3", captured.out)
    # progress: the time left while it runs, and how much of the ledger's budget this run leaves
    assert re.search(r"digits-eps3: step \d+/20 .* ETA \d+s", captured.out)
    assert re.search(r"budget total with it ε [\d.]+ of 10: ε [\d.]+ left after this run", captured.out)
    run = json.loads((out / "run.json").read_text())
    privacy = run["privacy"]
    assert run["status"] == "completed"
    assert privacy["steps"] == privacy["planned_steps"] == 20 and privacy["sample_rate"] == pytest.approx(1 / 2)
    assert 0.99 * 3 <= privacy["epsilon"] <= 3.0
    history = run["history"]
    assert [h["epoch"] for h in history] == list(range(1, 11))
    eps = [h["epsilon"] for h in history]
    assert all(a < b for a, b in zip(eps, eps[1:])) and eps[-1] == pytest.approx(privacy["epsilon"], rel=2e-3)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 10
    ledger = BudgetLedger(tmp_path / "runs" / "privacy.db", create=False)
    (entry,) = ledger.history("digits")
    assert entry.status == "spent" and entry.steps == 20 and ledger.budget("digits").epsilon == 10.0
    assert run["ledger"]["entry_id"] == entry.id and run["ledger"]["entry_status"] == "spent"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    history_steps = [list(r) for r in checkpoint["privacy"]["accountant"]["history"]]
    assert checkpoint["steps"] == 20 and history_steps == [[1 / 2, privacy["noise_multiplier"], 20]]
    assert set(checkpoint["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # keys unchanged by the engine
    # a second run into the same directory is refused before anything is spent
    assert main(["train", str(EXAMPLE), "--output-dir", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert len(ledger.history("digits")) == 1


def _csv(tmp_path: Path) -> Path:
    rows = ["age,pressure,smoker,outcome"]
    generator = torch.Generator().manual_seed(0)
    for i in range(300):
        age = int(torch.randint(18, 90, (1,), generator=generator))
        pressure = float(torch.randint(80, 200, (1,), generator=generator))
        smoker = i % 3 == 0
        outcome = "sick" if pressure + 30 * smoker > 150 else "well"
        rows.append(f"{age},{pressure},{int(smoker)},{outcome}")
    rows.append("130,250,1,sick")  # outside the declared ranges: clipped, never used to scale
    path = tmp_path / "patients.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_dataset_is_scaled_by_declared_ranges_and_trains(tmp_path, capsys):
    data = _csv(tmp_path)
    config = f"""
name = "patients"
[dataset]
name = "csv"
path = "{data}"
label_column = "outcome"
classes = ["well", "sick"]
feature_ranges = {{ age = [0, 120], pressure = [50, 200] }}
feature_range = [0, 1]
test_fraction = 0.25
[model]
hidden = [16]
activation = "tanh"
[training]
epochs = 3
batch_size = 50
optimizer = "sgd"
lr = 0.5
momentum = 0.5
[privacy]
noise_multiplier = 1.0
delta = 1e-4
[audit]
membership = false
"""
    with pytest.warns(DataRangeWarning, match=r"of 301 rows: age 1, pressure 1"):
        loaded = load_dataset(load_config(_write(tmp_path, config)).dataset)
    assert loaded.info["num_train"] == 226 and loaded.info["num_test"] == 75 and loaded.info["num_classes"] == 2
    x = torch.cat([loaded.train.tensors[0], loaded.test.tensors[0]])
    assert x.min() >= 0 and x.max() <= 1
    # the row (130, 250, 1) is clipped to (1, 1, 1); age 60 would be 0.5 by its declared range
    assert (x == 1).all(dim=1).sum() == 1
    out = tmp_path / "run"
    with pytest.warns(DataRangeWarning):
        assert main(["train", str(tmp_path / "config.toml"), "--output-dir", str(out), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["status"] == "completed" and run["audit"] is None and run["ledger"] is None
    assert run["model"]["architecture"] == "MLP 3-16-2 (tanh)"
    assert run["model"]["parameters"] == 3 * 16 + 16 + 16 * 2 + 2
    assert run["privacy"]["steps"] == 15 and math.isfinite(run["privacy"]["epsilon"])


@pytest.mark.parametrize(
    "features, rows, expected",
    [
        ('feature_ranges = { a = [0, 1] }', "a,b,y\n0.5,1,0\n", "no known range for features ['b']"),
        ("feature_range = [0, 1]", "a,y\nx,0\n", "line 2, column 'a': 'x' is not a number"),
        ("feature_range = [0, 1]", "a,y\n0.5,2\n", "line 2: label '2' is not one of classes [0, 1]"),
        ("feature_range = [0, 1]", "a,z\n0.5,0\n", "label_column 'y' is not a column"),
    ],
)
def test_csv_data_errors_name_the_line_and_column(tmp_path, capsys, features, rows, expected):
    (tmp_path / "d.csv").write_text(rows)
    config = VALID.replace('name = "digits"', f'name = "csv"\npath = "{tmp_path / "d.csv"}"\nlabel_column = "y"\n'
                           f"classes = [0, 1]\n{features}")
    assert main(["train", str(_write(tmp_path, config)), "--output-dir", str(tmp_path / "r")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _ledger_config(tmp_path: Path, cap: float, sigma: float, epochs: int) -> Path:
    text = VALID.replace("epochs = 2", f"epochs = {epochs}")
    text = text.replace("noise_multiplier = 2.0", f"noise_multiplier = {sigma}")
    return _write(tmp_path, text + f'[ledger]\npath = "{tmp_path / "l.db"}"\nbudget = "b"\ncap = {cap}\n')


def test_a_run_the_budget_cannot_hold_is_refused_before_training(tmp_path, capsys):
    path = _ledger_config(tmp_path, cap=0.05, sigma=1.0, epochs=2)
    assert main(["train", str(path), "--output-dir", str(tmp_path / "r")]) == 1
    assert "privacy budget 'b' would be exceeded" in capsys.readouterr().err
    assert BudgetLedger(tmp_path / "l.db").history("b") == []
    assert not (tmp_path / "r" / "run.json").exists()


def test_a_run_stops_when_its_budget_is_spent_and_settles_the_ledger(tmp_path, capsys):
    path = _ledger_config(tmp_path, cap=2.0, sigma=2.0, epochs=200)
    out = tmp_path / "r"
    assert main(["train", str(path), "--output-dir", str(out), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    ledger = BudgetLedger(tmp_path / "l.db")
    (entry,) = ledger.history("b")
    assert run["status"] == "budget_exhausted" and entry.status == "spent"
    assert 0 < run["privacy"]["steps"] == entry.steps == entry.planned_steps < 600
    assert ledger.spent("b") <= 2.0 and run["privacy"]["epsilon"] <= 2.0
    assert ledger.max_steps("b", 1 / 3, 2.0) == 0  # it stopped at the last step that fits
    card = json.loads((out / "privacy_card.json").read_text())
    assert card["run"]["status"] == "budget_exhausted" and "privacy budget was spent" in card["statement"]


def test_unknown_budget_without_cap_is_a_config_error(tmp_path, capsys):
    path = _write(tmp_path, VALID + f'[ledger]\npath = "{tmp_path / "l.db"}"\nbudget = "nope"\n')
    assert main(["train", str(path), "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no budget 'nope'" in err and "dptrain budget create nope" in err


@pytest.mark.parametrize("command", ["train", "demo", "report"])
def test_help_of_new_commands_shows_an_example(capsys, command):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: dptrain {command}" in out and "example:\n  dptrain " in out


def test_top_level_help_lists_examples_of_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "report", "epsilon", "calibrate", "budget", "audit"):
        assert f"  dptrain {command}" in out, command


def test_digits_split_is_the_documented_one_and_scaling_is_fixed():
    loaded = load_dataset(DatasetConfig(name="digits"))
    assert (loaded.info["num_train"], loaded.info["num_test"], loaded.info["num_features"]) == (1437, 360, 64)
    x = loaded.train.tensors[0]
    assert x.min() == 0.0 and x.max() == 1.0  # pixels / 16, the known maximum
    centred = load_dataset(DatasetConfig(name="digits", scale_to=(-1.0, 1.0)))
    assert torch.equal(centred.train.tensors[0], 2 * x - 1)
    assert "onto [-1, 1]" in centred.info["preprocessing"]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TrainingConfig(optimizer="adamw"), "[training] optimizer must be one of ['sgd', 'adam'], got 'adamw'"),
        (lambda: TrainingConfig(epochs=0), "[training] epochs must be an integer >= 1, got 0"),
        (lambda: PrivacyConfig(delta=1e-5), "[privacy] set exactly one of target_epsilon and noise_multiplier"),
        (lambda: PrivacyConfig(delta=2.0, noise_multiplier=1.0), "[privacy] delta must be in (0, 1), got 2.0"),
        (lambda: ModelConfig(activation="swish"), "[model] activation must be one of"),
        (lambda: DatasetConfig(name="mnist"), "[dataset] name must be one of ['digits', 'csv'], got 'mnist'"),
    ],
)
def test_a_config_built_in_python_is_validated_as_a_toml_one_is(build, message):
    """A TrainingConfig(optimizer="adamw") used to train with SGD silently: every config checks itself."""
    with pytest.raises(ConfigError) as error:
        build()
    assert message in str(error.value)
