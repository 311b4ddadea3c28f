"""After a second Ctrl-C the summary says what this run did, read back from the ledger;
the progress total holds still once it is known; the help names every kind of model."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from batch.expand import Expander, ExpandSpec, chunks
from batch.load import load_table
from batch.progress import Progress
from tests.conftest import (
    cli,
    prompts,
    submit_args,
    subprocess_env,
    wait_for,
    write_csv,
)


def test_a_double_ctrl_c_summary_counts_what_the_ledger_holds(start_fake, tmp_path: Path) -> None:
    """The report: after a double Ctrl-C the summary said "0 requests" and "sent 32"."""
    fake = start_fake(latency=0.6)
    path = write_csv(tmp_path / "in.csv", prompts(200))
    args = submit_args(fake, tmp_path, path, extra=["--concurrency", "8"])
    proc = subprocess.Popen([sys.executable, "-m", "batch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env())
    wait_for(lambda: len(fake.state.submissions()) >= 20)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, err
    assert "Traceback" not in err
    db = sqlite3.connect(tmp_path / "state.sqlite")
    ledger = dict(db.execute("SELECT status, count(*) FROM requests GROUP BY status").fetchall())
    db.close()
    assert sum(ledger.values()) >= 20
    # A mark still "sending" after an abort is a request whose outcome is unknown.
    expected = {("unknown" if s == "sending" else s): n for s, n in ledger.items()}
    summary = json.loads((tmp_path / "results.parquet.summary.json").read_text())
    assert summary["counts"] == expected and summary["total"] == sum(ledger.values())
    assert summary["aborted"] is True and summary["interrupted"] == "SIGINT"
    assert f": {sum(ledger.values())} requests" in out
    assert "results table not written" in out
    assert summary["sent"] >= summary["counts"].get("submitted", 0)
    assert len(fake.state.submissions()) == sum(ledger.values())  # each counted request reached the fake


def test_the_progress_total_is_stable_once_known(tmp_path: Path) -> None:
    """The report: total_estimate wandered although the total was known. Read as the
    submitter reads (256 requests a chunk), a file of N one-request rows is N throughout."""
    n = 3000
    path = write_csv(tmp_path / "in.csv", prompts(n))
    expander = Expander([load_table(path)], ExpandSpec())
    progress = Progress(lambda: (expander.rows_seen, expander.total_rows), tty=False)
    totals = []
    for chunk in chunks(iter(expander), 256):
        progress.queued += len(chunk)
        totals.append(progress.estimated_total())
    progress.producer_done = True
    totals.append(progress.estimated_total())
    assert set(totals) == {n}


def test_the_help_names_every_kind_of_model() -> None:
    res = cli(["--help"])
    assert res.exit_code == 0
    text = re.sub(r"-\s+", "-", " ".join(res.output.split()))  # click wraps at a hyphen
    assert "text-to-video" in text and "image-to-video" in text and "video-to-video" in text
