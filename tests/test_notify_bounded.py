"""A receiver that drips its answer holds neither the process nor its signals."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import prompts, submit_args, subprocess_env, write_csv

from batch import notify


@pytest.fixture
def dripping() -> Iterator[tuple[str, threading.Event]]:
    """A raw-socket HTTP receiver on 127.0.0.1 that reads the request, then sends its answer
    one byte a second (never slow enough for a socket read timeout)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.settimeout(0.2)
    got, stop = threading.Event(), threading.Event()

    def drip(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            got.set()
            for ch in b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 1000:
                if stop.is_set():
                    return
                try:
                    conn.send(bytes([ch]))
                except OSError:
                    return
                time.sleep(1)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"json://127.0.0.1:{srv.getsockname()[1]}/hook", got
    stop.set()
    srv.close()


def _start(fake, tmp_path: Path, url: str) -> subprocess.Popen[str]:
    inp = write_csv(tmp_path / "in.csv", prompts(2))
    return subprocess.Popen([sys.executable, "-m", "batch", *submit_args(fake, tmp_path, inp, extra=["--notify", url])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())


def _finish(proc: subprocess.Popen[str], timeout: float) -> str:
    try:
        return proc.communicate(timeout=timeout)[1]
    finally:
        if proc.poll() is None:  # the bug itself: never leave it running
            proc.kill()
            proc.communicate()


def test_a_dripping_receiver_is_given_up_on_within_the_limit(fake, dripping, tmp_path: Path) -> None:
    url, got = dripping
    started = time.monotonic()
    proc = _start(fake, tmp_path, url)
    err = _finish(proc, 120)
    assert got.is_set()
    assert proc.returncode == 0, err  # the run's code, whatever the receiver does
    assert time.monotonic() - started < notify.NOTIFY_LIMIT_S + 20
    assert '"notify_failed"' in err and "gave up" in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_notifying_ends_the_process_promptly_with_the_runs_code(
        fake, dripping, tmp_path: Path, signum: int) -> None:
    url, got = dripping
    proc = _start(fake, tmp_path, url)
    assert got.wait(60), "the notification never reached the receiver"
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signum)
    err = _finish(proc, 60)
    assert time.monotonic() - sent < 5, err
    assert proc.returncode == 0, err
    assert "Traceback" not in err and '"notify_failed"' in err
