"""Nightly safety: reruns, appends, reorders, crashes, signals, locks, budgets."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import (
    accepted_twice,
    cli,
    error_line,
    prompts,
    results,
    submit_args,
    subprocess_env,
    wait_for,
    write_csv,
)


def statuses(path: Path) -> dict[str, int]:
    counts = results(path)["status"].value_counts()
    return dict(zip(counts["status"].to_list(), counts["count"].to_list(), strict=True))


def test_rerun_skips_submitted_with_earlier_task_id(fake, tmp_path: Path, store: str) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(5))
    assert cli(submit_args(fake, tmp_path, path, state=store)).exit_code == 0
    first = results(tmp_path / "results.parquet")
    res = cli(submit_args(fake, tmp_path, path, state=store))
    assert res.exit_code == 0
    second = results(tmp_path / "results.parquet")
    assert second["status"].to_list() == ["skipped"] * 5
    assert second["task_id"].to_list() == first["task_id"].to_list()
    assert second["submitted_at"].to_list() == first["submitted_at"].to_list()
    assert len(fake.state.submissions()) == 5


def test_append_then_rerun_submits_exactly_the_new_rows(fake, tmp_path: Path, store: str) -> None:
    rows = prompts(6)
    path = write_csv(tmp_path / "in.csv", rows)
    cli(submit_args(fake, tmp_path, path, state=store))
    write_csv(path, [*rows, {"id": "new1", "prompt": "fresh one"}, {"id": "new2", "prompt": "fresh two"}])
    assert cli(submit_args(fake, tmp_path, path, state=store)).exit_code == 0
    assert statuses(tmp_path / "results.parquet") == {"skipped": 6, "submitted": 2}
    assert len(fake.state.submissions()) == 8
    assert accepted_twice(fake) == []


def test_reorder_and_new_column_change_nothing(fake, tmp_path: Path) -> None:
    rows = [{**r, "ratio": "16:9|9:16"} for r in prompts(5)]
    path = write_csv(tmp_path / "in.csv", rows)
    cli(submit_args(fake, tmp_path, path))
    ids = set(results(tmp_path / "results.parquet")["request_id"].to_list())
    write_csv(path, [{**r, "owner": "ops"} for r in reversed(rows)])
    assert cli(submit_args(fake, tmp_path, path)).exit_code == 0
    df = results(tmp_path / "results.parquet")
    assert set(df["request_id"].to_list()) == ids
    assert df["status"].unique().to_list() == ["skipped"]
    assert len(fake.state.submissions()) == 10


def test_failed_requests_are_tried_again_next_run(start_fake, tmp_path: Path, store: str) -> None:
    fake = start_fake(faults=["422,times=1"])
    path = write_csv(tmp_path / "in.csv", prompts(1))
    assert cli(submit_args(fake, tmp_path, path, state=store)).exit_code == 1
    assert cli(submit_args(fake, tmp_path, path, state=store)).exit_code == 0
    assert results(tmp_path / "results.parquet")["status"].to_list() == ["submitted"]


def test_max_requests_leaves_the_rest_pending_for_next_night(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(10))
    res = cli(submit_args(fake, tmp_path, path, extra=["--max-requests", "4", "--concurrency", "2"]))
    assert res.exit_code == 1
    assert statuses(tmp_path / "results.parquet") == {"submitted": 4, "pending": 6}
    df = results(tmp_path / "results.parquet")
    assert df.filter(pl.col("status") == "pending")["error"].str.contains("--max-requests 4").all()
    with sqlite3.connect(tmp_path / "state.sqlite") as db:  # the next night: the cap is the night's
        db.execute("UPDATE runs SET night = '2000-01-01'")
    db.close()
    cli(submit_args(fake, tmp_path, path, extra=["--max-requests", "4"]))
    assert statuses(tmp_path / "results.parquet") == {"skipped": 4, "submitted": 4, "pending": 2}
    cli(submit_args(fake, tmp_path, path))
    assert statuses(tmp_path / "results.parquet") == {"skipped": 8, "submitted": 2}
    assert len(fake.state.submissions()) == 10


def test_deadline_stops_starting_requests(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(40))
    t0 = time.monotonic()
    res = cli(submit_args(fake, tmp_path, path, rate="10/s", extra=["--deadline", "1s"]))
    assert time.monotonic() - t0 < 5
    assert res.exit_code == 1
    counts = statuses(tmp_path / "results.parquet")
    assert 5 <= counts["submitted"] <= 13 and counts["submitted"] + counts["pending"] == 40
    assert "deadline reached" in res.output


@pytest.mark.parametrize("content", [b"this is not a database at all" * 100, b""])
def test_corrupt_state_is_exit_2_and_left_untouched(fake, tmp_path: Path, content: bytes) -> None:
    state = tmp_path / "state.sqlite"
    if content:
        state.write_bytes(content)
    else:  # a truncated ledger: a valid header, torn pages
        path = write_csv(tmp_path / "in.csv", prompts(50))
        cli(submit_args(fake, tmp_path, path))
        raw = state.read_bytes()
        state.write_bytes(raw[:100] + b"\xff" * (len(raw) - 100))
        content = state.read_bytes()
    path = write_csv(tmp_path / "in.csv", prompts(2))
    sent_before = len(fake.state.submissions())
    res = cli(submit_args(fake, tmp_path, path))
    assert res.exit_code == 2
    assert "state" in error_line(res.stderr)
    assert state.read_bytes() == content  # nothing overwritten: the evidence stays
    assert len(fake.state.submissions()) == sent_before


def test_foreign_sqlite_state_is_exit_2(fake, tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    db = sqlite3.connect(state)
    db.execute("CREATE TABLE invoices(id INTEGER)")
    db.commit()
    db.close()
    res = cli(submit_args(fake, tmp_path, write_csv(tmp_path / "in.csv", prompts(1))))
    assert res.exit_code == 2
    assert "another application" in res.stderr
    assert fake.state.records == []


# -- real processes ---------------------------------------------------------------

def start_run(fake, tmp_path: Path, path: Path, state: str | None, *extra: str) -> subprocess.Popen[str]:
    args = submit_args(fake, tmp_path, path, extra=list(extra), state=state)
    return subprocess.Popen([sys.executable, "-m", "batch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())


def run_until_sent(fake, tmp_path: Path, state: str | None, rows: int, sent: int,
                   *extra: str) -> tuple[Path, subprocess.Popen[str]]:
    """Start a real submit of ``rows`` prompts and return once the fake has seen ``sent`` of them."""
    path = write_csv(tmp_path / "in.csv", prompts(rows))
    proc = start_run(fake, tmp_path, path, state, *extra)
    wait_for(lambda: len(fake.state.submissions()) >= sent)
    return path, proc


def test_kill_9_mid_run_then_rerun_never_pays_twice(start_fake, tmp_path: Path, store: str) -> None:
    fake = start_fake(latency=0.3, jitter=0.2)
    path, proc = run_until_sent(fake, tmp_path, store, 60, 20, "--concurrency", "8")
    proc.kill()
    proc.wait(10)
    time.sleep(0.6)  # let the fake finish answering the requests in flight
    killed_at = len(fake.state.submissions())
    assert killed_at < 60

    if store.endswith(".sqlite"):
        db = sqlite3.connect(store)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()

    fake.state.config.latency = fake.state.config.jitter = 0  # the rerun's pace is not the point
    rerun = start_run(fake, tmp_path, path, store, "--concurrency", "8")
    _out, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 1, err  # the in-flight ones are unknown
    assert accepted_twice(fake) == []
    counts = statuses(tmp_path / "results.parquet")
    assert set(counts) <= {"skipped", "submitted", "unknown"}
    assert sum(counts.values()) == 60
    assert 0 < counts.get("unknown", 0) <= 8  # at most what was in flight
    # Every request the API accepted is accounted for: skipped or submitted with its task id,
    # or unknown (accepted before the kill, answer lost; or marked and killed before its
    # bytes left, which PREWIRE bounds).
    df = results(tmp_path / "results.parquet")
    known = counts.get("skipped", 0) + counts.get("submitted", 0)
    assert known <= len(fake.state.accepted_bodies()) <= known + counts["unknown"]
    assert df.filter(pl.col("status") == "unknown")["error"].str.contains("earlier run stopped after sending").all()


def test_sigterm_finishes_in_flight_and_writes_table(start_fake, tmp_path: Path, store: str) -> None:
    fake = start_fake(latency=0.5)
    path, proc = run_until_sent(fake, tmp_path, store, 100, 8, "--concurrency", "4")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, err
    counts = statuses(tmp_path / "results.parquet")
    assert counts.get("unknown", 0) == 0  # in-flight requests were waited for and recorded
    assert counts["submitted"] == len(fake.state.submissions())
    assert counts["pending"] == 100 - counts["submitted"]
    assert "interrupted by SIGTERM" in out
    assert '"event": "stopping"' in err
    # The next night sends exactly the rest (at once: its pace is not the point).
    fake.state.config.latency = 0
    rerun = start_run(fake, tmp_path, path, store, "--concurrency", "8")
    rerun.communicate(timeout=60)
    assert rerun.returncode == 0
    assert len(fake.state.submissions()) == 100 and accepted_twice(fake) == []


def test_second_signal_aborts_at_once_leaving_ledger_consistent(start_fake, tmp_path: Path) -> None:
    fake = start_fake(latency=30)
    _path, proc = run_until_sent(fake, tmp_path, None, 20, 3, "--concurrency", "3")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert time.monotonic() - t0 < 5
    assert proc.returncode == 4
    db = sqlite3.connect(tmp_path / "state.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*) FROM requests WHERE status='sending'").fetchone()[0] == 3
    db.close()


def test_two_concurrent_runs_the_second_exits_3_sending_nothing(start_fake, tmp_path: Path, store: str) -> None:
    # 15 rounds of 0.6 s: the first run must outlast the second's start-up, which took
    # over 3 s at a load average of 10 (with 0.2 s the first had finished: exit 0, not 3).
    fake = start_fake(latency=0.6)
    path, first = run_until_sent(fake, tmp_path, store, 30, 2, "--concurrency", "2")
    t0 = time.monotonic()
    second = start_run(fake, tmp_path, path, store, "-o", str(tmp_path / "second.parquet"))
    _out, err = second.communicate(timeout=30)
    fake.state.config.latency = 0  # the first outlasted the second; the rest of its rounds need not take 0.6 s
    assert second.returncode == 3
    assert time.monotonic() - t0 < 10
    assert "another submit run is using" in err
    assert "another submit run" in error_line(err)
    assert not (tmp_path / "second.parquet").exists()
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert len(fake.state.submissions()) == 30 and accepted_twice(fake) == []


def test_lock_dies_with_a_killed_process(start_fake, tmp_path: Path, store: str) -> None:
    fake = start_fake(latency=5)
    path, proc = run_until_sent(fake, tmp_path, store, 3, 1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    fake.state.config.latency = 0
    res = cli(submit_args(fake, tmp_path, path, state=store))
    assert res.exit_code == 1, res.output  # not 3: it ran; 1 because the killed run's sends are unknown
    statuses = set(results(tmp_path / "results.parquet")["status"].to_list())  # not "skipped" of the summary's keys
    assert "unknown" in statuses and "skipped" not in statuses


def test_no_temp_files_left_and_results_replaced_atomically(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(3))
    (tmp_path / "results.parquet").write_bytes(b"")  # holds no task id (unreadable bytes refuse: test_fresh_state)
    assert cli(submit_args(fake, tmp_path, path)).exit_code == 0
    assert results(tmp_path / "results.parquet").height == 3
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []


def test_ctrl_c_during_a_dry_run_exits_4_without_traceback_or_temp_file(tmp_path: Path) -> None:
    big = tmp_path / "big.parquet"
    pl.DataFrame({"prompt": [f"p{i}" for i in range(400_000)]}).write_parquet(big)
    proc = subprocess.Popen([sys.executable, "-m", "batch", "submit", str(big), "--dry-run", "-o",
                             str(tmp_path / "r.parquet")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env())
    wait_for(lambda: any(".tmp-" in p.name for p in tmp_path.iterdir()))  # writing the table
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, err
    assert "Traceback" not in err and "interrupted by SIGINT" in err
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert not (tmp_path / "r.parquet").exists()


def test_a_ledger_from_before_the_lineage_gains_its_tables_in_place(tmp_path: Path) -> None:
    """SQLite's side of issue 23's migrations: a ledger written before issue 20 (no lineage,
    uploads or expiry tables, no retry columns) reads as empty of them when opened read-only,
    and its first writable open adds them in place, keeping its rows."""
    from batch.ledger import locked_ledger, open_readonly

    state = tmp_path / "old.sqlite"
    api = "https://api.example"
    with locked_ledger(state, api) as ledger:
        ledger.import_tasks([(api, "a", "task-a", None, None, None, None, "{}", None)])
    with sqlite3.connect(state) as db:
        for statement in ("DROP TABLE task_lineage", "DROP TABLE uploads", "DROP TABLE task_expiry",
                          "ALTER TABLE requests DROP COLUMN task_attempt",
                          "ALTER TABLE requests DROP COLUMN earlier_task_ids",
                          "ALTER TABLE requests DROP COLUMN failure_class"):
            db.execute(statement)
    old = open_readonly(state, api)
    assert old is not None
    try:
        assert (old.uploads(), old.expiries(), old.next_attempts(), old.lineage_tasks(), old.retries_sent("r"),
                old.failed_tasks(["a"]), old.export_rows("task_lineage")) == ({}, {}, {}, 0, 0, [], [])
        assert [r[-2:] for r in old.outcome_rows(["a"])] == [(1, None)]
    finally:
        old.close()
    with locked_ledger(state, api) as ledger:
        assert {"task_attempt", "earlier_task_ids", "failure_class"} <= ledger._columns("requests")
        assert all(ledger._columns(t) for t in ("task_lineage", "uploads", "task_expiry"))
        assert ledger.lookup(["a"])["a"].task_id == "task-a"
