"""The ledger's SQLite file format: the schema of a new file and the migrations that bring older files up to it.

One concept, kept apart from the ledger's logic so the layout can be read (and reviewed) in one place; tests compare
a migrated file's layout with a fresh one's.
"""

from __future__ import annotations

#: Version of the file layout; a file with a larger ``PRAGMA user_version`` was written by a newer dptrain.
SCHEMA_VERSION = 3
#: ``PRAGMA application_id`` of a dptrain ledger (ASCII "dptr"): tells a ledger from any other SQLite file.
APPLICATION_ID = 0x64707472

SCHEMA = (
    """CREATE TABLE budgets (
        name TEXT PRIMARY KEY NOT NULL CHECK (length(name) > 0),
        epsilon REAL NOT NULL CHECK (epsilon > 0),
        delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
        privacy_unit TEXT NOT NULL CHECK (privacy_unit IN ('example', 'user', 'client')),
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
        settled_at TEXT,
        seed TEXT
    )""",
    "CREATE INDEX entries_by_budget ON entries (budget, id)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
#: Statements that bring a file of schema version v to v + 1 (run in one write transaction on open). The result
#: matches a fresh file of the new version: an added column goes last, as in ``SCHEMA``.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE entries ADD COLUMN seed TEXT",),  # v2: the run's seed (NULL: none given, or a v1 entry)
    # v3: privacy unit "client". SQLite cannot alter a CHECK, so the budgets table is rebuilt (the ledger runs
    # migrations with foreign keys off and checks them after).
    2: (
        SCHEMA[0].replace("CREATE TABLE budgets", "CREATE TABLE budgets_v3"),
        "INSERT INTO budgets_v3 SELECT name, epsilon, delta, privacy_unit, created_at, closed_at FROM budgets",
        "DROP TABLE budgets",
        "ALTER TABLE budgets_v3 RENAME TO budgets",
    ),
}
