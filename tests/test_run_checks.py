"""What ``dptrain train`` checks before it trains, and what ``--check`` checks without training: the data files
(missing, NaN, non-numeric, values outside their declared ranges), the ledger (not a ledger, no budget), delta
against 1/N; and that a refused command leaves no file behind."""

from __future__ import annotations

import json
import sqlite3
import warnings
from pathlib import Path

import pytest

from dptrain.app import ConfigError, DatasetConfig, load_dataset
from dptrain.app.data import DataRangeWarning
from dptrain.cli import main

HEADER = "age,pressure,outcome"


def _csv(tmp_path: Path, rows: list[str], name: str = "patients.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def _rows(count: int = 60) -> list[str]:
    return [f"{20 + i % 60},{90 + i % 100},{'sick' if i % 3 == 0 else 'well'}" for i in range(count)]


def _config(tmp_path: Path, data: Path, extra: str = "", privacy: str = "noise_multiplier = 1.0\ndelta = 1e-5") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
name = "checked"
[dataset]
name = "csv"
path = "{data}"
label_column = "outcome"
classes = ["well", "sick"]
feature_ranges = {{ age = [0, 120], pressure = [50, 250] }}
[training]
epochs = 1
batch_size = 20
[privacy]
{privacy}
{extra}
""")
    return path


def test_check_validates_the_data_and_the_ledger_and_writes_nothing(tmp_path, capsys):
    data = _csv(tmp_path, _rows())
    ledger = tmp_path / "ledgers" / "privacy.db"
    config = _config(tmp_path, data, f'[ledger]\npath = "{ledger}"\nbudget = "patients"\ncap = 5.0',
                     privacy="noise_multiplier = 1.0\ndelta = 1e-3")
    assert main(["train", str(config), "--check"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{config}: valid (48 training and 12 held-out examples; ledger {ledger}, budget 'patients')"
    )
    assert not ledger.parent.exists()  # cap would create the ledger at the first run, not at a check
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "patients.csv"]


@pytest.mark.parametrize(
    "rows, expected",
    [
        (None, "no such file"),
        (["30,nan,sick", *_rows()], "line 2, column 'pressure': 'nan' is not finite"),
        (["thirty,120,sick", *_rows()], "'thirty' is not a number (a categorical column must be encoded"),
        (["30,120,maybe", *_rows()], "label 'maybe' is not one of classes ['well', 'sick']"),
    ],
)
def test_check_refuses_bad_data_files_with_the_line_and_column(tmp_path, capsys, rows, expected):
    data = tmp_path / "missing.csv" if rows is None else _csv(tmp_path, rows)
    assert main(["train", str(_config(tmp_path, data)), "--check"]) == 2
    assert expected in capsys.readouterr().err


def test_check_refuses_a_file_that_is_not_a_ledger_and_a_missing_budget(tmp_path, capsys):
    data = _csv(tmp_path, _rows())
    not_ledger = tmp_path / "notes.db"
    not_ledger.write_text("meeting notes, not a database")
    config = _config(tmp_path, data, f'[ledger]\npath = "{not_ledger}"\nbudget = "patients"',
                     privacy="noise_multiplier = 1.0\ndelta = 1e-3")
    assert main(["train", str(config), "--check"]) != 0
    assert "notes.db" in capsys.readouterr().err
    empty = tmp_path / "empty.db"
    assert main(["budget", "create", "other", "--epsilon", "3", "--delta", "1e-3", "--ledger", str(empty)]) == 0
    config = _config(tmp_path, data, f'[ledger]\npath = "{empty}"\nbudget = "patients"',
                     privacy="noise_multiplier = 1.0\ndelta = 1e-3")
    capsys.readouterr()
    assert main(["train", str(config), "--check"]) == 2
    assert "no budget 'patients'" in capsys.readouterr().err


def test_values_outside_a_declared_range_are_clipped_with_a_warning_counting_them_per_column(tmp_path):
    data = _csv(tmp_path, [*_rows(), "130,300,sick", "125,120,well", "-1,40,well"])
    config = DatasetConfig(name="csv", path=str(data), label_column="outcome", classes=("well", "sick"),
                           feature_ranges={"age": (0, 120), "pressure": (50, 250)})  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_dataset(config)
    (warning,) = [w for w in caught if issubclass(w.category, DataRangeWarning)]
    assert "of 63 rows: age 3, pressure 2" in str(warning.message)
    x = [*loaded.train.tensors[0], *loaded.test.tensors[0]]
    assert min(float(v.min()) for v in x) == 0.0 and max(float(v.max()) for v in x) == 1.0  # clipped
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataRangeWarning)
        load_dataset(DatasetConfig(name="csv", path=str(_csv(tmp_path, _rows(), "ok.csv")), label_column="outcome",
                                   classes=("well", "sick"), feature_range=(0, 300)))  # all inside: no warning


def test_delta_at_least_one_over_n_is_refused_unless_allowed_and_then_on_the_card(tmp_path, capsys):
    data = _csv(tmp_path, _rows())  # 48 training examples: 1/N = 0.021
    weak = "noise_multiplier = 1.0\ndelta = 0.05"
    assert main(["train", str(_config(tmp_path, data, privacy=weak)), "--check"]) == 2
    assert "delta = 0.05 >= 1/N = 0.0208 (48 training examples)" in capsys.readouterr().err
    config = _config(tmp_path, data, privacy=weak + "\nallow_weak_delta = true")
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # allowed: no raw Python warning either
        assert main(["train", str(config), "--output-dir", str(out), "--threads", "1"]) == 0
    card = json.loads((out / "privacy_card.json").read_text())
    assert card["guarantee"]["weak_delta"] is True
    assert any(item.startswith("WEAK DELTA: delta = 0.05 is at least 1/N") for item in card["limitations"])
    from dptrain.app import load_config
    from dptrain.app.train import check_run

    with pytest.raises(ConfigError):  # the check is also the runner's, before any training
        check_run(load_config(_config(tmp_path, data, privacy=weak)))
    assert main(["train", str(_config(tmp_path, data)), "--check"]) == 0  # delta 1e-5: fine


def test_a_refused_budget_create_leaves_no_ledger_file(tmp_path, capsys):
    path = tmp_path / "privacy.db"
    assert main(["budget", "create", "patients", "--epsilon", "0", "--delta", "1e-5", "--ledger", str(path)]) == 2
    assert "epsilon" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["budget", "create", "patients", "--epsilon", "3", "--delta", "1e-5", "--ledger", str(path)]) == 0
    assert main(["budget", "create", "patients", "--epsilon", "3", "--delta", "1e-5", "--ledger", str(path)]) == 1
    assert [row[0] for row in sqlite3.connect(path).execute("SELECT name FROM budgets")] == ["patients"]  # kept


def test_a_run_refused_for_a_missing_budget_leaves_no_ledger_and_no_run_directory(tmp_path, capsys):
    data = _csv(tmp_path, _rows())
    ledger = tmp_path / "ledgers" / "privacy.db"
    config = _config(tmp_path, data, f'[ledger]\npath = "{ledger}"\nbudget = "patients"',
                     privacy="noise_multiplier = 1.0\ndelta = 1e-3")
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    assert "no budget 'patients'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "patients.csv"]
