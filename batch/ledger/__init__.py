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
