"""Failed generations retried by rule (issue 20, item 4), over several simulated nights
against the fake: what the provider's words allow is sent again, content policy never,
each request at most --retry-cap tasks in all, its lineage kept and shown."""

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import cli, results, write_csv

from batch.retry import CONTENT, RETRYABLE_CLASS, UNCLASSIFIED, classify

ROWS = [{"id": "ok", "prompt": "a calm lake"}, {"id": "flaky", "prompt": "FLAKYTASK a storm at sea"},
        {"id": "policy", "prompt": "FAILTASK something forbidden"}, {"id": "cancel", "prompt": "CANCELTASK a fox"}]


def night(fake, tmp_path: Path, n: int, *extra: str):
    sheet = tmp_path / "in.csv"
    if not sheet.exists():
        write_csv(sheet, ROWS)
    state, table = str(tmp_path / "s.sqlite"), str(tmp_path / f"night{n}.parquet")
    sub = cli(["submit", str(sheet), "-o", table, "--base-url", fake.url, "--state", state, "--rate", "0",
               "--no-preflight", *extra])
    col = cli(["collect", "--state", state, "--base-url", fake.url, "--rate", "0", "--results", table])
    by_id = {r["id"]: r for r in results(Path(table)).iter_rows(named=True)}
    return sub, col, by_id


def sent(fake) -> list[str]:
    return [r.body["prompt"].split()[0] for r in fake.state.submissions()]


@pytest.mark.parametrize(("reason", "kind"), [
    ("400: Content Moderation: the prompt was rejected", CONTENT),
    ("InvalidParameter: ratio is not supported", CONTENT),
    ("500: Internal Error: the generation failed, try again", RETRYABLE_CLASS),
    ("cancelled: 499: Cancelled: the task was cancelled", RETRYABLE_CLASS),
    ("expired: the task expired in the queue", RETRYABLE_CLASS),
    ("error: upstream timeout", RETRYABLE_CLASS),
    ("no reason given", UNCLASSIFIED),
    (None, UNCLASSIFIED),
    # A code is the reason's code field (``<code>: ...`` as the collector stores it, after a
    # state prefix, or a ``code <n>`` part), never any number in the provider's prose.
    ("2001: the first frame is 512 px wide", UNCLASSIFIED),
    ("the first frame is 512 px wide", UNCLASSIFIED),
    ("the first frame is 400 px wide", UNCLASSIFIED),
    ("a clip of 504 frames; code 2001", UNCLASSIFIED),
    ("500: the generation failed", RETRYABLE_CLASS),
    ("503: the generation failed", RETRYABLE_CLASS),
    ("the generation failed; code 502", RETRYABLE_CLASS),
    ("cancelled: 504: gone", RETRYABLE_CLASS),
    ("422: the prompt could not be used", CONTENT),
    ("failed; code 400; the first frame is 512 px wide", CONTENT),
    # ... nor a word inside another, nor the provider saying not to retry
    ("a busybox worker exited", UNCLASSIFIED),
    ("the task is not retryable", UNCLASSIFIED),
    ("generation failed, do not retry", UNCLASSIFIED),
    ("the server is overloaded", RETRYABLE_CLASS),
    ("please retry later", RETRYABLE_CLASS),
])
def test_failures_are_classified_by_the_providers_words(reason: str | None, kind: str) -> None:
    assert classify(reason) == kind


def test_failed_tasks_over_several_nights(start_fake, tmp_path: Path) -> None:
    fake = start_fake(flaky_failures=5)
    # night 1: the ok one succeeds, three fail
    sub, col, rows = night(fake, tmp_path, 1)
    assert sub.exit_code == 0, sub.output
    assert {k: r["task_status"] for k, r in rows.items()} == {"ok": "success", "flaky": "failed", "policy": "failed",
                                                               "cancel": "failed"}
    assert all(r["task_attempt"] == 1 and r["earlier_task_ids"] is None for r in rows.values())
    first = {k: r["task_id"] for k, r in rows.items()}
    # night 2 without the option: nothing is paid for again
    night(fake, tmp_path, 2)
    assert len(fake.state.submissions()) == 4
    # night 3: the provider-side failures are sent again, content policy never
    sub, col, rows = night(fake, tmp_path, 3, "--retry-failed")
    assert sub.exit_code == 0, sub.output
    assert "retry-failed: 2 failed tasks made pending again, 2 retries sent; not retried: 1 content policy" \
        in sub.output
    assert sorted(sent(fake)[4:]) == ["CANCELTASK", "FLAKYTASK"]
    for k in ("flaky", "cancel"):
        assert rows[k]["task_attempt"] == 2 and rows[k]["earlier_task_ids"] == [first[k]]
        assert rows[k]["task_id"] != first[k] and rows[k]["status"] == "submitted"
    assert rows["policy"]["task_attempt"] == 1 and rows["policy"]["task_id"] == first["policy"]
    # night 4: both failed again, and the cap (2 tasks) is reached
    sub, _col, rows = night(fake, tmp_path, 4, "--retry-failed")
    assert len(fake.state.submissions()) == 6
    assert "2 at the cap" in sub.output
    # night 5: a higher cap, and the provider has recovered: the flaky one succeeds
    fake.state.config.flaky_failures = 2
    second = {k: rows[k]["task_id"] for k in ("flaky", "cancel")}
    sub, col, rows = night(fake, tmp_path, 5, "--retry-failed", "--retry-cap", "3")
    assert sub.exit_code == 0 and "retry-failed: 2 failed tasks made pending again, 2 retries sent" in sub.output
    assert col.exit_code == 1  # the cancelled one failed a third time
    assert len(fake.state.submissions()) == 8
    assert rows["flaky"]["task_status"] == "success" and rows["flaky"]["task_attempt"] == 3
    assert rows["flaky"]["earlier_task_ids"] == [first["flaky"], second["flaky"]]
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        lineage = db.execute("SELECT attempt, task_id, failure_class FROM task_lineage WHERE request_id = ? "
                             "ORDER BY attempt", (rows["flaky"]["request_id"],)).fetchall()
    assert lineage == [(1, first["flaky"], "retryable"), (2, second["flaky"], "retryable")]


def test_retries_count_against_max_spend(start_fake, tmp_path: Path) -> None:
    fake = start_fake(flaky_failures=5)
    night(fake, tmp_path, 1)
    prices = tmp_path / "prices.toml"
    prices.write_text('["bytedance/seedance-1.0-lite-t2v"]\n"480p" = 0.01\n"720p" = 0.02\n"1080p" = 0.03\n')
    capped, _, rows = night(fake, tmp_path, 2, "--retry-failed", "--prices", str(prices), "--max-spend", "0.001")
    assert capped.exit_code == 1 and "--max-spend" in capped.output
    assert len(fake.state.submissions()) == 4  # the cap stopped both retries: they count like any request
    assert rows["flaky"]["status"] == "pending" and rows["flaky"]["task_attempt"] == 2
    later, _, rows = night(fake, tmp_path, 3, "--prices", str(prices), "--max-spend", "10")
    assert later.exit_code == 0, later.output
    assert len(fake.state.submissions()) == 6 and rows["flaky"]["status"] == "submitted"


def test_the_job_file_turns_it_on(start_fake, tmp_path: Path) -> None:
    fake = start_fake(flaky_failures=1)
    night(fake, tmp_path, 1)
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["in.csv"]\noutput = "night2.parquet"\nstate = "s.sqlite"\nbase_url = "{fake.url}"\n'
                   'rate = "0"\npreflight = false\nretry_failed = true\nretry_cap = 2\n')
    res = cli(["run", str(job)])
    assert res.exit_code == 0, res.output
    assert sorted(sent(fake)[4:]) == ["CANCELTASK", "FLAKYTASK"]


def test_a_dry_run_shows_and_prices_the_retries(start_fake, tmp_path: Path) -> None:
    fake = start_fake(flaky_failures=5)
    night(fake, tmp_path, 1)
    prices = tmp_path / "prices.toml"
    prices.write_text('["bytedance/seedance-1.0-lite-t2v"]\n"480p" = 0.01\n"720p" = 0.02\n"1080p" = 0.03\n')
    args = ["submit", str(tmp_path / "in.csv"), "--base-url", fake.url,
            "--state", str(tmp_path / "s.sqlite"), "--prices", str(prices), "--dry-run"]
    plain = cli([*args, "-o", str(tmp_path / "plain.parquet")])
    assert plain.exit_code == 0 and "skipped           4" in plain.output, plain.output
    again = cli([*args, "-o", str(tmp_path / "dry.parquet"), "--retry-failed"])
    assert again.exit_code == 0, again.output
    assert "would send: 2 requests (2 flex); already submitted 2 (skipped)" in again.output
    assert "estimated cost: 0.10 USD" in again.output  # 2 x 5 s x 0.02 USD/s x 50% (flex)
    table = {r["id"]: r["status"] for r in results(tmp_path / "dry.parquet").iter_rows(named=True)}
    assert table == {"ok": "skipped", "flaky": "dry_run", "policy": "skipped", "cancel": "dry_run"}
    assert len(fake.state.submissions()) == 4  # a dry run sends nothing


PRICED = '["bytedance/seedance-1.0-lite-t2v"]\n"480p" = 0.02\n"720p" = 0.08\n"1080p" = 0.16\nflex = { "720p" = 0.04 }\n'


@pytest.mark.parametrize("cap", [["--max-spend", "1.0"], ["--max-requests", "5"]])
def test_a_same_night_retry_still_counts_the_first_task(start_fake, tmp_path: Path, cap: list[str]) -> None:
    """Reported: --retry-failed moved the night's first, failed task out of the night's count
    (the row was reset and claimed again), so a later run the same night sent beyond the cap.
    Every task the provider took tonight counts, a failed one too (it may be billed)."""
    fake = start_fake(flaky_failures=5)
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICED)  # 5 s at 720p, flex: 0.20 USD per task
    sheet, state = tmp_path / "in.csv", str(tmp_path / "s.sqlite")
    flaky = [{"id": f"f{i}", "prompt": f"FLAKYTASK storm {i}", "duration": "5"} for i in range(2)]

    def go(n: int, *extra: str):
        table = str(tmp_path / f"n{n}.parquet")
        sub = cli(["submit", str(sheet), "-o", table, "--base-url", fake.url, "--state", state, "--rate", "0",
                   "--no-preflight", "--prices", str(prices), *cap, *extra])
        cli(["collect", "--state", state, "--base-url", fake.url, "--rate", "0", "--results", table])
        return sub

    write_csv(sheet, flaky)
    assert go(1).exit_code == 0 and len(fake.state.submissions()) == 2  # both fail
    assert go(2, "--retry-failed").exit_code == 0 and len(fake.state.submissions()) == 4  # 0.80 USD, 4 tasks
    write_csv(sheet, [*flaky, *({"id": f"n{i}", "prompt": f"calm lake {i}", "duration": "5"} for i in range(3))])
    sub = go(3)
    # 1.00 USD or 5 tasks: one more is left tonight, not three
    assert len(fake.state.submissions()) == 5, sub.output
    assert sub.exit_code == 1
    if cap[0] == "--max-spend":
        assert "0.80 by earlier runs" in sub.output


def test_a_number_in_the_message_is_not_a_server_error(serve, tmp_path: Path) -> None:
    """Reported: "the first frame is 512 px wide" was read as a 5xx and paid for again. Over
    HTTP: the fake's failed task carries the provider's own code and that message."""
    from aiohttp import web

    from batch.fake_api import STATE_KEY, FakeConfig, make_app

    app = make_app(FakeConfig())

    @web.middleware
    async def reword(request: web.Request, handler):  # the task's error as the provider words it
        resp = await handler(request)
        if request.path.startswith("/api/v1/tasks/") and isinstance(resp, web.Response) and resp.body:
            doc = json.loads(resp.body)
            if isinstance((doc.get("data") or {}).get("error"), dict):
                doc["data"]["error"] = {"code": 2001, "message": "the first frame is 512 px wide"}
                return web.json_response(doc)
        return resp

    app.middlewares.append(reword)
    url = serve(app)
    state_of = app[STATE_KEY]
    sheet, state = write_csv(tmp_path / "in.csv", [{"id": "w", "prompt": "FAILTASK a wide shot"}]), tmp_path / "s"
    for n, extra in ((1, []), (2, ["--retry-failed"])):
        table = str(tmp_path / f"n{n}.parquet")
        sub = cli(["submit", str(sheet), "-o", table, "--base-url", url, "--state", str(state), "--rate", "0",
                   "--no-preflight", *extra])
        assert sub.exit_code == 0, sub.output
        cli(["collect", "--state", str(state), "--base-url", url, "--rate", "0", "--results", table])
    assert len(state_of.submissions()) == 1  # not sent again
    assert "0 content policy, 1 unclassified" in sub.output
    assert results(tmp_path / "n2.parquet")["failure_reason"].to_list() == ["2001: the first frame is 512 px wide"]


def test_the_summary_says_how_many_were_made_pending_and_how_many_were_sent(start_fake, tmp_path: Path) -> None:
    """Reported: with --max-spend reached the summary said "2 failed tasks sent again" while
    none was sent."""
    fake = start_fake(flaky_failures=5)
    night(fake, tmp_path, 1)
    prices = tmp_path / "prices.toml"
    prices.write_text('["bytedance/seedance-1.0-lite-t2v"]\n"480p" = 0.01\n"720p" = 0.02\n"1080p" = 0.03\n')
    capped, _, _ = night(fake, tmp_path, 2, "--retry-failed", "--prices", str(prices), "--max-spend", "0.001")
    assert len(fake.state.submissions()) == 4
    assert ("retry-failed: 2 failed tasks made pending again, 0 retries sent; not retried: 1 content policy"
            in capped.output)
    summary = json.loads((tmp_path / "night2.parquet.summary.json").read_text())
    assert summary["retry_failed"]["retried"] == 2 and summary["retry_failed"]["sent"] == 0
    sub, _, _ = night(fake, tmp_path, 3, "--retry-failed", "--retry-cap", "3")  # the 2 pending go out
    assert len(fake.state.submissions()) == 6
    # night 2 made the two pending; night 3 has nothing to reset, and sends them
    assert "retry-failed: 0 failed tasks made pending again, 2 retries sent" in sub.output, sub.output


def test_each_task_of_a_retried_request_has_its_own_x_request_id(start_fake, tmp_path: Path) -> None:
    """Reported: every task of a retried request went out with the same x-request-id, so the
    provider's support could not tell the attempts apart. Attempt n > 1 sends
    ``<request_id>.a<n>``: distinct, traceable to the ledger's row, nothing secret."""
    fake = start_fake(flaky_failures=5)
    _, _, rows = night(fake, tmp_path, 1)
    night(fake, tmp_path, 2, "--retry-failed", "--retry-cap", "3")
    night(fake, tmp_path, 3, "--retry-failed", "--retry-cap", "3")
    flaky = rows["flaky"]["request_id"]
    ids = [r.x_request_id for r in fake.state.submissions() if r.body["prompt"].startswith("FLAKYTASK")]
    assert ids == [flaky, f"{flaky}.a2", f"{flaky}.a3"]
    assert len({r.x_request_id for r in fake.state.submissions()}) == len(fake.state.submissions())


def test_a_retry_run_killed_mid_night_leaves_a_ledger_the_next_run_accepts(start_fake, tmp_path: Path) -> None:
    """Sibling of the lost first task: the run marker counted task ids in ``requests`` only,
    so a --retry-failed run killed after resetting rows (their task ids moved to the lineage)
    left a marker above the ledger's count, and the next night refused the ledger as one that
    lost writes. Killed with SIGKILL while its retries wait on a slow provider."""
    import subprocess
    import sys
    import time

    from conftest import subprocess_env

    fake = start_fake(flaky_failures=5)
    night(fake, tmp_path, 1)
    fake.state.config.latency = 30  # the retries wait on the provider
    state = tmp_path / "s.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch", "submit", str(tmp_path / "in.csv"), "-o", str(tmp_path / "k.parquet"),
         "--base-url", fake.url, "--state", str(state), "--rate", "0", "--no-preflight", "--retry-failed"],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as db:
                if db.execute("SELECT count(*) FROM requests WHERE status = 'sending'").fetchone()[0] == 2:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the retries were never claimed")
    finally:
        proc.kill()
        proc.wait()
    fake.state.config.latency = 0
    res = cli(["submit", str(tmp_path / "in.csv"), "-o", str(tmp_path / "n3.parquet"), "--base-url", fake.url,
               "--state", str(state), "--rate", "0", "--no-preflight"])
    assert "misses writes" not in res.output and res.exit_code in (0, 1), res.output
