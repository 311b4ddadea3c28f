"""Each outcome class over real HTTP against the bundled fake API."""

import itertools
from pathlib import Path

import pytest
from conftest import KEY, accepted_twice, cli, prompts, results, sends_by_prompt, submit_args, write_csv


def run(fake, tmp_path: Path, rows: list[dict], extra: list[str] | None = None, rate: str = "0"):
    path = write_csv(tmp_path / "in.csv", rows)
    res = cli(submit_args(fake, tmp_path, path, rate=rate, extra=extra))
    return res, results(tmp_path / "results.parquet")


def test_success_sends_each_request_once_with_documented_body(fake, tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "a fox", "ratio": "9:16", "duration": "5.0", "camera_fixed": "yes"},
            {"id": "b", "prompt": "a hen", "ratio": "", "duration": "", "camera_fixed": ""}]
    res, df = run(fake, tmp_path, rows)
    assert res.exit_code == 0, res.output
    assert df["status"].to_list() == ["submitted", "submitted"]
    subs = fake.state.submissions()
    assert len(subs) == 2
    bodies = sorted((r.body for r in subs), key=lambda b: b["prompt"])
    assert bodies == [
        {"prompt": "a fox", "ratio": "9:16", "duration": 5, "camera_fixed": True, "service_tier": "flex"},
        {"prompt": "a hen", "service_tier": "flex"},
    ]
    accepted = {r.task_id for r in subs}
    assert set(df["task_id"].to_list()) == accepted
    assert df["attempts"].to_list() == [1, 1]
    assert df["submitted_at"].null_count() == 0
    assert df["id"].to_list() == ["a", "b"]


@pytest.mark.parametrize("status", ["400", "403", "405", "413", "415", "422"])
def test_permanent_rejections_fail_at_once(start_fake, tmp_path: Path, status: str) -> None:
    fake = start_fake(faults=[f"{status},match=BAD"])
    res, df = run(fake, tmp_path, [{"prompt": "BAD one"}, {"prompt": "good one"}])
    assert res.exit_code == 1
    bad = df.filter(df["prompt"] == "BAD one").row(0, named=True)
    assert bad["status"] == "failed"
    assert bad["error_code"] == int(status)
    assert bad["http_status"] == int(status)
    assert "injected" in bad["error"]
    assert sends_by_prompt(fake) == {"BAD one": 1, "good one": 1}
    assert df.filter(df["prompt"] == "good one")["status"].to_list() == ["submitted"]


@pytest.mark.parametrize("fault", ["500", "502", "504", "badjson", "no_task_id", "drop", "drop_accepted",
                                   "code", "408", "409", "425"])
def test_ambiguous_outcomes_are_unknown_and_never_resent(start_fake, tmp_path: Path, fault: str) -> None:
    fake = start_fake(faults=[f"{fault},match=MAYBE"])
    res, df = run(fake, tmp_path, [{"prompt": "MAYBE"}, {"prompt": "sure"}])
    assert res.exit_code == 1
    row = df.filter(df["prompt"] == "MAYBE").row(0, named=True)
    assert row["status"] == "unknown", row
    assert row["attempts"] == 1
    # A second night does not resend it either...
    res2 = cli(submit_args(fake, tmp_path, tmp_path / "in.csv", rate="0"))
    assert res2.exit_code == 1
    df2 = results(tmp_path / "results.parquet")
    assert df2.filter(df2["prompt"] == "MAYBE")["status"].to_list() == ["unknown"]
    assert df2.filter(df2["prompt"] == "sure")["status"].to_list() == ["skipped"]
    assert sends_by_prompt(fake) == {"MAYBE": 1, "sure": 1}
    # ...unless the operator opts in.
    res3 = cli(submit_args(fake, tmp_path, tmp_path / "in.csv", rate="0", extra=["--resend-unknown"]))
    assert sends_by_prompt(fake) == {"MAYBE": 2, "sure": 1}
    assert res3.exit_code == 1  # the fault is still there


def test_timeout_after_sending_is_unknown(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["slow,match=SLOW,delay=3"])
    res, df = run(fake, tmp_path, [{"prompt": "SLOW"}], extra=["--timeout", "1"])
    assert res.exit_code == 1
    row = df.row(0, named=True)
    assert row["status"] == "unknown"
    assert "timeout" in row["error"]
    assert sends_by_prompt(fake) == {"SLOW": 1}


@pytest.mark.parametrize("status", ["429", "503"])
def test_transient_errors_are_retried_honouring_retry_after(start_fake, tmp_path: Path, status: str) -> None:
    fake = start_fake(faults=[f"{status},match=BUSY,times=2,retry_after=1"])
    res, df = run(fake, tmp_path, [{"prompt": "BUSY"}])
    assert res.exit_code == 0, res.output
    row = df.row(0, named=True)
    assert (row["status"], row["attempts"]) == ("submitted", 3)
    times = fake.state.submit_times()
    assert len(times) == 3
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0.95 for g in gaps), gaps  # Retry-After: 1 honoured each time
    assert len(fake.state.accepted_bodies()) == 1


def test_retries_exhausted_is_failed(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["503,match=DOWN,retry_after=0"])
    res, df = run(fake, tmp_path, [{"prompt": "DOWN"}], extra=["--max-attempts", "3"])
    assert res.exit_code == 1
    row = df.row(0, named=True)
    assert row["status"] == "failed" and row["attempts"] == 3
    assert row["error"].startswith("gave up after 3 attempts")
    assert sends_by_prompt(fake) == {"DOWN": 3}


def test_429_slows_the_whole_run(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["429,times=1,retry_after=1"])
    res, _ = run(fake, tmp_path, prompts(6), extra=["--concurrency", "1"])
    assert res.exit_code == 0
    times = fake.state.submit_times()
    # After the first request's 429 nothing at all is sent for a second, not only its own retry.
    assert times[1] - times[0] >= 0.95


def test_connection_refused_is_retried_then_failed(tmp_path: Path) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now

    class Nowhere:
        url = f"http://127.0.0.1:{port}"

    path = write_csv(tmp_path / "in.csv", [{"prompt": "x"}])
    res = cli(submit_args(Nowhere, tmp_path, path, extra=["--max-attempts", "2"]))
    assert res.exit_code == 1
    row = results(tmp_path / "results.parquet").row(0, named=True)
    assert row["status"] == "failed" and row["attempts"] == 2
    assert "connection failed before sending" in row["error"]


@pytest.mark.parametrize("status", ["401", "402"])
def test_fatal_errors_stop_the_run(start_fake, tmp_path: Path, status: str) -> None:
    fake = start_fake(faults=[f"{status}"])
    res, df = run(fake, tmp_path, prompts(30), extra=["--concurrency", "1"])
    assert res.exit_code == 5  # a fatal provider condition, not "some rows invalid"
    counts = dict(zip(*df["status"].value_counts().to_dict(as_series=False).values(), strict=True))
    assert counts["failed"] == 1
    assert counts["pending"] == 29
    assert len(fake.state.submissions()) == 1
    assert f"stop reason: HTTP {status}" in res.output
    assert df.filter(df["status"] == "pending")["error"].str.contains(f"HTTP {status}").all()


def test_circuit_breaker_stops_after_consecutive_ambiguous(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["500"])
    res, df = run(fake, tmp_path, prompts(40), extra=["--concurrency", "1"])
    assert res.exit_code == 1
    assert df.filter(df["status"] == "unknown").height == 10
    assert df.filter(df["status"] == "pending").height == 30
    assert len(fake.state.submissions()) == 10
    assert "circuit breaker" in res.output


def test_rate_limit_is_smooth_without_initial_burst(fake, tmp_path: Path, steady_clock: None) -> None:
    res, _df = run(fake, tmp_path, prompts(30), rate="20/s")
    assert res.exit_code == 0
    times = sorted(fake.state.submit_times())
    assert len(times) == 30
    gaps = [round(b - a, 4) for a, b in itertools.pairwise(times)]
    # No sliding 1 s window holds more than 20 starts, including the first second.
    worst = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    assert worst <= 20, gaps
    first_second = sum(1 for t in times if t < times[0] + 0.5)
    assert first_second <= 11, gaps  # a leaky bucket's burst would put all 20 here
    assert min(gaps) > 0.03, gaps  # 1.02/20 = 51 ms apart, less scheduling noise


def test_rate_units_per_minute(fake, tmp_path: Path, steady_clock: None) -> None:
    res, _ = run(fake, tmp_path, prompts(3), rate="600/min")
    assert res.exit_code == 0
    times = sorted(fake.state.submit_times())
    assert times[2] - times[0] >= 0.18  # 10/s


def test_key_never_leaks(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["500,match=E5", "400,match=E4", "drop,match=DROP", "401,match=AUTH"])
    rows = [{"prompt": p} for p in ("E5", "E4", "DROP", "ok", "AUTH")]
    res, df = run(fake, tmp_path, rows, extra=["--concurrency", "1", "--log-level", "debug"])
    haystack = res.output + res.stderr + str(df.to_dicts())
    haystack += (tmp_path / "results.parquet.summary.json").read_text()
    haystack += (tmp_path / "state.sqlite").read_bytes().decode("latin-1")
    assert KEY not in haystack
    assert "outcome" in res.stderr  # the debug events were really emitted
    # The server did receive the key, so the test would notice if it were logged.
    assert len(fake.state.submissions()) >= 4


def test_no_accepted_request_twice_under_mixed_faults(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["429,prob=0.2,retry_after=0", "503,prob=0.1", "drop_accepted,prob=0.05"], seed=3)
    rows = prompts(60)
    for _ in range(3):
        run(fake, tmp_path, rows, extra=["--max-attempts", "10"])
    assert accepted_twice(fake) == []
    df = results(tmp_path / "results.parquet")
    assert set(df["status"].to_list()) <= {"skipped", "unknown", "submitted"}


def test_a_wrong_route_stops_the_night_at_the_first_404(start_fake, tmp_path: Path) -> None:
    """A 404 on a submission means the route or model does not exist: stop, leave the rest
    pending, name the URL and the options that fix it; never fail the night row by row."""
    fake = start_fake(routes=("v1",))  # today's route form only; the default is the seed's
    res, df = run(fake, tmp_path, prompts(20), extra=["--concurrency", "2"])
    assert res.exit_code == 5
    counts = df["status"].value_counts().to_dict(as_series=False)
    assert dict(zip(*counts.values(), strict=True)) == {"pending": 20}
    assert len(fake.state.submissions()) <= 2  # at most what was in flight
    assert f"HTTP 404 from {fake.url}/api/v1/text-to-video/bytedance/seedance-1.0-lite-t2v/async" in res.output
    assert "--model" in res.output and "--endpoint" in res.output and "--base-url" in res.output
    # The next night, with the right route form, sends all of them, once.
    res = cli(submit_args(fake, tmp_path, tmp_path / "in.csv", extra=["--endpoint", "v1"]))
    assert res.exit_code == 0, res.output
    assert results(tmp_path / "results.parquet")["status"].to_list() == ["submitted"] * 20
    assert accepted_twice(fake) == []
