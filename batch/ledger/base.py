"""The ledger's semantics, written once above its stores (SQLite, PostgreSQL).

A store keeps, per ledger, one row per ``(api, request_id)`` and one per run. Every store
keeps these guarantees (each method's docstring in :class:`LedgerStore` says its part):

* **Durable before the wire.** :meth:`LedgerStore.commit` returns only once its claims
  are durable (SQLite: fsynced, ``synchronous=FULL``; PostgreSQL: committed with
  ``synchronous_commit=on``): the caller sends a request only after that.
* **A conditional claim.** A claim is one statement: a row already ``submitted`` (or
  ``sending``/``unknown``, unless the run resends unknowns) is never claimed again, so
  two writers, even without the writer lock, cannot both send one request.
* **One writer per ledger.** :meth:`LedgerStore.locked` holds the submit (or collect)
  lock for the store's life; a second writer gets :class:`~batch.errors.LockedError`
  (exit 3). SQLite: a byte lock on the file; PostgreSQL: a session advisory lock on the
  store's own connection. Both die with the process (or its connection).
* **Accepted task ids are never lost.** Outcomes a store cannot commit are kept
  (:meth:`LedgerStore.save_unsaved`) in memory and in a local rescue file, shown in the
  results table and replayed by the next run before it sends anything.
* **No silent fresh start; per API; the night's spend**: as :mod:`batch.ledger.sqlite`
  describes, the same in every store.
* **Retries, uploads, expiry times in every store.** The retry lineage, the uploads and
  the expiry times (tables ``task_lineage``, ``uploads``, ``task_expiry``) are kept by
  methods written here once, over the statements of :mod:`batch.ledger.queries`; a store
  only runs them (:meth:`LedgerStore._rows`, :meth:`LedgerStore._atomic`) and says which
  tables an older ledger opened read-only lacks (:meth:`LedgerStore._columns`). What is
  retried, the cap and which upload is reused are decided above, in :mod:`batch.retry`
  and :mod:`batch.upload`.

:class:`AsyncLedger` batches writes (group commit) in front of any store.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batch.api import FAKE_API
from batch.errors import StateError
from batch.ledger import queries as q

LEDGER_COLUMNS = (
    "api", "request_id", "status", "run_id", "label", "model", "endpoint", "task_id", "poll_url", "error",
    "error_code", "http_status", "attempts", "sending_at", "submitted_at", "task_status", "resource_urls",
    "failure_reason", "completed_at", "local_paths", "download_error", "body", "polls", "resources",
)

# Every column of every table a copy moves (``state copy``), in one order for both stores;
# each is verified by its count after the copy.
COPY_COLUMNS = {
    "requests": ("api", "request_id", "status", "run_id", "label", "model", "endpoint", "source", "row", "body",
                 "task_id", "poll_url", "error", "error_code", "http_status", "attempts", "sending_at",
                 "submitted_at", "updated_at", "task_status", "resource_urls", "resources", "failure_reason",
                 "completed_at", "local_paths", "download_error", "polls", "cost_usd", "failure_class",
                 "task_attempt", "earlier_task_ids"),
    "runs": ("run_id", "started_at", "finished_at", "command", "summary", "api", "output", "night"),
    # batch.retry's earlier tasks, batch.upload's images, batch.expiry's times
    "task_lineage": ("api", "request_id", "attempt", "task_id", "failure_reason", "failure_class", "submitted_at",
                     "completed_at", "retried_at", "run_id", "sent_run_id", "cost_usd"),
    "uploads": ("api", "sha256", "file_id", "url", "type", "filename", "size", "created_at", "uploaded_at"),
    "task_expiry": ("api", "request_id", "expires_at"),
}

# A row as the results table reads it (Ledger.outcome_rows).
OUTCOME_COLUMNS = (
    "request_id", "status", "run_id", "endpoint", "task_id", "error", "error_code", "http_status", "attempts",
    "submitted_at", "task_status", "resource_urls", "failure_reason", "completed_at", "local_paths",
    "download_error", "task_attempt", "earlier_task_ids",  # the last two: batch.retry (additive columns)
)


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def night_of(now: datetime | None = None) -> str:
    """The night a run belongs to: the local date (the machine's time zone, or ``TZ``)
    when it starts, ``YYYY-MM-DD``, the same date a job's ``{date}`` output gets. The
    spend cap is per night and per ledger."""
    return (now or datetime.now().astimezone()).strftime("%Y-%m-%d")


def one_line(text: object, limit: int = 300) -> str:
    """A driver's message on one line: libpq's continuation lines (tab-indented hints) joined,
    the SQL it echoes (``LINE 1: ...`` and its caret) dropped. Every message that reaches
    stdout, stderr or a summary from a store goes through this."""
    kept = []
    for line in str(text).splitlines():
        if line.startswith("LINE ") and ":" in line:
            break
        kept.append(line.strip())
    joined = " ".join(part for part in kept if part)
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def state_home() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "seedance-batch"


def default_state_path() -> Path:
    return state_home() / "state.sqlite"


def fake_state_path() -> Path:
    return state_home() / "fake-api-state.sqlite"


@dataclass(slots=True)
class Entry:
    """A ledger row as read back."""

    api: str
    request_id: str
    status: str
    run_id: str
    label: str | None
    model: str | None
    endpoint: str | None
    task_id: str | None
    poll_url: str | None
    error: str | None
    error_code: int | None
    http_status: int | None
    attempts: int
    sending_at: str | None
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


# An outcome row: (status, task_id, error, error_code, http_status, attempts, submitted_at,
# poll_url, run_id, request_id); the statement takes it with ``updated_at`` and ``api`` spliced
# in before the last two. One statement per outcome: a separate poll_url update cost
# 70 us a row (1.4 s of 20k).
SQL_OUTCOME = (
    "UPDATE requests SET status=?, task_id=?, error=?, error_code=?, http_status=?, "
    "attempts=?, submitted_at=COALESCE(?, submitted_at), poll_url=COALESCE(?, poll_url), updated_at=? "
    "WHERE api=? AND run_id=? AND request_id=?"
)
OUTCOME_FIELDS = 10
# A replayed outcome (from a rescue file) fills a row only where the run that wrote it left
# the row waiting for it: ``sending``/``unknown`` with no task id, or the same one. A file
# that is stale, planted or another ledger's never overwrites a task id the ledger holds.
SQL_REPLAY = SQL_OUTCOME + " AND status IN ('sending', 'unknown') AND (task_id IS NULL OR task_id = ?)"
# A rescue file is a night's outcomes (~400 bytes each): 256 MiB is far beyond any night.
RESCUE_MAX_BYTES = 256 << 20

def _table(name: str) -> str:
    """A table a copy or a count may name (never text from outside into SQL)."""
    if name not in COPY_COLUMNS:
        raise ValueError(f"not a ledger table: {name!r}")
    return name


class LedgerStore(abc.ABC):
    """One ledger in one store. Used from one thread; ``api`` scopes every look-up (a
    request counts as sent only for the API that took it)."""

    api: str
    readonly: bool = False
    #: The driver's exceptions that mean "this write did not happen" (a full disk, a
    #: server gone): :class:`AsyncLedger` stops sending and keeps the outcomes.
    write_errors: tuple[type[BaseException], ...] = (OSError,)

    #: What a rescue file names its ledger by (PostgreSQL: the id stored in the ledger).
    ledger_id: str | None = None

    def __init__(self) -> None:
        self.unsaved: dict[str, tuple[Any, ...]] = {}  # outcomes that could not be committed
        self.rescue_conflicts: Path | None = None  # outcomes a replay kept aside (see _replay_rescue)

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """The ledger's name for messages (a path, or a URL without its password)."""

    @abc.abstractmethod
    def rescue_file(self) -> Path:
        """The local file that takes outcomes the store could not commit."""

    def rescue_files(self) -> tuple[list[Path], list[Path]]:
        """The rescue files this ledger replays, and those of other ledgers seen beside them
        (named in a warning, never touched)."""
        return [self.rescue_file()], []

    @abc.abstractmethod
    def commit(self, sending: Sequence[Mark], outcomes: Sequence[tuple[Any, ...]],
               other: Sequence[tuple[str, tuple[Any, ...]]], resend_unknown: bool) -> set[str]:
        """One transaction: ``other`` statements (collect's bookkeeping, written with ``?``
        placeholders), then ``outcomes`` (rows as :data:`SQL_OUTCOME` takes them, outcomes
        before claims: within a batch an outcome always precedes its retry's claim), then
        the conditional claim of each mark. Returns the ids claimed; returns only once a
        batch with claims is durable. Raises one of :attr:`write_errors` when nothing was
        committed."""

    def stage(self, sending: Sequence[Mark], outcomes: Sequence[tuple[Any, ...]],
              other: Sequence[tuple[str, tuple[Any, ...]]], resend_unknown: bool) -> set[str] | None:
        """:meth:`commit` without its last step, for a store whose statements are cheap and
        whose COMMIT waits for the disk (SQLite): run the statements, leave the transaction
        open for :meth:`finish_stage`, return the ids claimed (durable only once that
        returns). ``None``: this store commits only in one call (then the writer thread
        runs :meth:`commit` whole)."""
        return None

    def finish_stage(self) -> None:  # noqa: B027 - only a store whose stage() stages needs it
        """Commit what :meth:`stage` left open; roll it back and raise if that fails."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the lock and the connection (a clean end leaves nothing to recover)."""

    # -- what each store says in its own dialect -----------------------------------------
    @abc.abstractmethod
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one statement written with ``?`` placeholders (:mod:`batch.ledger.queries`)."""

    @abc.abstractmethod
    def _atomic(self, batches: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> list[int]:
        """Each statement (``?`` placeholders) with each of its parameter rows, all in one
        transaction; the rows each statement changed. Raises one of :attr:`write_errors`
        when nothing was committed."""

    @abc.abstractmethod
    def _columns(self, table: str) -> frozenset[str]:
        """The columns ``table`` has (none when it does not exist): a ledger an earlier
        version wrote, opened read-only, lacks the additive tables and columns."""

    def _coerce(self, table: str, column: str, value: Any) -> Any:
        """A value read from another store, as this one's column takes it."""
        return value

    @abc.abstractmethod
    def run_outputs(self, run_ids: Iterable[str]) -> dict[str, str]:
        """The results table each of ``run_ids`` recorded at its start."""

    @abc.abstractmethod
    def lookup(self, ids: Sequence[str], apis: Sequence[str] | None = None) -> dict[str, Entry]:
        """The rows of ``ids`` sent to this API (or to ``apis``)."""

    def known(self, ids: Sequence[str], apis: Sequence[str] | None = None) -> set[str]:
        """Which of ``ids`` this API (or ``apis``) has a row for, whatever its status."""
        return set(self.lookup(ids, apis))

    def task_states(self, ids: Sequence[str], apis: Sequence[str] | None = None) -> dict[str, tuple[Any, ...]]:
        """``request_id`` -> ``(api, status, task_id)`` of the rows of ``ids`` this API (or ``apis``) has."""
        return {rid: (e.api, e.status, e.task_id) for rid, e in self.lookup(ids, apis).items()}

    @abc.abstractmethod
    def outcome_columns(self, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """Rows of ``ids`` as :data:`OUTCOME_COLUMNS`, as stored."""

    @abc.abstractmethod
    def labels(self, labels: Sequence[str], before_run: str | None = None) -> dict[str, set[str]]:
        """For each label, the request ids this API has under it that may be at the provider;
        with ``before_run``, only those other runs sent."""

    @abc.abstractmethod
    def tasks_to_follow(self, include_success: bool, apis: Sequence[str]) -> list[Entry]:
        """Submitted tasks of ``apis`` not yet terminal (with downloads, the successful too)."""

    # -- written once for every store (the statements of batch.ledger.queries) -------------
    def replay_outcomes(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Commit ``(api, *outcome)`` rows read back from a rescue file, in one transaction,
        each with :data:`SQL_REPLAY`'s condition (never over another task id)."""
        now = utcnow()
        self._atomic([(SQL_REPLAY, [(*o[:-2], now, api, o[-2], o[-1], o[1]) for api, *o in rows])])

    def apis(self) -> dict[str, int]:
        """Requests per API this ledger holds."""
        return dict(self._rows(q.APIS))

    def move_api(self, old: str, new: str) -> int:
        """Count ``old``'s requests as sent to ``new`` (the same provider at another host)."""
        now = utcnow()
        return self._atomic([(q.MOVE_API, [(new, now, old)]), (q.SET_META, [(f"moved {old}", f"{now} to {new}")])])[0]

    def start_run(self, run_id: str, command: str, output: str | None = None, night: str | None = None) -> None:
        """Record a run before it sends, with the results table it writes (``output``): a
        later collect finds the table by the run, whatever date the job's name holds; and
        its night, which the spend cap counts by."""
        self._atomic([(q.START_RUN, [(run_id, utcnow(), command, self.api, output, night or night_of())])])
        self.write_marker(run_id)

    def finish_run(self, run_id: str, summary: dict[str, Any]) -> None:
        """Record the run's end and summary."""
        self._atomic([(q.FINISH_RUN, [(utcnow(), json.dumps(summary), run_id)])])
        self.write_marker(run_id)

    def run_places(self, run_id: str) -> list[tuple[str, str | None, int | None, str | None]]:
        """``(request_id, source, row, model)`` of every request the run claimed (marked
        ``sending``), whatever came of it, in input order."""
        return self._rows(q.RUN_PLACES, (self.api, run_id))

    def run_counts(self, run_id: str) -> list[tuple[str, int]]:
        """``(status, count)`` of the requests ``run_id`` holds for this API."""
        return self._rows(q.RUN_COUNTS, (self.api, run_id))

    def night_requests(self, night: str) -> list[tuple[str | None, str | None, float | None]]:
        """``(model, body, cost_usd)`` of every task that runs of ``night`` sent and the
        provider may have accepted (``sending``, ``submitted``, ``unknown``, and the earlier
        tasks of a retried request, kept in the lineage): what the night has spent. Real
        runs count the real APIs' requests, fake runs the fake's."""
        fake = self.api == FAKE_API
        current = self._rows(q.NIGHT_REQUESTS, (night, FAKE_API, fake))
        if not self._columns("task_lineage"):
            return current
        return current + self._rows(q.NIGHT_ATTEMPTS, (night, FAKE_API, fake))

    def import_tasks(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Adopt tasks known only from a results table, in one transaction: ``(api, request_id,
        task_id, model, endpoint, source, row, body, submitted_at)``. With a task id a row is
        ``submitted``, without one ``unknown`` (the provider may hold it); a row the ledger has
        is left as it is, except one a run left ``sending``/``unknown`` without a task id (its
        ledger write failed): the table's task id upgrades it to ``submitted``."""
        if not rows:
            return
        now = utcnow()
        self._atomic([(q.IMPORT_TASK, [
            (api, rid, task, model, endpoint, source, self._coerce("requests", "row", row), body, task, submitted, now)
            for api, rid, task, model, endpoint, source, row, body, submitted in rows])])

    def counts(self) -> dict[str, int]:
        """Requests by status."""
        return dict(self._rows(q.COUNTS))

    def table_count(self, table: str) -> int:
        """Rows of one of :data:`COPY_COLUMNS`' tables (none when it does not exist)."""
        if not self._columns(table):
            return 0
        return int(self._rows(f"SELECT count(*) FROM {_table(table)}")[0][0])

    def export_rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of ``table`` (one of :data:`COPY_COLUMNS`) in its order."""
        if not self._columns(table):
            return []
        cols = ", ".join(f'"{c}"' for c in COPY_COLUMNS[_table(table)])
        return self._rows(f"SELECT {cols} FROM {table}")

    def import_rows(self, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert rows of ``table`` as :meth:`export_rows` gave them, in one transaction."""
        self.import_tables({table: rows})

    def import_tables(self, tables: dict[str, Sequence[tuple[Any, ...]]]) -> None:
        """Insert the rows of several tables as :meth:`export_rows` gave them, all in one
        transaction (a copy interrupted midway leaves nothing)."""
        batches = []
        for table, rows in tables.items():
            cols = COPY_COLUMNS[_table(table)]
            sql = f"INSERT INTO {table}({', '.join(f'{chr(34)}{c}{chr(34)}' for c in cols)}) " \
                  f"VALUES ({', '.join('?' * len(cols))})"
            batches.append((sql, [tuple(self._coerce(table, c, v) for c, v in zip(cols, r, strict=True))
                                  for r in rows]))
        self._atomic(batches)

    # -- batch.expiry ------------------------------------------------------------------
    def expiries(self) -> dict[tuple[str, str], str]:
        """``(api, request_id)`` -> when the provider said its outputs expire (batch.expiry)."""
        if not self._columns("task_expiry"):
            return {}
        return {(api, rid): at for api, rid, at in self._rows(q.EXPIRIES)}

    # -- batch.upload ------------------------------------------------------------------
    def uploads(self) -> dict[str, str]:
        """sha256 -> URL of every image uploaded for this API (batch.upload reuses them)."""
        if not self._columns("uploads"):
            return {}
        return dict(self._rows(q.UPLOADS, (self.api,)))

    # -- batch.retry: the lineage --------------------------------------------------------
    def failed_tasks(self, ids: Iterable[str]) -> list[tuple[Any, ...]]:
        """``(request_id, task_id, failure_reason, submitted_at, completed_at, attempt,
        earlier_task_ids, run_id, cost_usd, failure_class)`` of the rows of ``ids`` this API
        has ``submitted`` with a ``failed`` task (what :func:`batch.retry.plan` reads)."""
        wanted = list(dict.fromkeys(ids))
        have = self._columns("requests")
        query = q.FAILED_TASKS
        if "task_attempt" not in have:  # an earlier version's ledger, read-only: no retry ever ran
            query = query.replace("COALESCE(task_attempt, 1)", "1").replace("earlier_task_ids", "NULL")
        if "failure_class" not in have:
            query = query.replace(", failure_class FROM", ", NULL FROM")
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(wanted), 500):  # SQLite's parameter limit
            chunk = wanted[start:start + 500]
            rows += self._rows(query.format(marks=",".join("?" * len(chunk))), (self.api, *chunk))
        return rows

    def reset_for_retry(self, lineage: Sequence[tuple[Any, ...]], resets: Sequence[tuple[Any, ...]]) -> None:
        """In one transaction: earlier tasks into the lineage (rows as :data:`~batch.ledger.
        queries.ADD_LINEAGE` takes them), their requests made ``pending`` (as
        :data:`~batch.ledger.queries.RESET_FOR_RETRY` takes them). A crash leaves the old
        rows or the reset ones, never a task id in neither place."""
        self._atomic([(q.ADD_LINEAGE, lineage), (q.RESET_FOR_RETRY, resets)])

    def next_attempts(self) -> dict[str, int]:
        """Request id -> attempt number of each retried request not yet sent again (its row
        reset, no task yet): what its next task's x-request-id carries."""
        if "task_attempt" not in self._columns("requests"):
            return {}
        return dict(self._rows(q.NEXT_ATTEMPTS, (self.api,)))

    def lineage_tasks(self) -> int:
        """How many earlier tasks the lineage holds: task ids that left ``requests`` when
        their row was reset, which a count of the ledger's task ids must keep."""
        if not self._columns("task_lineage"):
            return 0
        return int(self._rows(q.LINEAGE_TASKS)[0][0])

    def retries_sent(self, run_id: str) -> int:
        """How many retry tasks (attempt 2 or later) ``run_id`` sent that the provider may
        have taken (a --max-spend stop leaves some pending, sent by a later run)."""
        if "task_attempt" not in self._columns("requests"):
            return 0
        return int(self._rows(q.RETRIES_SENT, (self.api, run_id))[0][0])

    # -- written once for every store --------------------------------------------------
    def import_task(self, api: str, request_id: str, task_id: str | None, model: str | None, endpoint: str | None,
                    source: str | None, row: int | None, body: str, submitted_at: str | None) -> None:
        """Adopt one task known only from a results table (collect --results on another machine,
        or a run whose ledger write failed: its row left ``sending``/``unknown``, no task id)."""
        self.import_tasks([(api, request_id, task_id, model, endpoint, source, row, body, submitted_at)])

    def write_marker(self, run_id: str) -> None:  # noqa: B027 - a store without local companions needs none
        """Record, outside the store, what the last run left (SQLite: its run marker)."""

    def outcome_rows(self, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """Rows of ``ids`` as the results table reads them (``OUTCOME_COLUMNS``), with any
        outcome the store refused laid over the stored row."""
        rows = self.outcome_columns(ids)
        if not self.unsaved:
            return rows
        out = []
        for row in rows:
            o = self.unsaved.get(row[0])
            if o is not None:
                status, task_id, error, error_code, http_status, attempts, submitted_at, _poll, _run, _rid = o
                row = (row[0], status, row[2], row[3], task_id, error, error_code, http_status, attempts,
                       submitted_at or row[9], *row[10:])
            out.append(row)
        return out

    def save_unsaved(self, outcomes: Iterable[tuple[Any, ...]]) -> Path | None:
        """Keep outcomes that could not be committed: in memory for the results table and,
        where the disk allows, in the local rescue file for the next run."""
        rows = list(outcomes)
        for o in rows:
            self.unsaved[o[-1]] = o
        if not rows:
            return None
        path = self.rescue_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a symlink planted under this name must not take the task ids elsewhere.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with open(fd, "a", encoding="utf-8") as f:
                for o in rows:
                    f.write(json.dumps({"api": self.api, "ledger": self.ledger_id, "outcome": list(o)}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            return None
        return path

    def _replay_rescue(self) -> None:
        """Before anything is sent: commit the outcomes an earlier run could not (each only
        where its row still waits for it), then rename the rescue file out of the way. A task
        id that conflicts with the one the ledger holds is kept aside in ``<file>.conflict``
        and named in a warning: never written over the ledger's, never lost."""
        import structlog

        mine, others = self.rescue_files()
        log = structlog.get_logger("batch")
        if others:
            log.warning("rescue_of_another_ledger", files=[str(p) for p in others], ledger=self.where,
                        consequence="left untouched: a run on the ledger it belongs to replays it")
        for path in mine:
            text = read_rescue(path)
            if text is None:
                continue
            rows, foreign = [], 0
            for line in text.splitlines():
                try:
                    item = json.loads(line)
                    if item.get("ledger") not in (None, self.ledger_id):
                        foreign += 1
                        continue
                    outcome = list(item["outcome"])
                    if len(outcome) == OUTCOME_FIELDS - 1:  # written before outcomes carried poll_url
                        outcome.insert(7, None)
                    if len(outcome) != OUTCOME_FIELDS:
                        continue
                    rows.append((item["api"], *outcome))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a torn last line: the rest still counts
            if foreign:
                raise StateError(f"{path}: the rescue file holds {foreign} outcomes of another ledger (not "
                                 f"{self.where}); move it away after checking which ledger it belongs to; nothing sent")
            conflicts = self._rescue_conflicts(rows)
            if conflicts:
                kept = path.with_name(path.name + ".conflict")
                _append_lines(kept, [json.dumps({"api": r[0], "ledger": self.ledger_id, "outcome": list(r[1:]),
                                                 "ledger_task_id": held}) for r, held in conflicts])
                log.warning("rescue_conflict", file=str(kept), outcomes=len(conflicts), ledger=self.where,
                            consequence="the ledger's task ids are kept; these outcomes were not replayed")
                self.rescue_conflicts = kept
                skip = {id(r) for r, _ in conflicts}
                rows = [r for r in rows if id(r) not in skip]
            self.replay_outcomes(rows)
            path.rename(path.with_name(path.name + f".replayed-{datetime.now(UTC):%Y%m%dT%H%M%S}"))

    def _rescue_conflicts(self, rows: Sequence[tuple[Any, ...]]) -> list[tuple[tuple[Any, ...], str]]:
        """Replayed outcomes whose task id differs from the one the ledger holds for the row."""
        found = []
        by_api: dict[str, list[tuple[Any, ...]]] = {}
        for r in rows:
            if r[2]:  # (api, status, task_id, ...): only an outcome with a task id can conflict
                by_api.setdefault(r[0], []).append(r)
        for api, group in by_api.items():
            held = self.task_states([r[-1] for r in group], [api])
            for r in group:
                state = held.get(r[-1])
                if state is not None and state[2] and state[2] != r[2]:
                    found.append((r, state[2]))
        return found


def read_rescue(path: Path) -> str | None:
    """A rescue file's text, opened as the ledger's own files are: not through a symlink,
    a regular file with one name, owned by this user, of a bounded size (a planted or
    foreign file must not put outcomes into the ledger). ``None`` when there is none."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        what = "a symlink" if path.is_symlink() else f"unreadable ({exc.strerror})"
        raise StateError(f"{path}: the rescue file is {what}; move it away after checking where it points; "
                         f"nothing sent") from None
    try:
        st = os.fstat(fd)
        what = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
                f"a file with {st.st_nlink} names (hard links)" if st.st_nlink != 1 else
                f"owned by another user (uid {st.st_uid})" if st.st_uid != os.geteuid() else
                f"{st.st_size} bytes (more than {RESCUE_MAX_BYTES})" if st.st_size > RESCUE_MAX_BYTES else "")
        if what:
            raise StateError(f"{path}: the rescue file is {what}, not one this tool wrote; move it away after "
                             f"checking it; nothing sent")
        with open(fd, "rb", closefd=False) as f:
            return f.read(RESCUE_MAX_BYTES + 1).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def _append_lines(path: Path, lines: Sequence[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True, slots=True)
class Mark:
    """What the ledger records when a request is about to be sent."""

    request_id: str
    run_id: str
    label: str | None
    model: str
    endpoint: str
    source: str
    row: int
    body: str
    cost: float | None = None  # estimated USD (with prices): what the night's spend cap counts


class AsyncLedger:
    """Group-committing async front of a :class:`LedgerStore` (either store).

    Writes queue up while the event loop serves other requests; one flush writes them all
    in one transaction, and every caller of :meth:`sending` in that batch awaits the same
    future, resolved only once the transaction is durable (the store's ``commit`` has
    returned): no request goes out before its claim is.

    With ``writer_thread`` (a submit run) the transaction runs in one writer thread: the
    event loop keeps sending the requests already claimed and reading answers while a
    commit waits for its fsync (on the loop's thread every fsync stalled every request: a
    mark-to-wire p99 of 7-18 ms on the shared 2-core machine, issue #21), and the claims
    that queue meanwhile share the next commit. The store is used by one thread at a
    time (:meth:`reading` for reads while a run writes). Measured with
    ``benchmarks/bench.py --submit-only`` (README "Performance"). An earlier measurement
    found a writer thread slower (5.8 s vs 4.1 s for 20k requests: it fought the loop for
    the GIL around every ``sqlite3_step``); that writer took one batch per wake-up, this
    one takes everything queued while the previous commit ran.

    Claims run one statement per row (to read each row's claim result); measured against
    ``executemany`` on 20k marks: +0.03 s. A batch with claims is fsynced; a batch of
    outcomes alone is not (see the module's guarantees).

    When a commit fails (disk full, I/O error) the ledger is *broken*: every later
    :meth:`sending` raises (nothing more is sent), while outcomes of requests already on
    the wire keep arriving; they are kept and handed to :meth:`LedgerStore.save_unsaved` at
    :meth:`close`, unless a last attempt to commit them succeeds.
    """

    def __init__(self, ledger: LedgerStore, resend_unknown: bool = False, writer_thread: bool = False) -> None:
        self.ledger = ledger
        self.resend_unknown = resend_unknown
        # One user of the store's connection at a time: the writer thread, or a read.
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer") if writer_thread else None
        self._sending: list[Mark] = []
        self._outcomes: list[tuple[Any, ...]] = []
        self._other: list[tuple[str, tuple[Any, ...]]] = []
        self._committed: asyncio.Future[set[str]] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._flusher())
        self.commits = 0
        self.broken: StateError | None = None
        self._kept: list[tuple[Any, ...]] = []  # outcomes not committed because the ledger broke
        self.rescue_path: Path | None = None
        self.committed_task_ids = 0

    @property
    def unsaved_count(self) -> int:
        return len(self._kept)

    def lookup(self, ids: Sequence[str]) -> dict[str, Entry]:
        with self._lock:
            return self.ledger.lookup(ids)

    @contextlib.contextmanager
    def reading(self) -> Iterator[LedgerStore]:
        """The store, for reads, while no commit runs in the writer thread."""
        with self._lock:
            yield self.ledger

    async def sending(self, mark: Mark) -> bool:
        """Durably claim a request as about to be sent; ``False`` if the ledger shows it
        taken (submitted, or in flight elsewhere): then it must not be sent."""
        if self.broken is not None:
            raise self.broken
        self._sending.append(mark)
        claimed = await self.flush()
        return mark.request_id in claimed

    def outcome(
        self, request_id: str, run_id: str, status: str, *, task_id: str | None = None, error: str | None = None,
        error_code: int | None = None, http_status: int | None = None, attempts: int = 0,
        submitted_at: str | None = None, poll_url: str | None = None,
    ) -> None:
        """Queue an outcome; committed with the next batch (losing it only leaves ``sending``)."""
        row = (status, task_id, error, error_code, http_status, attempts, submitted_at, poll_url, run_id, request_id)
        if self.broken is not None:
            self._kept.append(row)
            return
        self._outcomes.append(row)
        self._wake.set()

    def write(self, sql: str, params: tuple[Any, ...]) -> None:
        if self.broken is not None:
            return  # collect bookkeeping: the next pass polls again
        self._other.append((sql, params))
        self._wake.set()

    def record_upload(self, row: tuple[Any, ...]) -> None:
        """An image uploaded (batch.upload): committed with the next batch, before the
        requests that carry its URL are claimed."""
        self.write(q.RECORD_UPLOAD, row)

    def record_expiry(self, api: str, request_id: str, expires_at: str) -> None:
        """When the provider said a task's outputs expire (batch.expiry)."""
        self.write(q.SET_EXPIRY, (api, request_id, expires_at))

    async def flush(self) -> set[str]:
        """Return once everything queued so far is committed; the ids claimed in that batch."""
        if self._committed is None:
            self._committed = asyncio.get_running_loop().create_future()
        fut = self._committed
        self._wake.set()
        return await fut

    def _apply(self, sending: list[Mark], outcomes: list[tuple[Any, ...]],
               other: list[tuple[str, tuple[Any, ...]]]) -> set[str]:
        with self._lock:
            claimed = self.ledger.commit(sending, outcomes, other, self.resend_unknown)
        self.committed_task_ids += sum(1 for o in outcomes if o[1] is not None)
        return claimed

    async def _apply_in_writer(self, sending: list[Mark], outcomes: list[tuple[Any, ...]],
                               other: list[tuple[str, tuple[Any, ...]]]) -> set[str]:
        """As :meth:`_apply`, with the commit in the writer thread. A store that stages
        runs its statements here on the loop's thread (microseconds each: in a thread each
        one fought the loop for the GIL) and only the COMMIT, which waits for the fsync,
        in the thread; another runs its whole commit there. Not cancellable: a commit
        under way completes, and its waiters are settled."""
        assert self._writer is not None
        loop = asyncio.get_running_loop()
        self._lock.acquire()
        try:
            claimed = self.ledger.stage(sending, outcomes, other, self.resend_unknown)
        except BaseException:
            self._lock.release()
            raise
        if claimed is None:
            self._lock.release()
            return await asyncio.shield(loop.run_in_executor(self._writer, self._apply, sending, outcomes, other))

        def finish() -> None:
            try:
                self.ledger.finish_stage()
            finally:
                self._lock.release()

        await asyncio.shield(loop.run_in_executor(self._writer, finish))
        self.committed_task_ids += sum(1 for o in outcomes if o[1] is not None)
        return claimed

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let the other ready workers queue their writes too
            sending, outcomes, other = self._sending, self._outcomes, self._other
            fut, self._committed = self._committed, None
            self._sending, self._outcomes, self._other = [], [], []
            claimed: set[str] = set()
            if sending or outcomes or other:
                try:
                    if self._writer is None:
                        claimed = self._apply(sending, outcomes, other)
                    else:
                        claimed = await self._apply_in_writer(sending, outcomes, other)
                except Exception as exc:  # disk full, I/O error, read-only, the server gone; any other
                    # error too: the flusher must settle every waiter, or the run waits for it forever
                    self.broken = StateError(f"state write failed ({one_line(exc)})")
                    self._kept.extend(outcomes)
                    if fut is not None and not fut.done():
                        fut.set_exception(self.broken)
                    if self._closed:
                        return
                    continue
                self.commits += 1
            if fut is not None and not fut.done():
                fut.set_result(claimed)
            if self._closed and not (self._sending or self._outcomes or self._other):
                return

    async def close(self) -> None:
        """Flush everything queued (the connection stays open); keep what cannot be written."""
        self._closed = True
        self._wake.set()
        try:
            await asyncio.shield(self._task)
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
        if self._kept:
            try:  # the disk may have room again (a log rotated, a file removed)
                self._apply([], self._kept, [])
                self._kept = []
            except self.ledger.write_errors:
                self.rescue_path = self.ledger.save_unsaved(self._kept)

