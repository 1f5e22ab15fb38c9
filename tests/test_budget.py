"""The privacy budget ledger: refusal, composition, exact stopping, concurrency, crash safety, bad files, bad input."""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import signal
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld

from readme import readme_section
from dptrain.accounting import StepRecord, composed_epsilon, compute_epsilon
from dptrain.budget import (
    LEDGER_PLD_DISCRETIZATION,
    MAX_STEPS_SEARCHED,
    SCHEMA_VERSION,
    BudgetClosedError,
    BudgetExceededError,
    BudgetExistsError,
    BudgetLedger,
    LedgerError,
    UnknownBudgetError,
)

DELTA = 1e-5


@pytest.fixture
def ledger(tmp_path: Path) -> BudgetLedger:
    ledger = BudgetLedger(tmp_path / "privacy.db")
    ledger.create("patients", epsilon=3.0, delta=DELTA)
    return ledger


def _row_counts(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM budgets").fetchone()[0], db.execute(
            "SELECT count(*) FROM entries"
        ).fetchone()[0]


def _fresh_pld_total(entries, delta: float) -> float:
    """Every entry's event composed one by one (no merging) in a fresh dp_accounting PLD accountant."""
    accountant = pld.PLDAccountant(value_discretization_interval=LEDGER_PLD_DISCRETIZATION)
    accountant.compose(dp_accounting.ComposedDpEvent([e.event() for e in entries]))
    return accountant.get_epsilon(delta)


# -- the issue's example, spending and refusing ------------------------------------------------------------------


def test_issue_example_round_trip(ledger: BudgetLedger):
    entry_id = ledger.spend("patients", sample_rate=0.01, noise_multiplier=1.0, steps=1000, note="tuning run 1")
    spent = ledger.spent("patients")
    assert spent == pytest.approx(compute_epsilon(0.01, 1.0, 1000, DELTA), rel=1e-2)
    assert ledger.remaining("patients") == pytest.approx(3.0 - spent)
    [entry] = ledger.history("patients")
    assert entry.id == entry_id
    assert (entry.status, entry.note, entry.steps, entry.planned_steps) == ("spent", "tuning run 1", 1000, 1000)
    assert (entry.kind, entry.sampling, entry.privacy_unit, entry.accountant) == (
        "poisson_gaussian",
        "poisson",
        "example",
        "pld",
    )
    assert (entry.sample_rate, entry.noise_multiplier, entry.group_size) == (0.01, 1.0, 1)
    assert datetime.fromisoformat(entry.created_at).tzinfo == timezone.utc  # stored in UTC
    # A second ledger object on the same file (another process, tomorrow) sees the same state.
    assert BudgetLedger(ledger.path).spent("patients") == spent


def test_refusal_names_cap_spent_and_request_and_records_nothing(ledger: BudgetLedger):
    ledger.spend("patients", 0.01, 1.0, 1000)
    before = _row_counts(ledger.path)
    spent = ledger.spent("patients")
    with pytest.raises(BudgetExceededError) as err:
        ledger.reserve("patients", 0.01, 1.0, 2000, note="a run that does not fit")
    e = err.value
    assert (e.cap, e.delta) == (3.0, DELTA)
    assert e.spent == spent
    assert e.requested == composed_epsilon([StepRecord(0.01, 1.0, 2000)], DELTA, LEDGER_PLD_DISCRETIZATION)
    assert e.total > e.cap
    message = str(e)
    for value in (e.cap, e.spent, e.requested):
        assert f"{value:.8g}" in message
    assert "Nothing was recorded" in message
    assert isinstance(e, ValueError)
    assert _row_counts(ledger.path) == before
    assert ledger.spent("patients") == spent


def test_non_private_request_is_refused(ledger: BudgetLedger):
    with pytest.raises(BudgetExceededError, match="inf"):
        ledger.spend("patients", 0.01, 0.0, 10)
    assert ledger.history("patients") == []


def test_total_equals_a_fresh_pld_accountant_over_the_same_events(ledger: BudgetLedger):
    spends = [(0.01, 1.0, 300), (0.02, 1.5, 100), (0.01, 1.0, 200), (1.0, 30.0, 3), (0.01, 1.0, 100)]
    for q, sigma, steps in spends:
        ledger.spend("patients", q, sigma, steps)
    reservation = ledger.reserve("patients", 0.005, 2.0, 500)
    entries = ledger.history("patients")
    assert [e.status for e in entries].count("reserved") == 1
    spent = ledger.spent("patients")
    assert spent == pytest.approx(_fresh_pld_total(entries, DELTA), rel=1e-9)
    # Composed, not added: the total is well below the sum of the entries' epsilons.
    assert spent < sum(composed_epsilon([e.record()], DELTA, LEDGER_PLD_DISCRETIZATION) for e in entries)
    # Identical entries are merged: three entries (0.01, 1.0) cost exactly what one entry of 600 steps costs.
    merged = composed_epsilon(
        [StepRecord(0.01, 1.0, 600), StepRecord(0.02, 1.5, 100), StepRecord(1.0, 30.0, 3), StepRecord(0.005, 2.0, 500)],
        DELTA,
        LEDGER_PLD_DISCRETIZATION,
    )
    assert spent == merged
    ledger.settle(reservation, 0)
    assert ledger.spent("patients") < spent


# -- reservations, exact stopping ----------------------------------------------------------------------------------


def test_max_steps_is_exact_and_reserving_it_fits(ledger: BudgetLedger):
    ledger.spend("patients", 0.02, 1.2, 400, note="earlier run")
    q, sigma = 0.01, 1.0
    steps = ledger.max_steps("patients", q, sigma)
    assert steps > 0
    recorded = [e.record() for e in ledger.history("patients")]
    assert composed_epsilon([*recorded, StepRecord(q, sigma, steps)], DELTA, LEDGER_PLD_DISCRETIZATION) <= 3.0
    assert composed_epsilon([*recorded, StepRecord(q, sigma, steps + 1)], DELTA, LEDGER_PLD_DISCRETIZATION) > 3.0
    with pytest.raises(BudgetExceededError):
        ledger.reserve("patients", q, sigma, steps + 1)
    entry_id = ledger.reserve("patients", q, sigma, steps, note="final run")
    assert ledger.spent("patients") <= 3.0
    assert ledger.max_steps("patients", q, sigma) == 0
    with pytest.raises(BudgetExceededError):
        ledger.spend("patients", q, sigma, 1)
    # The engine settles when it stops early; what it did not use is released.
    ledger.settle(entry_id, steps // 2)
    assert 0 < ledger.max_steps("patients", q, sigma) <= steps - steps // 2


def test_max_steps_is_zero_when_nothing_fits_and_capped_when_nothing_is_spent(ledger: BudgetLedger):
    assert ledger.max_steps("patients", 0.5, 0.3) == 0
    assert ledger.max_steps("patients", 0.01, 0.0) == 0
    assert ledger.max_steps("patients", 0.0, 1.0) == MAX_STEPS_SEARCHED


def test_settle_rules(ledger: BudgetLedger):
    reservation = ledger.reserve("patients", 0.01, 1.0, 500, note="run")
    spent_entry = ledger.spend("patients", 0.01, 1.0, 10)
    with pytest.raises(ValueError, match="exceeds the 500 steps reserved"):
        ledger.settle(reservation, 501)
    with pytest.raises(ValueError, match="steps_taken"):
        ledger.settle(reservation, -1)
    assert ledger.entry(reservation).status == "reserved"
    ledger.settle(reservation, 321)
    entry = ledger.entry(reservation)
    assert (entry.status, entry.steps, entry.planned_steps) == ("spent", 321, 500)
    assert entry.settled_at is not None
    with pytest.raises(ValueError, match="not an open reservation"):
        ledger.settle(reservation, 321)
    with pytest.raises(ValueError, match="not an open reservation"):
        ledger.settle(spent_entry, 10)
    with pytest.raises(ValueError, match="no entry with id 999"):
        ledger.settle(999, 1)
    assert ledger.spent("patients") == composed_epsilon(
        [StepRecord(0.01, 1.0, 331)], DELTA, LEDGER_PLD_DISCRETIZATION
    )


def test_closed_budget_refuses_spending_but_settles(ledger: BudgetLedger):
    reservation = ledger.reserve("patients", 0.01, 1.0, 100)
    ledger.close_budget("patients")
    assert ledger.budget("patients").closed
    before = _row_counts(ledger.path)
    for call in (
        lambda: ledger.spend("patients", 0.01, 1.0, 1),
        lambda: ledger.reserve("patients", 0.01, 1.0, 1),
        lambda: ledger.max_steps("patients", 0.01, 1.0),
    ):
        with pytest.raises(BudgetClosedError, match="closed"):
            call()
    assert _row_counts(ledger.path) == before
    ledger.settle(reservation, 50)
    assert ledger.entry(reservation).steps == 50


# -- user-level budgets -----------------------------------------------------------------------------------------------


def test_user_level_budget_accounts_groups_with_the_mixture_event(tmp_path: Path):
    ledger = BudgetLedger(tmp_path / "users.db")
    ledger.create("users", epsilon=5.0, delta=DELTA, privacy_unit="user")
    ledger.spend("users", 0.01, 2.0, 100, group_size=3, note="examples sampled, <= 3 per user")
    [entry] = ledger.history("users")
    assert (entry.privacy_unit, entry.group_size) == ("user", 3)
    assert ledger.spent("users") == pytest.approx(compute_epsilon(0.01, 2.0, 100, DELTA, group_size=3), rel=1e-9)
    assert ledger.spent("users") > compute_epsilon(0.01, 2.0, 100, DELTA)


def test_client_level_budget_takes_only_federated_rounds_and_vice_versa(tmp_path: Path):
    ledger = BudgetLedger(tmp_path / "clients.db")
    ledger.create("hospitals", epsilon=5.0, delta=DELTA, privacy_unit="client")
    ledger.create("patients", epsilon=2.0, delta=DELTA)
    entry_id = ledger.reserve("hospitals", 0.2, 1.5, 10, client_level=True, note="10 rounds")
    ledger.settle(entry_id, 7)
    [entry] = ledger.history("hospitals")
    assert (entry.privacy_unit, entry.steps, entry.status) == ("client", 7, "spent")
    assert ledger.spent("hospitals") == pytest.approx(compute_epsilon(0.2, 1.5, 7, DELTA), abs=0.02)
    assert ledger.max_steps("hospitals", 0.2, 1.5, client_level=True) > 0
    with pytest.raises(ValueError, match="protects clients"):
        ledger.spend("hospitals", 0.01, 1.0, 10)  # training steps of examples
    with pytest.raises(ValueError, match="protects clients"):
        ledger.max_steps("hospitals", 0.01, 1.0)
    with pytest.raises(ValueError, match="protects examples"):
        ledger.reserve("patients", 0.2, 1.5, 10, client_level=True)
    assert len(ledger.history("hospitals")) == 1 and ledger.history("patients") == []


# -- several processes, SIGKILL --------------------------------------------------------------------------------------

PROCESSES, SPEND = 8, (0.01, 1.0, 100)


def _spend_until_refused(path: str, barrier, counts) -> None:
    ledger = BudgetLedger(path)
    barrier.wait(timeout=120)
    accepted = 0
    while True:
        try:
            ledger.spend("shared", *SPEND, note=f"process {os.getpid()}")
        except BudgetExceededError:
            break
        accepted += 1
        time.sleep(0.05)  # a little work between releases lets the other processes take the lock
    counts.put(accepted)


def _reserve_then_spend_forever(path: str, connection) -> None:
    ledger = BudgetLedger(path)
    connection.send(ledger.reserve("shared", 0.01, 1.0, 1000, note="run in progress"))
    while True:
        connection.send(ledger.spend("shared", 0.001, 5.0, 1))


def _context() -> multiprocessing.context.BaseContext:
    """Fresh processes (nothing shared with pytest); forkserver pays the heavy imports once, not once per process."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dptrain.budget"])
    return context


def test_concurrent_processes_never_jointly_exceed_the_cap(tmp_path: Path):
    path = tmp_path / "shared.db"
    cap = 2.0
    BudgetLedger(path).create("shared", epsilon=cap, delta=DELTA)
    q, sigma, steps = SPEND
    fitting = 0
    while composed_epsilon([StepRecord(q, sigma, (fitting + 1) * steps)], DELTA, LEDGER_PLD_DISCRETIZATION) <= cap:
        fitting += 1
    assert fitting > PROCESSES  # enough spends for the processes to race over
    context = _context()
    barrier, counts = context.Barrier(PROCESSES), context.Queue()
    workers = [
        context.Process(target=_spend_until_refused, args=(str(path), barrier, counts), daemon=True)
        for _ in range(PROCESSES)
    ]
    for w in workers:
        w.start()
    accepted = [counts.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    ledger = BudgetLedger(path)
    entries = ledger.history("shared")
    assert sum(accepted) == len(entries) == fitting
    assert len({e.note for e in entries}) > 1  # the processes really interleaved
    assert ledger.spent("shared") <= cap
    assert ledger.spent("shared") == pytest.approx(_fresh_pld_total(entries, DELTA), rel=1e-9)


def test_sigkill_keeps_every_committed_entry_and_the_reservation(tmp_path: Path):
    path = tmp_path / "crash.db"
    BudgetLedger(path).create("shared", epsilon=10.0, delta=DELTA)
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(target=_reserve_then_spend_forever, args=(str(path), sender), daemon=True)
    worker.start()
    sender.close()
    reservation = receiver.recv()
    committed = [receiver.recv() for _ in range(20)]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=60)
    assert worker.exitcode == -signal.SIGKILL
    ledger = BudgetLedger(path)  # runs an integrity check; the killed transaction, if any, is rolled back
    entries = {e.id: e for e in ledger.history("shared")}
    assert entries[reservation].status == "reserved"
    assert entries[reservation].steps == 1000
    assert set(committed) <= set(entries)
    assert all(entries[i].status == "spent" for i in committed)
    assert ledger.spent("shared") == pytest.approx(_fresh_pld_total(list(entries.values()), DELTA), rel=1e-9)


# -- bad files -------------------------------------------------------------------------------------------------------


def test_garbage_file_is_a_clear_error_naming_the_file(tmp_path: Path):
    path = tmp_path / "garbage.db"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(LedgerError, match=re.escape(str(path))):
        BudgetLedger(path)
    assert path.read_bytes() == bytes(range(256)) * 64  # untouched


def test_damaged_ledger_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "damaged.db"
    ledger = BudgetLedger(path)
    ledger.create("patients", 3.0, DELTA)
    for i in range(50):
        ledger.spend("patients", 0.001, 10.0, 1, note="x" * 200 + str(i))
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    data[2 * page + 8 : 3 * page] = b"\xff" * (page - 8)  # overwrite a b-tree page's contents
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match=re.escape(str(path))):
        BudgetLedger(path).history("patients")


def test_ledger_from_a_newer_version_is_refused(ledger: BudgetLedger):
    with sqlite3.connect(ledger.path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match="newer dptrain"):
        BudgetLedger(ledger.path)


def test_other_sqlite_database_is_not_taken_for_a_ledger(tmp_path: Path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE budgets (name TEXT)")
    with pytest.raises(LedgerError, match="not a dptrain privacy ledger"):
        BudgetLedger(path)


def test_missing_file_with_create_false(tmp_path: Path):
    with pytest.raises(LedgerError, match="no privacy ledger"):
        BudgetLedger(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


# -- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "patients", "epsilon": 1.0, "delta": DELTA}, BudgetExistsError, "already exists"),
        ({"name": "", "epsilon": 1.0, "delta": DELTA}, ValueError, "name"),
        ({"name": "x", "epsilon": 0.0, "delta": DELTA}, ValueError, "epsilon"),
        ({"name": "x", "epsilon": -1.0, "delta": DELTA}, ValueError, "epsilon"),
        ({"name": "x", "epsilon": math.inf, "delta": DELTA}, ValueError, "epsilon"),
        ({"name": "x", "epsilon": math.nan, "delta": DELTA}, ValueError, "epsilon"),
        ({"name": "x", "epsilon": 1.0, "delta": 0.0}, ValueError, "delta"),
        ({"name": "x", "epsilon": 1.0, "delta": 1.0}, ValueError, "delta"),
        ({"name": "x", "epsilon": 1.0, "delta": DELTA, "privacy_unit": "household"}, ValueError, "privacy_unit"),
    ],
)
def test_bad_create_raises_and_writes_nothing(ledger: BudgetLedger, kwargs, error, match):
    before = _row_counts(ledger.path)
    with pytest.raises(error, match=match):
        ledger.create(**kwargs)
    assert _row_counts(ledger.path) == before
    assert ledger.budget("patients").epsilon == 3.0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda l: l.spend("nobody", 0.01, 1.0, 10), UnknownBudgetError, "no budget named 'nobody'"),
        (lambda l: l.reserve("nobody", 0.01, 1.0, 10), UnknownBudgetError, "nobody"),
        (lambda l: l.spent("nobody"), UnknownBudgetError, "nobody"),
        (lambda l: l.history("nobody"), UnknownBudgetError, "nobody"),
        (lambda l: l.close_budget("nobody"), UnknownBudgetError, "nobody"),
        (lambda l: l.max_steps("nobody", 0.01, 1.0), UnknownBudgetError, "nobody"),
        (lambda l: l.spend("patients", 0.01, 1.0, 10, delta=1e-6), ValueError, "does not match"),
        (lambda l: l.spend("patients", 0.01, 1.0, 10, group_size=2), ValueError, "privacy_unit='user'"),
        (lambda l: l.spend("patients", 1.5, 1.0, 10), ValueError, "sample_rate"),
        (lambda l: l.spend("patients", 0.01, -1.0, 10), ValueError, "noise_multiplier"),
        (lambda l: l.spend("patients", 0.01, 1.0, 2.5), ValueError, "steps"),
        (lambda l: l.spend("patients", 0.01, 1.0, 10, group_size=0), ValueError, "group_size"),
        (lambda l: l.spend("patients", 0.01, 1.0, 10, note=None), ValueError, "note"),
        (lambda l: l.entry(12345), ValueError, "no entry"),
    ],
)
def test_bad_request_raises_and_records_nothing(ledger: BudgetLedger, call, error, match):
    ledger.spend("patients", 0.01, 1.0, 10)
    before = _row_counts(ledger.path)
    with pytest.raises(error, match=match):
        call(ledger)
    assert _row_counts(ledger.path) == before


def test_matching_delta_is_accepted(ledger: BudgetLedger):
    ledger.spend("patients", 0.01, 1.0, 10, delta=DELTA)
    assert len(ledger.history("patients")) == 1


# -- the README section ------------------------------------------------------------------------------------------


def _rounded(text: str) -> str:
    """``text`` with decimals cut to 4 significant digits: last-digit drift across platforms is not a doc error."""
    return re.sub(r"\d+\.\d+", lambda m: f"{float(m.group()):.4g}", text)


def test_readme_section_example_runs_and_prints_what_it_shows(tmp_path: Path, monkeypatch, capsys):
    text = readme_section("Privacy budgets")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    shown = re.search(r"```text\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert _rounded(capsys.readouterr().out) == _rounded(shown)
    assert (tmp_path / "budgets.db").is_file()  # its own file: the CLI examples beside it use privacy.db
