"""What happens after the first POST (issue #18 items 4, 5, 6 and 10): every output is
probed before anything is paid for, and once a request was sent, no failure loses the
night's table or the place where its task ids are.

A full file system is a real one: a small tmpfs mounted for the test (root only; the
test is skipped, saying why, where mounting is not allowed). ``tests/test_faults.py``
covers the unprivileged mechanism (``RLIMIT_FSIZE``) that runs everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openpyxl
import polars as pl
import pytest
from conftest import cli, error_line, prompts, results, run_cli_process, subprocess_env, write_csv

import batch.cli
import batch.ledger
import batch.pipeline
import batch.results
import batch.sending


def accepted(fake) -> set[str]:
    return {r.task_id for r in fake.state.submissions() if r.task_id}


def submit(fake, tmp_path: Path, inputs: Path, out: str = "out/r.parquet", *extra: str):
    return cli(["submit", str(inputs), "-o", str(tmp_path / out), "--base-url", fake.url,
                "--state", str(tmp_path / "s.sqlite"), "--rate", "0", *extra])


# -- item 4: every output location is probed before the first POST ----------------------

def test_output_under_a_regular_file_is_exit_2_and_sends_nothing(fake, tmp_path: Path) -> None:
    """Reported: every request sent, then exit 6 ("File exists")."""
    inputs = write_csv(tmp_path / "in.csv", prompts(3))
    (tmp_path / "afile").write_text("not a directory")
    res = submit(fake, tmp_path, inputs, "afile/r.parquet")
    assert res.exit_code == 2, res.output
    line = error_line(res.stderr)
    assert "afile/r.parquet" in line and "afile is a file, not a directory" in line and "nothing sent" in line
    assert fake.state.records == []
    res = submit(fake, tmp_path, inputs, "afile/r.parquet", "--dry-run")  # was a traceback
    assert res.exit_code == 2 and "afile is a file" in error_line(res.stderr)


@pytest.mark.parametrize("option", ["--metrics-file", "--download"])
def test_metrics_and_download_locations_are_probed_too(fake, tmp_path: Path, option: str) -> None:
    inputs = write_csv(tmp_path / "in.csv", prompts(3))
    (tmp_path / "afile").write_text("not a directory")
    where = str(tmp_path / "afile" / ("m.prom" if option == "--metrics-file" else "videos"))
    extra = [option, where] + (["--wait"] if option == "--download" else [])
    res = submit(fake, tmp_path, inputs, "out/r.parquet", *extra)
    assert res.exit_code == 2, res.output
    assert where in error_line(res.stderr)
    assert fake.state.records == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # the probe left nothing


def test_a_probe_leaves_no_file_behind(fake, tmp_path: Path) -> None:
    inputs = write_csv(tmp_path / "in.csv", prompts(2))
    res = submit(fake, tmp_path, inputs, "out/r.parquet", "--metrics-file", str(tmp_path / "m" / "x.prom"))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r.parquet", "r.parquet.summary.json"]
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["x.prom"]


# -- item 5: Excel's empty columns, and the guarantee after the first send -------------------

def test_excel_trailing_empty_columns_are_dropped(fake, tmp_path: Path) -> None:
    """Reported: passed --dry-run, then the real run sent every request and crashed in
    polars (ColumnNotFoundError: "") with no table and no summary, every rerun alike."""
    inputs = tmp_path / "in.csv"
    inputs.write_text("prompt,duration,,,\nA cat walks,5,,,\nA dog runs,5,,,\n", encoding="utf-8")
    res = submit(fake, tmp_path, inputs)
    assert res.exit_code == 0, res.output
    table = results(tmp_path / "out" / "r.parquet")
    assert table["status"].to_list() == ["submitted"] * 2
    assert not [c for c in table.columns if not c.strip() or c.startswith(("_duplicated", "column_"))]


def test_an_unnamed_column_with_values_is_an_error_before_sending(fake, tmp_path: Path) -> None:
    inputs = tmp_path / "in.csv"
    inputs.write_text("prompt,duration,,\nA cat walks,5,,16:9\nA dog runs,5,,\n", encoding="utf-8")
    res = submit(fake, tmp_path, inputs)
    assert res.exit_code == 2, res.output
    line = error_line(res.stderr)
    assert "in.csv" in line and "column 4" in line and "no header" in line
    assert fake.state.records == []
    book = openpyxl.Workbook()
    book.active.append(["prompt", None, "notes"])
    book.active.append(["A cat walks", "9:16", None])
    book.save(tmp_path / "in.xlsx")
    res = submit(fake, tmp_path, tmp_path / "in.xlsx")
    assert res.exit_code == 2, res.output
    assert "column B" in error_line(res.stderr)
    assert fake.state.records == []


async def _send_then_fail(self: Any, *args: Any, **kw: Any) -> Any:
    await ORIGINAL_RUN(self, *args, **kw)
    raise RuntimeError("injected fault after sending")


ORIGINAL_RUN = batch.sending.Submitter.run


def _raise(*_args: Any, **_kw: Any) -> Any:
    raise RuntimeError("injected fault")


def _disk_full(*_args: Any, **_kw: Any) -> Any:
    raise OSError(28, "No space left on device")


# Every stage after the first send, each failing as a bug (RuntimeError) or a disk (OSError).
STAGES = {
    "submit": (batch.sending.Submitter, "run", _send_then_fail),
    "collect": (batch.pipeline.Collector, "run", _raise),
    "spool": (batch.results.RequestSpool, "frames", _raise),
    "resolve": (batch.results, "resolve_frame", _raise),
    "table-commit": (batch.results.AtomicTableWriter, "commit", _disk_full),
    "summary": (batch.pipeline, "write_summary_file", _disk_full),
    "finish-run": (batch.ledger.Ledger, "finish_run", _raise),
    "metrics": (batch.cli, "write_metrics", _disk_full),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_failure_at_any_stage_after_sending_keeps_the_table_or_says_where_the_ids_are(
        fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    inputs = write_csv(tmp_path / "in.csv", prompts(6))
    owner, name, fault = STAGES[stage]
    with monkeypatch.context() as m:
        m.setattr(owner, name, fault)
        res = submit(fake, tmp_path, inputs, "out/r.parquet", "--metrics-file", str(tmp_path / "m.prom"),
                     *(["--wait"] if stage == "collect" else []))
    paid = accepted(fake)
    assert len(paid) == 6
    assert res.exit_code == 6, res.output
    line = error_line(res.stderr)
    assert str(tmp_path / "s.sqlite") in line and "task ids" in line, line
    table_path = tmp_path / "out" / "r.parquet"
    if table_path.exists():
        table = results(table_path)
        assert paid <= set(table["task_id"].drop_nulls().to_list())
    else:
        assert stage in ("table-commit",), f"{stage}: the table was lost: {line}"
    if stage != "summary":
        summary = json.loads((tmp_path / "out" / "r.parquet.summary.json").read_text())
        assert summary["exit_code"] == 6 and summary["local_fault"]
    # The next run, without the fault, pays for nothing again and writes the whole table.
    res = submit(fake, tmp_path, inputs)
    assert res.exit_code == 0, res.output
    assert len(fake.state.submissions()) == 6
    assert results(table_path)["status"].to_list() == ["skipped"] * 6


# -- item 6: a full results disk is a local fault -------------------------------------------

@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real, small file system: a 256 KiB tmpfs (:func:`fill` makes it full)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path) -> None:
    """Write a file until the file system has no block left."""
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.fixture
def full_fs(small_fs: Path) -> Path:
    fill(small_fs)
    return small_fs


def test_results_disk_full_is_exit_6_saying_where_the_task_ids_are(fake, tmp_path: Path, full_fs: Path) -> None:
    """Reported: exit 1 with an OSError [Errno 28] traceback, no line saying where the
    paid task ids are; the ledger was on another file system."""
    inputs = write_csv(tmp_path / "in.csv", prompts(40))
    res = subprocess.run([sys.executable, "-m", "batch", "submit", str(inputs), "-o", str(full_fs / "r.parquet"),
                          "--base-url", fake.url, "--state", str(tmp_path / "s.sqlite"), "--rate", "0"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert res.returncode == 6, res.stderr
    line = error_line(res.stderr)
    assert "No space left on device" in line and str(tmp_path / "s.sqlite") in line and "task ids" in line
    assert len(accepted(fake)) == 40
    assert "submitted" in res.stdout  # the summary on stdout still says what happened
    assert sorted(p.name for p in full_fs.iterdir()) == ["filler"]  # no half table, no temporary file
    (full_fs / "filler").unlink()
    again = run_cli_process(["submit", str(inputs), "-o", str(full_fs / "r.parquet"), "--base-url", fake.url,
                             "--state", str(tmp_path / "s.sqlite"), "--rate", "0"])
    assert again.returncode == 0, again.stderr
    assert len(fake.state.submissions()) == 40
    assert results(full_fs / "r.parquet")["status"].unique().to_list() == ["skipped"]


def test_collect_on_a_full_results_disk_is_exit_6(fake, tmp_path: Path, small_fs: Path) -> None:
    """The sibling in collect: rewriting the table on a full disk was a traceback."""
    inputs = write_csv(tmp_path / "in.csv", prompts(5))
    args = ["--base-url", fake.url, "--state", str(tmp_path / "s.sqlite"), "--rate", "0"]
    assert run_cli_process(["submit", str(inputs), "-o", str(small_fs / "r.parquet"), *args]).returncode == 0
    before = (small_fs / "r.parquet").read_bytes()
    fill(small_fs)
    res = run_cli_process(["collect", "--results", str(small_fs / "r.parquet"), *args])
    assert res.returncode == 6, res.stderr
    line = error_line(res.stderr)
    assert "cannot rewrite results table" in line and "No space left on device" in line
    assert str(tmp_path / "s.sqlite") in line
    assert (small_fs / "r.parquet").read_bytes() == before  # the old table, whole
    (small_fs / "filler").unlink()
    res = run_cli_process(["collect", "--results", str(small_fs / "r.parquet"), *args])
    assert res.returncode == 0, res.stderr
    assert results(small_fs / "r.parquet")["task_status"].to_list() == ["success"] * 5


# -- item 10: collect after midnight finds the tables of the runs it follows ----------------

def test_collect_after_midnight_finds_last_nights_table(fake, tmp_path: Path) -> None:
    """Reported: 'no such results table' (exit 2, nothing downloaded) for a job whose
    output is results/{date}.parquet, collected after midnight. The two processes run in
    time zones 26 hours apart, so their {date} always differs."""
    write_csv(tmp_path / "in.csv", prompts(3))
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["in.csv"]\noutput = "results/{{date}}.parquet"\nstate = "s.sqlite"\n'
                   f'rate = "0"\nbase_url = "{fake.url}"\ndownload = "videos/"\n')
    night = run_cli_process(["run", str(job)], env=subprocess_env(TZ="Etc/GMT-14"))
    assert night.returncode == 0, night.stderr
    (table_path,) = (tmp_path / "results").glob("*.parquet")
    morning = run_cli_process(["collect", str(job)], env=subprocess_env(TZ="Etc/GMT+12"))
    assert morning.returncode == 0, morning.stderr
    assert sorted(p.name for p in (tmp_path / "results").iterdir() if p.suffix == ".parquet") == [table_path.name]
    table = pl.read_parquet(table_path)
    assert table["task_status"].to_list() == ["success"] * 3
    assert all(len(p) == 1 and Path(p[0]).exists() for p in table["local_paths"].to_list())
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 3
    # A cron line's --results names only one table: when it is not there, the ones the runs wrote are named.
    res = run_cli_process(["collect", "--results", str(tmp_path / "results" / "1999-01-01.parquet"), "--state",
                           str(tmp_path / "s.sqlite"), "--base-url", fake.url, "--download", str(tmp_path / "v2")])
    assert res.returncode == 2
    assert f"no such results table (the runs whose tasks are open wrote: {table_path})" in error_line(res.stderr)


def test_a_ledger_from_before_runs_output_gains_the_column(fake, tmp_path: Path) -> None:
    """runs.output is an added, nullable column (schema version unchanged): a ledger
    written before it gets it on its next writable open, and its older runs stay."""
    import sqlite3

    inputs = write_csv(tmp_path / "in.csv", prompts(2))
    assert submit(fake, tmp_path, inputs).exit_code == 0
    db = sqlite3.connect(tmp_path / "s.sqlite")
    db.execute("ALTER TABLE runs DROP COLUMN output")
    db.commit()
    db.close()
    assert submit(fake, tmp_path, inputs, "out/second.parquet").exit_code == 0
    db = sqlite3.connect(tmp_path / "s.sqlite")
    outputs = [row[0] for row in db.execute("SELECT output FROM runs ORDER BY started_at")]
    db.close()
    assert outputs == [None, str(tmp_path / "out" / "second.parquet")]
    assert len(fake.state.submissions()) == 2
