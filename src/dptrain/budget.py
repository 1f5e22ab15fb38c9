"""Privacy budget ledger: one persistent budget per dataset, composed across every run that touches it.

Each release (a training run, a tuning run, an evaluation) is recorded as an *event* -- Poisson-sampled Gaussian
with its sample rate, noise multiplier, number of steps, sampling scheme and privacy unit -- never as a bare epsilon.
A run that shuffled instead of Poisson-sampling is composed the same way but labelled ``sampling="shuffled"``: its
share of the total is not a proven guarantee. A run's seed is kept, and reusing one against a budget is warned about.
The total is recomputed by composing every recorded event in one fresh PLD accountant at the budget's delta, which
is tighter than adding epsilons and never rounds in the user's favour (pessimistic discretisation, an exact
``total <= cap`` comparison).

The ledger is an SQLite file that the user can inspect (``sqlite3 privacy.db 'SELECT * FROM entries'``). A spend
checks the cap and writes the entry inside one ``BEGIN IMMEDIATE`` transaction, so processes sharing the file never
jointly exceed the cap; ``synchronous=FULL`` makes every committed entry survive a killed process. A training run
*reserves* its planned steps before it starts and *settles* to the steps it took; a crash leaves the reservation
in place, which errs on the safe side.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sqlite3
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from dptrain.accounting import (
    COARSE_PLD_VALUE_DISCRETIZATION,
    StepRecord,
    check_delta,
    check_positive,
    check_group_size,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    composed_epsilon,
)
# The ledger's records and errors, re-exported: dptrain.budget is where users import them from.
from dptrain.budget_records import (  # noqa: F401
    BudgetError,
    LedgerError,
    UnknownBudgetError,
    BudgetExistsError,
    BudgetClosedError,
    ReusedSeedWarning,
    BudgetExceededError,
    Budget,
    LedgerEntry,
    BudgetSummary,
)
# The file format; SCHEMA_VERSION is re-exported (tests and tools read it from dptrain.budget).
from dptrain.budget_schema import APPLICATION_ID, MIGRATIONS, SCHEMA, SCHEMA_VERSION  # noqa: F401

#: The PLD discretisation of every ledger total (pessimistic; see accounting.COARSE_PLD_VALUE_DISCRETIZATION).
LEDGER_PLD_DISCRETIZATION = COARSE_PLD_VALUE_DISCRETIZATION
#: :meth:`BudgetLedger.max_steps` searches up to this many steps (composing ~10^6 steps costs about a second).
MAX_STEPS_SEARCHED = 2**20
#: What one budget protects: a single example, a user (all of a person's examples), or a federated client (all of a
#: client's data: client-level DP, dptrain.federated).
PRIVACY_UNITS = ("example", "user", "client")
#: How a run chose its batches: "poisson" (what the accounting assumes) or "shuffled" (epsilon not proven).
SAMPLINGS = ("poisson", "shuffled")
#: Seeds accepted (torch's range). Stored as decimal TEXT: SQLite's INTEGER is signed 64-bit, so 2**63 and up
#: would not fit, and text compares exactly.
SEED_RANGE = (-(2**63), 2**64 - 1)
RESERVED, SPENT = "reserved", "spent"



def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"budget name must be a non-empty string, got {name!r}")


def _seed_text(seed: int | None) -> str | None:
    """The seed as it is stored: canonical decimal text (None stays None)."""
    if seed is None:
        return None
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not low <= int(seed) <= high:
        raise ValueError(f"seed must be None or an integer in [-2**63, 2**64 - 1], got {seed!r}")
    return str(int(seed))


class BudgetLedger:
    """Privacy budgets and every release against them, in the SQLite file at ``path``.

    Each method is one transaction on a fresh connection, so a ledger object is cheap, picklable and safe to use
    from several threads or processes. ``create=False`` refuses a missing file instead of starting an empty ledger;
    ``timeout`` is how many seconds to wait for another process's write lock.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        if not create and not self.path.is_file():
            raise LedgerError(f"no privacy ledger at {self.path}")
        with self._transaction(write=False, initialize=create) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise LedgerError(f"privacy ledger {self.path} is corrupt: {'; '.join(problems[:5])}")

    # -- file handling -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, write: bool, initialize: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction; ``write`` takes the write lock up front (BEGIN IMMEDIATE) so check-then-write is atomic."""
        db = None
        try:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                if self._is_empty(db) and initialize:
                    if not write:  # take the write lock, then look again: another process may initialise first
                        db.execute("COMMIT")
                        db.execute("BEGIN IMMEDIATE")
                    if self._is_empty(db):
                        for statement in SCHEMA:
                            db.execute(statement)
                if self._check_format(db) < SCHEMA_VERSION:
                    # A migration rebuilds tables (SQLite's documented procedure), which needs foreign keys off, and
                    # that pragma only takes effect outside a transaction: migrate in a transaction of its own (it
                    # looks at the version again under the lock: another process may migrate first).
                    db.execute("COMMIT")
                    db.execute("PRAGMA foreign_keys = OFF")
                    db.execute("BEGIN IMMEDIATE")
                    self._migrate(db)
                    db.execute("COMMIT")
                    db.execute("PRAGMA foreign_keys = ON")
                    db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise LedgerError(
                    f"privacy ledger {self.path} stayed locked by another process for {self.timeout} s: {e}"
                ) from e
            raise LedgerError(f"cannot use privacy ledger {self.path}: {e}") from e
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"{self.path} is not a readable privacy ledger (corrupt or not SQLite): {e}") from e
        finally:
            if db is not None:
                db.close()

    @staticmethod
    def _is_empty(db: sqlite3.Connection) -> bool:
        header = db.execute("PRAGMA application_id").fetchone()[0], db.execute("PRAGMA user_version").fetchone()[0]
        return header == (0, 0) and db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None

    def _check_format(self, db: sqlite3.Connection) -> int:
        """The file's schema version, after refusing a file that is not a ledger or is from a newer dptrain."""
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if app_id != APPLICATION_ID:
            raise LedgerError(f"{self.path} is an SQLite database but not a dptrain privacy ledger")
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"privacy ledger {self.path} has schema version {version}, written by a newer dptrain; this version "
                f"reads up to {SCHEMA_VERSION}. Upgrade dptrain to use it."
            )
        if version < 1:
            raise LedgerError(f"privacy ledger {self.path} has an invalid schema version {version}")
        return version

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring an older file to :data:`SCHEMA_VERSION` in place, inside the caller's write transaction (all or
        nothing: a failure rolls the file back to its old version, which older dptrain versions still read)."""
        for version in range(self._check_format(db), SCHEMA_VERSION):
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version + 1}")
        broken = db.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise LedgerError(f"migrating privacy ledger {self.path} would leave {len(broken)} dangling entries")

    def _budget(self, db: sqlite3.Connection, name: str) -> Budget:
        row = db.execute("SELECT * FROM budgets WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = [r[0] for r in db.execute("SELECT name FROM budgets ORDER BY name")]
            raise UnknownBudgetError(f"no budget named {name!r} in {self.path}; budgets: {known}")
        return Budget(**dict(row))

    @staticmethod
    def _entries(db: sqlite3.Connection, name: str) -> list[LedgerEntry]:
        rows = db.execute("SELECT * FROM entries WHERE budget = ? ORDER BY id", (name,))
        return [LedgerEntry.from_row(row) for row in rows]

    @staticmethod
    def _check_request(budget: Budget, group_size: int, delta: float | None, client_level: bool = False) -> None:
        """Refuse a request that does not match the budget it would be charged to."""
        if client_level != (budget.privacy_unit == "client"):
            made_by = "federated rounds (client-level DP)" if client_level else "training steps (examples or users)"
            raise ValueError(
                f"budget {budget.name!r} protects {budget.privacy_unit}s and cannot be charged with {made_by}: a "
                "client-level budget (privacy_unit='client') takes only the rounds of dptrain.federated's strategy, "
                "and a strategy's rounds go only to a client-level budget"
            )
        if budget.closed:
            raise BudgetClosedError(f"budget {budget.name!r} was closed at {budget.closed_at}")
        if delta is not None and delta != budget.delta:
            raise ValueError(
                f"delta {delta!r} does not match budget {budget.name!r}, whose cap is set at delta={budget.delta!r}"
            )
        if budget.privacy_unit == "example" and group_size != 1:
            raise ValueError(
                f"budget {budget.name!r} protects single examples; group_size={group_size} needs a budget "
                "created with privacy_unit='user'"
            )

    # -- budgets -------------------------------------------------------------------------------------------------

    def create(self, name: str, epsilon: float, delta: float, privacy_unit: str = "example") -> Budget:
        """Create a budget capping everything ever released about ``name`` at (``epsilon``, ``delta``)-DP."""
        _check_name(name)
        check_positive(epsilon, "epsilon (the cap)")
        check_delta(delta)
        if privacy_unit not in PRIVACY_UNITS:
            raise ValueError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {privacy_unit!r}")
        budget = Budget(name, float(epsilon), float(delta), privacy_unit, _now(), None)
        with self._transaction(write=True) as db:
            if db.execute("SELECT 1 FROM budgets WHERE name = ?", (name,)).fetchone():
                raise BudgetExistsError(f"budget {name!r} already exists in {self.path}")
            db.execute(
                "INSERT INTO budgets (name, epsilon, delta, privacy_unit, created_at) VALUES (?, ?, ?, ?, ?)",
                (budget.name, budget.epsilon, budget.delta, budget.privacy_unit, budget.created_at),
            )
        return budget

    def budget(self, name: str) -> Budget:
        """The budget ``name`` (raises UnknownBudgetError)."""
        with self._transaction(write=False) as db:
            return self._budget(db, name)

    def budgets(self) -> list[Budget]:
        """Every budget in the ledger, by name."""
        with self._transaction(write=False) as db:
            return [Budget(**dict(row)) for row in db.execute("SELECT * FROM budgets ORDER BY name")]

    def close_budget(self, name: str) -> None:
        """Close a budget for good: later spends and reservations raise BudgetClosedError (settling still works)."""
        with self._transaction(write=True) as db:
            if not self._budget(db, name).closed:
                db.execute("UPDATE budgets SET closed_at = ? WHERE name = ?", (_now(), name))

    # -- spending ------------------------------------------------------------------------------------------------

    def spend(
        self,
        name: str,
        sample_rate: float,
        noise_multiplier: float,
        steps: int,
        note: str = "",
        *,
        group_size: int = 1,
        delta: float | None = None,
        sampling: str = "poisson",
        seed: int | None = None,
        client_level: bool = False,
    ) -> int:
        """Record a finished release of ``steps`` sampled Gaussian steps; returns the entry id.

        Raises BudgetExceededError, recording nothing, if the composed total would exceed the cap. ``delta``, if
        given, must equal the budget's. ``sampling``: "poisson", or "shuffled" for batches that were not
        Poisson-sampled (composed the same way, labelled as not proven). ``seed``: the run's seed, if any; one
        already recorded against this budget raises a :class:`ReusedSeedWarning` (the entry is still recorded).
        ``client_level``: the steps are federated rounds whose privacy unit is the client (``dptrain.federated``);
        they go to budgets created with ``privacy_unit="client"`` and only there.
        """
        return self._add(
            name, sample_rate, noise_multiplier, steps, note, group_size, delta, SPENT, sampling, seed, client_level
        )

    def reserve(
        self,
        name: str,
        sample_rate: float,
        noise_multiplier: float,
        steps: int,
        note: str = "",
        *,
        group_size: int = 1,
        delta: float | None = None,
        sampling: str = "poisson",
        seed: int | None = None,
        client_level: bool = False,
    ) -> int:
        """Reserve a planned run's ``steps`` before it starts; they count in full until :meth:`settle`.

        Same checks, labels and seed warning as :meth:`spend`: a run that would not fit is refused before it takes
        any step.
        """
        return self._add(
            name, sample_rate, noise_multiplier, steps, note, group_size, delta, RESERVED, sampling, seed, client_level
        )

    def _add(
        self,
        name: str,
        sample_rate: float,
        noise_multiplier: float,
        steps: int,
        note: str,
        group_size: int,
        delta: float | None,
        status: str,
        sampling: str,
        seed: int | None,
        client_level: bool,
    ) -> int:
        check_sample_rate(sample_rate)
        check_noise_multiplier(noise_multiplier)
        check_steps(steps)
        check_group_size(group_size)
        if delta is not None:
            check_delta(delta)
        if not isinstance(note, str):
            raise ValueError(f"note must be a string, got {note!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS} (how the run chose its batches), got {sampling!r}")
        seed_text = _seed_text(seed)
        request = StepRecord(float(sample_rate), float(noise_multiplier), steps, group_size)
        with self._transaction(write=True) as db:
            budget = self._budget(db, name)
            self._check_request(budget, group_size, delta, client_level)
            recorded = [e.record() for e in self._entries(db, name)]
            total = composed_epsilon([*recorded, request], budget.delta, LEDGER_PLD_DISCRETIZATION)
            if not total <= budget.epsilon:
                raise BudgetExceededError(
                    name,
                    budget.epsilon,
                    budget.delta,
                    spent=composed_epsilon(recorded, budget.delta, LEDGER_PLD_DISCRETIZATION),
                    requested=composed_epsilon([request], budget.delta, LEDGER_PLD_DISCRETIZATION),
                    total=total,
                )
            if seed_text is not None:
                self._warn_reused_seed(db, name, seed_text)
            cursor = db.execute(
                "INSERT INTO entries (budget, created_at, status, kind, sample_rate, noise_multiplier, steps, "
                "planned_steps, sampling, privacy_unit, group_size, accountant, note, seed) "
                "VALUES (?, ?, ?, 'poisson_gaussian', ?, ?, ?, ?, ?, ?, ?, 'pld', ?, ?)",
                (
                    name,
                    _now(),
                    status,
                    request.sample_rate,
                    request.noise_multiplier,
                    steps,
                    steps,
                    sampling,
                    budget.privacy_unit,
                    group_size,
                    note,
                    seed_text,
                ),
            )
            entry_id = cursor.lastrowid
        assert entry_id is not None
        return entry_id

    def _warn_reused_seed(self, db: sqlite3.Connection, name: str, seed: str) -> None:
        """Warn if an entry of budget ``name`` already used ``seed``. Raised inside the write transaction, so that
        with warnings turned into errors the request is refused and nothing is recorded."""
        row = db.execute(
            "SELECT id, status, created_at, note FROM entries WHERE budget = ? AND seed = ? ORDER BY id LIMIT 1",
            (name, seed),
        ).fetchone()
        if row is not None:
            warnings.warn(
                f"seed {seed} was already used against budget {name!r} by entry {row['id']} ({row['status']}, "
                f"created {row['created_at']}, note {row['note']!r}). Two runs from one seed draw the same noise "
                "and, on the same data, the same batches, so comparing their released models cancels the noise: "
                "what differs between the runs shows through unprotected, which the ledger's composition (independent "
                "noise) does not account for. Pass a fresh seed, or none. This entry is recorded all the same.",
                ReusedSeedWarning,
                stacklevel=4,
            )

    def settle(self, entry_id: int, steps_taken: int) -> None:
        """Turn reservation ``entry_id`` into a spent entry of the ``steps_taken`` (<= reserved) actually taken."""
        check_steps(steps_taken, "steps_taken")
        with self._transaction(write=True) as db:
            row = db.execute("SELECT status, steps FROM entries WHERE id = ?", (entry_id,)).fetchone()
            if row is None:
                raise ValueError(f"no entry with id {entry_id!r} in {self.path}")
            if row["status"] != RESERVED:
                raise ValueError(f"entry {entry_id} is not an open reservation (status {row['status']!r})")
            if steps_taken > row["steps"]:
                raise ValueError(
                    f"steps_taken={steps_taken} exceeds the {row['steps']} steps reserved by entry {entry_id}"
                )
            db.execute(
                "UPDATE entries SET status = ?, steps = ?, settled_at = ? WHERE id = ?",
                (SPENT, steps_taken, _now(), entry_id),
            )

    def max_steps(
        self, name: str, sample_rate: float, noise_multiplier: float, *, group_size: int = 1, client_level: bool = False
    ) -> int:
        """The largest T such that everything recorded plus T such steps stays within the cap (0 if none fit).

        Exact for the ledger's own arithmetic: the total with T steps is <= cap and with T + 1 it is > cap, computed
        exactly as :meth:`reserve` computes it, so reserving T succeeds unless another process spends first. Capped
        at :data:`MAX_STEPS_SEARCHED`. Raises like :meth:`reserve` for a closed budget or a mismatched group size.
        """
        check_sample_rate(sample_rate)
        check_noise_multiplier(noise_multiplier)
        check_group_size(group_size)
        with self._transaction(write=False) as db:
            budget = self._budget(db, name)
            self._check_request(budget, group_size, None, client_level)
            recorded = [e.record() for e in self._entries(db, name)]

        def fits(steps: int) -> bool:
            step = StepRecord(float(sample_rate), float(noise_multiplier), steps, group_size)
            return composed_epsilon([*recorded, step], budget.delta, LEDGER_PLD_DISCRETIZATION) <= budget.epsilon

        # Invariant: `low` fits (the recorded total is within the cap), `high` is the next candidate.
        low, high = 0, 1
        while fits(high):
            if high == MAX_STEPS_SEARCHED:
                return high
            low, high = high, min(2 * high, MAX_STEPS_SEARCHED)
        while high - low > 1:
            mid = (low + high) // 2
            if fits(mid):
                low = mid
            else:
                high = mid
        return low

    # -- reading -------------------------------------------------------------------------------------------------

    def summary(self, name: str) -> BudgetSummary:
        """The budget, its composed spend (reservations included) and remaining epsilon, from one snapshot."""
        with self._transaction(write=False) as db:
            budget = self._budget(db, name)
            entries = self._entries(db, name)
        spent = composed_epsilon([e.record() for e in entries], budget.delta, LEDGER_PLD_DISCRETIZATION)
        return BudgetSummary(
            budget=budget,
            spent=spent,
            remaining=max(0.0, budget.epsilon - spent),
            entries=len(entries),
            reserved=sum(e.status == RESERVED for e in entries),
            shuffled=sum(e.sampling == "shuffled" for e in entries),
        )

    def spent(self, name: str) -> float:
        """Epsilon of every entry (reservations included) composed with PLD at the budget's delta."""
        return self.summary(name).spent

    def remaining(self, name: str) -> float:
        """Cap minus :meth:`spent`, for display (see :class:`BudgetSummary`)."""
        return self.summary(name).remaining

    def history(self, name: str) -> list[LedgerEntry]:
        """Every entry of budget ``name``, oldest first."""
        with self._transaction(write=False) as db:
            self._budget(db, name)
            return self._entries(db, name)

    def entry(self, entry_id: int) -> LedgerEntry:
        """One entry by id, e.g. to check a reservation (raises ValueError if there is none)."""
        with self._transaction(write=False) as db:
            row = db.execute("SELECT * FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            raise ValueError(f"no entry with id {entry_id!r} in {self.path}")
        return LedgerEntry.from_row(row)
