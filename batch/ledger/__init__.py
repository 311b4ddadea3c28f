"""The ledger: what was sent where, and what came of it (see :mod:`batch.ledger.sqlite`).

The package keeps the names ``batch.ledger`` always had.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path

from batch.ledger.base import (
    LEDGER_COLUMNS,
    OUTCOME_COLUMNS,
    OUTCOME_FIELDS,
    SQL_OUTCOME,
    AsyncLedger,
    Entry,
    LedgerStore,
    Mark,
    default_state_path,
    fake_state_path,
    night_of,
    state_home,
    utcnow,
)
from batch.ledger.postgres import PgLocation, is_database_url
from batch.ledger.sqlite import (
    ADDED_COLUMNS,
    APPLICATION_ID,
    COMPANIONS,
    SCHEMA_VERSION,
    SQL_CLAIM,
    SQLITE_HEADER,
    START_OVER,
    V1_ROUTE,
    Ledger,
    LedgerLock,
    backup,
    check_header,
    check_links,
    companion,
    create_ledger,
    transaction,
)
from batch.ledger.sqlite import (
    locked_ledger as locked_sqlite_ledger,
)

State = Path | PgLocation  # where a ledger is: a SQLite file, or a ledger in PostgreSQL


@contextlib.contextmanager
def locked_ledger(state: State, api: str, kind: str = "submit") -> Iterator[LedgerStore]:
    """The ledger at ``state``, open under its writer lock for ``kind`` (submit and collect
    lock apart), whichever store holds it."""
    if isinstance(state, PgLocation):
        from batch.ledger.postgres import locked_pg_ledger

        with locked_pg_ledger(state, api, kind) as ledger:
            yield ledger
    else:
        with locked_sqlite_ledger(state, api, kind) as ledger:
            yield ledger


def open_readonly(state: State, api: str) -> LedgerStore | None:
    """For estimates and lists: no lock, no writes; ``None`` when there is no ledger yet."""
    if isinstance(state, PgLocation):
        from batch.ledger.postgres import open_pg_readonly

        return open_pg_readonly(state, api)
    return Ledger.open_readonly(state, api)


def copy_ledger(source: State, dest: State) -> dict[str, int]:
    """Copy every request and run of ``source`` into ``dest`` (SQLite <-> PostgreSQL), which
    must hold none yet, each under its submit lock (no run writes meanwhile); then compare
    the counts by status of both. Returns them."""
    from batch.errors import StateError

    probe = open_readonly(source, "")
    if probe is None:
        raise StateError(f"{source}: no ledger there; nothing copied")
    probe.close()
    with locked_ledger(source, "") as src, locked_ledger(dest, "") as dst:
        if dst.export_rows("requests") or dst.export_rows("runs"):
            raise StateError(f"{dest}: already holds requests or runs; copy into a new ledger")
        for table in ("runs", "requests"):
            dst.import_rows(table, src.export_rows(table))
        want, have = src.counts(), dst.counts()
        if want != have:
            raise StateError(f"{dest}: the copy's counts {have} differ from {source}'s {want}")
        return have


__all__ = [
    "ADDED_COLUMNS",
    "APPLICATION_ID",
    "COMPANIONS",
    "LEDGER_COLUMNS",
    "OUTCOME_COLUMNS",
    "OUTCOME_FIELDS",
    "SCHEMA_VERSION",
    "SQLITE_HEADER",
    "SQL_CLAIM",
    "SQL_OUTCOME",
    "START_OVER",
    "V1_ROUTE",
    "AsyncLedger",
    "Entry",
    "Ledger",
    "LedgerLock",
    "LedgerStore",
    "Mark",
    "PgLocation",
    "State",
    "backup",
    "check_header",
    "check_links",
    "companion",
    "copy_ledger",
    "create_ledger",
    "default_state_path",
    "fake_state_path",
    "is_database_url",
    "locked_ledger",
    "night_of",
    "open_readonly",
    "state_home",
    "transaction",
    "utcnow",
]
