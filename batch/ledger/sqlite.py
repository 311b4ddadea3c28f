"""The SQLite store (the default): what was sent where, and what came of it, in one
local file. The semantics every store keeps are in :mod:`batch.ledger.base`; here is how
SQLite keeps them, and what only a file needs.

Guarantees:

* **Durable before the wire.** SQLite in WAL mode: a transaction that claims requests
  as ``sending`` is fsynced (``synchronous=FULL``) *before* any of their HTTP requests
  starts, so a process killed mid-request, or a machine that loses power, leaves evidence
  that the provider may have accepted it; the next run reports it ``unknown`` instead of
  paying for it twice. A transaction of outcomes alone is written without its own fsync
  (``synchronous=NORMAL``): it survives ``kill -9`` at once and power loss from the next
  claim's fsync (a few milliseconds later in a busy run) or the close. Measured with
  benchmarks/bench.py (20k unpaced requests): 10,787 fsynced commits took 2.9 s of a 13 s
  run, and a quarter of them held outcomes alone.
* **One writer per ledger, whatever names it.** :class:`LedgerLock` locks the ledger
  *file* (an open-file-description lock on byte 0 for submit, byte 1 for collect), so a
  symlink, a hard link or a relative path to the same file meets the same lock; the
  kernel drops it when the process dies. And independently of the lock, the ``sending``
  mark is a conditional claim: a row already ``submitted`` (or ``sending``/``unknown``)
  is never claimed again, so two writers cannot both send one request.
* **One file, one name.** A state file with a second hard link, or a ``-wal``, ``-shm``,
  run marker or rescue file planted as a link, is refused (:func:`check_links`): SQLite
  keeps the latest writes beside the name it opens, so a second name is a ledger missing
  them. SQLite opens the real name, so a symlink shares the same companions.
* **The night's spend.** Each claim records the request's estimated cost and each run its
  night (:func:`night_of`): the night's later runs sum what may have been accepted.
* **Per API.** Rows are keyed by ``(api, request_id)``: a request counts as sent only for
  runs against the API that took it (the fake's task ids never stand in for real ones).
* **No silent fresh start.** A zero-byte or header-less file is refused, never taken for
  a new ledger; a new ledger is built beside the target and linked into place, so a crash
  never leaves an empty one. A run marker written before sending detects a ledger that
  lost its ``-wal`` companion or was restored from an older copy.
* **Accepted task ids are never lost.** Outcomes that cannot be committed (disk full) are
  kept in memory, written to ``<state>.rescue.jsonl`` where possible, shown in the results
  table, and replayed into the ledger by the next run before it sends anything.

Statuses stored: ``sending``, ``submitted``, ``failed``, ``unknown`` and ``pending``
(certainly not accepted, e.g. stopped between retries of a 429).

:class:`~batch.ledger.base.AsyncLedger` batches writes (group commit): many workers
waiting for their ``sending`` mark share one fsync, so the ledger does not cap throughput.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import stat
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from batch import expiry, retry, upload
from batch.api import DEFAULT_MODEL, FAKE_API
from batch.errors import LockedError, StateError
from batch.identity import content_key, with_repeat
from batch.ledger.base import (
    COPY_COLUMNS,
    LEDGER_COLUMNS,
    OUTCOME_COLUMNS,
    SQL_IMPORT_UPGRADE,
    SQL_OUTCOME,
    SQL_REPLAY,
    Entry,
    LedgerStore,
    Mark,
    night_of,
    utcnow,
)
from batch.mutant import mutant
from batch.storage import fsync_path

APPLICATION_ID = 0x5EEDBA7C  # marks the file as ours (PRAGMA application_id)
SCHEMA_VERSION = 2
SQLITE_HEADER = b"SQLite format 3\x00"
# Version 1 sent every request to this one route (shared/api/seedance-1.0-lite-t2v.md).
V1_ROUTE = "/api/v1/text-to-video/bytedance/seedance-1.0-lite-t2v/async"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    api            TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    status         TEXT NOT NULL,
    run_id         TEXT NOT NULL,
    label          TEXT,
    model          TEXT,
    endpoint       TEXT,
    source         TEXT,
    row            INTEGER,
    body           TEXT,
    task_id        TEXT,
    poll_url       TEXT,
    error          TEXT,
    error_code     INTEGER,
    http_status    INTEGER,
    attempts       INTEGER NOT NULL DEFAULT 0,
    sending_at     TEXT,
    submitted_at   TEXT,
    updated_at     TEXT NOT NULL,
    task_status    TEXT,
    resource_urls  TEXT,
    resources      TEXT,
    failure_reason TEXT,
    completed_at   TEXT,
    local_paths    TEXT,
    download_error TEXT,
    polls          INTEGER NOT NULL DEFAULT 0,
    cost_usd       REAL,
    PRIMARY KEY (api, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_open_tasks ON requests(task_status) WHERE task_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_label ON requests(api, label) WHERE label IS NOT NULL;
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    command     TEXT,
    summary     TEXT,
    api         TEXT,
    output      TEXT,
    night       TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);
"""

# Columns added after schema 2 shipped, added in place by the first run that opens an
# older file (a version that does not know them simply leaves them NULL).
# Nullable columns added after schema 2 without a version of their own: older versions never read them.
ADDED_COLUMNS = (("requests", "cost_usd", "REAL"), ("runs", "night", "TEXT"), ("runs", "output", "TEXT"))





def companion(state: Path, suffix: str) -> Path:
    """A file that belongs to the ledger, beside its real path (``<state>.<suffix>``)."""
    real = Path(os.path.realpath(state))
    return real.with_name(f"{real.name}.{suffix}")




# -- the lock ------------------------------------------------------------------------

_OFD = getattr(fcntl, "F_OFD_SETLK", None)  # Linux >= 3.15
_LOCK_BYTE = {"submit": 0, "collect": 1}


class LedgerLock:
    """An exclusive lock on the ledger file itself, for one kind of run.

    submit and collect lock different bytes: a 15-minute collect cron must not wait for
    (or block) the nightly submit; SQLite serialises their writes. The bytes are far
    below SQLite's own lock range (1 GiB), and open-file-description locks belong to
    this descriptor alone, so SQLite closing its descriptors cannot drop ours. The
    descriptor is closed only after the ledger connection is (:func:`locked_ledger`).
    Where OFD locks do not exist, ``flock`` on ``<real path>.<kind>.lock`` stands in.
    """

    def __init__(self, state: Path, kind: str = "submit") -> None:
        self.state = state
        self.kind = kind
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            if _OFD is not None:
                fd = os.open(self.state, os.O_RDWR | os.O_CLOEXEC)
                data = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _LOCK_BYTE[self.kind], 1, 0)
                operation = lambda: fcntl.fcntl(fd, _OFD, data)  # noqa: E731
            else:  # pragma: no cover - non-Linux
                fd = os.open(companion(self.state, f"{self.kind}.lock"),
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                operation = lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # noqa: E731
        except OSError as exc:
            raise StateError(f"{self.state}: cannot open state file ({exc.strerror})") from None
        try:
            operation()
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LockedError(f"another {self.kind} run is using state {self.state}; nothing sent") from None
            raise StateError(f"{self.state}: cannot lock state file ({exc.strerror})") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def create_ledger(path: Path) -> None:
    """Create a new, empty ledger at ``path`` unless one exists: built under a temporary
    name and hard-linked into place, so ``path`` is never an empty or half-made file and
    two processes creating it at once end up with the same one."""
    if path.exists() or path.is_symlink():
        return
    tmp = path.with_name(f".{path.name}.new-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))  # the OS's reason, not SQLite's
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with transaction(db):
                _create_schema(db)
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("INSERT INTO meta VALUES ('created_at', ?)", (utcnow(),))
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
        fsync_path(tmp)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        fsync_path(path.parent)
    except sqlite3.Error as exc:
        raise StateError(f"{path}: cannot create state file ({exc})") from None
    except OSError as exc:
        raise StateError(f"{path}: cannot create state file ({exc.strerror or exc}); the state directory must be "
                         f"writable (SQLite also writes its -wal and -shm files there)") from None
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _create_schema(db: sqlite3.Connection) -> None:
    # executescript() would COMMIT first; run the statements inside our transaction.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any error, a failed COMMIT
    (disk full) included, so the connection is usable afterwards."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


START_OVER = ("if you mean to start over, move it away (every request it recorded may then be sent and "
              "paid for again)")


# Files SQLite and this tool keep beside the ledger's real name.
COMPANIONS = ("-wal", "-shm", "-journal", ".runmark", ".rescue.jsonl", ".v1-backup")


def check_links(path: Path, settle: float = 2.0) -> None:
    """Refuse a ledger that is not one file with one name. SQLite keeps the latest writes
    (the ``sending`` marks of a run killed mid-flight) in ``<name>-wal`` beside the name it
    was opened by, and this tool keeps its run marker and rescue file beside the real name:
    a second hard link is a second set of companions, and a run through it would not see
    what the first wrote, paying again for every request in flight. Symlinks resolve to the
    one real name (the callers open that). A companion planted as a link (another ledger's
    ``-wal``, a file to be appended to) is refused too. ``settle``: a new ledger is
    hard-linked into place by :func:`create_ledger` and has two names for an instant."""
    if mutant("skip_check_links"):
        return
    real = Path(os.path.realpath(path))
    deadline = time.monotonic() + settle
    while True:
        try:
            links = os.stat(real).st_nlink
        except OSError:
            return  # no file yet: the callers say so in their own words
        if links <= 1 or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if links > 1:
        raise StateError(
            f"{path}: the state file has {links} names (hard links); SQLite keeps its latest writes in a -wal file "
            f"beside each name, so a run through one name does not see what a run through another wrote and could "
            f"pay again for every request in flight. Keep one name: remove the others (find them with "
            f"'find / -xdev -samefile {real}') after a run ended cleanly, or copy the ledger with "
            f"'seedance-batch state backup'; nothing sent")
    for suffix in COMPANIONS:
        other = real.with_name(real.name + suffix)
        try:
            st = os.lstat(other)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StateError(f"{other}: cannot inspect the ledger's companion file ({exc.strerror}); nothing sent") \
                from None
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else (
                f"a file with {st.st_nlink} names (hard links)" if stat.S_ISREG(st.st_mode) else "not a regular file")
            raise StateError(
                f"{other}: the ledger's {suffix.lstrip('.-')} file is {what}, not a file of its own: another ledger's "
                f"writes could be taken for this one's (or this one's written elsewhere). Move it away after checking "
                f"where it points; nothing sent")


def check_header(path: Path) -> None:
    """Refuse a file that cannot be a ledger before SQLite would treat it as a new one."""
    check_links(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StateError(f"{path}: cannot read state file ({exc.strerror})") from None
    if not head:
        raise StateError(f"{path}: state file is empty (0 bytes), not a ledger this tool wrote: it was truncated "
                         f"or copied wrong; restore it from a backup, or {START_OVER}")
    if head != SQLITE_HEADER:
        raise StateError(f"{path}: not a SQLite file (no SQLite header): it may be truncated or overwritten; "
                         f"restore it from a backup, or {START_OVER}")


# -- the ledger ----------------------------------------------------------------------

class Ledger(LedgerStore):
    """Synchronous access to the state file; use from one thread only.

    ``api`` scopes every look-up: a request counts as sent only for that API.
    """

    write_errors = (sqlite3.Error, OSError)

    def __init__(self, path: Path, api: str, *, readonly: bool = False) -> None:
        super().__init__()
        self.path = path
        self.api = api
        self.readonly = readonly
        self._full = True  # PRAGMA synchronous, as last set
        try:
            # Through the real name: SQLite's -wal and -shm sit beside the name it opens.
            real = os.path.realpath(path)
            if readonly:
                uri = Path(real).as_uri() + "?mode=ro"
                self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                self.db = sqlite3.connect(real, isolation_level=None, check_same_thread=False)
            self._check()
        except sqlite3.OperationalError as exc:  # cannot open, read-only, locked: not the file's fault
            raise StateError(f"{path}: cannot use state file ({exc}); the file and its directory must be "
                             f"writable") from None
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{path}: not a usable seedance-batch state file ({exc})") from None
        except OSError as exc:
            raise StateError(f"{path}: cannot open state file ({exc.strerror})") from None

    @classmethod
    def open(cls, path: Path, api: str) -> Ledger:
        """Open for writing: call with the run lock held (:func:`locked_ledger` creates the
        file before it locks it)."""
        check_header(path)
        ledger = cls(path, api)
        try:
            ledger._replay_rescue()
            ledger._check_marker()
        except BaseException:
            ledger.close()
            raise
        return ledger

    @classmethod
    def open_readonly(cls, path: Path, api: str) -> Ledger | None:
        """For estimates: no lock, no writes; ``None`` when there is no ledger yet."""
        if not path.exists():
            return None
        check_header(path)
        return cls(path, api, readonly=True)

    def _check(self) -> None:
        db = self.db
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app_id != APPLICATION_ID:
            raise StateError(f"{self.path}: a SQLite file of another application, not a seedance-batch state")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"{self.path}: state schema {version} is newer than this tool ({SCHEMA_VERSION})")
        if "requests" not in tables:
            raise StateError(f"{self.path}: state file has no requests table; restore it from a backup, or {START_OVER}")
        problem = db.execute("PRAGMA quick_check").fetchone()[0]
        if problem != "ok":
            raise StateError(f"{self.path}: state file is corrupt ({problem})")
        if self.readonly:
            if version < SCHEMA_VERSION:
                raise StateError(f"{self.path}: state from an earlier version; the next submit run migrates it")
            return
        db.execute("PRAGMA synchronous=FULL")
        self._full = True
        db.execute("PRAGMA busy_timeout=5000")
        if version < SCHEMA_VERSION:
            self._migrate_v1()
        expiry.ensure(db)  # additive (issue 20): result_expires_at per request, IF NOT EXISTS
        upload.ensure(db)  # additive (issue 20): one uploaded image per content hash, IF NOT EXISTS
        retry.ensure(db)  # additive (issue 20): task_lineage table; requests.task_attempt, earlier_task_ids
        self._add_columns()

    def _add_columns(self) -> None:
        for table, column, kind in ADDED_COLUMNS:
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                with transaction(self.db):
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def _migrate_v1(self) -> None:
        """Version 1 keyed rows by ``<id>:<hash>#n`` for one API and one model; key them by
        content (:mod:`batch.identity`) under the API of the run that opens the file.
        A backup of the version-1 file is kept beside it first."""
        backup = companion(self.path, "v1-backup")
        if not backup.exists():
            target = sqlite3.connect(backup)
            try:
                self.db.backup(target)
            finally:
                target.close()
        db = self.db
        old = db.execute(
            "SELECT request_id, status, run_id, source, row, body, task_id, error, error_code, http_status, "
            "attempts, submitted_at, updated_at, task_status, resource_urls, resources, failure_reason, "
            "completed_at, local_paths, download_error, polls FROM requests").fetchall()
        keyed: dict[str, list[tuple[tuple[int, str, int], tuple[Any, ...]]]] = {}
        for row in old:
            rid, body = row[0], row[5]
            label, _, rest = rid.rpartition(":") if ":" in rid else ("", "", rid)
            digest, _, repeat = rest.partition("#")
            try:
                key = content_key(DEFAULT_MODEL, json.loads(body)) if body else digest
            except ValueError:
                key = digest
            order = (int(repeat) if repeat.isdigit() else 0, row[3] or "", row[4] or 0)
            keyed.setdefault(key, []).append((order, (label or None, *row)))
        endpoint = None if self.api == FAKE_API else self.api + V1_ROUTE
        with transaction(db):
            db.execute("DROP INDEX IF EXISTS requests_open_tasks")
            db.execute("ALTER TABLE requests RENAME TO requests_v1")
            db.execute("ALTER TABLE runs ADD COLUMN api TEXT")
            _create_schema(db)
            for key, rows in keyed.items():
                for n, (_, r) in enumerate(sorted(rows, key=lambda item: item[0])):
                    label, _rid, status, run_id, source, row_no, body, task_id, *rest = r
                    db.execute(
                        "INSERT INTO requests(api, request_id, status, run_id, label, model, endpoint, source, row, "
                        "body, task_id, error, error_code, http_status, attempts, submitted_at, updated_at, "
                        "task_status, resource_urls, resources, failure_reason, completed_at, local_paths, "
                        "download_error, polls) VALUES (" + ",".join("?" * 25) + ")",
                        (self.api, with_repeat(key, n), status, run_id, label, DEFAULT_MODEL, endpoint, source,
                         row_no, body, task_id, *rest))
            db.execute("DROP TABLE requests_v1")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('migrated_v1', ?)", (f"{utcnow()} for {self.api}",))
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self.migrated = len(old)

    def synchronous(self, *, full: bool) -> None:
        """FULL (fsync at commit) for what must be durable before the wire; NORMAL for the
        rest (durable against a crash of this process; see the module's guarantees)."""
        full = full and not mutant("skip_claim_fsync")
        if full != self._full:
            self.db.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._full = full

    @property
    def where(self) -> str:
        return str(self.path)

    def rescue_file(self) -> Path:
        return companion(self.path, "rescue.jsonl")

    def commit(self, sending: Sequence[Mark], outcomes: Sequence[tuple[Any, ...]],
               other: Sequence[tuple[str, tuple[Any, ...]]], resend_unknown: bool) -> set[str]:
        db, api = self.db, self.api
        claimed: set[str] = set()
        self.synchronous(full=bool(sending))
        with transaction(db):
            for sql, params in other:
                db.execute(sql, params)
            now = utcnow()  # one timestamp per transaction: what was committed together
            if outcomes:
                db.executemany(SQL_OUTCOME, [(*o[:-2], now, api, o[-2], o[-1]) for o in outcomes])
            for m in sending:
                cur = db.execute(SQL_CLAIM, (api, m.request_id, m.run_id, m.label, m.model, m.endpoint, m.source,
                                             m.row, m.body, now, now, m.cost, resend_unknown))
                if cur.rowcount:
                    claimed.add(m.request_id)
        return claimed

    def export_rows(self, table: str) -> list[tuple[Any, ...]]:
        return self.db.execute(f"SELECT {', '.join(COPY_COLUMNS[table])} FROM {table}").fetchall()

    def import_rows(self, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
        cols = COPY_COLUMNS[table]
        with transaction(self.db):
            self.db.executemany(f"INSERT INTO {table}({', '.join(cols)}) VALUES ({','.join('?' * len(cols))})", rows)

    def replay_outcomes(self, rows: Sequence[tuple[Any, ...]]) -> None:
        with transaction(self.db):
            for api, *o in rows:
                self.db.execute(SQL_REPLAY, (*o[:-2], utcnow(), api, o[-2], o[-1], o[1]))

    def close(self) -> None:
        if not self.readonly:
            # A clean exit leaves everything in the main file: a copy of it alone is whole.
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if not self._full:  # outcomes committed without fsync, if the checkpoint left them in the WAL
                with contextlib.suppress(OSError):
                    fsync_path(os.path.realpath(self.path) + "-wal")
        self.db.close()

    # -- which APIs this ledger knows --------------------------------------------------
    def apis(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT api, count(*) FROM requests GROUP BY api"))

    def move_api(self, old: str, new: str) -> int:
        """Count ``old``'s requests as sent to ``new`` (the same provider at another host)."""
        with transaction(self.db):
            moved = self.db.execute(
                "UPDATE OR FAIL requests SET api=?, poll_url=NULL, updated_at=? WHERE api=?",
                (new, utcnow(), old)).rowcount
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"moved {old}", f"{utcnow()} to {new}"))
        return moved

    # -- runs ------------------------------------------------------------------------
    def start_run(self, run_id: str, command: str, output: str | None = None, night: str | None = None) -> None:
        """Record a run before it sends, with the results table it writes (``output``):
        a later collect finds the table by the run, whatever date the job's name holds;
        and its night, which the spend cap counts by."""
        self.db.execute("INSERT INTO runs(run_id, started_at, command, api, output, night) VALUES (?,?,?,?,?,?)",
                        (run_id, utcnow(), command, self.api, output, night or night_of()))
        self.write_marker(run_id)

    def run_outputs(self, run_ids: Iterable[str]) -> dict[str, str]:
        """The results table each of ``run_ids`` recorded at its start (runs that recorded one)."""
        found: dict[str, str] = {}
        ids = sorted(set(run_ids))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self.db.execute(
                f"SELECT run_id, output FROM runs WHERE output IS NOT NULL AND run_id IN ({marks})", chunk))
        return found

    def run_places(self, run_id: str) -> list[tuple[str, str | None, int | None, str | None]]:
        """``(request_id, source, row, model)`` of every request a run claimed (marked
        ``sending``), whatever came of it, in input order."""
        return list(self.db.execute("SELECT request_id, source, row, model FROM requests WHERE api=? AND run_id=? "
                                    "ORDER BY source, row", (self.api, run_id)))

    def night_requests(self, night: str) -> list[tuple[str | None, str | None, float | None]]:
        """``(model, body, cost_usd)`` of every task that runs of ``night`` sent and the
        provider may have accepted (``sending``, ``submitted``, ``unknown``, and the earlier
        tasks of a retried request, kept in the lineage): what the night has spent. Real
        runs count the real APIs' requests, fake runs the fake's."""
        fake = self.api == FAKE_API
        current = self.db.execute(
            "SELECT r.model, r.body, r.cost_usd FROM requests r JOIN runs u ON u.run_id = r.run_id "
            "WHERE u.night = ? AND r.status IN ('sending', 'submitted', 'unknown') AND (r.api = ?) = ?",
            (night, FAKE_API, fake)).fetchall()
        # ... and the earlier, failed tasks of requests --retry-failed sent again (issue 20).
        return current + retry.night_attempts(self.db, night, FAKE_API, fake)

    def finish_run(self, run_id: str, summary: dict[str, Any]) -> None:
        self.db.execute("UPDATE runs SET finished_at=?, summary=? WHERE run_id=?",
                        (utcnow(), json.dumps(summary), run_id))
        self.write_marker(run_id)

    # -- the run marker: a ledger that lost writes is detected ----------------------------
    def _submitted_count(self) -> int:
        # With the earlier tasks --retry-failed moved to the lineage: a retry run killed after
        # resetting rows must not look like a ledger that lost writes.
        have = self.db.execute("SELECT count(*) FROM requests WHERE task_id IS NOT NULL").fetchone()[0]
        return have + retry.lineage_tasks(self.db)

    def write_marker(self, run_id: str) -> None:
        """Record, outside the database, the last run and how many task ids it held."""
        marker = companion(self.path, "runmark")
        data = {"run_id": run_id, "task_ids": self._submitted_count(), "written_at": utcnow()}
        tmp = marker.with_name(f"{marker.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            # A new file of its own: never through a name planted beside the ledger.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with open(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(data))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, marker)
        except OSError:
            tmp.unlink(missing_ok=True)  # best effort: the ledger itself is what matters

    def _check_marker(self) -> None:
        marker = companion(self.path, "runmark")
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
            run_id, task_ids = str(data["run_id"]), int(data["task_ids"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            return  # a damaged marker proves nothing either way
        known = self.db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone()
        have = self._submitted_count()
        if known is None or have < task_ids:
            raise StateError(
                f"{self.path}: the ledger misses writes its last run made (run {run_id} with {task_ids} task ids "
                f"recorded in {marker.name}; the file has {'not that run' if known is None else have}): it was "
                f"probably copied without its -wal file or restored from an older copy. Restore the complete "
                f"ledger (use 'seedance-batch state backup' to copy one safely); to go on with this one anyway "
                f"(requests may be paid twice) remove {marker}")

    # -- requests ----------------------------------------------------------------------
    def _rows_of(self, columns: Sequence[str], ids: Sequence[str],
                 apis: Sequence[str] | None = None) -> Iterator[tuple[Any, ...]]:
        """``columns`` of the rows of ``ids`` sent to this API (or to ``apis``), 500 ids per
        query: SQLite's parameter limit."""
        cols = ", ".join(columns)
        scope = tuple(apis) if apis is not None else (self.api,)
        api_marks = ",".join("?" * len(scope))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            yield from self.db.execute(
                f"SELECT {cols} FROM requests WHERE api IN ({api_marks}) AND request_id IN ({marks})", (*scope, *chunk))

    def lookup(self, ids: Sequence[str], apis: Sequence[str] | None = None) -> dict[str, Entry]:
        return {row[1]: Entry(*row) for row in self._rows_of(LEDGER_COLUMNS, ids, apis)}

    def known(self, ids: Sequence[str], apis: Sequence[str] | None = None) -> set[str]:
        return {row[0] for row in self._rows_of(("request_id",), ids, apis)}

    def task_states(self, ids: Sequence[str], apis: Sequence[str] | None = None) -> dict[str, tuple[Any, ...]]:
        return {row[0]: row[1:] for row in self._rows_of(("request_id", "api", "status", "task_id"), ids, apis)}

    def outcome_columns(self, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        # A ledger an earlier version wrote, opened read-only, lacks batch.retry's columns.
        columns = (*OUTCOME_COLUMNS[:-2], "COALESCE(task_attempt, 1)", "earlier_task_ids") \
            if retry.has_columns(self.db) else (*OUTCOME_COLUMNS[:-2], "1", "NULL")
        return list(self._rows_of(columns, ids))

    def expiries(self) -> dict[tuple[str, str], str]:
        return expiry.load(self.db)

    def uploads(self) -> dict[str, str]:
        return upload.uploaded(self.db, self.api)

    def next_attempts(self) -> dict[str, int]:
        return retry.next_attempts(self.db, self.api)

    def run_counts(self, run_id: str) -> list[tuple[str, int]]:
        return self.db.execute("SELECT status, count(*) FROM requests WHERE api=? AND run_id=? GROUP BY status",
                               (self.api, run_id)).fetchall()

    def labels(self, labels: Sequence[str], before_run: str | None = None) -> dict[str, set[str]]:
        """For each label, the request ids this API has under it (to spot edited rows);
        with ``before_run``, only those sent by other runs than that one."""
        found: dict[str, set[str]] = {}
        for start in range(0, len(labels), 500):
            chunk = labels[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for label, rid in self.db.execute(
                    f"SELECT label, request_id FROM requests WHERE api=? AND label IN ({marks}) "
                    f"AND status IN ('submitted', 'sending', 'unknown') AND run_id IS NOT ?",
                    (self.api, *chunk, before_run)):
                found.setdefault(label, set()).add(rid)
        return found

    def tasks_to_follow(self, include_success: bool, apis: Sequence[str]) -> list[Entry]:
        """Submitted tasks of ``apis`` not yet terminal (and, for downloads, the successful ones)."""
        done = "('failed', 'expired')" if include_success else "('success', 'failed', 'expired')"
        cols = ", ".join(LEDGER_COLUMNS)
        marks = ",".join("?" * len(apis))
        return [Entry(*row) for row in self.db.execute(
            f"SELECT {cols} FROM requests WHERE task_id IS NOT NULL AND status = 'submitted' AND api IN ({marks}) "
            f"AND (task_status IS NULL OR task_status NOT IN {done}) ORDER BY submitted_at", tuple(apis)
        )]

    def import_tasks(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Adopt tasks known only from a results table, in one transaction: ``(api, request_id,
        task_id, model, endpoint, source, row, body, submitted_at)``. A row with a task id
        is ``submitted``; one without is ``unknown`` (the provider may hold it). A row the
        ledger has already is left as it is, except one a run left ``sending``/``unknown``
        without a task id (its ledger write failed): the task id upgrades it to ``submitted``."""
        if not rows:
            return
        now = utcnow()
        with transaction(self.db):
            self.db.executemany(
                "INSERT INTO requests(api, request_id, status, run_id, model, endpoint, source, row, body, task_id, "
                "submitted_at, updated_at) VALUES (?, ?, CASE WHEN ? IS NULL THEN 'unknown' ELSE 'submitted' END, "
                "'imported', ?, ?, ?, ?, ?, ?, ?, ?) " + SQL_IMPORT_UPGRADE,
                [(api, rid, task, model, endpoint, source, row, body, task, submitted, now)
                 for api, rid, task, model, endpoint, source, row, body, submitted in rows])


def backup(state: Path, dest: Path) -> dict[str, int]:
    """A consistent copy of a ledger through SQLite's online backup API: safe while a run
    writes (it reads a snapshot, WAL included), written beside ``dest`` and renamed into
    place, then checked. Returns the copy's request counts by status."""
    check_header(state)
    if dest.exists():
        raise StateError(f"{dest}: already exists; give a new file name")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        source = sqlite3.connect(Path(os.path.realpath(state)).as_uri() + "?mode=ro", uri=True)
        target = sqlite3.connect(tmp)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")
            if target.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise StateError(f"{state}: the copy does not pass SQLite's integrity check")
            counts = dict(target.execute("SELECT status, count(*) FROM requests GROUP BY status").fetchall())
        finally:
            target.close()
            source.close()
        os.replace(tmp, dest)
        fsync_path(dest.parent)
    except sqlite3.Error as exc:
        raise StateError(f"{state}: cannot back up ({exc})") from None
    except OSError as exc:
        raise StateError(f"{dest}: cannot write the copy ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return counts


@contextlib.contextmanager
def locked_ledger(state: Path, api: str, kind: str = "submit") -> Iterator[Ledger]:
    """The state file, open under its run lock (``kind``: submit and collect lock apart)."""
    create_ledger(state)
    lock = LedgerLock(state, kind)
    lock.acquire()
    try:
        ledger = Ledger.open(state, api)
        try:
            yield ledger
        finally:
            ledger.close()
    finally:
        lock.release()


# A claim: insert as ``sending``, or take over a row that is certainly not at the
# provider (``failed``, ``pending``); with --resend-unknown also an earlier run's
# ``sending``/``unknown``. A ``submitted`` row is never claimed (rowcount 0).
SQL_CLAIM = (
    "INSERT INTO requests(api, request_id, status, run_id, label, model, endpoint, source, row, body, attempts, "
    "sending_at, updated_at, cost_usd) VALUES (?, ?, 'sending', ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?) "
    "ON CONFLICT(api, request_id) DO UPDATE SET status='sending', run_id=excluded.run_id, label=excluded.label, "
    "model=excluded.model, endpoint=excluded.endpoint, source=excluded.source, row=excluded.row, "
    "body=excluded.body, sending_at=excluded.sending_at, updated_at=excluded.updated_at, "
    "cost_usd=excluded.cost_usd "
    "WHERE requests.status IN ('failed', 'pending') OR (? AND requests.status IN ('sending', 'unknown') "
    "AND requests.run_id != excluded.run_id)"
)
