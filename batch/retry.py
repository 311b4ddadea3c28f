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

* The ledger's ``task_lineage`` table (in either store: :mod:`batch.ledger` keeps it, and
  the statements; this module decides what is retried) keeps every earlier task
  of a request: attempt number, task id, failure reason and class, when it was retried,
  and the run that sent it with its estimated cost (``sent_run_id``, ``cost_usd``): the
  provider took that task, so the night it was sent keeps counting it against
  ``--max-spend`` and ``--max-requests`` after the row is reset
  (:meth:`batch.ledger.base.LedgerStore.night_requests`).
  The ``requests`` row has two more columns: ``task_attempt`` (1 for the first task) and
  ``earlier_task_ids`` (JSON list), which the results table shows.
* A retry only resets rows that tonight's input holds and that are ``submitted`` with a
  ``failed`` task, in one transaction; the reset row is ``pending`` and goes through the
  ordinary claim, pacing and ``--max-spend`` like any request (so spend counts retries).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from batch.api import whole_text

if TYPE_CHECKING:
    from batch.ledger.base import LedgerStore

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


@dataclass
class RetryPlan:
    retried: list[str] = field(default_factory=list)
    capped: list[str] = field(default_factory=list)  # retryable, but the cap is reached
    never: list[str] = field(default_factory=list)  # content policy / invalid input
    unclassified: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"retried": len(self.retried), "cap_reached": len(self.capped),
                "content_policy": len(self.never), "unclassified": len(self.unclassified)}


def failed_tasks(ledger: LedgerStore, ids: Iterable[str]) -> list[tuple]:
    """Tonight's requests among ``ids`` whose task failed, as :func:`plan` reads them."""
    return ledger.failed_tasks(ids)


def plan(rows: list[tuple], cap: int) -> RetryPlan:
    out = RetryPlan()
    for request_id, _task, reason, _sub, _done, attempt, *_rest, stored in rows:
        kind = stored or classify(reason)
        target = {CONTENT: out.never, UNCLASSIFIED: out.unclassified}.get(kind)
        if target is None:
            target = out.retried if attempt < cap else out.capped
        target.append(request_id)
    return out


def prepare(ledger: LedgerStore, ids: Iterable[str], cap: int, run_id: str) -> RetryPlan:
    """Reset tonight's retryable failed requests to ``pending`` (their task moved to the
    lineage); one transaction, so a crash leaves either the old row or the reset one."""
    rows = ledger.failed_tasks(ids)
    decided = plan(rows, cap)
    chosen = set(decided.retried)
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    api = ledger.api
    lineage, resets = [], []
    for request_id, task_id, reason, submitted_at, completed_at, attempt, earlier, sent_by, cost, stored in rows:
        if request_id not in chosen:
            continue
        lineage.append((api, request_id, attempt, task_id, reason, stored or classify(reason), submitted_at,
                        completed_at, now, run_id, sent_by, cost))
        resets.append((f"retrying: task {task_id} failed ({(reason or '')[:120]})", attempt + 1,
                       json.dumps([*_ids(earlier), str(task_id)]), now, api, request_id))
    if lineage:
        ledger.reset_for_retry(lineage, resets)
    return decided


def _ids(text: str | None) -> list[str]:
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return [whole_text(str(v)) for v in value] if isinstance(value, list) else []
