"""Disks that fail and budgets that are shared (issue #10 items 12 and 13), as processes.

A full disk is simulated with ``RLIMIT_FSIZE`` in the child (no privileges needed:
CPython ignores SIGXFSZ, so writes past the limit fail with EFBIG, as they would with
ENOSPC); a read-only state directory by running the child as ``nobody`` when the tests
run as root (root writes anywhere), else by ``chmod``.
"""

import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
from conftest import accepted_twice, error_line, prompts, results, subprocess_env, write_csv


def submit_process(fake, tmp_path: Path, inputs: Path, *extra: str, limit: int | None = None,
                   out: str = "out/r.parquet", **kw) -> subprocess.CompletedProcess[str]:
    def preexec() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = ["submit", str(inputs), "-o", str(tmp_path / out), "--base-url", fake.url,
            "--state", str(tmp_path / "s.sqlite"), "--rate", "0", *extra]
    return subprocess.run([sys.executable, "-m", "batch", *args], capture_output=True, text=True,
                          env=subprocess_env(), preexec_fn=preexec, timeout=120, **kw)


def test_state_disk_full_mid_run_loses_no_accepted_task_id(fake, tmp_path: Path) -> None:
    """Reported: exit 2 ("nothing was sent") although 130 POSTs went out and 64 accepted
    task ids were lost; no table, no summary."""
    rows = [{"id": f"r{i:04d}", "prompt": f"A calm lake at dawn, take {i} " + "x" * 300} for i in range(500)]
    path = write_csv(tmp_path / "in.csv", rows)
    res = submit_process(fake, tmp_path, path, limit=150_000)
    assert res.returncode == 6, res.stderr  # a fault after sending: not "nothing was sent"
    assert "Traceback" not in res.stderr
    line = error_line(res.stderr)
    assert "state write failed" in line and "requests were sent" in line and "rescue" in line
    accepted = {r.task_id for r in fake.state.submissions() if r.task_id}
    assert 0 < len(accepted) < 500
    table = results(tmp_path / "out" / "r.parquet")
    assert accepted <= set(table["task_id"].drop_nulls().to_list())  # every accepted id is in the table
    assert (tmp_path / "out" / "r.parquet.summary.json").exists()
    assert (tmp_path / "s.sqlite.rescue.jsonl").exists()
    # The next night, on a disk with room: the rescue file is replayed first, nothing is paid twice.
    again = submit_process(fake, tmp_path, path)
    assert again.returncode == 0, again.stderr
    assert accepted_twice(fake) == [] and len(fake.state.submissions()) == 500
    final = results(tmp_path / "out" / "r.parquet")
    assert final.filter(pl.col("task_id").is_in(list(accepted)))["status"].unique().to_list() == ["skipped"]
    assert not (tmp_path / "s.sqlite.rescue.jsonl").exists()


def test_output_disk_full_is_one_line_and_the_ledger_keeps_everything(fake, tmp_path: Path) -> None:
    """Reported: a traceback, the real error hidden."""
    rng = random.Random(1)
    # 400 wide rows rather than 2000 narrower ones: the same ~11 MB table for a fifth of
    # the requests (13 s -> 3.6 s a run at load 10); the ledger, which keeps no notes, < 1 MB.
    letters = (string.ascii_letters * 5).encode()[:256]  # a random byte -> a letter: 16 MB in 0.1 s, not 3
    rows = [{"prompt": f"p{i}", "notes": rng.randbytes(40_000).translate(letters).decode()} for i in range(400)]
    path = write_csv(tmp_path / "in.csv", rows)
    res = submit_process(fake, tmp_path, path, limit=6_000_000)  # the table needs ~11 MB, the ledger < 1
    assert res.returncode == 6, res.stderr
    assert "Traceback" not in res.stderr
    line = error_line(res.stderr)
    assert "cannot write results table" in line and "File too large" in line and "nothing is sent twice" in line
    assert "submitted       400" in res.stdout  # the summary still says what happened
    # ... and not that the table is where it is not (fresh-eyes review, #18 item 9)
    assert f"results: {tmp_path / 'out' / 'r.parquet'}\n" not in res.stdout + "\n"
    assert "results: not written" in res.stdout
    assert not (tmp_path / "out" / "r.parquet").exists()
    assert [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name] == []
    again = submit_process(fake, tmp_path, path)
    assert again.returncode == 0 and len(fake.state.submissions()) == 400
    assert results(tmp_path / "out" / "r.parquet")["status"].unique().to_list() == ["skipped"]


def test_a_dry_run_table_that_cannot_be_written_is_one_line_exit_2(fake, tmp_path: Path) -> None:
    """Found from outside (#21 review): a traceback and exit 1 (the code of "some rows
    invalid"); nothing was sent, so it is an output that cannot take the file: exit 2, and
    an earlier table stays whole."""
    rng = random.Random(2)
    letters = (string.ascii_letters * 5).encode()[:256]
    rows = [{"prompt": f"p{i} " + rng.randbytes(20_000).translate(letters).decode()} for i in range(300)]
    path = write_csv(tmp_path / "in.csv", rows)
    assert submit_process(fake, tmp_path, write_csv(tmp_path / "small.csv", prompts(3)), "--dry-run").returncode == 0
    res = submit_process(fake, tmp_path, path, "--dry-run", limit=2_000_000)  # the table needs ~6 MB
    assert res.returncode == 2, res.stderr
    line = error_line(res.stderr)
    assert "cannot write results table" in line and "File too large" in line and "nothing was sent" in line
    assert results(tmp_path / "out" / "r.parquet").height == 3  # the earlier table, whole
    assert [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name] == []
    assert fake.state.submissions() == []


def test_a_read_only_state_directory_is_one_line_exit_2(fake) -> None:
    """Reported: a traceback."""
    base = Path(tempfile.mkdtemp())
    (base / "ro").mkdir()
    (base / "ro").chmod(0o555)
    path = write_csv(base / "in.csv", prompts(3))
    # Root writes anywhere; without its two DAC-override capabilities it meets the mode bits.
    unprivileged = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    env = {**subprocess_env(), "XDG_STATE_HOME": str(base / "xdg")}
    res = subprocess.run([*unprivileged, sys.executable, "-m", "batch", "submit", str(path), "-o",
                          str(base / "r.parquet"), "--base-url", fake.url, "--state", str(base / "ro" / "s.sqlite"),
                          "--rate", "0"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    line = error_line(res.stderr)
    assert "s.sqlite" in line and "Permission denied" in line
    assert fake.state.records == []


def test_submit_and_collect_share_one_rate_budget_per_key(start_fake, tmp_path: Path) -> None:
    """Reported: a 15-minute collect beside the nightly submit, each with its own limiter,
    could together send twice the per-key limit. The fake enforces a strict 10/s window; the
    runs share 9/s: at a load average of 10, scheduling jitter alone bunched sends paced at
    exactly 10/s into 11 arrivals in some second (1-2 of 65 answered 429), while two budgets
    of 9/s would send 18/s."""
    fake = start_fake(rate_limit=10, task_delay=3.0)
    first = write_csv(tmp_path / "first.csv", prompts(20, "first"))
    res = submit_process(fake, tmp_path, first, "--rate", "9/s", out="first.parquet")
    assert res.returncode == 0, res.stderr
    before = len(fake.state.records)
    second = write_csv(tmp_path / "second.csv", prompts(40, "second"))
    t0 = time.monotonic()
    sub = subprocess.Popen([sys.executable, "-m", "batch", "submit", str(second), "-o", str(tmp_path / "second.parquet"),
                            "--base-url", fake.url, "--state", str(tmp_path / "s2.sqlite"), "--rate", "9/s"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    col = subprocess.Popen([sys.executable, "-m", "batch", "collect", "--state", str(tmp_path / "s.sqlite"),
                            "--base-url", fake.url, "--rate", "9/s", "--wait", "--poll-interval", "0.5",
                            "--timeout", "20s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=subprocess_env())
    sub.communicate(timeout=60)
    col.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    during = fake.state.records[before:]
    refused = [r for r in during if r.status == 429]
    assert sub.returncode == 0 and col.returncode == 0
    assert refused == [], f"{len(refused)} of {len(during)} answered 429"
    times = sorted(r.t for r in during if r.kind in ("submit", "query"))
    worst = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
    assert worst <= 10, worst
    assert elapsed >= len(times) / 9 * 0.9  # together they kept to one budget


def test_separate_budgets_would_have_tripped_the_limit(start_fake, tmp_path: Path) -> None:
    """The same two runs, each with its own state home (so its own budget): the fake's
    window refuses some, which shows the shared test above can fail."""
    fake = start_fake(rate_limit=10)
    procs = []
    for n in range(2):
        inputs = write_csv(tmp_path / f"in{n}.csv", prompts(30, f"run{n}"))
        env = {**subprocess_env(), "XDG_STATE_HOME": str(tmp_path / f"home{n}")}
        procs.append(subprocess.Popen([sys.executable, "-m", "batch", "submit", str(inputs), "-o",
                                       str(tmp_path / f"r{n}.parquet"), "--base-url", fake.url, "--state",
                                       str(tmp_path / f"s{n}.sqlite"), "--rate", "10/s", "--max-attempts", "20"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for p in procs:
        p.communicate(timeout=60)
    assert sum(1 for r in fake.state.records if r.status == 429) > 0
