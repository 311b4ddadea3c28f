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


def test_a_first_signal_while_the_results_table_is_written_lets_it_finish(tmp_path: Path) -> None:
    """Found by tests/sim (soak, seed 1065005408): a SIGINT that arrived after the last
    answer, while the results table was being written, aborted the write (no table: the
    README promises one on the first signal) and pyarrow's writer, discarded half-open,
    printed a traceback from its finalizer. Now the first signal lets the table finish
    (exit 4); a second one aborts, as documented."""
    import polars as pl

    from batch.fake_api import FakeConfig, fake_in_thread

    rows = 60_000  # invalid rows are never sent, but each is a row of the table: a long write
    pl.DataFrame({"prompt": [f"a calm lake {i}" for i in range(rows)],
                  "duration": [15] * (rows - 1) + [5]}).write_csv(tmp_path / "in.csv")
    out = tmp_path / "out" / "night.parquet"
    env = {**os.environ, "SEEDANCE_API_KEY": "sk-test-0123456789", "XDG_STATE_HOME": str(tmp_path / "xdg"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with fake_in_thread(FakeConfig()) as fake:
        proc = subprocess.Popen([sys.executable, "-m", "batch", "submit", str(tmp_path / "in.csv"), "-o", str(out),
                                 "--base-url", fake.url, "--state", str(tmp_path / "state.sqlite"), "--rate", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not list(out.parent.glob(".night.parquet.tmp-*")):
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        stdout, err = proc.communicate(timeout=120)
        accepted = len(fake.state.accepted_bodies())
        assert "Traceback" not in stdout + err, err[-2000:]
        assert proc.returncode == 4, err[-2000:]
        assert accepted == 1
        assert pl.read_parquet(out).height == rows

        # The sibling: collect's rewrite of the table, interrupted once, finishes too.
        proc = subprocess.Popen([sys.executable, "-m", "batch", "collect", "--results", str(out), "--base-url", fake.url,
                                 "--state", str(tmp_path / "state.sqlite"), "--rate", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not list(out.parent.glob(".night.parquet.tmp-*")):
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        stdout, err = proc.communicate(timeout=120)
    assert "Traceback" not in stdout + err, err[-2000:]
    assert proc.returncode == 4, err[-2000:]
    table = pl.read_parquet(out)
    assert table.height == rows
    assert table.filter(pl.col("task_id").is_not_null())["task_status"].to_list() == ["success"]


def test_signals_while_a_run_finishes_never_give_a_traceback_or_death_by_signal(tmp_path: Path) -> None:
    """Found by tests/sim (seed 1987161788: SIGINT twice, 0.2 s apart, as a --wait run
    ended): the second signal met Python's default handler after the tool's own were
    removed (exit -2). Here SIGINTs keep coming from the moment the summary is printed."""
    from batch.fake_api import FakeConfig, fake_in_thread

    (tmp_path / "in.csv").write_text("prompt\na calm lake\na quiet sea\n")
    env = {**os.environ, "SEEDANCE_API_KEY": "sk-test-0123456789", "XDG_STATE_HOME": str(tmp_path / "xdg"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with fake_in_thread(FakeConfig()) as fake:
        proc = subprocess.Popen([sys.executable, "-m", "batch", "submit", str(tmp_path / "in.csv"), "-o",
                                 str(tmp_path / "out.parquet"), "--base-url", fake.url, "--state",
                                 str(tmp_path / "state.sqlite"), "--rate", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if "results:" in line:
                break
        while proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.001)
        err = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in err, err[-2000:]
    assert proc.returncode in (0, 4), err[-2000:]


def test_a_ctrl_c_between_the_tools_own_handlers_is_exit_4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by tests/sim (soak, seed 2202996937: SIGINT 0.7 s into a rerun): a Ctrl-C that
    fell between the tool's signal handlers (here while the options were read) became
    click's "Aborted!", exit 1 without a table, as if the run had finished."""
    from click.testing import CliRunner

    import batch.cli

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(batch.cli, "build_options", interrupted)
    (tmp_path / "in.csv").write_text("prompt\na calm lake\n")
    result = CliRunner().invoke(batch.cli.main, ["submit", str(tmp_path / "in.csv"), "-o", str(tmp_path / "o.parquet")],
                                env={"SEEDANCE_API_KEY": "sk-test-0123456789"})
    assert result.exit_code == 4, result.output
