"""Failed generations, retried by rule (``--retry-failed``): which task failures a later
night may pay for again, and the lineage of every request's tasks.

A task the provider accepted and that then ended ``failed`` is paid or at least counted
against the key; sending its request again is a new paid task. So only failures the
provider's own words put on its side are retried, each request at most ``cap`` times in
all (its first task included, across nights), and never a content-policy or invalid-input
failure (the same request would fail the same way, at the same price).

The provider documents no task-failure vocabulary ("inspect error payload"); its error
messages read ``<Category>: <detail>`` (docs, error-handling page; ``provider-today.md``),
and its clients name the states ``failed``, ``error``, ``cancelled``/``canceled`` and
``expired``. :func:`classify` reads the failure reason the collector stored
(:func:`batch.following.failure_reason`) against :data:`NEVER` and :data:`RETRYABLE`; the
collector classifies each field of the answer whole (:func:`classify_parts`, stored as ``requests.failure_class``), since the
stored reason is cut to 300 characters and a long message must not push the provider's
own "content policy" out of it; a
reason matching neither is ``unclassified`` and, like content policy, not retried: paying
again on a guess is what this module exists to avoid.

Guarantees:

* The ledger's ``task_lineage`` table (created ``IF NOT EXISTS``) keeps every earlier task
  of a request: attempt number, task id, failure reason and class, when it was retried,
  and the run that sent it with its estimated cost (``sent_run_id``, ``cost_usd``): the
  provider took that task, so the night it was sent keeps counting it against
  ``--max-spend`` and ``--max-requests`` after the row is reset (:func:`night_attempts`).
  The ``requests`` row gains two columns (``ALTER TABLE ... ADD COLUMN``, only when
  missing): ``task_attempt`` (1 for the first task) and ``earlier_task_ids`` (JSON list),
  which the results table shows.
* A retry only resets rows that tonight's input holds and that are ``submitted`` with a
  ``failed`` task, in one transaction; the reset row is ``pending`` and goes through the
  ordinary claim, pacing and ``--max-spend`` like any request (so spend counts retries).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from batch.api import whole_text

DEFAULT_CAP = 2  # tasks per request in all: the first and one retry

CONTENT, RETRYABLE_CLASS, UNCLASSIFIED = "content_policy", "retryable", "unclassified"


def _code(pattern: str) -> str:
    """An error *code* as :func:`batch.following.failure_reason` stores one: a part of the
    reason (parts are joined by ``; ``, the first may follow a ``<state>: `` prefix) that
    starts ``<code>:``, or is ``code <n>``; never a number in the provider's prose
    ("the first frame is 512 px wide" is not a server error)."""
    return (rf"(?:^|; )(?:(?:error|cancell?ed|expired|failed): )?(?:{pattern}(?=:)|code {pattern}(?=;|$))")


# The provider's words for a failure that is the request's own: never retried.
NEVER = re.compile(
    r"content|moderation|moderated|policy|sensitive|safety|nsfw|copyright|violat|prohibited|"
    rf"invalid|bad request|parameter|unsupported|{_code('4(?:00|22)')}",
    re.IGNORECASE,
)
# ... and for one on the provider's side (its states ``error``, ``cancelled``, ``expired``
# arrive as "<state>: <text>", see batch.following.failure_reason).
# Whole words: "busybox" is not "busy".
RETRYABLE = re.compile(
    r"\b(?:internal|server error|time ?outs?|timed out|expired|cancel\w*|unavailable|overload\w*|busy|"
    rf"try again|retry\w*|capacity)\b|{_code('5[0-9][0-9]')}|^error:",
    re.IGNORECASE,
)
# The provider saying a failure is *not* worth another try outweighs its other words.
NOT_RETRYABLE = re.compile(r"\b(?:not|never|no|don't|do not)\s+(?:be\s+)?retr\w*|\bnon-?retryable\b",
                           re.IGNORECASE)

LINEAGE_SCHEMA = """CREATE TABLE IF NOT EXISTS task_lineage (
    api            TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    attempt        INTEGER NOT NULL,
    task_id        TEXT,
    failure_reason TEXT,
    failure_class  TEXT,
    submitted_at   TEXT,
    completed_at   TEXT,
    retried_at     TEXT NOT NULL,
    run_id         TEXT,
    sent_run_id    TEXT,
    cost_usd       REAL,
    PRIMARY KEY (api, request_id, attempt)
) WITHOUT ROWID"""
COLUMNS = (("task_attempt", "INTEGER"), ("earlier_task_ids", "TEXT"))
# Added after the first release of the lineage: the attempt's own run (hence its night) and cost.
LINEAGE_COLUMNS = (("sent_run_id", "TEXT"), ("cost_usd", "REAL"))
CLASS_COLUMN = ("failure_class", "TEXT")  # written by collect; NULL: classify the stored reason


def classify(reason: str | None) -> str:
    text = reason or ""
    if NEVER.search(text):
        return CONTENT
    if NOT_RETRYABLE.search(text):
        return UNCLASSIFIED
    if RETRYABLE.search(text):
        return RETRYABLE_CLASS
    return UNCLASSIFIED


def classify_parts(parts: Iterable[str]) -> str:
    """The class of a failure from each of its fields, whole: content policy or invalid
    input in any field wins over any retryable word in another."""
    kinds = {classify(p) for p in parts}
    return CONTENT if CONTENT in kinds else RETRYABLE_CLASS if RETRYABLE_CLASS in kinds else UNCLASSIFIED


def ensure(db: sqlite3.Connection) -> None:
    """The additive schema: the lineage table, and the two columns where missing."""
    db.execute(LINEAGE_SCHEMA)
    for table, columns in (("requests", (*COLUMNS, CLASS_COLUMN)), ("task_lineage", LINEAGE_COLUMNS)):
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns:
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def has_columns(db: sqlite3.Connection) -> bool:
    return {n for n, _ in COLUMNS} <= {row[1] for row in db.execute("PRAGMA table_info(requests)")}


@dataclass
class RetryPlan:
    retried: list[str] = field(default_factory=list)
    capped: list[str] = field(default_factory=list)  # retryable, but the cap is reached
    never: list[str] = field(default_factory=list)  # content policy / invalid input
    unclassified: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"retried": len(self.retried), "cap_reached": len(self.capped),
                "content_policy": len(self.never), "unclassified": len(self.unclassified)}


_FAILED = ("SELECT request_id, task_id, failure_reason, submitted_at, completed_at, COALESCE(task_attempt, 1), "
           "earlier_task_ids, run_id, cost_usd, failure_class FROM requests "
           "WHERE api = ? AND status = 'submitted' AND task_status = 'failed' AND request_id IN ({marks})")


def failed_tasks(db: sqlite3.Connection, api: str, ids: Iterable[str]) -> list[tuple]:
    wanted = list(dict.fromkeys(ids))
    rows: list[tuple] = []
    columns = has_columns(db)
    query = _FAILED if columns else _FAILED.replace("COALESCE(task_attempt, 1)", "1").replace(
        "earlier_task_ids", "NULL")
    if CLASS_COLUMN[0] not in {row[1] for row in db.execute("PRAGMA table_info(requests)")}:
        query = query.replace(", failure_class FROM", ", NULL FROM")
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        rows.extend(db.execute(query.format(marks=",".join("?" * len(chunk))), (api, *chunk)).fetchall())
    return rows


def plan(rows: list[tuple], cap: int) -> RetryPlan:
    out = RetryPlan()
    for request_id, _task, reason, _sub, _done, attempt, *_rest, stored in rows:
        kind = stored or classify(reason)
        target = {CONTENT: out.never, UNCLASSIFIED: out.unclassified}.get(kind)
        if target is None:
            target = out.retried if attempt < cap else out.capped
        target.append(request_id)
    return out


def prepare(db: sqlite3.Connection, api: str, ids: Iterable[str], cap: int, run_id: str) -> RetryPlan:
    """Reset tonight's retryable failed requests to ``pending`` (their task moved to the
    lineage); one transaction, so a crash leaves either the old row or the reset one."""
    rows = failed_tasks(db, api, ids)
    decided = plan(rows, cap)
    chosen = set(decided.retried)
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    db.execute("BEGIN IMMEDIATE")
    try:
        for request_id, task_id, reason, submitted_at, completed_at, attempt, earlier, sent_by, cost, stored in rows:
            if request_id not in chosen:
                continue
            ids_before = [*_ids(earlier), str(task_id)]
            db.execute("INSERT OR REPLACE INTO task_lineage(api, request_id, attempt, task_id, failure_reason, "
                       "failure_class, submitted_at, completed_at, retried_at, run_id, sent_run_id, cost_usd) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (api, request_id, attempt, task_id, reason, stored or classify(reason), submitted_at,
                        completed_at, now, run_id, sent_by, cost))
            db.execute(
                "UPDATE requests SET status = 'pending', task_id = NULL, poll_url = NULL, task_status = NULL, "
                "resource_urls = NULL, resources = NULL, failure_reason = NULL, failure_class = NULL, completed_at = NULL, "
                "local_paths = NULL, download_error = NULL, polls = 0, attempts = 0, error = ?, "
                "task_attempt = ?, earlier_task_ids = ?, updated_at = ? "
                "WHERE api = ? AND request_id = ? AND status = 'submitted' AND task_status = 'failed'",
                (f"retrying: task {task_id} failed ({(reason or '')[:120]})", attempt + 1, json.dumps(ids_before),
                 now, api, request_id))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return decided


# The earlier tasks sent by runs of a night: ``(model, body, cost_usd)`` as
# :meth:`batch.ledger.Ledger.night_requests` counts them (the body is the request's, the
# same for every attempt). A failed task counts: the provider took it and may bill it.
NIGHT_ATTEMPTS = (
    "SELECT r.model, r.body, l.cost_usd FROM task_lineage l JOIN runs u ON u.run_id = l.sent_run_id "
    "JOIN requests r ON r.api = l.api AND r.request_id = l.request_id "
    "WHERE u.night = ? AND (l.api = ?) = ?"
)


def night_attempts(db: sqlite3.Connection, night: str, fake_api: str, fake: bool) -> list[tuple]:
    return db.execute(NIGHT_ATTEMPTS, (night, fake_api, fake)).fetchall()


def next_attempts(db: sqlite3.Connection, api: str) -> dict[str, int]:
    """Request id -> attempt number of each retried request not yet sent again (its row
    reset, no task yet): what its next task's x-request-id carries."""
    if not has_columns(db):
        return {}
    return dict(db.execute("SELECT request_id, task_attempt FROM requests WHERE api = ? AND task_attempt > 1 "
                           "AND task_id IS NULL", (api,)).fetchall())


def lineage_tasks(db: sqlite3.Connection) -> int:
    """How many earlier tasks the lineage holds: task ids that left ``requests`` when their
    row was reset, which the run marker's count must keep (batch.ledger)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'task_lineage'").fetchone() is None:
        return 0
    return db.execute("SELECT count(*) FROM task_lineage WHERE task_id IS NOT NULL").fetchone()[0]


def retries_sent(db: sqlite3.Connection, api: str, run_id: str) -> int:
    """How many retry tasks (attempt 2 or later) ``run_id`` sent that the provider may
    have taken: what the summary reports apart from the requests made pending again (a
    --max-spend stop leaves those pending, sent by a later run)."""
    if not has_columns(db):
        return 0
    return db.execute("SELECT count(*) FROM requests WHERE api = ? AND run_id = ? AND task_attempt > 1 "
                      "AND status IN ('submitted', 'unknown')", (api, run_id)).fetchone()[0]


def _ids(text: str | None) -> list[str]:
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return [whole_text(str(v)) for v in value] if isinstance(value, list) else []
