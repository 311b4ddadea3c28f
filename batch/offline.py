"""What a run knows of its night when its ledger's database goes away mid-run.

Guarantee: a ``submit`` whose PostgreSQL ledger fails (server killed, connection cut)
still writes its results table, without another read of the database, from what the run
itself saw: the rows it read before the failure, the claims and outcomes it committed,
and the outcomes it holds but could not commit (the rescue file's). No row says "not
sent" unless this run read the request's state and did not send it; a request whose
state the run never read, or whose answer it never got, is ``unknown`` and says why.

:class:`RememberingLedger` stands in front of the store for the sending part of the run
(lookups and commits pass through unchanged; it keeps a copy of what they returned) and,
once the store failed, answers the results table's questions from that copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batch.errors import StateError
from batch.ledger import Entry, LedgerStore
from batch.ledger.base import OUTCOME_COLUMNS, Mark, one_line

NOT_READ = ("not confirmed: the ledger became unreachable before this run read this request's state (an "
            "earlier run may have sent it); a rerun with the ledger back writes its status")
NO_ANSWER = ("sent; its answer was not recorded (the ledger became unreachable): the provider may have "
             "accepted it; a rerun with the ledger back writes its status")
_TAIL = (None,) * (len(OUTCOME_COLUMNS) - 10)  # the collect and lineage columns: unknown here


class RememberingLedger:
    """A :class:`LedgerStore` as the run's sending part uses it, remembering what it read
    and committed; every other attribute is the store's own."""

    def __init__(self, store: LedgerStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self.unreachable: str | None = None  # why the store failed, once it did
        self._seen: set[str] = set()  # ids whose state this run read
        self._rows: dict[str, tuple[Any, ...]] = {}  # their rows as read (OUTCOME_COLUMNS)
        # Claims committed by this run: (endpoint, source, row, model), not the body (a
        # million-row night must not keep every body twice).
        self._marks: dict[str, tuple[str, str, int, str]] = {}
        self._outcomes: dict[str, tuple[Any, ...]] = {}  # outcomes committed by this run

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    # -- the two calls the sending part makes, passed through and remembered ------------
    def lookup(self, ids: Sequence[str], apis: Sequence[str] | None = None) -> dict[str, Entry]:
        try:
            found = self.store.lookup(ids, apis)
        except self.store.write_errors as exc:
            self.unreachable = self.unreachable or one_line(exc)
            raise
        if apis is None:
            self._seen.update(ids)
            for rid, e in found.items():
                self._rows[rid] = (rid, e.status, e.run_id, e.endpoint, e.task_id, e.error, e.error_code,
                                   e.http_status, e.attempts, e.submitted_at, e.task_status, e.resource_urls,
                                   e.failure_reason, e.completed_at, e.local_paths, e.download_error, None, None)
        return found

    def commit(self, sending: Sequence[Mark], outcomes: Sequence[tuple[Any, ...]],
               other: Sequence[tuple[str, tuple[Any, ...]]], resend_unknown: bool) -> set[str]:
        try:
            claimed = self.store.commit(sending, outcomes, other, resend_unknown)
        except self.store.write_errors as exc:
            self.unreachable = self.unreachable or one_line(exc)
            raise
        for o in outcomes:
            self._outcomes[o[-1]] = o
        for m in sending:
            if m.request_id in claimed:
                self._marks[m.request_id] = (m.endpoint, m.source, m.row, m.model)
        return claimed

    # -- the results table's questions, answered from memory once the store failed -----
    def _outcome_row(self, o: tuple[Any, ...]) -> tuple[Any, ...]:
        status, task_id, error, error_code, http_status, attempts, submitted_at, _poll, run_id, rid = o
        mark = self._marks.get(rid)
        return (rid, status, run_id, mark[0] if mark else None, task_id, error, error_code, http_status,
                attempts, submitted_at, *_TAIL)

    def outcome_rows(self, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """``OUTCOME_COLUMNS`` rows: an outcome in hand (not committed) or committed by this
        run; a claim without an answer (``unknown``); the row as read before (an earlier
        run's, or none: not sent); a request never read (``unknown``)."""
        out = []
        for rid in ids:
            o = self.store.unsaved.get(rid) or self._outcomes.get(rid)
            if o is not None:
                out.append(self._outcome_row(o))
            elif rid in self._marks:
                out.append((rid, "unknown", self.run_id, self._marks[rid][0], None, NO_ANSWER, None, None, 1, None, *_TAIL))
            elif rid in self._rows:
                out.append(self._rows[rid])
            elif rid not in self._seen:
                out.append((rid, "unknown", self.run_id, None, None, NOT_READ, None, None, 0, None, *_TAIL))
        return out

    def run_places(self, run_id: str) -> list[tuple[str, str | None, int | None, str | None]]:
        """The requests this run claimed, in input order (as the store answers)."""
        places = [(rid, source, row, model) for rid, (_, source, row, model) in self._marks.items()]
        return sorted(places, key=lambda p: (p[1] or "", p[2] or 0))

    def run_counts(self, run_id: str) -> list[tuple[str, int]]:
        counts: dict[str, int] = {}
        for row in self.outcome_rows([p[0] for p in self.run_places(run_id)]):
            counts[row[1]] = counts.get(row[1], 0) + 1
        return list(counts.items())

    def labels(self, labels: Sequence[str], before_run: str | None = None) -> dict[str, set[str]]:
        raise StateError("the ledger is unreachable: edited rows are not counted")

    def finish_run(self, run_id: str, summary: dict[str, Any]) -> None:
        raise StateError(f"the ledger is unreachable ({self.unreachable})")
