"""Money (issue #18 item 2): ``--max-spend`` spends up to the cap, and the cap is the
night's, per ledger: a second run the same night gets only what is left. Over HTTP
against the fake, counting what it accepted."""

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, results, subprocess_env, write_csv

LITE = "bytedance/seedance-1.0-lite-t2v"
# 5 s at 720p, flex: 0.04 USD/s -> 0.20 USD per video.
PRICES = f'["{LITE}"]\n"480p" = 0.02\n"720p" = 0.08\n"1080p" = 0.16\nflex = {{ "720p" = 0.04 }}\n'


def run(fake, tmp_path: Path, cap: str, *extra: str, rows: int = 20, out: str = "r.parquet"):
    inputs = write_csv(tmp_path / "in.csv", [{"prompt": f"p{i}", "duration": "5"} for i in range(rows)])
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    # Unpaced unless a test says otherwise (a later --rate wins): the default 100/min made
    # each run wait ~0.6 s a request, and the cap's point is what is sent, not how fast.
    return cli(["submit", str(inputs), "-o", str(tmp_path / out), "--base-url", fake.url, "--state",
                str(tmp_path / "s.sqlite"), "--prices", str(prices), "--max-spend", cap, "--rate", "0", *extra])


def counts(path: Path) -> dict[str, int]:
    return dict(zip(*results(path)["status"].value_counts().to_dict(as_series=False).values(), strict=True))


def summary_of(tmp_path: Path, out: str = "r.parquet") -> dict:
    return json.loads((tmp_path / f"{out}.summary.json").read_text())


@pytest.mark.parametrize(("cap", "sent"), [("1.0", 5), ("3.1", 15), ("0.1", 0), ("4", 20)])
@pytest.mark.parametrize("rate", ["0", "50/s"])
def test_a_cap_below_the_total_sends_until_the_next_would_cross_it(fake, tmp_path: Path, cap: str, sent: int,
                                                                   rate: str) -> None:
    """Reported: caps 1.0 and 3.1 at 0.20 per video sent nothing at the default concurrency."""
    metrics = tmp_path / "m.prom"
    res = run(fake, tmp_path, cap, "--rate", rate, "--metrics-file", str(metrics))
    assert len(fake.state.submissions()) == sent, res.output
    expected = {k: n for k, n in (("submitted", sent), ("pending", 20 - sent)) if n}
    assert counts(tmp_path / "r.parquet") == expected
    summary = summary_of(tmp_path)
    spend = summary["spend"]
    assert spend["max_usd"] == float(cap)
    assert spend["this_run_usd"] == pytest.approx(0.2 * sent)
    assert spend["earlier_runs_usd"] == 0
    assert spend["tonight_usd"] == pytest.approx(0.2 * sent)
    assert spend["left_usd"] == pytest.approx(float(cap) - 0.2 * sent)
    if sent < 20:
        assert res.exit_code == 1
        # The message says what the summary says.
        assert summary["stop_reason"] == (
            f"--max-spend {float(cap):g} USD reached for the night of {spend['night']}: {0.2 * sent:.2f} USD "
            f"estimated ({0.2 * sent:.2f} by this run, 0.00 by earlier runs), {float(cap) - 0.2 * sent:.2f} left; "
            f"the next request would cost 0.20")
        assert f"stop reason: {summary['stop_reason']}" in res.output
    else:
        assert res.exit_code == 0 and summary["stop_reason"] is None
    assert (f"spend, night of {spend['night']}: {0.2 * sent:.2f} USD estimated ({0.2 * sent:.2f} by this run, "
            f"0.00 by earlier runs) of --max-spend {float(cap):g}, {float(cap) - 0.2 * sent:.2f} left") in res.output
    text = metrics.read_text()
    assert f'seedance_batch_night_spend_usd{{job="submit"}} {round(0.2 * sent, 2)}' in text
    assert f'seedance_batch_night_spend_left_usd{{job="submit"}} {round(float(cap) - 0.2 * sent, 2)}' in text


def test_a_second_run_the_same_night_gets_only_what_is_left(fake, tmp_path: Path) -> None:
    res = run(fake, tmp_path, "1.0")
    assert res.exit_code == 1 and len(fake.state.submissions()) == 5
    # A rerun with the same cap: the night's 1.00 is spent, nothing more goes out.
    res = run(fake, tmp_path, "1.0", out="r2.parquet")
    assert len(fake.state.submissions()) == 5, res.output
    assert counts(tmp_path / "r2.parquet") == {"skipped": 5, "pending": 15}
    spend = summary_of(tmp_path, "r2.parquet")["spend"]
    assert spend["earlier_runs_usd"] == pytest.approx(1.0) and spend["this_run_usd"] == 0
    assert spend["left_usd"] == pytest.approx(0.0)
    assert "1.00 USD estimated (0.00 by this run, 1.00 by earlier runs), 0.00 left" in res.output
    # A higher cap the same night: only the difference.
    res = run(fake, tmp_path, "3.1", out="r3.parquet")
    assert len(fake.state.submissions()) == 15, res.output
    spend = summary_of(tmp_path, "r3.parquet")["spend"]
    assert spend["earlier_runs_usd"] == pytest.approx(1.0) and spend["this_run_usd"] == pytest.approx(2.0)
    assert spend["tonight_usd"] == pytest.approx(3.0) and spend["left_usd"] == pytest.approx(0.1)
    # The next night starts afresh: here the earlier runs are moved to another night.
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        db.execute("UPDATE runs SET night = '2000-01-01'")
    db.close()
    res = run(fake, tmp_path, "0.5", out="r4.parquet")
    assert len(fake.state.submissions()) == 17, res.output
    assert summary_of(tmp_path, "r4.parquet")["spend"]["earlier_runs_usd"] == 0


def test_a_request_the_provider_refused_gives_its_share_back(start_fake, tmp_path: Path) -> None:
    """A 400 certainly created no task: it is not counted against the night."""
    fake = start_fake(faults=["400,match=p3"])
    res = run(fake, tmp_path, "1.0", "--concurrency", "1")
    assert res.exit_code == 1
    assert len(fake.state.submissions()) == 6 and len(fake.state.accepted_bodies()) == 5
    assert counts(tmp_path / "r.parquet") == {"failed": 1, "submitted": 5, "pending": 14}
    assert summary_of(tmp_path)["spend"]["this_run_usd"] == pytest.approx(1.0)


def test_spend_without_a_cap_is_still_recorded_for_a_later_capped_run(fake, tmp_path: Path) -> None:
    """A first run with prices but no cap, then a capped run the same night: the first
    run's spend counts."""
    inputs = write_csv(tmp_path / "in.csv", [{"prompt": f"p{i}", "duration": "5"} for i in range(20)])
    res = cli(["submit", str(inputs), "-o", str(tmp_path / "r0.parquet"), "--base-url", fake.url, "--state",
               str(tmp_path / "s.sqlite"), "--max-requests", "3"])
    assert res.exit_code == 1 and len(fake.state.submissions()) == 3
    res = run(fake, tmp_path, "1.0")
    assert len(fake.state.submissions()) == 5, res.output
    spend = summary_of(tmp_path)["spend"]
    assert spend["earlier_runs_usd"] == pytest.approx(0.6) and spend["this_run_usd"] == pytest.approx(0.4)


def test_max_requests_is_the_nights_too(fake, tmp_path: Path) -> None:
    """Sibling: --max-requests ("at most N new requests tonight") was per run, so a rerun
    the same night sent N more."""
    inputs = write_csv(tmp_path / "in.csv", [{"prompt": f"p{i}"} for i in range(10)])

    def submit(out: str, n: str):
        return cli(["submit", str(inputs), "-o", str(tmp_path / out), "--base-url", fake.url, "--state",
                    str(tmp_path / "s.sqlite"), "--rate", "0", "--max-requests", n])

    assert submit("a.parquet", "4").exit_code == 1 and len(fake.state.submissions()) == 4
    res = submit("b.parquet", "4")
    assert len(fake.state.submissions()) == 4, res.output
    assert counts(tmp_path / "b.parquet") == {"skipped": 4, "pending": 6}
    assert "--max-requests 4 reached for the night of " in res.output and "(4 by earlier runs)" in res.output
    assert submit("c.parquet", "6").exit_code == 1 and len(fake.state.submissions()) == 6
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        db.execute("UPDATE runs SET night = '2000-01-01'")
    db.close()
    assert submit("d.parquet", "3").exit_code == 1 and len(fake.state.submissions()) == 9


def test_a_run_killed_mid_flight_counts_its_requests_on_the_wire_for_the_rerun(start_fake, tmp_path: Path) -> None:
    """kill -9 while requests are on the wire: they may have been accepted, so their
    reserved cost (recorded with their sending mark) counts against the night's rerun."""
    fake = start_fake(latency=1.0)
    inputs = write_csv(tmp_path / "in.csv", [{"prompt": f"p{i}", "duration": "5"} for i in range(20)])
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    args = ["submit", str(inputs), "--base-url", fake.url, "--state", str(tmp_path / "s.sqlite"), "--prices",
            str(prices), "--max-spend", "2.0", "--rate", "0", "--no-preflight"]
    proc = subprocess.Popen([sys.executable, "-m", "batch", *args, "-o", str(tmp_path / "a.parquet"),
                             "--concurrency", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())
    end = time.monotonic() + 30
    while len(fake.state.submissions()) < 4:
        assert time.monotonic() < end and proc.poll() is None
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=10)
    time.sleep(1.5)  # the fake accepts what was on the wire
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        marked = db.execute("SELECT count(*) FROM requests WHERE status IN ('sending', 'submitted')").fetchone()[0]
    db.close()
    assert marked >= 4
    res = cli([*args, "-o", str(tmp_path / "b.parquet")])
    spend = summary_of(tmp_path, "b.parquet")["spend"]
    assert spend["earlier_runs_usd"] == pytest.approx(0.2 * marked), res.output
    assert spend["tonight_usd"] == pytest.approx(2.0)
    assert len(fake.state.accepted_bodies()) <= 10  # never past the cap, kill or not


def test_the_night_is_the_local_date_a_jobs_date_gets(tmp_path: Path) -> None:
    """One definition: the spend cap's night and a job's {date} are the same local date."""
    from datetime import datetime, timedelta, timezone

    from batch.jobfile import load_job
    from batch.ledger import night_of

    tokyo = timezone(timedelta(hours=9))
    late = datetime(2026, 12, 6, 23, 30, tzinfo=tokyo)
    assert night_of(late) == "2026-12-06"
    assert night_of(late + timedelta(hours=1)) == "2026-12-07"  # after midnight: a new night
    job = tmp_path / "job.toml"
    job.write_text('inputs = ["in.csv"]\noutput = "r/{date}.parquet"\n')
    for now in (late, late + timedelta(hours=1)):
        assert load_job(job, now=now).values["output"].name == f"{night_of(now)}.parquet"
