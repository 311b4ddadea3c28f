"""The PostgreSQL ledger against a real server the suite starts: what only it has (a
ledger shared by hosts, the server going away, credentials)."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
from conftest import (
    PgServer,
    accepted_twice,
    cli,
    error_line,
    prompts,
    results,
    run_cli_process,
    submit_args,
    subprocess_env,
    write_csv,
)

from batch import expiry


def host_dir(tmp: Path, name: str) -> Path:
    """A "host": its own working directory and state home, nothing shared but the database."""
    d = tmp / name
    (d / "xdg").mkdir(parents=True)
    return d


def host_env(d: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(XDG_STATE_HOME=str(d / "xdg"), **extra)


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
        server.start()  # the same data directory: what was committed is there
        fake.state.config.latency = 0  # the rerun's pace is not the point
        again = run_cli_process(args)
        assert again.returncode in (0, 1), again.stderr
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
        sheet = write_csv(tmp_path / "in.csv", prompts(40))
        args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0", "--concurrency", "4",
                "--state", url, "-o", str(tmp_path / "r.parquet")]
        proc = subprocess.Popen([sys.executable, "-m", "batch", *args], env=subprocess_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while len(fake.state.submissions()) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.cut()
        cut_at = len(fake.state.submissions())
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 6, err
        assert len(fake.state.submissions()) <= cut_at + 4  # only what was claimed before the cut
        fake.state.config.latency = 0  # the rerun's pace is not the point
        again = run_cli_process(args)
        assert again.returncode in (0, 1), again.stderr
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
    assert "5 requests copied (5 submitted), counts verified" in res.output
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


def test_retry_failed_and_local_images_are_refused_before_sending(fake, pg_server: PgServer, tmp_path: Path) -> None:
    """The retry lineage and the uploads table are SQLite tables so far. With a PostgreSQL
    ledger --retry-failed is a usage error (exit 2, one line, dry runs alike); a row naming
    a local image is invalid (field, value, rule) while the others are sent; nothing uploaded."""
    url = pg_server.url()
    sheet = write_csv(tmp_path / "in.csv", prompts(2))
    base = ["--base-url", fake.url, "--rate", "0", "--state", url, "--no-preflight"]
    for dry in ([], ["--dry-run"]):
        proc = run_cli_process(["submit", str(sheet), "-o", str(tmp_path / "r.parquet"), "--retry-failed",
                                *dry, *base])
        assert proc.returncode == 2, proc.stderr
        line = error_line(proc.stderr)
        assert "--retry-failed is not yet supported with a PostgreSQL ledger" in line, line
    assert fake.state.submissions() == []
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    framed = write_csv(tmp_path / "framed.csv", [{"prompt": "one", "first_frame_image": "refs/a.png"},
                                                 {"prompt": "two", "first_frame_image": "https://example.com/f.jpg"}])
    proc = run_cli_process(["submit", str(framed), "-o", str(tmp_path / "f.parquet"), "--model",
                            "bytedance/seedance-2.0-fast-i2v", *base])
    assert proc.returncode == 1, proc.stderr  # some rows invalid
    rows = {r["prompt"]: r for r in results(tmp_path / "f.parquet").iter_rows(named=True)}
    assert rows["two"]["status"] == "submitted"
    assert rows["one"]["status"] == "invalid" and "refs/a.png" in rows["one"]["error"]
    assert "not yet supported with a PostgreSQL ledger" in rows["one"]["error"]
    assert fake.state.uploads() == [] and len(fake.state.submissions()) == 1


def test_a_schema_1_ledger_is_migrated_in_place_and_collect_records_expiry(pg_server: PgServer) -> None:
    """Schema 2 (the failure class, the retry columns, task_expiry) is applied in place to a
    ledger a schema-1 version created; a read-only open of a schema-1 ledger reads it as is."""
    from batch.ledger import PgLocation, locked_ledger, open_readonly

    location = PgLocation(pg_server.url())
    api = "https://api.example"
    with locked_ledger(location, api) as ledger:
        ledger.import_tasks([(api, "a", "task-a", None, None, None, None, "{}", None)])
        for statement in ("ALTER TABLE requests DROP COLUMN failure_class", "ALTER TABLE requests DROP COLUMN "
                          "task_attempt", "ALTER TABLE requests DROP COLUMN earlier_task_ids",
                          "DROP TABLE task_expiry", "DELETE FROM migrations WHERE version = 2"):
            ledger.db.execute(statement)
    old = open_readonly(location, api)
    assert old is not None
    try:
        assert [r[-2:] for r in old.outcome_rows(["a"])] == [(1, None)] and old.expiries() == {}
    finally:
        old.close()
    with locked_ledger(location, api) as ledger:
        assert ledger.db.execute("SELECT max(version) FROM migrations").fetchone()[0] == 2
        ledger.commit([], [], [("UPDATE requests SET failure_class=? WHERE request_id=?", ("retryable", "a")),
                               (expiry.SQL_SET, (api, "a", "2030-01-01T00:00:00+00:00"))], False)
        assert ledger.expiries() == {(api, "a"): "2030-01-01T00:00:00+00:00"}
        assert [r[-2:] for r in ledger.outcome_rows(["a"])] == [(1, None)]
