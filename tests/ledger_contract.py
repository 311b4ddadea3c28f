"""The ledger's contract, written once and run against every store (Dagster's habit:
subclasses only say how to make a store). Each test names the guarantee of
:mod:`batch.ledger.base` it checks."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

from batch import retry
from batch.errors import LockedError
from batch.ledger import AsyncLedger, LedgerStore, Mark, State, locked_ledger, open_readonly

API = "https://api.example"


def mark(rid: str, run: str = "run-1", label: str | None = None) -> Mark:
    return Mark(rid, run, label, "bytedance/seedance-1.0-lite-t2v", API + "/x", "in.csv", 2, '{"prompt": "p"}', 0.1)


def claim(ledger: LedgerStore, *marks: Mark, resend_unknown: bool = False,
          outcomes: list[dict[str, Any]] | None = None) -> set[str]:
    """Claim ``marks`` through the group-committing front, as a run does; record ``outcomes``."""
    async def go() -> set[str]:
        front = AsyncLedger(ledger, resend_unknown=resend_unknown)
        got = await asyncio.gather(*(front.sending(m) for m in marks))
        for o in outcomes or []:
            front.outcome(**o)
        await front.close()
        return {m.request_id for m, ok in zip(marks, got, strict=True) if ok}
    return asyncio.run(go())


def submitted(rid: str, run: str = "run-1", task: str = "task-1") -> dict[str, Any]:
    return {"request_id": rid, "run_id": run, "status": "submitted", "task_id": task, "attempts": 1,
            "submitted_at": "2026-01-01T00:00:00.000+00:00"}


class LedgerContract:
    __test__ = False

    @pytest.fixture
    def state(self) -> State:
        raise NotImplementedError

    @pytest.fixture
    def opened(self, state: State) -> Callable[..., AbstractContextManager[LedgerStore]]:
        return lambda kind="submit": locked_ledger(state, API, kind)

    @pytest.fixture
    def ledger(self, opened) -> Iterator[LedgerStore]:
        with opened() as ledger:
            yield ledger

    def test_a_submitted_request_is_never_claimed_again(self, ledger: LedgerStore) -> None:
        assert claim(ledger, mark("a"), mark("b"), outcomes=[submitted("a")]) == {"a", "b"}
        assert claim(ledger, mark("a", "run-2"), mark("b", "run-2"), mark("c", "run-2"), resend_unknown=True) \
            == {"b", "c"}  # b was left sending: an earlier run's, resent only because asked
        entries = ledger.lookup(["a", "b", "c"])
        assert entries["a"].status == "submitted" and entries["a"].task_id == "task-1"
        assert entries["b"].run_id == "run-2"

    def test_sending_and_unknown_are_not_claimed_without_resend_unknown(self, ledger: LedgerStore) -> None:
        claim(ledger, mark("a"))
        assert claim(ledger, mark("a", "run-2")) == set()
        assert ledger.lookup(["a"])["a"].run_id == "run-1"

    def test_failed_and_pending_are_claimed_again(self, ledger: LedgerStore) -> None:
        claim(ledger, mark("a"), mark("b"), outcomes=[
            {"request_id": "a", "run_id": "run-1", "status": "failed", "error": "HTTP 422"},
            {"request_id": "b", "run_id": "run-1", "status": "pending"}])
        assert claim(ledger, mark("a", "run-2"), mark("b", "run-2")) == {"a", "b"}

    def test_rows_are_per_api(self, ledger: LedgerStore) -> None:
        claim(ledger, mark("a"), outcomes=[submitted("a")])
        assert ledger.lookup(["a"], ["https://other.example"]) == {}
        assert ledger.known(["a", "z"]) == {"a"} and ledger.known(["a"], ["https://other.example"]) == set()
        assert ledger.apis() == {API: 1}

    def test_a_second_writer_is_refused_and_collect_locks_apart(self, opened) -> None:
        with opened() as first:
            claim(first, mark("a"))
            with pytest.raises(LockedError), opened():
                pass
            with opened("collect") as collector:
                assert collector.lookup(["a"])["a"].status == "sending"
        with opened():  # free again once the first closed
            pass

    def test_outcomes_that_could_not_be_committed_are_replayed_first(self, opened) -> None:
        with opened() as ledger:
            claim(ledger, mark("a"))
            kept = ("submitted", "task-9", None, None, 200, 1, "2026-01-01T00:00:00.000+00:00", None, "run-1", "a")
            path = ledger.save_unsaved([kept])
            assert path is not None and path.exists()
            assert ledger.outcome_rows(["a"])[0][4] == "task-9"  # the table sees it at once
        with opened() as again:
            entry = again.lookup(["a"])["a"]
            assert (entry.status, entry.task_id) == ("submitted", "task-9")
            assert not path.exists()

    def test_a_replayed_outcome_never_overwrites_a_task_id(self, opened) -> None:
        """A rescue file (stale, planted) whose task id differs from the one the ledger holds
        is kept aside in ``.conflict`` and named in a warning; the rest is replayed."""
        with opened() as ledger:
            claim(ledger, mark("a"), mark("b"), outcomes=[submitted("a", task="task-real")])
            planted = ("submitted", "task-PLANTED", None, None, 200, 1, None, None, "run-1", "a")
            kept = ("submitted", "task-b", None, None, 200, 1, None, None, "run-1", "b")
            path = ledger.save_unsaved([planted, kept])
        assert path is not None
        with opened() as again:
            entries = again.lookup(["a", "b"])
            assert (entries["a"].status, entries["a"].task_id) == ("submitted", "task-real")
            assert (entries["b"].status, entries["b"].task_id) == ("submitted", "task-b")
            assert again.rescue_conflicts is not None and "task-PLANTED" in again.rescue_conflicts.read_text()
            assert "task-real" in again.rescue_conflicts.read_text()
        assert not path.exists()

    @pytest.mark.parametrize("plant", ["directory", "symlink", "hard link"])
    def test_a_rescue_file_that_is_not_this_tools_is_refused(self, opened, state: State, tmp_path, plant: str) -> None:
        from batch.errors import StateError

        with opened() as ledger:
            claim(ledger, mark("a"), outcomes=[submitted("a", task="task-real")])
            path = ledger.rescue_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        other = tmp_path / "planted.jsonl"
        other.write_text(json.dumps({"api": API, "outcome": ["submitted", "task-PLANTED", None, None, 200, 1, None,
                                                             None, "run-1", "a"]}) + "\n")
        if plant == "directory":
            path.mkdir()
        elif plant == "symlink":
            path.symlink_to(other)
        else:
            os.link(other, path)
        try:
            with pytest.raises(StateError, match="rescue"), opened():
                pass
        finally:
            path.rmdir() if plant == "directory" else path.unlink()
        with opened() as again:
            assert again.lookup(["a"])["a"].task_id == "task-real"

    def test_imported_tasks_are_submitted_or_unknown_and_never_overwrite(self, ledger: LedgerStore) -> None:
        claim(ledger, mark("a"), outcomes=[submitted("a", task="mine")])
        ledger.import_tasks([(API, "a", "theirs", None, None, None, None, "{}", None),
                             (API, "b", "task-b", "m", API + "/x", "in.csv", "3", "{}", None),
                             (API, "c", None, None, None, None, None, "{}", None)])
        entries = ledger.lookup(["a", "b", "c"])
        assert entries["a"].task_id == "mine"
        assert (entries["b"].status, entries["b"].task_id) == ("submitted", "task-b")
        assert entries["c"].status == "unknown"
        assert claim(ledger, mark("b", "run-2"), mark("c", "run-2")) == set()

    def test_an_import_upgrades_only_a_row_left_without_its_task_id(self, ledger: LedgerStore) -> None:
        """A run whose ledger write failed left rows ``sending``/``unknown`` without a task id
        that its table holds (main's review fix): the import records them ``submitted``."""
        claim(ledger, mark("s"), mark("u"), mark("k"),
              outcomes=[{"request_id": "u", "run_id": "run-1", "status": "unknown", "attempts": 1},
                        submitted("k", task="kept")])
        ledger.import_tasks([(API, rid, f"table-{rid}", None, None, None, None, "{}", None) for rid in "suk"]
                            + [(API, "n", None, None, None, None, None, "{}", None)])
        ledger.import_tasks([(API, "s", None, None, None, None, None, "{}", None)])  # no id: nothing to upgrade
        got = {rid: (e.status, e.task_id) for rid, e in ledger.lookup(["s", "u", "k", "n"]).items()}
        assert got == {"s": ("submitted", "table-s"), "u": ("submitted", "table-u"), "k": ("submitted", "kept"),
                       "n": ("unknown", None)}
        assert ledger.task_states(["s", "n", "zz"]) == {"s": (API, "submitted", "table-s"), "n": (API, "unknown", None)}

    def test_runs_labels_and_the_nights_spend(self, ledger: LedgerStore) -> None:
        ledger.start_run("run-1", "submit", "/out/r.parquet", "2026-01-01")
        claim(ledger, mark("a", label="row-1"), mark("b", label="row-2"), outcomes=[submitted("a")])
        ledger.finish_run("run-1", {"sent": 2})
        assert ledger.run_outputs(["run-1", "nope"]) == {"run-1": "/out/r.parquet"}
        assert sorted(p[0] for p in ledger.run_places("run-1")) == ["a", "b"]
        assert ledger.labels(["row-1", "row-3"]) == {"row-1": {"a"}}
        assert ledger.labels(["row-1"], before_run="run-1") == {}
        spent = ledger.night_requests("2026-01-01")
        assert len(spent) == 2 and all(cost == 0.1 for _, _, cost in spent)
        assert ledger.night_requests("2026-01-02") == []

    def test_tasks_to_follow(self, ledger: LedgerStore) -> None:
        claim(ledger, mark("a"), mark("b"), outcomes=[submitted("a"), submitted("b", task="task-2")])
        assert {e.request_id for e in ledger.tasks_to_follow(False, [API])} == {"a", "b"}

    def test_read_only_open_of_no_ledger_is_none(self, state: State) -> None:
        assert open_readonly(state, API) is None

    # -- batch.retry, batch.upload, batch.expiry: kept by every store (issue 23) --------------
    def test_retry_lineage_moves_a_failed_task_and_the_cap_holds(self, ledger: LedgerStore) -> None:
        """--retry-failed's storage: a retryable failed task moves to the lineage, its row
        becomes ``pending`` with attempt 2; the lineage keeps counting in the night it was
        sent; the cap (2 tasks) stops a third."""
        ledger.start_run("run-1", "submit", None, "2026-01-01")
        claim(ledger, mark("a"), mark("b"), mark("c"),
              outcomes=[submitted("a"), submitted("b", task="task-b"), submitted("c", task="task-c")])
        fail = "UPDATE requests SET task_status='failed', failure_reason=? WHERE request_id=?"
        ledger.commit([], [], [(fail, ("500: Internal Error", "a")), (fail, ("400: Content Moderation", "b"))], False)
        first = retry.prepare(ledger, ["a", "b", "c"], 2, "run-2")
        assert (first.retried, first.never, first.capped) == (["a"], ["b"], [])
        a = ledger.lookup(["a"])["a"]
        assert (a.status, a.task_id, a.task_status) == ("pending", None, None)
        assert ledger.next_attempts() == {"a": 2}
        assert [r[-2:] for r in ledger.outcome_rows(["a"])] == [(2, '["task-1"]')]
        assert ledger.lineage_tasks() == 1
        # the night of run-1 still counts a's first task, though its row was reset
        assert len(ledger.night_requests("2026-01-01")) == 3
        ledger.start_run("run-2", "submit", None, "2026-01-02")
        claim(ledger, mark("a", "run-2"), outcomes=[submitted("a", "run-2", task="task-2")])
        assert ledger.next_attempts() == {} and ledger.retries_sent("run-2") == 1
        ledger.commit([], [], [(fail, ("503: busy", "a"))], False)
        capped = retry.prepare(ledger, ["a"], 2, "run-3")
        assert (capped.retried, capped.capped) == ([], ["a"])
        assert ledger.lookup(["a"])["a"].task_id == "task-2"

    def test_an_upload_is_kept_per_api_and_content(self, ledger: LedgerStore) -> None:
        sha = "ab" * 32

        async def go() -> None:
            front = AsyncLedger(ledger)
            front.record_upload((API, sha, "file-1", "https://cdn.example/1.png", "image/png", "image.png", 70,
                                 None, "2026-01-01T00:00:00+00:00"))
            front.record_upload((API, sha, "file-2", "https://cdn.example/2.png", "image/png", "image.png", 70,
                                 None, "2026-01-02T00:00:00+00:00"))  # uploaded again: the newer URL counts
            await front.close()
        asyncio.run(go())
        assert ledger.uploads() == {sha: "https://cdn.example/2.png"}
        assert ledger.export_rows("uploads")[0][:4] == (API, sha, "file-2", "https://cdn.example/2.png")

    def test_expiry_times_are_kept_per_request(self, ledger: LedgerStore) -> None:
        async def go() -> None:
            front = AsyncLedger(ledger)
            front.record_expiry(API, "a", "2030-01-01T00:00:00+00:00")
            front.record_expiry(API, "a", "2030-01-02T00:00:00+00:00")
            front.record_expiry("https://other.example", "a", "2031-01-01T00:00:00+00:00")
            await front.close()
        asyncio.run(go())
        assert ledger.expiries() == {(API, "a"): "2030-01-02T00:00:00+00:00",
                                     ("https://other.example", "a"): "2031-01-01T00:00:00+00:00"}
