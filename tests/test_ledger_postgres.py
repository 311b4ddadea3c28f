"""The PostgreSQL ledger against a real server the suite starts: what only it has (a
ledger shared by hosts, the server going away, credentials)."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import psycopg
import pytest
from conftest import (
    PgServer,
    accepted_twice,
    cli,
    error_line,
    host_dir,
    host_env,
    json_lines,
    prompts,
    results,
    run_cli_process,
    submit_args,
    subprocess_env,
    write_csv,
)

from batch.errors import StateError
from batch.ledger import PgLocation, queries
from batch.ledger.postgres import SCHEMA_VERSION


def test_rerun_from_another_host_sends_nothing_twice(fake, pg_server: PgServer, tmp_path: Path) -> None:
    url = pg_server.url()
    a, b = host_dir(tmp_path, "a"), host_dir(tmp_path, "b")
    sheet = write_csv(tmp_path / "in.csv", prompts(6))
    args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--state", url]
    first = run_cli_process([*args, "-o", str(a / "r.parquet")], env=host_env(a), cwd=a)
    assert first.returncode == 0, first.stderr
    second = run_cli_process([*args, "-o", str(b / "r.parquet")], env=host_env(b), cwd=b)
    assert second.returncode == 0, second.stderr
    assert len(fake.state.submissions()) == 6
    assert results(b / "r.parquet")["status"].to_list() == ["skipped"] * 6


def test_a_second_host_exits_3_while_one_submits(start_fake, pg_server: PgServer, tmp_path: Path) -> None:
    fake = start_fake(latency=3)  # the first run is still sending when the second starts
    url = pg_server.url()
    a, b = host_dir(tmp_path, "a"), host_dir(tmp_path, "b")
    sheet = write_csv(tmp_path / "in.csv", prompts(8))
    args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--concurrency", "2", "--state", url]
    first = subprocess.Popen([sys.executable, "-m", "batch", *args, "-o", str(a / "r.parquet")], cwd=a,
                             env=host_env(a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not fake.state.submissions() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run_cli_process([*args, "-o", str(b / "r.parquet")], env=host_env(b), cwd=b)
    assert first.poll() is None, "the first run ended before the second tried"
    fake.state.config.latency = 0  # the second has tried; the first's other rounds need not take 3 s
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert second.returncode == 3, second.stderr
    assert "another submit run" in error_line(second.stderr)
    assert len(fake.state.submissions()) == 8 and accepted_twice(fake) == []


def test_without_the_lock_the_conditional_claim_alone_sends_each_once(start_fake, pg_server: PgServer,
                                                                      tmp_path: Path) -> None:
    fake = start_fake(latency=0.05)
    url = pg_server.url()
    sheet = write_csv(tmp_path / "in.csv", prompts(60))
    procs = []
    for name in ("a", "b", "c"):
        d = host_dir(tmp_path, name)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "batch", "submit", str(sheet), "--base-url", fake.url, "--rate", "0",
             "--concurrency", "8", "--state", url, "-o", str(d / "r.parquet")], cwd=d,
            env=host_env(d, SEEDANCE_BATCH_TEST_NO_PG_LOCK="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode in (0, 1), err
    assert len(fake.state.submissions()) == 60
    assert accepted_twice(fake) == []


def test_unreachable_database_exits_2_sending_nothing(fake, tmp_path: Path) -> None:
    from conftest import free_port

    sheet = write_csv(tmp_path / "in.csv", prompts(2))
    url = f"postgresql://u:hunter2secret@127.0.0.1:{free_port()}/db?ledger=x"
    proc = run_cli_process(["submit", str(sheet), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url,
                            "--state", url])
    assert proc.returncode == 2, proc.stderr
    message = error_line(proc.stderr)
    assert "cannot connect" in message and "nothing sent" in message
    assert "hunter2secret" not in proc.stderr + proc.stdout
    assert fake.state.submissions() == []


def test_the_password_never_appears(fake, pg_server: PgServer, tmp_path: Path) -> None:
    url = pg_server.url().replace("postgres@", "postgres:pa55-w0rd-xyz@")
    sheet = write_csv(tmp_path / "in.csv", prompts(3))
    proc = run_cli_process(["submit", str(sheet), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url,
                            "--rate", "0", "--state", url])
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "r.parquet.summary.json").read_text()
    assert "pa55-w0rd-xyz" not in proc.stdout + proc.stderr + summary
    assert json.loads(summary)["state"].startswith("postgresql://postgres:***@127.0.0.1")


def check_night_without_ledger(fake, table: Path, err: str, n: int) -> None:
    """A run whose ledger went away mid-run still leaves its results table: every request of
    the input, every task id the provider issued, no request called unsent that reached the
    provider, the summary and the message saying the ledger was unreachable and naming the
    rescue file that holds what the ledger could not take."""
    assert table.exists(), err
    rows = results(table)
    assert rows.height == n
    accepted = {r.body["prompt"]: r.task_id for r in fake.state.submissions() if r.task_id}
    assert set(accepted.values()) <= set(rows["task_id"].drop_nulls().to_list())
    reached = {r.body["prompt"] for r in fake.state.submissions()}
    for row in rows.iter_rows(named=True):
        if row["prompt"] in accepted:
            assert row["task_id"] == accepted[row["prompt"]] and row["status"] in ("submitted", "skipped"), row
        if row["status"] == "pending":  # "not sent" only when certainly not sent
            assert row["prompt"] not in reached, row
        if row["status"] == "unknown":
            assert "ledger" in row["error"], row
    summary = json.loads(table.with_name(table.name + ".summary.json").read_text())
    assert "unreachable" in summary["local_fault"] and summary["ledger_unreachable"], summary
    rescue = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    named = [e for e in rescue if e.get("event") == "error"]
    assert len(named) == 1, err
    assert summary.get("rescue") and summary["rescue"] in named[0]["error"], (summary, named)
    assert Path(summary["rescue"]).exists()


def check_rerun_table(fake, table: Path, n: int) -> None:
    """The rerun with the ledger back: the whole night in its table, each task id once."""
    rows = results(table)
    assert rows.height == n
    accepted = {r.task_id for r in fake.state.submissions() if r.task_id}
    assert set(rows["task_id"].drop_nulls().to_list()) == accepted
    assert set(rows["status"].to_list()) <= {"submitted", "skipped", "unknown"}, rows["status"].value_counts()
    assert accepted_twice(fake) == []


def test_server_killed_mid_run_loses_no_task_id(start_fake, tmp_path: Path) -> None:
    """The database dies while requests are on the wire: sending stops at once (no request
    without a committed claim), the outcomes in hand go to the local rescue file (exit 6),
    and the next run replays them before it sends."""
    server = PgServer()
    try:
        fake = start_fake(latency=0.3)
        url = server.url()
        sheet = write_csv(tmp_path / "in.csv", prompts(40))
        args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--concurrency", "4",
                "--state", url, "-o", str(tmp_path / "r.parquet")]
        proc = subprocess.Popen([sys.executable, "-m", "batch", *args], env=subprocess_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while len(fake.state.submissions()) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()
        killed_at = len(fake.state.submissions())
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 6, err
        sent = fake.state.submissions()
        assert len(sent) <= killed_at + 4  # only what was on the wire or claimed before the kill
        rescue = list((Path(os.environ["XDG_STATE_HOME"]) / "seedance-batch" / "postgres").glob("*.rescue.jsonl"))
        assert "rescue" in err
        check_night_without_ledger(fake, tmp_path / "r.parquet", err, 40)
        server.start()  # the same data directory: what was committed is there
        fake.state.config.latency = 0  # the rerun's pace is not the point
        again = run_cli_process(args)
        assert again.returncode in (0, 1), again.stderr
        check_rerun_table(fake, tmp_path / "r.parquet", 40)
        with psycopg.connect(server.base_url()) as db:
            schema = "seedance_" + url.rsplit("=", 1)[1]
            rows = dict(db.execute(f"SELECT request_id, task_id FROM {schema}.requests WHERE task_id IS NOT NULL"))
        accepted = {r.task_id for r in fake.state.submissions() if r.task_id}
        assert accepted == set(rows.values())  # every task id the provider issued is in the ledger
        assert rescue, err
        assert accepted_twice(fake) == []
    finally:
        server.stop()


class CutProxy:
    """A TCP proxy on 127.0.0.1 to the server whose :meth:`cut` drops every connection
    through it at once (a network fault, not a server fault)."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            with self.lock:
                self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        with self.lock:
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.socks = []

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_connections_cut_mid_run_stop_sending_and_lose_no_task_id(start_fake, pg_server: PgServer,
                                                                 tmp_path: Path) -> None:
    fake = start_fake(latency=0.3)
    proxy = CutProxy(pg_server.port)
    try:
        ledger = "t" + uuid.uuid4().hex[:12]
        url = pg_server.url(ledger, port=proxy.port)
        # An earlier run sent the first 5; the run that is cut reads the first 256 requests'
        # state in one look-up, and never the rest.
        earlier = write_csv(tmp_path / "earlier.csv", prompts(5))
        assert run_cli_process(["submit", str(earlier), "--base-url", fake.url, "--rate", "0", "--state", url,
                                "-o", str(tmp_path / "earlier.parquet")]).returncode == 0
        sheet = write_csv(tmp_path / "in.csv", prompts(300))
        args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--concurrency", "4",
                "--state", url, "-o", str(tmp_path / "r.parquet")]
        proc = subprocess.Popen([sys.executable, "-m", "batch", *args], env=subprocess_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while len(fake.state.submissions()) < 11 and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.cut()
        cut_at = len(fake.state.submissions())
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 6, err
        assert len(fake.state.submissions()) <= cut_at + 4  # only what was claimed before the cut
        check_night_without_ledger(fake, tmp_path / "r.parquet", err, 300)
        rows = results(tmp_path / "r.parquet")
        assert rows["status"].head(5).to_list() == ["skipped"] * 5  # as read before the cut, with their task ids
        unread = rows.slice(256)  # never read: an earlier run may have sent them, so not "not sent"
        assert set(unread["status"]) == {"unknown"} and unread["error"].str.contains("not confirmed").all()
        fake.state.config.latency = 0  # the rerun's pace is not the point
        again = run_cli_process([*args, "--concurrency", "32"])
        assert again.returncode in (0, 1), again.stderr
        check_rerun_table(fake, tmp_path / "r.parquet", 300)
        with psycopg.connect(pg_server.base_url()) as db:
            rows = dict(db.execute(f"SELECT request_id, task_id FROM seedance_{ledger}.requests "
                                   f"WHERE task_id IS NOT NULL"))
        assert {r.task_id for r in fake.state.submissions() if r.task_id} == set(rows.values())
        assert accepted_twice(fake) == []
    finally:
        proxy.close()


def test_state_copy_moves_a_history_both_ways(fake, pg_server: PgServer, tmp_path: Path) -> None:
    sheet = write_csv(tmp_path / "in.csv", prompts(5))
    assert cli(submit_args(fake, tmp_path, sheet)).exit_code == 0
    url = pg_server.url()
    res = cli(["state", "copy", str(tmp_path / "state.sqlite"), url])
    assert res.exit_code == 0, res.output
    assert "5 requests copied (5 submitted), 1 runs, 0 earlier tasks (retry lineage), 0 uploads, 0 expiry times; " \
        "counts verified" in res.output
    # The team's runs now go through PostgreSQL: nothing is paid twice.
    again = cli(submit_args(fake, tmp_path, sheet, out="again.parquet", state=url))
    assert again.exit_code == 0, again.output
    assert results(tmp_path / "again.parquet")["status"].to_list() == ["skipped"] * 5
    back = cli(["state", "copy", url, str(tmp_path / "back.sqlite")])
    assert back.exit_code == 0, back.output
    assert cli(submit_args(fake, tmp_path, sheet, out="third.parquet", state=str(tmp_path / "back.sqlite"))).exit_code == 0
    assert len(fake.state.submissions()) == 5
    refused = cli(["state", "copy", str(tmp_path / "state.sqlite"), url])
    assert refused.exit_code == 2 and "already holds" in refused.output + (refused.stderr or "")


def full_history(state: Path) -> None:
    """A SQLite ledger holding a row in every table a copy moves: runs, requests, a retried
    request's earlier task, an upload, an expiry time (through the store's own methods)."""
    import asyncio

    from ledger_contract import API, claim, mark, submitted

    from batch import retry
    from batch.ledger import AsyncLedger, locked_ledger

    with locked_ledger(state, API) as ledger:
        ledger.start_run("run-1", "submit", "/out/r.parquet", "2026-01-01")
        claim(ledger, mark("a"), mark("b"), outcomes=[submitted("a"), submitted("b", task="task-b")])
        ledger.commit([], [], [("UPDATE requests SET task_status='failed', failure_reason='500: Internal Error' "
                                "WHERE request_id='a'", ())], False)
        assert retry.prepare(ledger, ["a", "b"], 2, "run-2").retried == ["a"]

        async def record() -> None:
            front = AsyncLedger(ledger)
            front.record_upload((API, "ab" * 32, "file-1", "https://cdn.example/1.png", "image/png", "image.png",
                                 "70", None, "2026-01-01T00:00:00+00:00"))  # a size as the provider's text
            front.record_expiry(API, "b", "2030-01-01T00:00:00+00:00")
            await front.close()
        asyncio.run(record())


def every_table(state) -> dict[str, list]:
    from batch.ledger import COPY_COLUMNS, open_readonly

    ledger = open_readonly(state, "")
    assert ledger is not None
    try:
        return {t: sorted(ledger.export_rows(t), key=repr) for t in COPY_COLUMNS}
    finally:
        ledger.close()


def test_state_copy_moves_lineage_uploads_and_expiry_both_ways(pg_server: PgServer, tmp_path: Path) -> None:
    """Issue 23: ``state copy`` moved only requests and runs, so a team moving to PostgreSQL
    lost its retry lineage (the cap restarted: paid again), its uploads (uploaded again) and
    its expiry times. Every table goes, both ways, each verified by its count."""
    full_history(tmp_path / "state.sqlite")
    url = pg_server.url()
    there = cli(["state", "copy", str(tmp_path / "state.sqlite"), url])
    assert there.exit_code == 0, there.output
    assert "2 requests copied (1 pending, 1 submitted), 1 runs, 1 earlier tasks (retry lineage), 1 uploads, " \
           "1 expiry times; counts verified" in there.output
    back = cli(["state", "copy", url, str(tmp_path / "back.sqlite")])
    assert back.exit_code == 0, back.output
    original = every_table(tmp_path / "state.sqlite")
    assert all(original[t] for t in ("task_lineage", "uploads", "task_expiry"))
    assert every_table(PgLocation(url)) == original
    assert every_table(tmp_path / "back.sqlite") == original


def test_state_copy_refuses_a_copy_whose_counts_differ(pg_server: PgServer, tmp_path: Path) -> None:
    """A table the destination silently drops rows of (here a DBA's trigger on the lineage)
    is a failed copy: exit 2 naming the table, never "counts verified"."""
    from batch.ledger import locked_ledger

    full_history(tmp_path / "state.sqlite")
    url = pg_server.url()
    with locked_ledger(PgLocation(url), "") as ledger:
        ledger.db.execute("CREATE FUNCTION drop_row() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'")
        ledger.db.execute("CREATE TRIGGER drop_lineage BEFORE INSERT ON task_lineage FOR EACH ROW "
                          "EXECUTE FUNCTION drop_row()")
    res = cli(["state", "copy", str(tmp_path / "state.sqlite"), url])
    assert res.exit_code == 2, res.output
    assert "0 rows of task_lineage" in res.output + (res.stderr or "") and "counts verified" not in res.output


def peak_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u < t + 1.0) for i, t in enumerate(times)), default=0)


def test_one_rate_budget_per_key_across_hosts(fake, pg_server: PgServer, tmp_path: Path) -> None:
    """Two "hosts" (own working directory and state home, two jobs with their own
    ledgers in one database) with one key at --rate 5/s: together never more than 5 starts
    in any second at the provider."""
    sheets = []
    procs = []
    for name in ("a", "b"):
        d = host_dir(tmp_path, name)
        sheet = write_csv(d / "in.csv", prompts(15, prefix=f"host {name} prompt"))
        sheets.append(sheet)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "batch", "submit", str(sheet), "--base-url", fake.url, "--rate", "5/s",
             "--no-preflight", "--state", pg_server.url(), "-o", str(d / "r.parquet")], cwd=d, env=host_env(d),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    starts = [r.t for r in fake.state.submissions()]
    assert len(starts) == 30
    assert peak_in_one_second(starts) <= 5


def test_dry_run_and_validate_read_the_postgres_ledger(fake, pg_server: PgServer, tmp_path: Path) -> None:
    url = pg_server.url()
    sheet = write_csv(tmp_path / "in.csv", prompts(4))
    fresh = cli(["validate", str(sheet), "--state", url])  # no ledger yet: everything would be sent
    assert fresh.exit_code == 0, fresh.output
    assert "would send" in fresh.output
    assert cli(submit_args(fake, tmp_path, sheet, state=url)).exit_code == 0
    write_csv(sheet, [*prompts(4), {"id": "new", "prompt": "one more"}])
    dry = cli(submit_args(fake, tmp_path, sheet, out="dry.parquet", state=url, extra=["--dry-run"]))
    assert dry.exit_code == 0, dry.output
    assert results(tmp_path / "dry.parquet")["status"].to_list() == ["skipped"] * 4 + ["dry_run"]
    listed = cli(["validate", str(sheet), "--state", url, "--base-url", fake.url])
    assert listed.exit_code == 0, listed.output
    assert re.search(r"skipped\W+4", listed.output) and re.search(r"would send\W+1", listed.output), listed.output
    assert len(fake.state.submissions()) == 4


RETRY_ROWS = [{"id": "ok", "prompt": "a calm lake"}, {"id": "flaky", "prompt": "FLAKYTASK a storm at sea"},
              {"id": "policy", "prompt": "FAILTASK something forbidden"}, {"id": "cancel", "prompt": "CANCELTASK a fox"}]


def run_summary(stderr: str) -> dict:
    return next(e for e in json_lines(stderr) if e.get("event") == "summary")


def host_night(fake, url: str, d: Path, n: int, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """One night on one "host": submit then collect from its own directory and state home."""
    sheet = d / "in.csv"
    if not sheet.exists():
        write_csv(sheet, RETRY_ROWS)
    table = d / f"night{n}.parquet"
    common = ["--base-url", fake.url, "--state", url, "--rate", "0"]
    sub = run_cli_process(["submit", str(sheet), "-o", str(table), "--no-preflight", *common, *extra],
                          env=host_env(d), cwd=d)
    assert sub.returncode == 0, sub.stderr
    col = run_cli_process(["collect", "--results", str(table), *common], env=host_env(d), cwd=d)
    assert col.returncode in (0, 1), col.stderr  # 1: some tasks failed, as they should
    return sub, {r["id"]: r for r in results(table).iter_rows(named=True)}


def test_retry_failed_on_a_postgres_ledger_holds_its_cap_across_hosts(start_fake, pg_server: PgServer,
                                                                      tmp_path: Path) -> None:
    """Issue 23: --retry-failed exited 2 with a PostgreSQL ledger. Three nights on two hosts
    sharing only the database: night 2 (host b) retries the provider-side failures as
    ``<request_id>.a2`` with the lineage in the database; night 3 (host a, whose disk never
    saw night 2) finds the cap of 2 tasks reached and pays for nothing."""
    fake = start_fake(flaky_failures=5)
    url = pg_server.url()
    a, b = host_dir(tmp_path, "a"), host_dir(tmp_path, "b")
    _, first = host_night(fake, url, a, 1)
    assert {k: r["task_status"] for k, r in first.items()} == {"ok": "success", "flaky": "failed",
                                                                "policy": "failed", "cancel": "failed"}
    dry = run_cli_process(["submit", str(a / "in.csv"), "-o", str(b / "dry.parquet"), "--dry-run", "--retry-failed",
                           "--base-url", fake.url, "--state", url, "--rate", "0"], env=host_env(b), cwd=b)
    assert dry.returncode == 0, dry.stderr
    assert sorted(results(b / "dry.parquet")["status"].to_list()) == ["dry_run", "dry_run", "skipped", "skipped"]
    sub, second = host_night(fake, url, b, 2, "--retry-failed")
    assert run_summary(sub.stderr)["retry_failed"] == {"retried": 2, "cap_reached": 0, "content_policy": 1,
                                                        "unclassified": 0, "sent": 2}
    for k in ("flaky", "cancel"):
        assert second[k]["task_attempt"] == 2 and second[k]["earlier_task_ids"] == [first[k]["task_id"]]
    flaky = first["flaky"]["request_id"]
    assert [r.x_request_id for r in fake.state.submissions() if r.body["prompt"].startswith("FLAKYTASK")] \
        == [flaky, f"{flaky}.a2"]
    sub, third = host_night(fake, url, a, 3, "--retry-failed")
    assert run_summary(sub.stderr)["retry_failed"]["cap_reached"] == 2
    assert len(fake.state.submissions()) == 6  # 4 first tasks, 2 retries, none after the cap
    assert third["flaky"]["earlier_task_ids"] == [first["flaky"]["task_id"]]
    with psycopg.connect(pg_server.base_url()) as db:
        schema = PgLocation(url).schema
        lineage = db.execute(f"SELECT attempt, task_id, failure_class FROM {schema}.task_lineage "
                             "WHERE request_id = %s", (flaky,)).fetchall()
    assert lineage == [(1, first["flaky"]["task_id"], "retryable")]


def test_a_local_image_is_uploaded_once_across_two_hosts(fake, pg_server: PgServer, tmp_path: Path) -> None:
    """Issue 23: a local image was ``invalid`` with a PostgreSQL ledger. Two hosts, each with
    its own copy of the picture and its own sheet, one ledger: one upload, one URL in both."""
    url = pg_server.url()
    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))
    for name, prompt in (("a", "one"), ("b", "two")):
        d = host_dir(tmp_path, name)
        (d / "refs").mkdir()
        (d / "refs" / "frame.png").write_bytes(png)
        sheet = write_csv(d / "in.csv", [{"prompt": prompt, "first_frame_image": "refs/frame.png"}])
        proc = run_cli_process(["submit", str(sheet), "-o", str(d / "r.parquet"), "--base-url", fake.url,
                                "--state", url, "--rate", "0", "--no-preflight", "--model",
                                "bytedance/seedance-2.0-fast-i2v"], env=host_env(d), cwd=d)
        assert proc.returncode == 0, proc.stderr
        assert results(d / "r.parquet")["status"].to_list() == ["submitted"]
    assert len(fake.state.uploads()) == 1
    sent = {r.body["prompt"]: r.body["first_frame_image"] for r in fake.state.submissions()}
    assert sent["one"] == sent["two"] and sent["one"].startswith(f"{fake.url}/media/file-")


def test_a_schema_1_ledger_is_migrated_in_place_and_collect_records_expiry(pg_server: PgServer) -> None:
    """Schemas 2 (the failure class, the retry columns, task_expiry) and 3 (task_lineage,
    uploads) are applied in place to a ledger a schema-1 version created; a read-only open
    of a schema-1 ledger reads it as is."""
    from batch.ledger import PgLocation, locked_ledger, open_readonly

    location = PgLocation(pg_server.url())
    api = "https://api.example"
    with locked_ledger(location, api) as ledger:
        ledger.import_tasks([(api, "a", "task-a", None, None, None, None, "{}", None)])
        for statement in ("ALTER TABLE requests DROP COLUMN failure_class", "ALTER TABLE requests DROP COLUMN "
                          "task_attempt", "ALTER TABLE requests DROP COLUMN earlier_task_ids",
                          "DROP TABLE task_expiry", "DROP TABLE task_lineage", "DROP TABLE uploads",
                          "DELETE FROM migrations WHERE version >= 2"):
            ledger.db.execute(statement)
    old = open_readonly(location, api)
    assert old is not None
    try:
        assert [r[-2:] for r in old.outcome_rows(["a"])] == [(1, None)] and old.expiries() == {}
        assert (old.uploads(), old.next_attempts(), old.lineage_tasks(), old.night_requests("2026-01-01")) \
            == ({}, {}, 0, [])
        assert old.failed_tasks(["a"]) == []
    finally:
        old.close()
    with locked_ledger(location, api) as ledger:
        assert ledger.db.execute("SELECT max(version) FROM migrations").fetchone()[0] == SCHEMA_VERSION
        ledger.commit([], [], [("UPDATE requests SET failure_class=? WHERE request_id=?", ("retryable", "a")),
                               (queries.SET_EXPIRY, (api, "a", "2030-01-01T00:00:00+00:00"))], False)
        assert ledger.expiries() == {(api, "a"): "2030-01-01T00:00:00+00:00"}
        assert [r[-2:] for r in ledger.outcome_rows(["a"])] == [(1, None)]
        assert [v for v, in ledger.db.execute("SELECT version FROM migrations ORDER BY version")] == [1, 2, 3]
        assert ledger.uploads() == {} and ledger.lineage_tasks() == 0  # the tables are back, empty


class SourcedProxy(CutProxy):
    """:class:`CutProxy` whose connections to the server leave from ``source`` (another
    loopback address), so that a packet filter can make that "host" vanish alone."""

    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__(port)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream), source_address=(self.source, 0))
            with self.lock:
                self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()


@contextlib.contextmanager
def vanished(address: str) -> Iterator[None]:
    """Every packet to or from ``address`` dropped (nftables, a table of this test's own,
    removed after): a host gone without closing its connections. Skips where the test
    cannot filter packets (not root, no nft, no CAP_NET_ADMIN)."""
    nft = shutil.which("nft")
    if os.geteuid() != 0 or nft is None:
        pytest.skip("dropping packets needs root and nft (Debian's nftables)")
    table = f"sb_vanish_{os.getpid()}"
    made = subprocess.run([nft, "add", "table", "ip", table], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"nft cannot filter packets here: {made.stderr.strip()[:200]}")
    try:
        for rule in (f"add chain ip {table} out {{ type filter hook output priority 0 ; }}",
                     f"add rule ip {table} out ip saddr {address} drop",
                     f"add rule ip {table} out ip daddr {address} drop"):
            subprocess.run([nft, *rule.split()], check=True, capture_output=True)
        yield
    finally:
        subprocess.run([nft, "delete", "table", "ip", table], capture_output=True)


def allow_loopback_net(server: PgServer) -> None:
    """The server's pg_hba trusts 127.0.0.1 only: let the other loopback addresses in."""
    with psycopg.connect(server.base_url(), autocommit=True) as db:
        hba = Path(db.execute("SHOW hba_file").fetchone()[0])
        if "127.0.0.0/8" not in hba.read_text():
            with hba.open("a") as f:
                f.write("host all all 127.0.0.0/8 trust\n")
            db.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)  # the postmaster rereads it on SIGHUP


def test_a_vanished_host_frees_the_lock_by_keepalive(start_fake, pg_server: PgServer, tmp_path: Path) -> None:
    """Host A holds the submit lock and vanishes without closing its connection (every
    packet to and from its address dropped, its process stopped): the server's keepalive
    ends A's session and the lock is free within ~25 s; a run on host B then proceeds."""
    from batch.ledger.postgres import _lock_key

    allow_loopback_net(pg_server)
    fake = start_fake(latency=120)  # A is waiting on the provider, holding the lock, when it vanishes
    proxy = SourcedProxy(pg_server.port, "127.0.0.2")
    ledger = "t" + uuid.uuid4().hex[:12]
    a, b = host_dir(tmp_path, "a"), host_dir(tmp_path, "b")
    sheet = write_csv(tmp_path / "in.csv", prompts(1))
    args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--no-preflight"]
    first = subprocess.Popen([sys.executable, "-m", "batch", *args, "--state", pg_server.url(ledger, port=proxy.port),
                              "-o", str(a / "r.parquet")], cwd=a, env=host_env(a), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not fake.state.submissions() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fake.state.submissions(), "host A never started sending"
        key = _lock_key("seedance_" + ledger, "submit")
        with psycopg.connect(pg_server.base_url(), autocommit=True) as db, vanished("127.0.0.2"):
            first.send_signal(signal.SIGSTOP)
            gone = time.monotonic()
            freed = None
            while time.monotonic() - gone < 40:
                if db.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
                    freed = time.monotonic() - gone
                    db.execute("SELECT pg_advisory_unlock(%s)", (key,))
                    break
                time.sleep(0.25)
            print(f"lock free {freed} s after host A vanished")
            assert freed is not None and 10 <= freed <= 30, freed
            second = run_cli_process([*args, "--state", pg_server.url(ledger), "-o", str(b / "r.parquet")],
                                     env=host_env(b), cwd=b)
        assert second.returncode != 3, second.stderr  # B runs: A's claims stay claimed (unknown), none resent
        assert len(fake.state.submissions()) == 1 and accepted_twice(fake) == []
    finally:
        first.kill()
        first.wait(timeout=30)
        proxy.close()


PASSWORD = "S3cr@t:%40-pw"  # an @, a :, and a %40 that must stay three characters


@pytest.fixture(scope="module")
def pw_role(pg_server: PgServer) -> str:
    """A role that must give its password (scram), ahead of the server's trust lines."""
    with psycopg.connect(pg_server.base_url(), autocommit=True) as db:
        hba = Path(db.execute("SHOW hba_file").fetchone()[0])
        text = hba.read_text()
        if "pwuser" not in text:
            hba.write_text("host all pwuser 127.0.0.0/8 scram-sha-256\n" + text)
            db.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)
        if not db.execute("SELECT 1 FROM pg_roles WHERE rolname = 'pwuser'").fetchone():
            db.execute("CREATE ROLE pwuser LOGIN PASSWORD %s" % psycopg.sql.quote(PASSWORD))  # noqa: UP031
            db.execute("GRANT CREATE ON DATABASE postgres TO pwuser")
    return "pwuser"


def secret_forms(password: str) -> list[str]:
    from urllib.parse import quote
    return [password, quote(password, safe=""), "S3cr@t", "%40-pw", "40-pw"]


def assert_hidden(proc: subprocess.CompletedProcess[str], *extra: Path) -> None:
    seen = proc.stdout + proc.stderr + "".join(p.read_text() for p in extra if p.exists())
    for form in secret_forms(PASSWORD):
        assert form not in seen, (form, seen)


def refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)  # one line, no traceback
    assert all(w in line for w in words), line
    assert_hidden(proc)
    return line


def test_a_password_with_at_colon_and_percent_works_and_never_shows(fake, pg_server: PgServer, pw_role: str,
                                                                     tmp_path: Path) -> None:
    from urllib.parse import quote

    sheet = write_csv(tmp_path / "in.csv", prompts(2))
    base = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--no-preflight"]
    port = pg_server.port
    good = {
        "url": (f"postgresql://{pw_role}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/postgres?ledger=pw1", {}),
        "query": (f"postgresql://{pw_role}@127.0.0.1:{port}/postgres?password={quote(PASSWORD, safe='')}"
                  f"&ledger=pw2", {}),
        "PGPASSWORD": (f"postgresql://{pw_role}@127.0.0.1:{port}/postgres?ledger=pw3", {"PGPASSWORD": PASSWORD}),
    }
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:postgres:{pw_role}:{PASSWORD.replace(':', chr(92) + ':')}\n")
    pgpass.chmod(0o600)
    good[".pgpass"] = (f"postgresql://{pw_role}@127.0.0.1:{port}/postgres?ledger=pw4", {"PGPASSFILE": str(pgpass)})
    for name, (url, env) in good.items():
        out = tmp_path / f"{name}.parquet"
        proc = run_cli_process([*base, "--state", url, "-o", str(out)], env=subprocess_env(**env))
        assert proc.returncode == 0, (name, proc.stderr)
        assert_hidden(proc, Path(f"{out}.summary.json"))


def test_wrong_credentials_and_odd_ledger_names_are_one_line_exit_2(fake, pg_server: PgServer, pw_role: str,
                                                                    tmp_path: Path) -> None:
    """A wrong password (in the URL, in ?password=, in PGPASSWORD, in .pgpass), one typed raw
    in the URL, an unknown database or an odd ledger name: exit 2, one line, no traceback,
    nothing sent, and no form of the password anywhere."""
    from urllib.parse import quote

    sheet = write_csv(tmp_path / "in.csv", prompts(1))
    base = ["submit", str(sheet), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url, "--no-preflight"]
    port = pg_server.port
    host = f"127.0.0.1:{port}/postgres"
    wrong = PASSWORD + "x"
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:postgres:{pw_role}:{wrong.replace(':', chr(92) + ':')}\n")
    pgpass.chmod(0o600)
    cases: list[tuple[str, dict[str, str]]] = [
        (f"postgresql://{pw_role}:{quote(wrong, safe='')}@{host}?ledger=a", {}),
        (f"postgresql://{pw_role}@{host}?password={quote(wrong, safe='')}&ledger=a", {}),
        (f"postgresql://{pw_role}@{host}?ledger=a&password={wrong}", {}),
        (f"postgresql://{pw_role}@{host}?ledger=a", {"PGPASSWORD": wrong}),
        (f"postgresql://{pw_role}@{host}?ledger=a", {"PGPASSFILE": str(pgpass)}),
    ]
    for url, env in cases:
        proc = run_cli_process([*base, "--state", url], env=subprocess_env(**env))
        line = refused(proc, "nothing sent")
        assert "password" in line or "authentication" in line, line
    # Typed raw in the user part (@, : and %40 unencoded): libpq would take the password's
    # tail for a host; refused, quoting none of it, saying how to write it.
    refused(run_cli_process([*base, "--state", f"postgresql://{pw_role}:{wrong}@{host}?ledger=a"]), "percent-encode")
    url = f"postgresql://{pw_role}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/nosuchdb?ledger=a"
    refused(run_cli_process([*base, "--state", url]), "nosuchdb")
    for name in ("x;drop'\u00e9", "x" * 5000, ""):  # each a process: the names PgLocation refuses, in-process
        url = f"postgresql://{pw_role}:{quote(PASSWORD, safe='')}@{host}?ledger={quote(name, safe='')}"
        line = refused(run_cli_process([*base, "--state", url]), "ledger")
        assert len(line) < 400, line
    from batch.ledger import PgLocation
    for name in ("a b", "\u00e9t\u00e9", "a" * 49, "'\"", "%00", "a\x00b"):
        with pytest.raises(StateError, match="use letters, digits"):
            PgLocation(f"postgresql://{pw_role}:{quote(PASSWORD, safe='')}@{host}?ledger={quote(name, safe='')}")
    assert fake.state.submissions() == []


def test_collect_cut_mid_run_keeps_the_table_and_the_downloads(start_fake, pg_server: PgServer,
                                                                 tmp_path: Path) -> None:
    """collect's connections cut while it polls and downloads: exit 6 saying the ledger went
    away (not that the ledger holds what it could not take); the table keeps every task id;
    the files downloaded stay; a collect with the ledger back finishes the table and files."""
    fake = start_fake(latency=0.1)
    ledger = "t" + uuid.uuid4().hex[:12]
    sheet = write_csv(tmp_path / "in.csv", prompts(30))
    table = tmp_path / "r.parquet"
    sent = run_cli_process(["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--concurrency", "16",
                            "--state", pg_server.url(ledger), "-o", str(table)])
    assert sent.returncode == 0, sent.stderr
    task_ids = set(results(table)["task_id"].to_list())
    assert len(task_ids) == 30
    proxy = CutProxy(pg_server.port)
    videos = tmp_path / "videos"
    args = ["collect", "--base-url", fake.url, "--rate", "0", "--results", str(table), "--download", str(videos),
            "--concurrency", "1", "--download-concurrency", "1", "--no-html"]
    try:
        proc = subprocess.Popen([sys.executable, "-m", "batch", *args, "--state", pg_server.url(ledger, port=proxy.port)],
                                env=subprocess_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while len(list(videos.glob("*.mp4"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.cut()
        _, err = proc.communicate(timeout=90)
    finally:
        proxy.close()
    assert proc.returncode == 6, err
    line = error_line(err)
    assert "unreachable" in line and "ledger" in line, line
    assert "are in the ledger" not in line, line
    assert set(results(table)["task_id"].to_list()) == task_ids
    kept = {p.name for p in videos.glob("*.mp4")}
    assert len(kept) >= 4
    again = run_cli_process([*args, "--state", pg_server.url(ledger)])
    assert again.returncode == 0, again.stderr
    rows = results(table)
    assert set(rows["task_id"].to_list()) == task_ids and set(rows["task_status"].to_list()) == {"success"}
    assert kept <= {p.name for p in videos.glob("*.mp4")} and len(list(videos.glob("*.mp4"))) == 30


def test_without_its_database_a_run_answers_from_what_it_saw(pg_server: PgServer) -> None:
    """batch.offline against a real store whose connection is gone: an earlier run's row as
    read, this run's committed answer, a claim without an answer (unknown), a request read
    and not sent (no row: pending), a request never read (unknown, not "not sent")."""
    from batch.ledger import PgLocation, locked_ledger
    from batch.ledger.base import Mark, utcnow
    from batch.offline import NO_ANSWER, NOT_READ, RememberingLedger

    location = PgLocation(pg_server.url())
    api = "https://api.example"

    def mark(rid: str, row: int) -> Mark:
        return Mark(rid, "run1", None, "m", "/ep", "in.csv", row, "{}")

    with locked_ledger(location, api) as ledger:
        ledger.import_tasks([(api, "old", "task-old", None, None, None, None, "{}", None)])
        memo = RememberingLedger(ledger, "run1")
        assert set(memo.lookup(["old", "a", "b", "c"])) == {"old"}
        assert memo.commit([mark("a", 1), mark("b", 2)], [], [], False) == {"a", "b"}
        memo.commit([], [("submitted", "task-a", None, None, 200, 1, utcnow(), None, "run1", "a")], [], False)
        ledger.db.close()  # the server gone
        with pytest.raises(ledger.write_errors):
            memo.commit([mark("c", 3)], [], [], False)
        assert memo.unreachable
        rows = {r[0]: r for r in memo.outcome_rows(["old", "a", "b", "c", "d"])}
    assert (rows["old"][1], rows["old"][4]) == ("submitted", "task-old")
    assert (rows["a"][1], rows["a"][2], rows["a"][3], rows["a"][4]) == ("submitted", "run1", "/ep", "task-a")
    assert (rows["b"][1], rows["b"][5]) == ("unknown", NO_ANSWER)
    assert "c" not in rows  # read, claimed in a batch that failed: not sent
    assert (rows["d"][1], rows["d"][5]) == ("unknown", NOT_READ)
    assert [p[0] for p in memo.run_places("run1")] == ["a", "b"]


# -- the rescue file belongs to a ledger, not to a URL's spelling (review of #23) ----------

def cut_night(fake, url: str, sheet: Path, table: Path, proxy: CutProxy, env: dict[str, str],
              cwd: Path | None = None) -> str:
    """Submit through ``proxy`` and cut it once a few requests are out: exit 6, a rescue file."""
    proc = subprocess.Popen([sys.executable, "-m", "batch", "submit", str(sheet), "--base-url", fake.url, "--rate",
                             "0", "--concurrency", "4", "--state", url, "-o", str(table)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    deadline = time.monotonic() + 30
    before = len(fake.state.submissions())
    while len(fake.state.submissions()) < before + 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    proxy.cut()
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 6, err
    return err


def ledger_task_ids(pg_server: PgServer, ledger: str, db: str = "postgres") -> set[str]:
    with psycopg.connect(pg_server.base_url().rsplit("/", 1)[0] + "/" + db) as conn:
        return {t for (t,) in conn.execute(f"SELECT task_id FROM seedance_{ledger}.requests "
                                            f"WHERE task_id IS NOT NULL")}


def test_the_rescue_file_follows_the_ledger_not_the_urls_spelling(start_fake, pg_server: PgServer,
                                                                   tmp_path: Path) -> None:
    """Two databases reached through two service entries with one ledger name (one URL
    spelling): the night cut on "prod" leaves a rescue file that a run on "staging" names
    and leaves alone; a run on prod spelled another way (localhost, the direct port
    instead of the proxy's) replays it: every task id in prod's ledger, nothing paid twice."""
    fake = start_fake(latency=0.3)
    with psycopg.connect(pg_server.base_url(), autocommit=True) as conn:
        staging_db = "staging" + uuid.uuid4().hex[:8]
        conn.execute(f"CREATE DATABASE {staging_db}")
    proxy = CutProxy(pg_server.port)
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[prod]\nhost=127.0.0.1\nport={proxy.port}\ndbname=postgres\nuser=postgres\n\n"
                        f"[staging]\nhost=127.0.0.1\nport={pg_server.port}\ndbname={staging_db}\nuser=postgres\n")
    env = subprocess_env(PGSERVICEFILE=str(services))
    ledger = "n" + uuid.uuid4().hex[:10]
    home = Path(env["XDG_STATE_HOME"]) / "seedance-batch" / "postgres"
    try:
        sheet = write_csv(tmp_path / "in.csv", prompts(40))
        err = cut_night(fake, f"postgresql://postgres@/?service=prod&ledger={ledger}", sheet, tmp_path / "r.parquet",
                        proxy, env)
        rescue = sorted(home.glob(f"{ledger}-*.rescue.jsonl"))
        assert len(rescue) == 1, (err, list(home.iterdir()))
        held = {json.loads(line)["outcome"][1] for line in rescue[0].read_text().splitlines()}
        assert held - {None}, "the cut left no task id in the rescue file"
        other_rows = prompts(3, prefix="A storm over the sea")
        other = write_csv(tmp_path / "other.csv", other_rows)
        staging = run_cli_process(["submit", str(other), "--base-url", fake.url, "--rate", "0", "--state",
                                   f"postgresql://postgres@/?service=staging&ledger={ledger}",
                                   "-o", str(tmp_path / "s.parquet")], env=env)
        assert staging.returncode == 0, staging.stderr
        assert rescue[0].exists(), "staging consumed prod's rescue file"
        warned = [e for e in map(json.loads, staging.stderr.splitlines()) if e.get("event") == "rescue_of_another_ledger"]
        assert warned and str(rescue[0]) in json.dumps(warned), staging.stderr
        assert ledger_task_ids(pg_server, ledger, staging_db) == {r.task_id for r in fake.state.submissions()
                                                                  if r.body["prompt"] in {o["prompt"] for o in other_rows}}
        # prod, spelled the other way: the server's own port and "localhost", another table
        again = run_cli_process(["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--state",
                                 f"postgresql://postgres@localhost:{pg_server.port}/postgres?ledger={ledger}",
                                 "-o", str(tmp_path / "again.parquet")], env=env)
        assert again.returncode in (0, 1), again.stderr
        assert not rescue[0].exists()
        mine = {o["prompt"] for o in prompts(40)}
        accepted = {r.task_id for r in fake.state.submissions() if r.task_id and r.body["prompt"] in mine}
        assert accepted == ledger_task_ids(pg_server, ledger)
        assert accepted_twice(fake) == []
    finally:
        proxy.close()


def test_a_planted_rescue_file_is_refused_or_kept_aside(fake, store: str, tmp_path: Path) -> None:
    """Attacker 10: a symlink at the rescue file's place is one line, exit 2, nothing sent; a
    rescue file whose task id conflicts with the ledger's is kept aside (``.conflict``, the
    summary's ``rescue_conflicts``), the ledger's task id stays."""
    from batch.ledger import PgLocation, open_readonly

    sheet = write_csv(tmp_path / "in.csv", prompts(3))
    args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--state", store,
            "-o", str(tmp_path / "r.parquet")]
    assert run_cli_process(args).returncode == 0
    first = results(tmp_path / "r.parquet").row(0, named=True)
    state = PgLocation(store) if store.startswith("postgresql") else Path(store)
    ledger = open_readonly(state, fake.url.rstrip("/"))
    assert ledger is not None
    api = next(iter(ledger.apis()))
    ledger.close()
    ledger = open_readonly(state, api)
    assert ledger is not None
    rescue = ledger.rescue_file()
    run_id = ledger.lookup([first["request_id"]])[first["request_id"]].run_id
    ledger.close()
    planted = tmp_path / "planted.jsonl"
    planted.write_text(json.dumps({"api": api, "outcome": ["submitted", "task-PLANTED", None, None, 200, 1, None,
                                                           None, run_id, first["request_id"]]}) + "\n")
    rescue.parent.mkdir(parents=True, exist_ok=True)
    rescue.symlink_to(planted)
    proc = run_cli_process(args)
    assert proc.returncode == 2 and "rescue" in error_line(proc.stderr), proc.stderr
    rescue.unlink()
    shutil.copy(planted, rescue)
    proc = run_cli_process(args)
    assert proc.returncode == 0, proc.stderr
    assert results(tmp_path / "r.parquet").row(0, named=True)["task_id"] == first["task_id"]
    summary = json.loads((tmp_path / "r.parquet.summary.json").read_text())
    assert "task-PLANTED" in Path(summary["rescue_conflicts"]).read_text()
    assert len(fake.state.submissions()) == 3


def test_a_nul_in_a_cell_is_an_invalid_row_in_both_stores(fake, store: str, tmp_path: Path) -> None:
    """Attacker 5: a NUL in an id, a prompt or a pass-through cell makes its row invalid
    (field, value, rule), for SQLite and PostgreSQL alike; every other row is sent, and a
    rerun sends nothing again."""
    rows = [{"id": f"r{i}", "prompt": f"A quiet harbour {i}", "note": "ok"} for i in range(8)]
    rows[2]["id"] = "r\x002"
    rows[4]["prompt"] = "A quiet\x00 harbour"
    rows[6]["note"] = "n\x00te"
    sheet = write_csv(tmp_path / "in.csv", rows)
    args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--state", store,
            "-o", str(tmp_path / "r.parquet")]
    proc = run_cli_process(args)
    assert proc.returncode == 1, proc.stderr
    table = results(tmp_path / "r.parquet")
    assert table["status"].to_list() == ["submitted"] * 2 + ["invalid"] + ["submitted"] + ["invalid"] + \
        ["submitted"] + ["invalid"] + ["submitted"]
    for error, field in zip(table.filter(pl.col("status") == "invalid")["error"].to_list(), ("id", "prompt", "note"),
                            strict=True):
        assert error.startswith(f"{field}=") and "NUL" in error, error
    again = run_cli_process(args)
    assert again.returncode == 1, again.stderr
    assert len(fake.state.submissions()) == 5 and accepted_twice(fake) == []


def test_text_with_a_nul_fits_the_postgres_ledger(fake, pg_server: PgServer, tmp_path: Path) -> None:
    """Attacker 6 and its siblings: a SQLite ledger holding NUL text (written before inputs
    refused it) copies into PostgreSQL whole, the NUL shown as U+FFFD; provider text with a
    NUL (a reason, a URL) never makes a PostgreSQL write fail."""
    import sqlite3

    from batch.ledger import PgLocation, locked_ledger
    from batch.ledger.base import Mark

    sheet = write_csv(tmp_path / "in.csv", prompts(3))
    assert cli(submit_args(fake, tmp_path, sheet)).exit_code == 0
    with sqlite3.connect(tmp_path / "state.sqlite") as db:
        db.execute("UPDATE requests SET label = ?, error = ?", ("r\x00bad", "why\x00not"))
        db.execute("UPDATE runs SET command = ?", ("submit \x00",))
    url = pg_server.url()
    res = cli(["state", "copy", str(tmp_path / "state.sqlite"), url])
    assert res.exit_code == 0, res.output
    assert "3 requests copied" in res.output
    location = PgLocation(url)
    with psycopg.connect(pg_server.base_url()) as db:
        labels = {r for (r,) in db.execute(f"SELECT label FROM {location.schema}.requests")}
    assert labels == {"r\ufffdbad"}
    with locked_ledger(location, "https://api.example") as ledger:
        mark = Mark("n1", "run-n", "lab\x00el", "m", "/ep", "in.csv", 1, '{"prompt": "p"}')
        assert ledger.commit([mark], [], [], False) == {"n1"}
        ledger.commit([], [("failed", None, "bad\x00reason", 400, 400, 1, None, "http://x/\x00", "run-n", "n1")],
                      [("UPDATE requests SET failure_reason = ? WHERE request_id = ?", ("r\x00", "n1"))], False)
        entry = ledger.lookup(["n1"])["n1"]
        assert (entry.error, entry.failure_reason, entry.label) == ("bad\ufffdreason", "r\ufffd", "lab\ufffdel")


def test_a_database_blocked_at_start_is_one_line_exit_2(fake, pg_server: PgServer, tmp_path: Path) -> None:
    """Found on the second review: with the requests table locked by another session and no
    signal, the first read gave up at lock_timeout with a traceback (exit 1) from
    settle_apis; nothing was sent, so it is a state error: one line, exit 2."""
    url = pg_server.url()
    sheet = write_csv(tmp_path / "in.csv", prompts(3))
    args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--state", url,
            "-o", str(tmp_path / "r.parquet")]
    first = write_csv(tmp_path / "first.csv", prompts(1, prefix="Another"))
    assert run_cli_process(["submit", str(first), *args[2:]]).returncode == 0  # the ledger exists
    schema = "seedance_" + url.rsplit("=", 1)[1]
    holder = psycopg.connect(pg_server.base_url())
    try:
        holder.execute(f"LOCK TABLE {schema}.requests IN ACCESS EXCLUSIVE MODE")  # held until rollback
        proc = run_cli_process(args, timeout=60)
    finally:
        holder.rollback()
        holder.close()
    assert proc.returncode == 2, proc.stderr
    assert "lock timeout" in error_line(proc.stderr) and "nothing sent" in error_line(proc.stderr)
    assert len(fake.state.submissions()) == 1


def test_a_blocked_database_does_not_hold_the_run_past_a_signal(fake, pg_server: PgServer, tmp_path: Path) -> None:
    """Attacker 7: another session holds the requests table locked for a long time; SIGTERM
    ends the run within seconds (the tool's statements give up waiting for a lock after
    lock_timeout), nothing is sent, exit 4 as for any signal."""
    url = pg_server.url()
    sheet = write_csv(tmp_path / "in.csv", prompts(5))
    args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--state", url,
            "-o", str(tmp_path / "r.parquet")]
    first = write_csv(tmp_path / "first.csv", prompts(1, prefix="Another"))
    assert run_cli_process(["submit", str(first), *args[2:]]).returncode == 0  # the ledger exists
    schema = "seedance_" + url.rsplit("=", 1)[1]
    holder = psycopg.connect(pg_server.base_url())
    try:
        holder.execute(f"LOCK TABLE {schema}.requests IN ACCESS EXCLUSIVE MODE")  # held until rollback
        proc = subprocess.Popen([sys.executable, "-m", "batch", *args], env=subprocess_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(4)
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(int(os.environ.get("SB_TEST_SIG", signal.SIGTERM)))
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"SIGTERM ignored while the table was locked: {err[-2000:]}")
        waited = time.monotonic() - t0
    finally:
        holder.rollback()
        holder.close()
    assert waited < 15, waited
    assert proc.returncode == 4, err
    assert len(fake.state.submissions()) == 1


def test_a_table_locked_mid_run_stops_the_run_within_lock_timeout(start_fake, pg_server: PgServer,
                                                                   tmp_path: Path) -> None:
    """Attacker 7, while sending: another session takes the requests table; the run's
    statements give up after lock_timeout (10 s): SIGTERM and --deadline are answered then,
    not when the lock is released; nothing is sent without its claim; no task id lost."""
    fake = start_fake(latency=0.5)
    url = pg_server.url()
    sheet = write_csv(tmp_path / "in.csv", prompts(40))
    args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--concurrency", "2", "--state", url,
            "-o", str(tmp_path / "r.parquet")]
    proc = subprocess.Popen([sys.executable, "-m", "batch", *args], env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while len(fake.state.submissions()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    schema = "seedance_" + url.rsplit("=", 1)[1]
    holder = psycopg.connect(pg_server.base_url())
    try:
        holder.execute(f"LOCK TABLE {schema}.requests IN ACCESS EXCLUSIVE MODE")
        locked_at = len(fake.state.submissions())
        time.sleep(1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the run waited for the lock: {err[-2000:]}")
        waited = time.monotonic() - t0
    finally:
        holder.rollback()
        holder.close()
    assert waited < 25, (waited, err)
    assert proc.returncode == 6, err  # the rescue file needs a look more than the signal does
    assert "lock timeout" in error_line(err)
    assert len(fake.state.submissions()) <= locked_at + 2
    again = run_cli_process(args)
    assert again.returncode in (0, 1), again.stderr
    accepted = {r.task_id for r in fake.state.submissions() if r.task_id}
    with psycopg.connect(pg_server.base_url()) as db:
        held = {t for (t,) in db.execute(f"SELECT task_id FROM {schema}.requests WHERE task_id IS NOT NULL")}
    assert accepted == held and accepted_twice(fake) == []


def test_a_role_without_rights_on_the_ledger_is_one_line(fake, pg_server: PgServer, tmp_path: Path) -> None:
    """User 8b: a ledger created by one role, used by another without rights on its schema:
    one line naming the schema and the missing right, exit 2, nothing sent."""
    ledger = "t" + uuid.uuid4().hex[:12]
    sheet = write_csv(tmp_path / "in.csv", prompts(2))
    args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "-o", str(tmp_path / "r.parquet")]
    assert run_cli_process([*args, "--state", pg_server.url(ledger)]).returncode == 0
    with psycopg.connect(pg_server.base_url(), autocommit=True) as db:
        if not db.execute("SELECT 1 FROM pg_roles WHERE rolname = 'norights'").fetchone():
            db.execute("CREATE ROLE norights LOGIN")
    url = pg_server.url(ledger).replace("postgres@", "norights@")
    proc = run_cli_process([*args, "--state", url])
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert f"permission denied for schema seedance_{ledger}" in line and "\n" not in line, line
    assert "LINE 1" not in line and "migrations" not in line, line
    dry = run_cli_process([*args, "--dry-run", "--state", url])  # an estimate says it could not consult it
    assert dry.returncode == 0, dry.stderr
    warned = [e["reason"] for e in map(json.loads, dry.stderr.splitlines()) if e["event"] == "ledger_not_consulted"]
    assert warned and f"permission denied for schema seedance_{ledger}" in warned[0], dry.stderr
    assert len(fake.state.submissions()) == 2


def test_libpq_messages_reach_the_user_on_one_line(start_fake, pg_server: PgServer, tmp_path: Path) -> None:
    """User 8e: the connection cut mid-run: the summary's stop reason and every stdout and
    stderr line carry libpq's several-line message on one line."""
    fake = start_fake(latency=0.3)
    proxy = CutProxy(pg_server.port)
    try:
        url = pg_server.url(port=proxy.port)
        env = subprocess_env()
        proc = subprocess.Popen([sys.executable, "-m", "batch", "submit", str(write_csv(tmp_path / "in.csv",
                                 prompts(30))), "--base-url", fake.url, "--rate", "0", "--concurrency", "4",
                                 "--state", url, "-o", str(tmp_path / "r.parquet")], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while len(fake.state.submissions()) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.cut()
        out, err = proc.communicate(timeout=90)
    finally:
        proxy.close()
    assert proc.returncode == 6, err
    assert not [line for line in out.splitlines() if line.startswith(("\t", "before or while"))], out
    summary = json.loads((tmp_path / "r.parquet.summary.json").read_text())
    for key in ("stop_reason", "ledger_unreachable"):
        assert "\n" not in str(summary.get(key)), summary
    for event in map(json.loads, err.splitlines()):
        assert all("\n" not in str(v) for v in event.values()), event
