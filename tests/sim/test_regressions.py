"""Plain regression tests for defects the simulator found (each names its history)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("signum", "times"), [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_a_signal_while_the_libraries_load_is_exit_4_without_a_traceback(tmp_path: Path, signum: int,
                                                                         times: int) -> None:
    """Found by tests/sim (a SIGINT 1.0 s after start on a busy machine): Ctrl-C while
    polars and friends were still importing printed a KeyboardInterrupt traceback and
    died of the signal instead of exiting 4; then (seed 2865008501) a second Ctrl-C
    0.2 s later met the default handler during shutdown (exit -2)."""
    (tmp_path / "in.csv").write_text("prompt\na calm lake\n")
    env = {**os.environ, "SEEDANCE_API_KEY": "sk-test-0123456789", "XDG_STATE_HOME": str(tmp_path / "xdg"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "batch", "submit", str(tmp_path / "in.csv"), "-o",
                             str(tmp_path / "out.parquet"), "--base-url", "http://127.0.0.1:9", "--state",
                             str(tmp_path / "state.sqlite")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    # Signal once polars' library is mapped: the interpreter runs our code, the imports go on.
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline and "polars" not in maps.read_text(errors="replace"):
        time.sleep(0.005)
    proc.send_signal(signum)
    if times == 2:
        time.sleep(0.05)
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in out + err, err
    assert proc.returncode == 4, err
    assert not (tmp_path / "out.parquet").exists()
