"""What the budget ledger stores and raises: budgets, recorded entries, summaries, and its errors (apart from the
ledger's storage, ``dptrain.budget``, so that another storage backend can share them)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import dp_accounting

from dptrain.accounting import StepRecord


class BudgetError(Exception):
    """Base class of every refusal or failure of the budget ledger."""


class LedgerError(BudgetError, RuntimeError):
    """The ledger file cannot be used: corrupt, not a ledger, from a newer dptrain, missing or locked too long."""


class UnknownBudgetError(BudgetError, ValueError):
    """No budget of that name in the ledger."""


class BudgetExistsError(BudgetError, ValueError):
    """A budget of that name already exists (caps are never silently replaced)."""


class BudgetClosedError(BudgetError, ValueError):
    """The budget was closed: nothing more may be spent or reserved against it."""


class ReusedSeedWarning(UserWarning):
    """A reservation or spend gives a seed that an earlier entry of the same budget already used (still recorded)."""


class BudgetExceededError(BudgetError, ValueError):
    """The request would take the composed total above the cap; nothing was recorded.

    ``cap``: the budget's epsilon; ``spent``: the composed epsilon of everything recorded so far; ``requested``: the
    epsilon of the request alone; ``total``: the composed epsilon of both (all at the budget's ``delta``).
    """

    def __init__(self, name: str, cap: float, delta: float, spent: float, requested: float, total: float) -> None:
        self.name, self.cap, self.delta = name, cap, delta
        self.spent, self.requested, self.total = spent, requested, total
        super().__init__(
            f"privacy budget {name!r} would be exceeded: cap epsilon={cap:.8g} at delta={delta:.3g}, "
            f"already spent epsilon={spent:.8g}, requested epsilon={requested:.8g} on its own, composed total "
            f"would be epsilon={total:.8g} > cap. Nothing was recorded."
        )


@dataclass(frozen=True)
class Budget:
    """A cap (epsilon, delta) on everything released about one dataset, per ``privacy_unit`` ("example", "user" or "client")."""

    name: str
    epsilon: float
    delta: float
    privacy_unit: str
    created_at: str
    closed_at: str | None

    @property
    def closed(self) -> bool:
        return self.closed_at is not None


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded release: the event itself (not its epsilon), when it happened, and whether it is settled.

    ``status`` is "reserved" (a run's planned steps, counted in full until settled) or "spent"; ``planned_steps`` is
    what was reserved and ``steps`` what counts now. ``group_size`` > 1: each privacy unit (user) contributes up to
    that many examples, each Poisson-sampled (see :func:`dptrain.accounting.sampled_gaussian_event`). ``sampling``
    is "poisson", or "shuffled" for a run whose epsilon (composed as if Poisson) is not a proven guarantee;
    ``seed`` is the run's seed (None: none given, or recorded by a version-1 ledger).
    """

    id: int
    budget: str
    created_at: str
    status: str
    kind: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    planned_steps: int
    sampling: str
    privacy_unit: str
    group_size: int
    accountant: str
    note: str
    settled_at: str | None
    seed: int | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "LedgerEntry":
        fields = dict(row)
        fields["seed"] = None if fields["seed"] is None else int(fields["seed"])
        return cls(**fields)

    def record(self) -> StepRecord:
        """The entry's steps as an accounting record (what the ledger composes)."""
        return StepRecord(self.sample_rate, self.noise_multiplier, self.steps, self.group_size)

    def event(self) -> dp_accounting.DpEvent:
        """The entry as a dp_accounting event, e.g. to compose it in an accountant of your own."""
        return self.record().to_event()


@dataclass(frozen=True)
class BudgetSummary:
    """A budget with its composed spend, read in one snapshot.

    ``remaining`` = cap - spent is for display: epsilons do not add, so use :meth:`BudgetLedger.max_steps` to plan.
    ``shuffled`` counts the entries labelled ``sampling="shuffled"``: if it is not 0, ``spent`` is not a proven bound.
    """

    budget: Budget
    spent: float
    remaining: float
    entries: int
    reserved: int
    shuffled: int = 0
