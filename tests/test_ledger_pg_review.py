"""The PostgreSQL ledger under the attacks of #23's review: a lock session that ends under a
running night, the database password in every form a URL or libpq can carry it, URLs
without a host, ledger names that collide, and a shared budget row another team damaged.
Real server (the suite's), real processes, hostile servers written here."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import (
    PgServer,
    accepted_twice,
    error_line,
    host_dir,
    host_env,
    prompts,
    run_cli_process,
    subprocess_env,
    wait_for,
    write_csv,
)


def popen(args: list[str], d: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batch", *args], cwd=d, env=env or host_env(d),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def database(pg_server: PgServer) -> Iterator[str]:
    """A database of its own (a setting altered on it touches no other test)."""
    name = "db" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg_server.base_url(), autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1:{pg_server.port}/{name}"
    with psycopg.connect(pg_server.base_url(), autocommit=True) as db:
        db.execute(f"DROP DATABASE {name} WITH (FORCE)")


# -- 1: a lost lock session never lets two runs spend one night's cap -------------------

def test_lock_session_terminated_mid_run_stops_sending_and_keeps_the_cap(start_fake, database: str,
                                                                        tmp_path: Path) -> None:
    """An admin (or a proxy) ends the session that holds the submit lock while host A paces
    at 2/s: A must not send another request (its claims need the lock), host B takes the
    lock, and the night together stays under --max-requests."""
    fake = start_fake(latency=0.05)
    url = f"{database}?ledger=spend1"
    a, b = host_dir(tmp_path, "a"), host_dir(tmp_path, "b")
    common = ["--base-url", fake.url, "--rate", "2/s", "--no-preflight", "--max-requests", "10", "--state", url]
    sheet_a = write_csv(a / "m.csv", prompts(20, prefix="host a"))
    sheet_b = write_csv(b / "n.csv", prompts(20, prefix="host b"))
    first = popen(["submit", str(sheet_a), *common, "-o", str(a / "r.csv")], a)
    wait_for(lambda: len(fake.state.submissions()) >= 3)
    with psycopg.connect(database, autocommit=True) as db:
        ended = db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE application_name = 'seedance-batch submit lock'").fetchall()
    assert ended == [(True,)]
    second = popen(["submit", str(sheet_b), *common, "-o", str(b / "r.csv")], b)
    _, err_a = first.communicate(timeout=90)
    _, err_b = second.communicate(timeout=90)
    assert len(fake.state.submissions()) <= 10, (err_a, err_b)
    assert first.returncode == 6, err_a
    assert "lock" in error_line(err_a) and "lost" in error_line(err_a)
    assert second.returncode in (0, 1), err_b  # it ran (the lock was free), within the night's cap
    assert accepted_twice(fake) == []


def test_a_server_idle_session_timeout_ends_neither_the_lock_nor_the_writer(start_fake, database: str,
                                                                            tmp_path: Path) -> None:
    """A database whose default ends idle sessions after 2 s: the lock's session (always
    idle) and the writer's (idle while the rate waits 3 s) must survive it, so a second host
    is refused (exit 3) and the first finishes its night."""
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(f"ALTER DATABASE {database.rsplit('/', 1)[1]} SET idle_session_timeout = '2s'")
        db.execute(f"ALTER DATABASE {database.rsplit('/', 1)[1]} SET idle_in_transaction_session_timeout = '2s'")
    fake = start_fake(latency=0.05)
    url = f"{database}?ledger=idle1"
    a, b = host_dir(tmp_path, "a"), host_dir(tmp_path, "b")
    common = ["--base-url", fake.url, "--rate", "20/min", "--no-preflight", "--max-requests", "4", "--state", url]
    sheet_a = write_csv(a / "m.csv", prompts(4, prefix="host a"))
    sheet_b = write_csv(b / "n.csv", prompts(4, prefix="host b"))
    first = popen(["submit", str(sheet_a), *common, "-o", str(a / "r.csv")], a)
    wait_for(lambda: len(fake.state.submissions()) >= 1)
    time.sleep(3.5)  # every session of the first run has been idle past the server's 2 s
    second = run_cli_process(["submit", str(sheet_b), *common, "-o", str(b / "r.csv")], env=host_env(b), cwd=b)
    _, err_a = first.communicate(timeout=90)
    assert second.returncode == 3, second.stderr
    assert first.returncode == 0, err_a
    assert len(fake.state.submissions()) == 4


# -- 3: the database password never appears, whatever form it comes in -------------------

class EchoingServer:
    """A hostile "PostgreSQL" on loopback: it refuses TLS and GSS, asks for the password in
    clear (AuthenticationCleartextPassword) and sends it back in its FATAL ErrorResponse."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.passwords: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _talk(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ConnectionError), conn:
            while True:  # SSLRequest / GSSENCRequest, then the StartupMessage
                size, code = struct.unpack("!ii", self._read(conn, 8))
                self._read(conn, size - 8)
                if code in (80877103, 80877104):
                    conn.sendall(b"N")
                    continue
                break
            conn.sendall(b"R" + struct.pack("!ii", 8, 3))
            _kind, size = struct.unpack("!ci", self._read(conn, 5))
            password = self._read(conn, size - 4).rstrip(b"\0").decode(errors="replace")
            self.passwords.append(password)
            fields = b"".join(k + v.encode() + b"\0" for k, v in (
                (b"S", "FATAL"), (b"V", "FATAL"), (b"C", "28P01"),
                (b"M", f"password authentication failed: you sent '{password}'")))
            conn.sendall(b"E" + struct.pack("!i", 4 + len(fields) + 1) + fields + b"\0")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echoing() -> Iterator[EchoingServer]:
    server = EchoingServer()
    yield server
    server.close()


# (URL's user:password part, extra environment, files to write, the password pieces that must never show,
#  whether the server is reached: a URL libpq would misread is refused before any connection)
FORMS = {
    "encoded specials": ("postgres:S3cr%25et%40PW%2F%3F%2399x@", {}, {}, ["S3cr%et@PW/?#99x", "et@PW"], True),
    "raw percent": ("postgres:S3cr%41etPW%zz@", {}, {}, ["S3cr%41etPW%zz", "S3crAetPW", "etPW"], False),
    "raw at": ("postgres:S3cr@etPW77@", {}, {}, ["S3cr", "etPW77"], False),
    "raw slash": ("postgres:S3cr/etPW77@", {}, {}, ["S3cr", "etPW77"], False),
    "raw question": ("postgres:S3cr?etPW77@", {}, {}, ["S3cr", "etPW77"], False),
    "raw hash": ("postgres:S3cr#etPW77@", {}, {}, ["S3cr", "etPW77"], False),
    "PGPASSWORD": ("postgres@", {"PGPASSWORD": "EnvPw98765"}, {}, ["EnvPw98765"], True),
    "PGPASSFILE": ("postgres@", {"PGPASSFILE": "pgpass"}, {"pgpass": "*:*:*:*:Pass\\:FilePw555\n"},
                   ["Pass:FilePw555", "FilePw555"], True),
    "service file": ("", {"PGSERVICEFILE": "services.conf"}, {}, ["SvcPw31337"], True),
}


@pytest.mark.parametrize("form", FORMS)
def test_the_database_password_never_appears(form: str, echoing: EchoingServer, fake, tmp_path: Path) -> None:
    userinfo, extra, files, pieces, reached = FORMS[form]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
    env_extra = {k: str(tmp_path / v) if k.endswith("FILE") else v for k, v in extra.items()}
    if form == "service file":
        (tmp_path / "services.conf").write_text(
            f"[night]\nhost=127.0.0.1\nport={echoing.port}\ndbname=teamdb\nuser=postgres\npassword=SvcPw31337\n")
        url = "postgresql://?service=night&ledger=t1"
    else:
        url = f"postgresql://{userinfo}127.0.0.1:{echoing.port}/teamdb?ledger=t1"
    sheet = write_csv(tmp_path / "in.csv", prompts(2))
    commands = {
        "submit": ["submit", str(sheet), "-o", str(tmp_path / "r.csv"), "--base-url", fake.url, "--rate", "0"],
        "dry run": ["submit", str(sheet), "-o", str(tmp_path / "d.csv"), "--base-url", fake.url, "--dry-run"],
        "validate": ["validate", str(sheet), "--base-url", fake.url],
        "collect": ["collect", "--base-url", fake.url],
        "state copy": ["state", "copy", url, str(tmp_path / "copy.sqlite")],
        "state backup": ["state", "backup", str(tmp_path / "backup.sqlite")],
    }
    env = subprocess_env(SEEDANCE_BATCH_STATE=url, **env_extra)
    procs = {name: subprocess.Popen([sys.executable, "-m", "batch", *args], cwd=tmp_path, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in commands.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, (name, err)
        for piece in pieces:
            assert piece not in out + err, (name, piece, err)
        if reached and name in ("dry run", "validate"):  # an estimate without the ledger, said so
            assert proc.returncode == 0 and "cannot connect" in err, (name, err)
            continue
        assert proc.returncode == 2, (name, err)
        line = error_line(err)
        if name != "state backup":  # refuses a PostgreSQL ledger before it connects
            assert ("cannot connect" in line) == reached, (name, line)
    for name in ("r.csv", "r.csv.summary.json", "d.csv", "copy.sqlite", "backup.sqlite"):
        if (tmp_path / name).exists():
            assert not any(p.encode() in (tmp_path / name).read_bytes() for p in pieces)
    assert fake.state.submissions() == []
    if reached:
        assert echoing.passwords and set(echoing.passwords) == {pieces[0]}  # the server did get (and echo) it
    else:
        assert echoing.passwords == []


# -- 9: URLs without a host (libpq's environment, a service) ------------------------------

def test_urls_without_a_host_reach_the_same_ledger(fake, pg_server: PgServer, tmp_path: Path) -> None:
    """``postgresql:///db`` (PGHOST/PGPORT), ``postgresql://?service=NAME`` and
    ``postgresql:///?service=NAME`` are what libpq makes of them: one ledger, sent once."""
    (tmp_path / "services.conf").write_text(f"[prod]\nhost=127.0.0.1\nport={pg_server.port}\ndbname=postgres\n")
    env = subprocess_env(PGHOST="127.0.0.1", PGPORT=str(pg_server.port), PGUSER="postgres",
                         PGSERVICEFILE=str(tmp_path / "services.conf"))
    ledger = "nohost" + uuid.uuid4().hex[:8]
    sheet = write_csv(tmp_path / "in.csv", prompts(3))
    for i, url in enumerate([f"postgresql:///postgres?ledger={ledger}", f"postgresql://?service=prod&ledger={ledger}",
                             f"postgresql:///?service=prod&ledger={ledger}", f"postgres:///?ledger={ledger}"]):
        proc = run_cli_process(["submit", str(sheet), "-o", str(tmp_path / f"r{i}.csv"), "--base-url", fake.url,
                                "--rate", "0", "--state", url], env=env)
        assert proc.returncode == 0, (url, proc.stderr)
        assert len(fake.state.submissions()) == 3, url
        if i:
            assert (tmp_path / f"r{i}.csv").read_text().count(",skipped,") == 3, url


# -- 4: one ledger name, one schema; the shared schema is no ledger ----------------------

@pytest.mark.parametrize(("first", "second"), [("t1", "T1"), ("a-b", "a_b"), ("Nightly", "nightly")])
def test_ledger_names_that_meet_in_one_schema_are_refused(first: str, second: str, fake, pg_server: PgServer,
                                                          tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:6]
    sheet = write_csv(tmp_path / "in.csv", prompts(3))
    args = ["submit", str(sheet), "--base-url", fake.url, "--rate", "0"]
    ok = run_cli_process([*args, "-o", str(tmp_path / "a.csv"), "--state", pg_server.url(first + suffix)])
    assert ok.returncode == 0, ok.stderr
    other = run_cli_process([*args, "-o", str(tmp_path / "b.csv"), "--state", pg_server.url(second + suffix)])
    assert other.returncode == 2, other.stderr
    assert "ledger" in error_line(other.stderr) and first + suffix in error_line(other.stderr)
    assert len(fake.state.submissions()) == 3
    again = run_cli_process([*args, "-o", str(tmp_path / "c.csv"), "--state", pg_server.url(first + suffix)])
    assert again.returncode == 0, again.stderr  # the name that made it keeps working


@pytest.mark.parametrize("name", ["shared", "SHARED", "Shared"])
def test_the_shared_schema_is_no_ledger(name: str, fake, pg_server: PgServer, tmp_path: Path) -> None:
    sheet = write_csv(tmp_path / "in.csv", prompts(1))
    proc = run_cli_process(["submit", str(sheet), "-o", str(tmp_path / "a.csv"), "--base-url", fake.url,
                            "--state", pg_server.url(name)])
    assert proc.returncode == 2, proc.stderr
    assert "reserved" in error_line(proc.stderr)
    with psycopg.connect(pg_server.base_url()) as db:
        assert db.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'seedance_shared' "
                          "AND tablename <> 'rate_budgets'").fetchone()[0] == 0
    assert fake.state.submissions() == []


# -- 8: a damaged shared budget row neither stalls, spins nor crashes a run --------------

DAMAGE = {
    "NaN": "next = 'NaN', resume_at = 'NaN', starts = '{}'",
    "infinity": "next = 'Infinity', resume_at = '-Infinity', starts = '{NaN,Infinity}'",
    "resume far ahead": "resume_at = extract(epoch FROM clock_timestamp()) + 100000",
    "next far ahead": "next = extract(epoch FROM clock_timestamp()) + 100000",
    "starts in the future": "starts = array_fill(extract(epoch FROM clock_timestamp())::float8 + 100000, ARRAY[50])",
}


def damage_budget(pg_server: PgServer, key: str, change: str | None) -> None:
    """Give ``key`` a budget row, then damage it as another team could (``None``: delete it)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    with psycopg.connect(pg_server.base_url(), autocommit=True) as db:
        db.execute("CREATE SCHEMA IF NOT EXISTS seedance_shared")
        db.execute("CREATE TABLE IF NOT EXISTS seedance_shared.rate_budgets (key TEXT PRIMARY KEY, "
                   "next DOUBLE PRECISION NOT NULL, resume_at DOUBLE PRECISION NOT NULL, "
                   "starts DOUBLE PRECISION[] NOT NULL)")
        db.execute("INSERT INTO seedance_shared.rate_budgets VALUES (%s, 0, 0, '{}') ON CONFLICT DO NOTHING",
                   (digest,))
        if change is None:
            db.execute("DELETE FROM seedance_shared.rate_budgets WHERE key = %s", (digest,))
        else:
            db.execute(f"UPDATE seedance_shared.rate_budgets SET {change} WHERE key = %s", (digest,))


def peak_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u < t + 1.0) for i, t in enumerate(times)), default=0)


@pytest.mark.parametrize("form", DAMAGE)
def test_a_damaged_budget_row_is_ignored_with_a_warning(form: str, fake, pg_server: PgServer,
                                                        tmp_path: Path) -> None:
    key = f"sk-test-damaged-{uuid.uuid4().hex}"
    damage_budget(pg_server, key, DAMAGE[form])
    sheet = write_csv(tmp_path / "in.csv", prompts(8))
    started = time.monotonic()
    proc = run_cli_process(["submit", str(sheet), "-o", str(tmp_path / "r.csv"), "--base-url", fake.url,
                            "--rate", "5/s", "--no-preflight", "--state", pg_server.url()],
                           env=subprocess_env(SEEDANCE_API_KEY=key), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 30
    assert "rate_budget_damaged" in proc.stderr
    starts = [r.t for r in fake.state.submissions()]
    assert len(starts) == 8 and peak_in_one_second(starts) <= 5


def test_a_budget_row_deleted_mid_run_is_recreated(fake, pg_server: PgServer, tmp_path: Path) -> None:
    key = f"sk-test-deleted-{uuid.uuid4().hex}"
    sheet = write_csv(tmp_path / "in.csv", prompts(12))
    proc = popen(["submit", str(sheet), "-o", str(tmp_path / "r.csv"), "--base-url", fake.url, "--rate", "4/s",
                  "--no-preflight", "--state", pg_server.url()], tmp_path, env=subprocess_env(SEEDANCE_API_KEY=key))
    wait_for(lambda: len(fake.state.submissions()) >= 3)
    damage_budget(pg_server, key, None)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "rate_budget_damaged" in err and "deleted" in err
    starts = [r.t for r in fake.state.submissions()]
    assert len(starts) == 12 and peak_in_one_second(starts) <= 4


@pytest.mark.parametrize("form", ["NaN", "resume far ahead"])
def test_sigterm_ends_a_run_waiting_on_a_damaged_budget(form: str, fake, pg_server: PgServer,
                                                        tmp_path: Path) -> None:
    key = f"sk-test-sigterm-{uuid.uuid4().hex}"
    damage_budget(pg_server, key, DAMAGE[form])
    sheet = write_csv(tmp_path / "in.csv", prompts(40))
    proc = popen(["submit", str(sheet), "-o", str(tmp_path / "r.csv"), "--base-url", fake.url, "--rate", "1/s",
                  "--no-preflight", "--state", pg_server.url()], tmp_path, env=subprocess_env(SEEDANCE_API_KEY=key))
    wait_for(lambda: len(fake.state.submissions()) >= 2)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:  # it ignored the signal: end it, then fail
            proc.kill()
            proc.communicate()
    assert proc.returncode == 4, err
    assert 2 <= len(fake.state.submissions()) < 40


LIMITER = """
import asyncio, sys, time
from pathlib import Path
from batch import ratelimit
budget = ratelimit.SharedBudget(Path(sys.argv[1]), "sk-test-local-budget-key")
limiter = ratelimit.SmoothLimiter(ratelimit.parse_rate("5/s"), shared=budget)
async def three():
    for _ in range(3):
        await limiter.acquire()
t0 = time.monotonic()
asyncio.run(three())
print(time.monotonic() - t0)
"""


@pytest.mark.parametrize("damage", ["NaN", "resume far ahead", "start far ahead"])
def test_a_damaged_local_budget_file_neither_stalls_nor_spins(damage: str, tmp_path: Path) -> None:
    """The sibling on one machine: the per-key budget file under the state directory
    (another process of the user, a bit flip) holding a NaN or a far-future time. A
    process paces with it (the budget is per boot, so monotonic times are shared)."""
    import math

    from batch import ratelimit

    budget = ratelimit.SharedBudget(tmp_path, "sk-test-local-budget-key")
    now = time.monotonic()
    nxt, resume, start = {"NaN": (math.nan, math.nan, math.nan), "resume far ahead": (0.0, now + 1e5, None),
                          "start far ahead": (0.0, 0.0, now + 1e5)}[damage]
    magic, boot, *_ = ratelimit._HEAD.unpack_from(budget._map, 0)
    count = 0
    if start is not None:
        for i in range(5):
            struct.pack_into("<d", budget._map, ratelimit._HEAD.size + 8 * i, start)
        count = 5
    ratelimit._HEAD.pack_into(budget._map, 0, magic, boot, nxt, resume, count, count % (1 << 16))
    budget.close()
    try:
        proc = subprocess.run([sys.executable, "-c", LIMITER, str(tmp_path)], capture_output=True, text=True,
                              env=subprocess_env(), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("three starts at 5/s did not come within 20 s")
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 2


def test_a_restored_copy_of_a_ledger_has_rescue_files_of_its_own(pg_server: PgServer, database: str,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Found on the second review: a ledger restored with pg_dump into another database (as
    README advises for backups) keeps its ledger id, so a run on the copy consumed the
    original's rescue file and the original's task ids never reached it. The rescue file is
    the ledger's in its database."""
    from batch.ledger import PgLocation, locked_ledger

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    original, copy = pg_server.url("nightly"), f"{database}?ledger=nightly"
    with locked_ledger(PgLocation(original), "") as ledger:
        first_id, first_file = ledger.ledger_id, ledger.rescue_file()
    with locked_ledger(PgLocation(copy), ""):
        pass
    with psycopg.connect(database, autocommit=True) as db:  # what pg_dump | psql carries over
        db.execute("UPDATE seedance_nightly.meta SET value = %s WHERE key = 'ledger_id'", (first_id,))
    with locked_ledger(PgLocation(copy), "") as ledger:
        assert ledger.rescue_file() != first_file


def test_a_url_naming_two_ledgers_is_refused(pg_server: PgServer) -> None:
    """Second review: `?ledger=mh&ledger=other` was accepted, the last one silently winning."""
    from batch.errors import StateError
    from batch.ledger import PgLocation

    with pytest.raises(StateError, match="more than one ledger"):
        PgLocation(f"{pg_server.base_url()}?ledger=mh&ledger=other")
    assert PgLocation(f"{pg_server.base_url()}?ledger=mh&ledger=mh").ledger == "mh"
