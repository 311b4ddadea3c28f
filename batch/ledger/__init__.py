"""The ledger: what was sent where, and what came of it (see :mod:`batch.ledger.sqlite`).

The package keeps the names ``batch.ledger`` always had.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path

from batch.ledger.base import (
    COPY_COLUMNS,
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
    """Copy every table of ``source``'s history into ``dest`` (SQLite <-> PostgreSQL): runs,
    requests, the retry lineage, uploads and expiry times. ``dest`` must hold none of them
    yet; both are under their submit lock (no run writes meanwhile), the copy is one
    transaction. Then every table's row count, and the requests' counts by
    status, are compared: a mismatch is a :class:`StateError` naming the table. Returns
    the rows copied per table and, under ``"requests:<status>"``, the requests by status."""
    from batch.errors import StateError

    probe = open_readonly(source, "")
    if probe is None:
        raise StateError(f"{source}: no ledger there; nothing copied")
    probe.close()
    with locked_ledger(source, "") as src, locked_ledger(dest, "") as dst:
        held = [table for table in COPY_COLUMNS if dst.table_count(table)]
        if held:
            raise StateError(f"{dest}: already holds {', '.join(held)}; copy into a new ledger")
        dst.import_tables({table: src.export_rows(table) for table in COPY_COLUMNS})
        copied: dict[str, int] = {}
        for table in COPY_COLUMNS:
            want, have = src.table_count(table), dst.table_count(table)
            copied[table] = have
            if want != have:
                raise StateError(f"{dest}: the copy holds {have} rows of {table}, {source} {want}; "
                                 f"the copy is incomplete: drop it and copy again")
        want_status, have_status = src.counts(), dst.counts()
        if want_status != have_status:
            raise StateError(f"{dest}: the copy's counts {have_status} differ from {source}'s {want_status}")
        return copied | {f"requests:{status}": n for status, n in have_status.items()}


__all__ = [
    "ADDED_COLUMNS",
    "APPLICATION_ID",
    "COMPANIONS",
    "COPY_COLUMNS",
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
