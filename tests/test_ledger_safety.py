"""The ledger under attack and bad luck (issue #10 items 1-3), with real processes.

Each test reproduces a failure reported against the earlier ledger, counting POSTs on
the fake: a second run through another path to the same file, a claim that bypasses
the lock, an emptied or rolled-back state file, and requests left ``unknown`` by a
``kill -9`` although the provider never saw them.
"""

import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    KEY,
    accepted_twice,
    cli,
    prompts,
    results,
    run_cli_process,
    submit_args,
    subprocess_env,
    wait_for,
    write_csv,
)

from batch.api import api_identity
from batch.client import Secret
from batch.expand import Expander, ExpandSpec
from batch.ledger import AsyncLedger, Ledger, create_ledger
from batch.load import load_table
from batch.ratelimit import SmoothLimiter
from batch.sending import PREWIRE, SubmitConfig, Submitter


def popen(fake, tmp_path: Path, inputs: Path, state: Path, *extra: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    args = ["submit", str(inputs), "-o", str(tmp_path / f"out-{time.monotonic_ns()}.parquet"), "--base-url", fake.url,
            "--state", str(state), "--rate", "0", *extra]
    return subprocess.Popen([sys.executable, "-m", "batch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(), cwd=cwd)


# -- item 1: one ledger, one run, whatever path names it -------------------------------

@pytest.mark.parametrize("alias", ["symlink", "hardlink", "relative"])
def test_a_second_run_through_another_path_to_the_ledger_is_refused(start_fake, tmp_path: Path, alias: str) -> None:
    """Reported: --state alias.sqlite (a symlink) beside --state s.sqlite paid 495 of 500 twice."""
    fake = start_fake(latency=0.2)
    inputs = write_csv(tmp_path / "in.csv", prompts(40))
    state = tmp_path / "s.sqlite"
    first = popen(fake, tmp_path, inputs, state, "--concurrency", "2")
    wait_for(lambda: len(fake.state.submissions()) >= 2)
    sub = tmp_path / "sub"
    sub.mkdir()
    cwd = None
    if alias == "symlink":
        other = str(tmp_path / "alias.sqlite")
        os.symlink(state, other)
    elif alias == "hardlink":
        other = str(sub / "hard.sqlite")
        os.link(state, other)
    else:
        other, cwd = "../s.sqlite", sub
    second = popen(fake, tmp_path, inputs, Path(other), "--concurrency", "8", cwd=cwd)
    _out, err = second.communicate(timeout=30)
    fake.state.config.latency = 0  # the second has been refused; the first's other rounds need not crawl
    assert second.returncode == 3, err
    assert "another submit run is using state" in err
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert len(fake.state.submissions()) == 40 and accepted_twice(fake) == []


def test_two_writers_that_bypass_the_lock_never_send_one_request_twice(fake, tmp_path: Path) -> None:
    """Defence in depth: the sending mark is a conditional claim, so even two submitters
    on two connections to one ledger, with no lock at all, send each request once."""
    path = write_csv(tmp_path / "in.csv", prompts(60))
    state = tmp_path / "s.sqlite"
    create_ledger(state)
    api = api_identity(fake.url)
    requests = list(Expander([load_table(path)], ExpandSpec()))

    async def both() -> list[int]:
        ledgers = [Ledger(state, api), Ledger(state, api)]
        runs = []
        for n, ledger in enumerate(ledgers):
            config = SubmitConfig(fake.url, Secret(KEY), rate=None, concurrency=8)
            runs.append(Submitter(config, AsyncLedger(ledger), f"writer-{n}", limiter=SmoothLimiter(None)))
        stats = await asyncio.gather(*(s.run(iter(requests)) for s in runs))
        for s in runs:
            await s.ledger.close()
        for ledger in ledgers:
            ledger.close()
        return [st.sent for st in stats]

    sent = asyncio.run(both())
    assert sum(sent) == 60, sent  # between them, once each
    assert len(fake.state.submissions()) == 60 and accepted_twice(fake) == []
    db = sqlite3.connect(state)
    assert db.execute("SELECT count(*) FROM requests WHERE status='submitted'").fetchone()[0] == 60


class SlowCommitLedger(Ledger):
    """A ledger whose COMMIT takes ``delay`` seconds (a slow disk's fsync), noting when
    each claim's commit returned and in which thread it ran."""

    delay = 0.15

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.durable_at: dict[str, float] = {}
        self.threads: set[str] = set()
        self._staged: set[str] = set()

    def stage(self, sending, outcomes, other, resend_unknown):
        claimed = super().stage(sending, outcomes, other, resend_unknown)
        self._staged |= claimed
        return claimed

    def finish_stage(self) -> None:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        super().finish_stage()
        now = time.monotonic()
        for rid in self._staged:
            self.durable_at[rid] = now
        self._staged = set()


def test_with_the_writer_thread_no_request_leaves_before_its_claim_is_committed(serve, tmp_path: Path) -> None:
    """The commit runs in the writer thread while the loop goes on sending: a slow commit
    must hold back the requests it claims, never be overtaken by them. The server notes
    when each request arrives; each must arrive after its claim's COMMIT returned."""
    from aiohttp import web

    arrived: dict[str, float] = {}

    async def submit(request: web.Request) -> web.Response:
        arrived[request.headers["x-request-id"]] = time.monotonic()
        await request.read()
        return web.json_response({"code": 0, "data": {"task_id": f"t-{len(arrived)}"}})

    app = web.Application()
    app.router.add_post("/{tail:.*}", submit)
    url = serve(app)
    state = tmp_path / "s.sqlite"
    create_ledger(state)
    requests = list(Expander([load_table(write_csv(tmp_path / "in.csv", prompts(40)))], ExpandSpec()))

    ledger = SlowCommitLedger(state, api_identity(url))

    async def night() -> Submitter:
        aledger = AsyncLedger(ledger, writer_thread=True)
        submitter = Submitter(SubmitConfig(url, Secret(KEY), rate=None, concurrency=8), aledger, "night",
                              limiter=SmoothLimiter(None))
        try:
            await submitter.run(iter(requests))
        finally:
            await aledger.close()
        return submitter

    submitter = asyncio.run(night())
    ledger.close()
    assert submitter.stats.counts["submitted"] == 40
    assert ledger.threads and threading.main_thread().name not in ledger.threads  # the writer thread committed
    assert set(arrived) == set(ledger.durable_at) and len(arrived) == 40
    early = {rid: round(ledger.durable_at[rid] - t, 3) for rid, t in arrived.items() if t <= ledger.durable_at[rid]}
    assert early == {}, f"sent before their claim was committed (seconds early): {early}"


def test_a_submitted_row_is_never_claimed_again(tmp_path: Path) -> None:
    from batch.ledger import SQL_CLAIM

    state = tmp_path / "s.sqlite"
    create_ledger(state)
    ledger = Ledger(state, "https://api.example")
    db = ledger.db
    args = ("https://api.example", "r1", "run-a", None, "m/x", "u", "f.csv", 2, "{}", "t", "t", None)
    assert db.execute(SQL_CLAIM, (*args, False)).rowcount == 1
    db.execute("UPDATE requests SET status='submitted', task_id='t-1'")
    for resend in (False, True):
        assert db.execute(SQL_CLAIM, (*args[:2], "run-b", *args[3:], resend)).rowcount == 0
    db.execute("UPDATE requests SET status='failed'")
    assert db.execute(SQL_CLAIM, (*args[:2], "run-b", *args[3:], False)).rowcount == 1
    ledger.close()


def test_claims_are_fsynced_before_the_wire_and_outcomes_alone_are_not(tmp_path: Path) -> None:
    """A batch with a claim commits under synchronous=FULL (an fsync: survives power loss
    before the request goes out); a batch of outcomes alone under NORMAL (survives kill -9)."""
    from batch.ledger import Mark

    state = tmp_path / "s.sqlite"
    create_ledger(state)
    ledger = Ledger(state, "https://api.example")
    seen: list[tuple[str, int]] = []

    def trace(sql: str) -> None:
        if sql == "COMMIT":
            seen.append(("commit", ledger.db.execute("PRAGMA synchronous").fetchone()[0]))

    async def night() -> None:
        aledger = AsyncLedger(ledger)
        ledger.db.set_trace_callback(trace)
        mark = Mark("r1", "run-a", None, "m/x", "https://api.example/x", "f.csv", 2, "{}")
        assert await aledger.sending(mark)
        assert seen == [("commit", 2)]  # FULL
        aledger.outcome("r1", "run-a", "submitted", task_id="t-1", submitted_at="t", poll_url="https://api.example/t")
        await aledger.flush()
        assert seen[-1] == ("commit", 1)  # NORMAL
        assert await aledger.sending(Mark("r2", "run-a", None, "m/x", "https://api.example/x", "f.csv", 3, "{}"))
        assert seen[-1] == ("commit", 2)
        ledger.db.set_trace_callback(None)
        await aledger.close()

    asyncio.run(night())
    entry = ledger.lookup(["r1"])["r1"]
    assert (entry.status, entry.task_id, entry.poll_url) == ("submitted", "t-1", "https://api.example/t")
    ledger.close()


def test_a_rescue_file_from_before_poll_urls_is_still_replayed(tmp_path: Path) -> None:
    from batch.ledger import SQL_CLAIM

    state = tmp_path / "s.sqlite"
    create_ledger(state)
    ledger = Ledger(state, "https://api.example")
    ledger.db.execute(SQL_CLAIM, ("https://api.example", "r1", "run-a", None, "m/x", "u", "f.csv", 2, "{}", "t", "t",
                                  None, False))
    ledger.close()
    old = ["submitted", "t-1", None, None, 200, 1, "2026-11-27T01:00:00Z", "run-a", "r1"]  # nine fields
    torn = '{"api": "https://api.example", "outcome": ["submitted", "t-2"'
    (tmp_path / "s.sqlite.rescue.jsonl").write_text(json.dumps({"api": "https://api.example", "outcome": old})
                                                     + "\n" + torn + "\n")
    ledger = Ledger.open(state, "https://api.example")
    entry = ledger.lookup(["r1"])["r1"]
    assert (entry.status, entry.task_id) == ("submitted", "t-1")
    assert not (tmp_path / "s.sqlite.rescue.jsonl").exists()
    ledger.close()


# -- item 2: no silent fresh start ------------------------------------------------------

def test_an_empty_state_file_is_refused_not_taken_for_a_new_ledger(fake, tmp_path: Path) -> None:
    """Reported: truncate -s 0 state.sqlite, and the rerun resent all 500 and exited 0."""
    path = write_csv(tmp_path / "in.csv", prompts(20))
    assert cli(submit_args(fake, tmp_path, path)).exit_code == 0
    state = tmp_path / "state.sqlite"
    for companion in (state.with_name("state.sqlite-wal"), state.with_name("state.sqlite-shm")):
        companion.unlink(missing_ok=True)
    os.truncate(state, 0)
    res = cli(submit_args(fake, tmp_path, path))
    assert res.exit_code == 2
    line = res.stderr.strip().splitlines()[-1]
    assert "empty (0 bytes)" in line and "move it away" in line and "Traceback" not in res.stderr
    assert state.stat().st_size == 0  # the evidence stays as it was
    assert len(fake.state.submissions()) == 20  # nothing sent again


def test_a_ledger_that_lost_its_wal_after_a_crash_is_detected(start_fake, tmp_path: Path) -> None:
    fake = start_fake(latency=0.1)
    path = write_csv(tmp_path / "in.csv", prompts(200))
    state = tmp_path / "state.sqlite"
    proc = popen(fake, tmp_path, path, state, "--concurrency", "8")
    wait_for(lambda: len(fake.state.submissions()) >= 60)
    proc.kill()
    proc.wait(10)
    sent = len(fake.state.submissions())
    # A copy without its -wal companion: the recent writes are gone.
    state.with_name("state.sqlite-wal").unlink()
    state.with_name("state.sqlite-shm").unlink(missing_ok=True)
    res = cli(submit_args(fake, tmp_path, path))
    assert res.exit_code == 2, res.output
    assert "misses writes its last run made" in res.stderr and "-wal" in res.stderr
    assert len(fake.state.submissions()) == sent


def test_an_older_copy_of_the_ledger_is_detected_and_state_backup_makes_a_good_one(fake, tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    first = write_csv(tmp_path / "in.csv", prompts(10))
    assert cli(submit_args(fake, tmp_path, first)).exit_code == 0
    # A copy made the safe way, while nothing runs: it is whole.
    res = cli(["state", "backup", str(tmp_path / "monday.sqlite"), "--state", str(state)])
    assert res.exit_code == 0 and "10 requests (10 submitted)" in res.output
    more = write_csv(tmp_path / "in.csv", prompts(25))
    assert cli(submit_args(fake, tmp_path, more)).exit_code == 0
    assert len(fake.state.submissions()) == 25
    # Restoring monday's copy over tonight's ledger would resend 15 paid videos: refused.
    shutil.copy(tmp_path / "monday.sqlite", state)
    res = cli(submit_args(fake, tmp_path, more))
    assert res.exit_code == 2 and "misses writes its last run made" in res.stderr
    assert len(fake.state.submissions()) == 25


def test_state_backup_while_a_run_writes(start_fake, tmp_path: Path) -> None:
    fake = start_fake(latency=0.05)
    path = write_csv(tmp_path / "in.csv", prompts(300))
    proc = popen(fake, tmp_path, path, tmp_path / "state.sqlite", "--concurrency", "4")
    wait_for(lambda: len(fake.state.submissions()) >= 40)
    res = run_cli_process(["state", "backup", str(tmp_path / "copy.sqlite"), "--state", str(tmp_path / "state.sqlite")])
    assert res.returncode == 0, res.stderr
    fake.state.config.latency = 0  # the backup was taken mid-run; the run's other requests need not crawl
    proc.communicate(timeout=60)
    db = sqlite3.connect(tmp_path / "copy.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*) FROM requests WHERE status='submitted'").fetchone()[0] >= 30
    assert not (tmp_path / "copy.sqlite-wal").exists()  # a single self-contained file


# -- item 3: a kill leaves few "unknown" the provider never saw ----------------------------

def test_kill_9_at_random_points_leaves_at_most_prewire_unknown_but_never_sent(start_fake, tmp_path: Path) -> None:
    """Reported: after kill -9 bursts at --rate 0, 295 requests were unknown, 70 of which had
    reached the server. Now at most PREWIRE requests are marked but not yet on the wire."""
    fake = start_fake(latency=0.05, jitter=0.05)
    n = 600
    path = write_csv(tmp_path / "in.csv", prompts(n))
    state = tmp_path / "state.sqlite"
    rng = random.Random(7)
    never_sent_total = unknown_total = 0
    for _burst in range(3):
        proc = popen(fake, tmp_path, path, state, "--concurrency", "64")
        seen = len(fake.state.submissions())
        wait_for(lambda seen=seen: len(fake.state.submissions()) > seen)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.kill()
        proc.wait(10)
        time.sleep(0.3)  # the fake answers what was in flight
        received = {r.body["prompt"] for r in fake.state.submissions()}
        db = sqlite3.connect(state)
        sending = [json.loads(b)["prompt"] for (b,) in db.execute("SELECT body FROM requests WHERE status='sending'")]
        db.close()
        never_sent = [p for p in sending if p not in received]
        assert len(never_sent) <= PREWIRE, (len(never_sent), len(sending))
        never_sent_total += len(never_sent)
        unknown_total += len(sending)
        # The next night: resend what certainly never arrived is the operator's call
        # (--resend-unknown); here the bound is what matters.
        db = sqlite3.connect(state)
        db.execute("UPDATE requests SET status='unknown' WHERE status='sending'")
        db.commit()
        db.close()
    assert unknown_total > 0  # the kills did land mid-run
    assert accepted_twice(fake) == []
    print(f"unknown after 3 kills: {unknown_total}, of which never sent: {never_sent_total}")


def test_second_signal_leaves_the_in_flight_requests_sending_and_nothing_else(start_fake, tmp_path: Path) -> None:
    fake = start_fake(latency=30)
    path = write_csv(tmp_path / "in.csv", prompts(40))
    proc = popen(fake, tmp_path, path, tmp_path / "state.sqlite", "--concurrency", "16")
    wait_for(lambda: len(fake.state.submissions()) >= 16)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    db = sqlite3.connect(tmp_path / "state.sqlite")
    sending = db.execute("SELECT count(*) FROM requests WHERE status='sending'").fetchone()[0]
    assert sending == len(fake.state.submissions()) == 16  # every mark is a request the fake saw
    res = cli([*submit_args(fake, tmp_path, path), "--max-requests", "0"])  # the fake is still 30 s slow
    assert res.exit_code == 1
    assert results(tmp_path / "results.parquet")["status"].to_list().count("unknown") == 16


# -- issue #18 item 3: a hard link is the same ledger ---------------------------------------

@pytest.mark.parametrize("when", ["before", "after"])
def test_a_rerun_through_a_hard_link_after_kill_9_sends_nothing_twice(start_fake, tmp_path: Path, when: str) -> None:
    """Reported: with a second hard link to the state file, kill -9 during a run and a rerun
    through the other name sent every in-flight prompt twice: the sending marks were in the
    -wal beside the first name, which SQLite opening the second name never reads."""
    fake = start_fake(latency=1.0)
    path = write_csv(tmp_path / "in.csv", prompts(40))
    state = tmp_path / "state.sqlite"
    other = tmp_path / "elsewhere" / "other.sqlite"
    other.parent.mkdir()
    if when == "before":
        # The link was there before the night: already the first run is refused.
        create_ledger(state)
        os.link(state, other)
        proc = popen(fake, tmp_path, path, state, "--concurrency", "8", "--no-preflight")
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 2 and "2 names (hard links)" in err and fake.state.submissions() == []
        other.unlink()
    proc = popen(fake, tmp_path, path, state, "--concurrency", "8", "--no-preflight")
    wait_for(lambda: len(fake.state.submissions()) >= 8)
    proc.kill()
    proc.wait(10)
    time.sleep(1.5)  # the fake accepts what was in flight
    fake.state.config.latency = 0  # the reruns' pace is not the point
    os.link(state, other)
    sent = len(fake.state.submissions())
    res = cli(["submit", str(path), "-o", str(tmp_path / "again.parquet"), "--base-url", fake.url,
               "--state", str(other), "--rate", "0", "--no-preflight"])
    assert accepted_twice(fake) == [] and len(fake.state.submissions()) == sent
    assert res.exit_code == 2, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert "2 names (hard links)" in line and "nothing sent" in line and "Traceback" not in res.stderr
    # Through the first name too: which name is the "real" one is not the tool's to guess.
    res = cli(["submit", str(path), "-o", str(tmp_path / "again.parquet"), "--base-url", fake.url,
               "--state", str(state), "--rate", "0", "--no-preflight"])
    assert res.exit_code == 2 and len(fake.state.submissions()) == sent
    # With one name again, the run goes on and resends nothing that may have been accepted.
    other.unlink()
    res = cli(["submit", str(path), "-o", str(tmp_path / "again.parquet"), "--base-url", fake.url,
               "--state", str(state), "--rate", "0", "--no-preflight"])
    assert res.exit_code == 1, res.output  # the in-flight ones are unknown
    assert accepted_twice(fake) == []


def test_a_rerun_through_a_symlink_after_kill_9_reads_the_same_wal(start_fake, tmp_path: Path) -> None:
    """A symlink names the same file and, resolved, the same -wal, marker and rescue file."""
    fake = start_fake(latency=1.0)
    path = write_csv(tmp_path / "in.csv", prompts(40))
    state = tmp_path / "state.sqlite"
    link = tmp_path / "elsewhere" / "link.sqlite"
    link.parent.mkdir()
    create_ledger(state)
    os.symlink(state, link)
    proc = popen(fake, tmp_path, path, link, "--concurrency", "8", "--no-preflight")
    wait_for(lambda: len(fake.state.submissions()) >= 8)
    proc.kill()
    proc.wait(10)
    time.sleep(1.5)
    fake.state.config.latency = 0  # the rerun's pace is not the point
    assert not (link.parent / "link.sqlite-wal").exists()  # SQLite worked beside the real name
    res = cli(["submit", str(path), "-o", str(tmp_path / "again.parquet"), "--base-url", fake.url,
               "--state", str(state), "--rate", "0", "--no-preflight"])
    assert res.exit_code == 1, res.output
    assert accepted_twice(fake) == []
    assert len(fake.state.submissions()) == 40


@pytest.mark.parametrize("companion", ["-wal", "-shm", "-journal", ".runmark", ".rescue.jsonl", ".v1-backup"])
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "directory"])
def test_a_planted_link_beside_the_ledger_is_refused(fake, tmp_path: Path, companion: str, kind: str) -> None:
    """The ledger's companions are its own files: one planted as a link to another file
    (another ledger's -wal, a file the attacker wants appended to) is refused, nothing sent."""
    path = write_csv(tmp_path / "in.csv", prompts(3))
    state = tmp_path / "state.sqlite"
    create_ledger(state)
    target = tmp_path / "target"
    target.write_text("")
    planted = tmp_path / f"state.sqlite{companion}"
    if kind == "directory":  # reported for -journal: SQLite's misleading "unable to open database file"
        planted.mkdir()
    else:
        (os.symlink if kind == "symlink" else os.link)(target, planted)
    res = cli(submit_args(fake, tmp_path, path))
    assert res.exit_code == 2, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert f"state.sqlite{companion}" in line and "Traceback" not in res.stderr
    assert fake.state.submissions() == [] and target.read_text() == ""


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_planted_rate_budget_file_is_not_written_through(fake, tmp_path: Path, kind: str) -> None:
    """Sibling: the per-key budget file beside the ledgers was opened following a planted
    name and truncated to its size: another file overwritten. Now the run paces alone."""
    import hashlib

    home = tmp_path / "xdg-state" / "seedance-batch"
    home.mkdir(parents=True)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    planted = home / f"budget-{hashlib.sha256(KEY.encode()).hexdigest()[:16]}.bin"
    (os.symlink if kind == "symlink" else os.link)(target, planted)
    path = write_csv(tmp_path / "in.csv", prompts(3))
    res = cli(submit_args(fake, tmp_path, path, rate="100/s"))
    assert res.exit_code == 0, res.output
    assert target.read_text() == "keep me\n"
    assert "rate_budget_not_shared" in res.stderr and len(fake.state.submissions()) == 3
