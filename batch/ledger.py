"""The durable state store: what was sent, and what came of it, per ``request_id``.

SQLite in WAL mode with ``synchronous=FULL``: a committed row survives ``kill -9``
and power loss. A request is committed as ``sending`` *before* its HTTP request
starts, so a process killed mid-request leaves evidence that the provider may have
accepted it; the next run reports it ``unknown`` instead of paying for it twice.

Statuses stored: ``sending``, ``submitted``, ``failed``, ``unknown`` and ``pending``
(certainly not accepted, e.g. stopped between retries of a 429).

:class:`AsyncLedger` runs every statement on one worker thread and batches writes
(group commit): many workers waiting for their ``sending`` mark share one fsync, so
the ledger does not cap throughput.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batch.errors import LockedError, StateError

APPLICATION_ID = 0x5EEDBA7C  # marks the file as ours (PRAGMA application_id)
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id     TEXT PRIMARY KEY,
    status         TEXT NOT NULL,
    run_id         TEXT NOT NULL,
    source         TEXT,
    row            INTEGER,
    body           TEXT,
    task_id        TEXT,
    error          TEXT,
    error_code     INTEGER,
    http_status    INTEGER,
    attempts       INTEGER NOT NULL DEFAULT 0,
    submitted_at   TEXT,
    updated_at     TEXT NOT NULL,
    task_status    TEXT,
    resource_urls  TEXT,
    resources      TEXT,
    failure_reason TEXT,
    completed_at   TEXT,
    local_paths    TEXT,
    download_error TEXT,
    polls          INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_open_tasks ON requests(task_status)
    WHERE task_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    command     TEXT,
    summary     TEXT
);
"""

LEDGER_COLUMNS = (
    "request_id", "status", "run_id", "task_id", "error", "error_code", "http_status",
    "attempts", "submitted_at", "task_status", "resource_urls", "failure_reason",
    "completed_at", "local_paths", "download_error", "body", "polls", "resources",
)


# A row as the results table reads it (Ledger.outcome_rows).
OUTCOME_COLUMNS = (
    "request_id", "status", "run_id", "task_id", "error", "error_code", "http_status", "attempts",
    "submitted_at", "task_status", "resource_urls", "failure_reason", "completed_at", "local_paths",
    "download_error",
)


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def default_state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "seedance-batch" / "state.sqlite"


@dataclass(slots=True)
class Entry:
    """A ledger row as read back."""

    request_id: str
    status: str
    run_id: str
    task_id: str | None
    error: str | None
    error_code: int | None
    http_status: int | None
    attempts: int
    submitted_at: str | None
    task_status: str | None
    resource_urls: str | None
    failure_reason: str | None
    completed_at: str | None
    local_paths: str | None
    download_error: str | None
    body: str | None
    polls: int
    resources: str | None


class RunLock:
    """An exclusive ``flock`` on ``<state>.lock``: released by the kernel when the
    process dies, so a ``kill -9`` leaves no stale lock behind."""

    def __init__(self, state_path: Path, kind: str = "") -> None:
        # submit and collect take different locks: a 15-minute collect cron must not
        # wait for (or block) the nightly submit; SQLite serialises their writes.
        self.path = state_path.with_name(state_path.name + (f".{kind}" if kind else "") + ".lock")
        self.kind = kind or "submit"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockedError(
                f"another {self.kind} run is using state {self.path.with_suffix('')} (pid {holder}); nothing sent"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Ledger:
    """Synchronous access to the state file; use from one thread only."""

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = path
        if not create and not path.exists():
            raise StateError(f"{path}: no state file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._check_and_init()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{path}: not a usable seedance-batch state file ({exc})") from None
        except OSError as exc:
            raise StateError(f"{path}: cannot open state file ({exc.strerror})") from None

    def _check_and_init(self) -> None:
        db = self.db
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        if app_id != APPLICATION_ID and tables:
            raise StateError(f"{self.path}: a SQLite file of another application, not a seedance-batch state")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"{self.path}: state schema {version} is newer than this tool ({SCHEMA_VERSION})")
        if tables:
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise StateError(f"{self.path}: state file is corrupt ({problem})")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        if not tables:
            db.execute("BEGIN IMMEDIATE")
            # executescript() would COMMIT first; run the statements inside our transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # -- runs ------------------------------------------------------------------
    def start_run(self, run_id: str, command: str) -> None:
        self.db.execute("INSERT INTO runs(run_id, started_at, command) VALUES (?,?,?)", (run_id, utcnow(), command))

    def finish_run(self, run_id: str, summary: dict[str, Any]) -> None:
        self.db.execute(
            "UPDATE runs SET finished_at=?, summary=? WHERE run_id=?",
            (utcnow(), json.dumps(summary), run_id),
        )

    # -- requests ----------------------------------------------------------------
    def _rows_of(self, columns: Sequence[str], ids: Sequence[str]) -> Iterator[tuple[Any, ...]]:
        """``columns`` of the rows of ``ids`` (500 ids per query: SQLite's parameter limit)."""
        cols = ", ".join(columns)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            yield from self.db.execute(f"SELECT {cols} FROM requests WHERE request_id IN ({marks})", chunk)

    def lookup(self, ids: Sequence[str]) -> dict[str, Entry]:
        return {row[0]: Entry(*row) for row in self._rows_of(LEDGER_COLUMNS, ids)}

    def outcome_rows(self, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """Rows of ``ids`` as the results table reads them (``OUTCOME_COLUMNS``)."""
        return list(self._rows_of(OUTCOME_COLUMNS, ids))

    def tasks_to_follow(self, include_success: bool) -> list[Entry]:
        """Submitted tasks not yet terminal (and, for downloads, the successful ones)."""
        wanted = "('pending', 'success')" if include_success else "('pending')"
        cols = ", ".join(LEDGER_COLUMNS)
        return [Entry(*row) for row in self.db.execute(
            f"SELECT {cols} FROM requests WHERE task_id IS NOT NULL AND status = 'submitted' "
            f"AND (task_status IS NULL OR task_status IN {wanted}) ORDER BY submitted_at"
        )]

    def import_task(self, request_id: str, task_id: str, source: str | None, row: int | None,
                    body: str, submitted_at: str | None) -> None:
        """Adopt a task known only from a results table (collect --results on another machine)."""
        self.db.execute(
            "INSERT INTO requests(request_id, status, run_id, source, row, body, task_id, submitted_at, updated_at) "
            "VALUES (?, 'submitted', 'imported', ?, ?, ?, ?, ?, ?) ON CONFLICT(request_id) DO NOTHING",
            (request_id, source, row, body, task_id, submitted_at, utcnow()),
        )


SQL_SENDING = (
    "INSERT INTO requests(request_id, status, run_id, source, row, body, attempts, updated_at) "
    "VALUES (?, 'sending', ?, ?, ?, ?, 0, ?) "
    "ON CONFLICT(request_id) DO UPDATE SET status='sending', run_id=excluded.run_id, "
    "source=excluded.source, row=excluded.row, body=excluded.body, updated_at=excluded.updated_at"
)
SQL_OUTCOME = (
    "UPDATE requests SET status=?, task_id=?, error=?, error_code=?, http_status=?, "
    "attempts=?, submitted_at=COALESCE(?, submitted_at), updated_at=? WHERE request_id=?"
)


class AsyncLedger:
    """Group-committing async front of a :class:`Ledger`.

    Writes queue up while the event loop serves other requests; one flush writes them all
    with ``executemany`` in one transaction, and every caller of :meth:`sending` in that
    batch awaits the same future, resolved once the transaction is durable.

    The statements run on the event-loop thread, blocking it for one commit (~0.3 ms with
    fsync here). Alternatives measured with benchmarks/bench.py (20k unpaced requests,
    2 cores): a writer thread was slower (5.8 s vs 4.1 s: it fought the loop for the GIL
    around every ``sqlite3_step``); only the COMMIT in an executor thread, no faster;
    a writer child process fed over a pipe, with group commit in the child, cut this
    process's CPU by ~0.4 s but not the wall time (ratio 0.48 vs 0.47): the fake API
    keeps the other core busy and every ``sending`` mark then waited for the child's
    turn on a CPU. Yielding two or three loop turns before a commit (940 or 840 commits
    instead of 1,560) changed nothing measurable either.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._sending: list[tuple[Any, ...]] = []
        self._outcomes: list[tuple[Any, ...]] = []
        self._other: list[tuple[str, tuple[Any, ...]]] = []
        self._committed: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._flusher())
        self.commits = 0

    def lookup(self, ids: Sequence[str]) -> dict[str, Entry]:
        return self.ledger.lookup(ids)

    async def sending(self, request_id: str, run_id: str, source: str, row: int, body: str) -> None:
        """Durably mark a request as about to be sent; returns once committed."""
        self._sending.append((request_id, run_id, source, row, body))
        await self.flush()

    def outcome(
        self, request_id: str, status: str, *, task_id: str | None = None, error: str | None = None,
        error_code: int | None = None, http_status: int | None = None, attempts: int = 0,
        submitted_at: str | None = None,
    ) -> None:
        """Queue an outcome; committed with the next batch (losing it only leaves ``sending``)."""
        self._outcomes.append((status, task_id, error, error_code, http_status, attempts, submitted_at, request_id))
        self._wake.set()

    def write(self, sql: str, params: tuple[Any, ...]) -> None:
        self._other.append((sql, params))
        self._wake.set()

    async def flush(self) -> None:
        """Return once everything queued so far is committed."""
        if self._committed is None:
            self._committed = asyncio.get_running_loop().create_future()
        fut = self._committed
        self._wake.set()
        await fut

    def _apply(self, sending: list[tuple[Any, ...]], outcomes: list[tuple[Any, ...]],
               other: list[tuple[str, tuple[Any, ...]]]) -> None:
        db = self.ledger.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in other:
                db.execute(sql, params)
            # Outcomes before sendings: within one batch an outcome for a request was
            # always queued before its next ``sending`` (a retry), never after.
            now = utcnow()  # one updated_at per transaction: what was committed together
            if outcomes:
                db.executemany(SQL_OUTCOME, [(*o[:-1], now, o[-1]) for o in outcomes])
            if sending:
                db.executemany(SQL_SENDING, [(*row, now) for row in sending])
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let the other ready workers queue their writes too
            sending, outcomes, other = self._sending, self._outcomes, self._other
            fut, self._committed = self._committed, None
            self._sending, self._outcomes, self._other = [], [], []
            if sending or outcomes or other:
                try:
                    self._apply(sending, outcomes, other)
                except Exception as exc:  # disk full, I/O error: fail every waiter
                    if fut is not None and not fut.done():
                        fut.set_exception(StateError(f"state write failed: {exc}"))
                    if self._closed:
                        raise
                    continue
                self.commits += 1
            if fut is not None and not fut.done():
                fut.set_result(None)
            if self._closed and not (self._sending or self._outcomes or self._other):
                return

    async def close(self) -> None:
        """Flush everything queued (the connection stays open)."""
        self._closed = True
        self._wake.set()
        await asyncio.shield(self._task)
