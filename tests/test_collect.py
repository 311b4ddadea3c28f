"""collect: follow tasks, download outputs, over real HTTP against the fake API."""

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
from conftest import cli, prompts, results, submit_args, subprocess_env, write_csv

from batch.download import file_stem
from batch.fake_api import fake_file_bytes


def submit(fake, tmp_path: Path, rows: list[dict], state: str | None = None) -> Path:
    path = write_csv(tmp_path / "in.csv", rows)
    res = cli(submit_args(fake, tmp_path, path, state=state))
    assert res.exit_code == 0, res.output
    return tmp_path / "results.parquet"


def collect(fake, tmp_path: Path, *extra: str, state: str | None = None):
    return cli(["collect", "--state", state or str(tmp_path / "state.sqlite"), "--base-url", fake.url, "--rate", "0",
                "--results", str(tmp_path / "results.parquet"), *extra])


def polls(fake) -> int:
    return sum(1 for r in fake.state.records if r.path.startswith("/api/v1/tasks/"))


def video_of(directory: Path, row: dict) -> Path:
    """Where collect puts a row's video: named by its id label and request id."""
    return directory / f"{file_stem(row['request_id'], row.get('id'))}.mp4"


def downloads(fake) -> list:
    return [r for r in fake.state.records if r.path.startswith("/files/")]


def test_collect_in_passes_then_download(start_fake, tmp_path: Path, store: str) -> None:
    fake = start_fake(task_delay=2.0)  # "pending" for 1 s: a loaded machine still collects within it
    table = submit(fake, tmp_path, [*prompts(4), {"id": "lf", "prompt": "with frame", "return_last_frame": "true"}],
                   store)
    first = collect(fake, tmp_path, "--download", str(tmp_path / "videos"), state=store)
    assert first.exit_code == 1  # still pending
    assert results(table)["task_status"].to_list() == ["pending"] * 5
    assert polls(fake) == 5 and downloads(fake) == []
    time.sleep(2.1)
    second = collect(fake, tmp_path, "--download", str(tmp_path / "videos"), state=store)
    assert second.exit_code == 0, second.output
    df = results(table)
    assert df["task_status"].to_list() == ["success"] * 5
    assert df["completed_at"].null_count() == 0
    assert df.schema["resource_urls"] == pl.List(pl.String) and df.schema["local_paths"] == pl.List(pl.String)
    assert all(url.split("/files/")[1].startswith("task-video-") for urls in df["resource_urls"] for url in urls)
    every = sorted(p.name for p in (tmp_path / "videos").iterdir())
    # Besides the outputs, only the page's poster frames (one per video, batch/page.py).
    files = [f for f in every if not f.endswith(".poster.jpg")]
    assert len(files) == 6 and sum(f.endswith(".last_frame.png") for f in files) == 1
    assert sorted(set(every) - set(files)) == sorted(f + ".poster.jpg" for f in files if f.endswith(".mp4"))
    for row in df.iter_rows(named=True):
        video = video_of(tmp_path / "videos", row)
        assert video.read_bytes() == fake_file_bytes(row["task_id"], "mp4", 4096)
        assert str(video) in row["local_paths"]
    # A third pass polls nothing and downloads nothing again.
    before_polls, before_dl = polls(fake), len(downloads(fake))
    third = collect(fake, tmp_path, "--download", str(tmp_path / "videos"), state=store)
    assert third.exit_code == 0
    assert polls(fake) == before_polls and len(downloads(fake)) == before_dl
    assert "already present 5" in third.output


def test_failed_tasks_carry_the_providers_reason(fake, tmp_path: Path, store: str) -> None:
    # Collect records the failure's class too (batch.retry's column, in both stores).
    table = submit(fake, tmp_path, [{"prompt": "fine"}, {"prompt": "FAILTASK please"}], state=store)
    res = collect(fake, tmp_path, state=store)
    assert res.exit_code == 1
    df = results(table).sort("prompt")
    assert df["task_status"].to_list() == ["failed", "success"]
    assert df["failure_reason"][0] == "400: Content Moderation: the prompt was rejected"


def test_poll_faults_are_retried(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["500,endpoint=query,times=2", "429,endpoint=query,times=1,retry_after=1",
                              "drop,endpoint=query,times=1", "badjson,endpoint=query,times=1"])
    table = submit(fake, tmp_path, prompts(3))
    res = collect(fake, tmp_path)
    assert res.exit_code == 0, res.output
    assert results(table)["task_status"].to_list() == ["success"] * 3
    assert polls(fake) == 3 + 5


def test_truncated_downloads_resume_and_never_leave_partial_files(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["drop,endpoint=download,times=2"], video_bytes=100_000)
    table = submit(fake, tmp_path, prompts(2))
    res = collect(fake, tmp_path, "--download", str(tmp_path / "v"))
    assert res.exit_code == 0, res.output
    df = results(table)
    for row in df.iter_rows(named=True):
        assert video_of(tmp_path / "v", row).read_bytes() == \
            fake_file_bytes(row["task_id"], "mp4", 100_000)
    ranged = [r for r in downloads(fake) if r.body]  # the fake records the Range header
    assert len(ranged) == 2 and all(r.body == "bytes=50000-" for r in ranged)
    assert [p.name for p in (tmp_path / "v").iterdir() if p.name.startswith(".")] == []


def test_download_that_keeps_failing_is_reported(start_fake, tmp_path: Path, quick_download_retries: None) -> None:
    fake = start_fake(faults=["503,endpoint=download"])
    table = submit(fake, tmp_path, prompts(1))
    res = cli(["collect", "--state", str(tmp_path / "state.sqlite"), "--base-url", fake.url, "--rate", "0",
               "--results", str(table), "--download", str(tmp_path / "v")])
    assert res.exit_code == 1
    row = results(table).row(0, named=True)
    assert row["task_status"] == "success" and "gave up after 5 attempts" in row["download_error"]
    assert list((tmp_path / "v").glob("*.mp4")) == []


def test_gone_output_is_expired(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["404,endpoint=download"])
    table = submit(fake, tmp_path, prompts(1))
    res = collect(fake, tmp_path, "--download", str(tmp_path / "v"))
    assert res.exit_code == 1
    assert results(table)["task_status"].to_list() == ["expired"]


def test_wait_polls_until_terminal_with_growing_interval(start_fake, tmp_path: Path, steady_clock: None) -> None:
    fake = start_fake(task_delay=1.5)
    table = submit(fake, tmp_path, prompts(2))
    t0 = time.monotonic()
    res = collect(fake, tmp_path, "--wait", "--poll-interval", "0.2")
    assert res.exit_code == 0, res.output
    assert time.monotonic() - t0 >= 1.4
    assert results(table)["task_status"].to_list() == ["success"] * 2
    first_task = results(table)["task_id"][0]
    times = sorted(r.t for r in fake.state.records if r.path == f"/api/v1/tasks/{first_task}")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 2 and gaps[-1] > gaps[0]


def test_wait_timeout_gives_up(start_fake, tmp_path: Path) -> None:
    fake = start_fake(task_delay=60)
    submit(fake, tmp_path, prompts(1))
    res = collect(fake, tmp_path, "--wait", "--timeout", "1s", "--poll-interval", "0.2")
    assert res.exit_code == 1
    assert "--timeout 1s reached" in res.output


def test_unknown_task_ids_from_a_results_table(fake, tmp_path: Path, store: str) -> None:
    table = tmp_path / "results.parquet"
    pl.DataFrame({"request_id": ["r1"], "status": ["submitted"], "task_id": ["task-nobody-knows"],
                  "prompt": ["x"], "task_status": [None]}, schema_overrides={"task_status": pl.String}).write_parquet(table)
    res = collect(fake, tmp_path, state=store)
    assert res.exit_code == 1
    row = results(table).row(0, named=True)
    assert row["task_status"] == "failed" and "404" in row["failure_reason"]


def test_bad_key_stops_collect(start_fake, tmp_path: Path) -> None:
    fake = start_fake()
    submit(fake, tmp_path, prompts(3))
    fake.state.config.api_key = "another-key"
    res = collect(fake, tmp_path)
    assert res.exit_code == 5 and "HTTP 401" in res.output  # a fatal provider condition


def test_submit_wait_downloads_in_the_same_process(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(3))
    res = cli(submit_args(fake, tmp_path, path, extra=["--wait", "--download", str(tmp_path / "v")]))
    assert res.exit_code == 0, res.output
    df = results(tmp_path / "results.parquet")
    assert df["task_status"].to_list() == ["success"] * 3
    assert df["local_paths"].null_count() == 0
    assert len(list((tmp_path / "v").glob("*.mp4"))) == 3
    assert "tasks: 3 success; downloaded 3" in res.output


def test_kill_9_during_download_then_rerun_fetches_only_whats_missing(start_fake, tmp_path: Path, store: str) -> None:
    fake = start_fake(video_bytes=60_000, download_bps=40_000)
    table = submit(fake, tmp_path, prompts(3), store)
    args = [sys.executable, "-m", "batch", "collect", "--state", store, "--base-url",
            fake.url, "--rate", "0", "--results", str(table), "--download", str(tmp_path / "v"),
            "--download-concurrency", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    deadline = time.monotonic() + 30
    while not (len(list((tmp_path / "v").glob("*.mp4"))) == 1 and list((tmp_path / "v").glob(".*.part"))):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    for video in (tmp_path / "v").glob("*.mp4"):  # a final name only ever holds a whole file
        assert video.stat().st_size == 60_000
    done_before = {p.name for p in (tmp_path / "v").glob("*.mp4")}
    partial = list((tmp_path / "v").glob(".*.part"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < 60_000
    fetched_before = len(downloads(fake))

    fake.state.config.download_bps = None  # the kill is past: the rerun's resume need not crawl at 40 kB/s
    rerun = subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    new = downloads(fake)[fetched_before:]
    assert len(new) == 2  # the interrupted one (resumed) and the missing one; not the finished one
    assert sum(1 for r in new if r.body and r.body.startswith("bytes=")) == 1
    df = results(table)
    assert {p.name for p in (tmp_path / "v").glob("*.mp4")} >= done_before
    for row in df.iter_rows(named=True):
        video = video_of(tmp_path / "v", row)
        assert video.read_bytes() == fake_file_bytes(row["task_id"], "mp4", 60_000)
    assert list((tmp_path / "v").glob(".*.part")) == []


def test_collect_rewrites_a_csv_table_without_double_escaping(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"id": "a", "prompt": "=SUM(A1) as a prompt"}, {"id": "b", "prompt": "fine"}])
    assert cli(submit_args(fake, tmp_path, path, out="r.csv")).exit_code == 0
    res = cli(["collect", "--state", str(tmp_path / "state.sqlite"), "--base-url", fake.url, "--rate", "0",
               "--results", str(tmp_path / "r.csv")])
    assert res.exit_code == 0, res.output
    df = results(tmp_path / "r.csv")
    assert df["prompt"].to_list() == ["'=SUM(A1) as a prompt", "fine"]
    assert df["task_status"].to_list() == ["success", "success"]
    assert df["id"].to_list() == ["a", "b"]


def test_sigterm_stops_collect_wait_with_exit_4(start_fake, tmp_path: Path) -> None:
    fake = start_fake(task_delay=60)
    table = submit(fake, tmp_path, prompts(2))
    proc = subprocess.Popen([sys.executable, "-m", "batch", "collect", "--state", str(tmp_path / "state.sqlite"),
                             "--base-url", fake.url, "--rate", "0", "--results", str(table), "--wait",
                             "--poll-interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env())
    deadline = time.monotonic() + 20
    while polls(fake) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 4, err
    assert "interrupted by SIGTERM" in out
    assert results(table)["task_status"].to_list() == ["pending", "pending"]
