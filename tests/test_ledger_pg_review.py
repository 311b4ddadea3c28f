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
    KEY,
    PgServer,
    accepted_twice,
    error_line,
    prompts,
    run_cli_process,
    subprocess_env,
    write_csv,
)


def host_dir(tmp: Path, name: str) -> Path:
    """A "host": its own working directory and state home, nothing shared but the database."""
    d = tmp / name
    (d / "xdg").mkdir(parents=True)
    return d


def host_env(d: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(XDG_STATE_HOME=str(d / "xdg"), **extra)


def popen(args: list[str], d: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batch", *args], cwd=d, env=env or host_env(d),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(check, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


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
