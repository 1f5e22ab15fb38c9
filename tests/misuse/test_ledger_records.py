"""The ledger records what a run really was: a shuffled run is labelled as such, a reused seed is warned about, and a
ledger written by the previous schema (version 1) keeps working after an in-place migration."""

from __future__ import annotations

import sqlite3
import warnings
from pathlib import Path

import pytest

from dptrain.accounting import StepRecord, composed_epsilon
from dptrain.budget import (
    LEDGER_PLD_DISCRETIZATION,
    SCHEMA_VERSION,
    BudgetLedger,
    LedgerError,
    ReusedSeedWarning,
)
from dptrain.cli import main

DELTA = 1e-5

# The version-1 layout exactly as dptrain wrote it (data, not code: the file format of older ledgers).
V1_SCHEMA = (
    """CREATE TABLE budgets (
        name TEXT PRIMARY KEY NOT NULL CHECK (length(name) > 0),
        epsilon REAL NOT NULL CHECK (epsilon > 0),
        delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
        privacy_unit TEXT NOT NULL CHECK (privacy_unit IN ('example', 'user')),
        created_at TEXT NOT NULL,
        closed_at TEXT
    )""",
    """CREATE TABLE entries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        budget TEXT NOT NULL REFERENCES budgets (name),
        created_at TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('reserved', 'spent')),
        kind TEXT NOT NULL,
        sample_rate REAL NOT NULL CHECK (sample_rate >= 0 AND sample_rate <= 1),
        noise_multiplier REAL NOT NULL CHECK (noise_multiplier >= 0),
        steps INTEGER NOT NULL CHECK (steps >= 0),
        planned_steps INTEGER NOT NULL CHECK (planned_steps >= steps),
        sampling TEXT NOT NULL,
        privacy_unit TEXT NOT NULL,
        group_size INTEGER NOT NULL CHECK (group_size >= 1),
        accountant TEXT NOT NULL,
        note TEXT NOT NULL,
        settled_at TEXT
    )""",
    "CREATE INDEX entries_by_budget ON entries (budget, id)",
    "PRAGMA application_id = 1685091442",
    "PRAGMA user_version = 1",
)
# (status, sample_rate, noise_multiplier, steps, planned_steps, note) of the version-1 file's entries.
V1_ENTRIES = [
    ("spent", 0.01, 1.0, 1000, 1000, "tuning run 1"),
    ("spent", 0.02, 1.5, 300, 500, "run stopped early"),
    ("reserved", 0.01, 2.0, 200, 200, "crashed run"),
]


@pytest.fixture
def ledger(tmp_path: Path) -> BudgetLedger:
    ledger = BudgetLedger(tmp_path / "privacy.db")
    ledger.create("patients", epsilon=8.0, delta=DELTA)
    return ledger


def _entry_count(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM entries").fetchone()[0]


# -- sampling label --------------------------------------------------------------------------------------------------


def test_shuffled_run_is_labelled_in_entry_history_summary_and_cli(ledger: BudgetLedger, capsys):
    shuffled = ledger.reserve("patients", 0.01, 1.0, 500, "shuffled run", sampling="shuffled")
    ledger.settle(shuffled, 400)
    poisson = ledger.spend("patients", 0.01, 1.0, 500, "poisson run")
    assert ledger.entry(shuffled).sampling == "shuffled"  # kept through settle
    assert [(e.id, e.sampling) for e in ledger.history("patients")] == [(shuffled, "shuffled"), (poisson, "poisson")]
    summary = ledger.summary("patients")
    assert (summary.entries, summary.shuffled) == (2, 1)
    # Composed exactly as a Poisson run of the same parameters (the label says the bound is not proven).
    expected = composed_epsilon(
        [StepRecord(0.01, 1.0, 400), StepRecord(0.01, 1.0, 500)], DELTA, LEDGER_PLD_DISCRETIZATION
    )
    assert summary.spent == expected
    assert main(["budget", "history", "patients", "--ledger", str(ledger.path), "--json"]) == 0
    listed = capsys.readouterr().out
    assert '"sampling": "shuffled"' in listed and '"sampling": "poisson"' in listed
    with sqlite3.connect(ledger.path) as db:  # and in the file the user inspects with sqlite3
        assert db.execute("SELECT sampling FROM entries WHERE id = ?", (shuffled,)).fetchone() == ("shuffled",)


@pytest.mark.parametrize("label", ["uniform", "Poisson", "", None])
def test_unknown_sampling_label_is_refused_and_records_nothing(ledger: BudgetLedger, label):
    for call in (ledger.spend, ledger.reserve):
        with pytest.raises(ValueError, match="sampling must be one of"):
            call("patients", 0.01, 1.0, 10, sampling=label)
    assert _entry_count(ledger.path) == 0


# -- seeds -----------------------------------------------------------------------------------------------------------


def test_reused_seed_warns_naming_the_earlier_entry_and_is_recorded(ledger: BudgetLedger):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a first use, another seed, or no seed
        first = ledger.spend("patients", 0.01, 1.0, 10, "first run", seed=7)
        ledger.spend("patients", 0.01, 1.0, 10, seed=8)
        ledger.spend("patients", 0.01, 1.0, 10)
        ledger.reserve("patients", 0.01, 1.0, 10)
    for call in (ledger.reserve, ledger.spend):
        with pytest.warns(ReusedSeedWarning, match=rf"seed 7 was already used .* by entry {first} \(spent") as caught:
            entry = call("patients", 0.01, 1.0, 10, "rerun", seed=7)
        message = str(caught[0].message)
        assert "'first run'" in message and "cancels the noise" in message and "fresh seed" in message
        assert ledger.entry(entry).seed == 7  # recorded all the same, and charged
    assert _entry_count(ledger.path) == 6


def test_seed_is_per_budget(ledger: BudgetLedger):
    ledger.create("other", epsilon=8.0, delta=DELTA)
    ledger.spend("patients", 0.01, 1.0, 10, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ledger.spend("other", 0.01, 1.0, 10, seed=7)


@pytest.mark.parametrize("seed", [2**63 - 1, 2**63, 2**64 - 1, -(2**63), 0])
def test_seeds_beyond_sqlite_integer_are_stored_exactly_and_compared_exactly(ledger: BudgetLedger, seed):
    entry = ledger.spend("patients", 0.01, 1.0, 10, seed=seed)
    assert ledger.entry(entry).seed == seed and type(ledger.entry(entry).seed) is int
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ledger.spend("patients", 0.01, 1.0, 10, seed=seed - 1 if seed > 0 else seed + 1)  # a neighbour is distinct
    with pytest.warns(ReusedSeedWarning, match=f"seed {seed} "):
        ledger.spend("patients", 0.01, 1.0, 10, seed=seed)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.0, "7", True])
def test_bad_seed_is_refused_and_records_nothing(ledger: BudgetLedger, seed):
    with pytest.raises(ValueError, match="seed must be None or an integer"):
        ledger.reserve("patients", 0.01, 1.0, 10, seed=seed)
    assert _entry_count(ledger.path) == 0


def test_reused_seed_as_an_error_refuses_and_records_nothing(ledger: BudgetLedger):
    ledger.spend("patients", 0.01, 1.0, 10, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReusedSeedWarning)
        with pytest.raises(ReusedSeedWarning):
            ledger.reserve("patients", 0.01, 1.0, 10, seed=7)
    assert _entry_count(ledger.path) == 1  # the warning, raised inside the transaction, rolled the insert back


# -- schema migration ------------------------------------------------------------------------------------------------


def _write_v1_ledger(path: Path) -> None:
    """A ledger as dptrain's version-1 code wrote it: one budget, three entries (one an open reservation)."""
    with sqlite3.connect(path, isolation_level=None) as db:
        for statement in V1_SCHEMA:
            db.execute(statement)
        db.execute(
            "INSERT INTO budgets (name, epsilon, delta, privacy_unit, created_at) "
            "VALUES ('patients', 8.0, ?, 'example', '2024-01-01T00:00:00+00:00')",
            (DELTA,),
        )
        for status, q, sigma, steps, planned, note in V1_ENTRIES:
            db.execute(
                "INSERT INTO entries (budget, created_at, status, kind, sample_rate, noise_multiplier, steps, "
                "planned_steps, sampling, privacy_unit, group_size, accountant, note) "
                "VALUES ('patients', '2024-01-02T00:00:00+00:00', ?, 'poisson_gaussian', ?, ?, ?, ?, 'poisson', "
                "'example', 1, 'pld', ?)",
                (status, q, sigma, steps, planned, note),
            )
    db.close()


def _layout(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        layout = [tuple(row) for table in ("budgets", "entries") for row in db.execute(f"PRAGMA table_info({table})")]
    db.close()
    return layout


def test_version_1_ledger_migrates_in_place_keeping_entries_and_totals(tmp_path: Path):
    path = tmp_path / "v1.db"
    _write_v1_ledger(path)
    expected = composed_epsilon(
        [StepRecord(q, sigma, steps) for _, q, sigma, steps, _, _ in V1_ENTRIES], DELTA, LEDGER_PLD_DISCRETIZATION
    )
    ledger = BudgetLedger(path, create=False)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    db.close()
    fresh = tmp_path / "fresh.db"
    BudgetLedger(fresh)
    assert _layout(path) == _layout(fresh)  # the migrated file is laid out as a new one
    history = ledger.history("patients")
    assert [(e.status, e.sample_rate, e.noise_multiplier, e.steps, e.planned_steps, e.note) for e in history] == (
        V1_ENTRIES
    )
    assert all(e.seed is None and e.sampling == "poisson" for e in history)
    summary = ledger.summary("patients")
    assert (summary.spent, summary.entries, summary.reserved, summary.shuffled) == (expected, 3, 1, 0)
    # The migrated ledger keeps working: the old reservation settles, new entries carry seeds.
    ledger.settle(history[2].id, 50)
    ledger.spend("patients", 0.01, 1.0, 10, seed=2**64 - 1)
    with pytest.warns(ReusedSeedWarning):
        BudgetLedger(path).reserve("patients", 0.01, 1.0, 10, seed=2**64 - 1)
    assert len(ledger.history("patients")) == 5
    # Version 3's client-level budgets exist in the migrated file, and the rebuilt budgets table still anchors entries.
    ledger.create("hospitals", epsilon=3.0, delta=DELTA, privacy_unit="client")
    ledger.spend("hospitals", 0.1, 1.0, 5, client_level=True)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA foreign_keys = ON")
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            db.execute(
                "INSERT INTO entries (budget, created_at, status, kind, sample_rate, noise_multiplier, steps, "
                "planned_steps, sampling, privacy_unit, group_size, accountant, note) VALUES ('nobody', 'now', "
                "'spent', 'poisson_gaussian', 0.1, 1.0, 1, 1, 'poisson', 'example', 1, 'pld', '')"
            )
    db.close()


def test_ledger_newer_than_this_version_is_still_refused(tmp_path: Path):
    path = tmp_path / "v1.db"
    _write_v1_ledger(path)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(LedgerError, match="newer dptrain"):
        BudgetLedger(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1  # untouched
        assert "seed" not in [row[1] for row in db.execute("PRAGMA table_info(entries)")]
    db.close()
