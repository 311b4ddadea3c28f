"""The provider as it moved on (issue 20), over HTTP against the fake: Seedance 2.0 Mini
and the provider's defaults, every task state and ``result_expires_at``, ``x-request-id``
on submissions, and the submit-429 rule."""

import json
import re
import sqlite3
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.request import Request, urlopen

from conftest import cli, error_line, prompts, results, write_csv

from batch.following import read_task
from batch.models import Catalog, names_only, shipped

LITE = "bytedance/seedance-1.0-lite-t2v"
MINI = "bytedance/seedance-2.0-mini-t2v"
FAST_I2V = "bytedance/seedance-2.0-fast-i2v"


def submit(url: str, tmp_path: Path, path: Path, *extra: str, out: str = "r.parquet", env=None):
    return cli(["submit", str(path), "-o", str(tmp_path / out), "--base-url", url, "--state",
                str(tmp_path / "s.sqlite"), "--rate", "0", *extra], env=env)


def collect(url: str, tmp_path: Path, *extra: str):
    return cli(["collect", "--state", str(tmp_path / "s.sqlite"), "--base-url", url, "--rate", "0",
                "--results", str(tmp_path / "r.parquet"), *extra])


def ask(url: str, task_id: str) -> dict:
    """The fake's task answer's ``data``, as a plain HTTP client sees it."""
    with urlopen(Request(f"{url}/api/v1/tasks/{task_id}", headers={"Authorization": "Bearer k"})) as resp:
        return json.loads(resp.read())["data"]


# -- 1. Seedance 2.0 Mini and the provider's defaults ---------------------------------------------

def test_mini_is_shipped_with_only_the_field_a_source_states() -> None:
    spec = shipped()[MINI]
    assert (spec.kind, spec.completeness, spec.source_date) == ("t2v", "partial", "2026-12-06")
    assert list(spec.fields) == ["prompt"] and spec.fields["prompt"].required
    assert spec.provider_default == "t2v" and shipped()[FAST_I2V].provider_default == "i2v"
    assert shipped()[LITE].provider_default is None
    # named but never described: known, not shipped as specs
    assert "bytedance/seedance-2.0-mini-i2v" in names_only() and "bytedance/seedance-2.0-mini-i2v" not in shipped()


def test_a_sheet_for_mini_sends_the_prompt_and_refuses_an_unstated_field(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "a fox in snow", "model": MINI},
                                           {"prompt": "a fox in rain", "model": MINI, "duration": "5"}])
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 1, res.output  # the second row is invalid; the first is sent
    assert [(r.path, r.body) for r in fake.state.submissions()] == [
        ("/api/v1/bytedance/seedance-2.0-mini-t2v/async", {"prompt": "a fox in snow"})]
    table = results(tmp_path / "r.parquet").sort("prompt")
    bad = table.filter(table["prompt"] == "a fox in rain").row(0, named=True)
    assert bad["status"] == "invalid" and "duration" in bad["error"] and MINI in bad["error"]


def test_preflight_for_an_unlisted_model_names_the_listed_seedance_models_and_how_to_switch(
        start_fake, tmp_path: Path) -> None:
    fake = start_fake(models=(MINI, FAST_I2V, "google/nano-banana-2-lite"))
    res = submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", [{"prompt": "a lake"}]))
    assert res.exit_code == 5
    line = error_line(res.stderr)
    assert f"{LITE} is not listed (3 models listed); listed Seedance models: {FAST_I2V}, {MINI}" in line
    assert "--model SLUG, a model column, or model = \"SLUG\" in the job file" in line
    assert "nano-banana" not in line
    assert fake.state.submissions() == []


def test_preflight_checks_only_the_models_of_rows_that_will_be_sent(start_fake, tmp_path: Path) -> None:
    """Reported: a sheet whose every row names Mini exited 5 in preflight because the
    unused default (1.0 Lite) is not listed. Neither the default nor the model of an
    invalid row is "in use": check, preflight and --max-spend look at the rows sent."""
    fake = start_fake(models=(MINI, FAST_I2V))
    path = write_csv(tmp_path / "in.csv", [
        {"prompt": "a fox in snow", "model": MINI}, {"prompt": "a fox in rain", "model": MINI},
        {"prompt": "a fox at dusk", "model": "bytedance/seedance-1.5-pro-t2v", "duration": "999"}])  # invalid
    checked = cli(["check", str(path), "--base-url", fake.url])
    assert checked.exit_code == 0, checked.output
    assert LITE not in checked.output and "1.5-pro" not in checked.output
    prices = tmp_path / "prices.toml"
    prices.write_text(f'["{MINI}"]\ndefault = 0.05\n')  # Mini states no resolution field
    res = submit(fake.url, tmp_path, path, "--prices", str(prices), "--max-spend", "5")
    assert res.exit_code == 1, res.output + res.stderr  # the invalid row; not 5
    assert sorted(r.body["prompt"] for r in fake.state.submissions()) == ["a fox in rain", "a fox in snow"]


def test_models_list_marks_the_defaults_and_the_names_known_only(tmp_path: Path) -> None:
    out = cli(["models", "list"]).output
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("bytedance/")}
    assert "[provider's default for t2v]" in lines[MINI] and "[provider's default for i2v]" in lines[FAST_I2V]
    assert "[this tool's default]" in lines[LITE] and "provider's default" not in lines[LITE]
    assert "known by name only" in out and "bytedance/seedance-2.0-mini-i2v (i2v)" in out
    assert Catalog().find(MINI) is not None


# -- 3. every task state, result_expires_at, x-request-id -----------------------------------------

def test_every_state_of_the_newer_client_maps_to_ours() -> None:
    expected = {"queued": "pending", "created": "pending", "pending": "pending", "running": "processing",
                "in_progress": "processing", "processing": "processing", "done": "success", "success": "success"}
    for word, ours in expected.items():
        view = read_task({"code": 0, "data": {"status": word, "task_id": "t1"}}, "t1")
        assert (view.status, view.unknown_state) == (ours, None), word


def test_a_night_in_the_newer_state_words_ends_in_success_and_downloads(start_fake, tmp_path: Path) -> None:
    fake = start_fake(state_names="dsh", task_delay=0.6)
    path = write_csv(tmp_path / "in.csv", prompts(4))
    assert submit(fake.url, tmp_path, path).exit_code == 0
    res = collect(fake.url, tmp_path, "--wait", "--timeout", "30s", "--poll-interval", "0.1",
                  "--download", str(tmp_path / "videos"))
    assert res.exit_code == 0, res.output
    assert "task_state_unknown" not in res.stderr
    assert results(tmp_path / "r.parquet")["task_status"].to_list() == ["success"] * 4
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 4
    assert {ask(fake.url, r.task_id)["status"] for r in fake.state.submissions()} == {"done"}


def test_the_fake_speaks_each_newer_state_word(start_fake) -> None:
    fake = start_fake(state_names="dsh", task_delay=2.0)
    words = set()
    for i in range(8):
        task_id = fake.state.new_task({"prompt": f"p{i}"}, LITE)
        words.add(ask(fake.url, task_id)["status"])
    assert words == {"queued", "created"}
    time.sleep(1.1)
    assert {ask(fake.url, t)["status"] for t in fake.state.tasks} == {"running", "in_progress"}


def test_outputs_past_result_expires_at_are_expired_not_downloaded(start_fake, tmp_path: Path) -> None:
    fake = start_fake(result_ttl=-60.0)  # expired a minute after completion... before we ask
    assert submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", prompts(2))).exit_code == 0
    res = collect(fake.url, tmp_path, "--download", str(tmp_path / "videos"))
    assert res.exit_code == 1
    table = results(tmp_path / "r.parquet")
    assert table["task_status"].to_list() == ["expired"] * 2
    assert all("result_expires_at" in r for r in table["failure_reason"].to_list())
    assert [r for r in fake.state.records if r.kind == "download"] == []


def test_the_summary_warns_of_outputs_expiring_before_the_next_collect(start_fake, tmp_path: Path) -> None:
    fake = start_fake(result_ttl=3600.0)  # one hour: gone before tomorrow night's collect
    assert submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", prompts(3))).exit_code == 0
    res = collect(fake.url, tmp_path)  # polls, no download directory
    assert "expiring: 3 outputs not downloaded expire before the next collect (24 h)" in res.output
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        stored = dict(db.execute("SELECT request_id, expires_at FROM task_expiry").fetchall())
    assert len(stored) == 3 and all(v.endswith("+00:00") for v in stored.values())
    # downloaded now, nothing is left to warn about
    res = collect(fake.url, tmp_path, "--download", str(tmp_path / "videos"))
    assert res.exit_code == 0, res.output
    assert "expiring:" not in res.output


def test_collect_downloads_the_soonest_expiring_outputs_first(fake, tmp_path: Path) -> None:
    assert submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", prompts(4))).exit_code == 0
    assert collect(fake.url, tmp_path).exit_code == 0  # polled to success, not downloaded
    order = [r.task_id for r in fake.state.submissions()]
    ids = results(tmp_path / "r.parquet").select("request_id", "task_id").rows()
    by_task = {t: rid for rid, t in ids}
    now = datetime.now(UTC)
    with sqlite3.connect(tmp_path / "s.sqlite") as db:  # the last submitted expires first
        for n, task_id in enumerate(reversed(order)):
            db.execute("INSERT OR REPLACE INTO task_expiry VALUES (?, ?, ?)",
                       (fake.url, by_task[task_id], (now + timedelta(hours=2 + n)).isoformat(timespec="seconds")))
    res = collect(fake.url, tmp_path, "--download", str(tmp_path / "videos"), "--download-concurrency", "1")
    assert res.exit_code == 0, res.output
    downloads = [r.path.rsplit("/", 1)[1].removesuffix(".mp4") for r in fake.state.records if r.kind == "download"]
    assert downloads == list(reversed(order))


def test_every_submission_carries_our_request_id_as_x_request_id(start_fake, tmp_path: Path) -> None:
    fake = start_fake(api_key="sk-test-secret-key-123", faults=["429,times=1"])
    rows = prompts(3) + prompts(1)  # a repeat: its own request id, <key>-1
    res = submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", rows), "--max-attempts", "3",
                 env={"SEEDANCE_API_KEY": "sk-test-secret-key-123"})
    assert res.exit_code == 0, res.output
    table = results(tmp_path / "r.parquet")
    sent = [r.x_request_id for r in fake.state.submissions()]
    assert len(sent) == 5 and set(sent) == set(table["request_id"].to_list())  # the 429'd one was resent with it
    assert all(re.fullmatch(r"[0-9a-f]{16}(-\d+)?", s) for s in sent)
    assert not any("secret" in s for s in sent)


# -- 5. a submit 429: a definite rejection, resent within bounds ------------------------------------

def test_a_429_is_resent_at_most_max_attempts_times(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["429"])  # every submission, forever
    res = submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", prompts(4)), "--max-attempts", "3",
                 "--no-preflight")
    assert res.exit_code == 1
    sends = Counter(json.dumps(r.body, sort_keys=True) for r in fake.state.submissions())
    assert len(sends) == 4 and set(sends.values()) == {3}
    table = results(tmp_path / "r.parquet")
    assert table["status"].to_list() == ["failed"] * 4 and table["attempts"].to_list() == [3] * 4
    assert all("gave up after 3 attempts" in e for e in table["error"].to_list())


def test_a_429_is_never_resent_after_the_deadline(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["429,retry_after=3"])  # the cooldown outlasts the night
    started = time.time()
    res = submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", prompts(3)), "--max-attempts", "50",
                 "--deadline", "2s", "--no-preflight", "--concurrency", "1")
    deadline = started + 2.0
    assert res.exit_code == 1, res.output
    walls = [r.wall for r in fake.state.submissions()]
    assert walls and max(walls) < deadline + 0.25  # nothing sent after the deadline (a little clock slack)
    table = results(tmp_path / "r.parquet")
    assert set(table["status"].to_list()) == {"pending"}  # not failed: the next night sends them
