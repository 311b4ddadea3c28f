"""Shared fixtures: the bundled fake API over real HTTP on 127.0.0.1, CLI runners."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from batch.cli import main
from batch.fake_api import FakeConfig, FakeServer, Fault, app_in_thread, fake_in_thread
from benchmarks.pgserver import PgServer, free_port  # noqa: F401 - the tests import them from here

KEY = "sk-test-0123456789-SECRET-abcdef"
ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_data"


@pytest.fixture(autouse=True)
def own_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test has its own state home: no default ledger, model spec or per-key rate
    budget is shared between tests (or with the developer's own ~/.local/state)."""
    home = tmp_path / "xdg-state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    # Nor does a proxy of the machine that runs the tests: they talk to 127.0.0.1 only.
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                "no_proxy", "SSL_CERT_FILE", "SEEDANCE_BATCH_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def serve() -> Iterator[Callable[[web.Application], str]]:
    """Factory: ``serve(app)`` runs a (hostile) aiohttp app on 127.0.0.1, returns its URL."""
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(app_in_thread(app))


@pytest.fixture
def start_fake() -> Iterator[Callable[..., FakeServer]]:
    """Factory: ``start_fake(latency=..., faults=[...])`` → a running fake server."""
    with ExitStack() as stack:
        def start(**kw: Any) -> FakeServer:
            faults = [Fault.parse(f) if isinstance(f, str) else f for f in kw.pop("faults", [])]
            return stack.enter_context(fake_in_thread(FakeConfig(faults=faults, **kw)))
        yield start


@pytest.fixture
def fake(start_fake: Callable[..., FakeServer]) -> FakeServer:
    return start_fake()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    pl.DataFrame(rows, schema=dict.fromkeys(keys, pl.String)).write_csv(path)
    return path


def prompts(n: int, prefix: str = "A calm lake at dawn, shot") -> list[dict[str, Any]]:
    return [{"id": f"r{i:04d}", "prompt": f"{prefix} {i}"} for i in range(n)]


def cli(args: list[str], env: dict[str, str] | None = None) -> Result:
    runner = CliRunner()
    base_env = {"SEEDANCE_API_KEY": KEY, "SEEDANCE_LOG_LEVEL": "debug"}
    return runner.invoke(main, args, env={**base_env, **(env or {})}, catch_exceptions=False)


def submit_args(server: FakeServer, tmp: Path, *inputs: Path, out: str = "results.parquet", rate: str = "0",
                extra: list[str] | None = None, state: str | None = None) -> list[str]:
    return ["submit", *map(str, inputs), "-o", str(tmp / out), "--base-url", server.url,
            "--state", state or str(tmp / "state.sqlite"), "--rate", rate, *(extra or [])]


def results(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, infer_schema=False)


def sends_by_prompt(server: FakeServer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in server.state.submissions():
        p = r.body.get("prompt") if isinstance(r.body, dict) else None
        counts[p] = counts.get(p, 0) + 1
    return counts


def accepted_twice(server: FakeServer) -> list[str]:
    return [k for k, n in server.state.accepted_count_by_prompt().items() if n > 1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDANCE")}
    env.update({"SEEDANCE_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    """Poll ``predicate`` every 20 ms until it holds; fail the test after ``timeout`` s."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def host_dir(tmp: Path, name: str) -> Path:
    """A "host": its own working directory and state home, nothing shared but the database."""
    d = tmp / name
    (d / "xdg").mkdir(parents=True)
    return d


def host_env(d: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(XDG_STATE_HOME=str(d / "xdg"), **extra)


def run_cli_process(args: list[str], env: dict[str, str] | None = None, timeout: float = 60,
                    **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batch", *args], capture_output=True, text=True,
                          env=env or subprocess_env(), timeout=timeout, **kw)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def error_line(stderr: str) -> str:
    """The one error a failed command reports. Off a TTY (as here) every stderr line is a
    JSON event, and exactly one of them is the ``error``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert all(line.startswith("{") for line in lines), stderr
    errors = [e["error"] for e in map(json.loads, lines) if e.get("event") == "error"]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture
def steady_clock() -> Iterator[None]:
    """No collector pauses while a test times requests: here the CLI and the fake share
    the test process, whose heap after a few hundred tests makes a full collection a
    pause of up to ~60 ms (measured with gc.callbacks over the suite) that bunches the
    fake's timestamps; benchmarks/bench.py measures with each in its own process."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def quick_download_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Download retries back off a tenth as long (0.05 s doubling, with the same jitter)
    in this process: for in-process tests whose point is that a download gives up after
    its attempts, not how long it waits between them (0.5 s doubling made each such
    test wait 4-8 s)."""
    from batch import client, following

    def quick(attempt: int, base: float, cap: float) -> float:
        return client.backoff_delay(attempt, base / 10, cap / 10)

    monkeypatch.setattr(following, "backoff_delay", quick)


# -- a real PostgreSQL server, started by the suite (benchmarks/pgserver.py) -----------

@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ``--state`` value: a SQLite file, or a fresh ledger in the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "state.sqlite")
    return request.getfixturevalue("pg_server").url()
