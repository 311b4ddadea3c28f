"""--notify: one message through Apprise to a receiver on 127.0.0.1, at the end of submit and
collect and on a fatal exit; a failing notification never changes the exit code; no secret
is ever in a message."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import KEY, cli, prompts, submit_args, write_csv

from batch import logs, notify


class Receiver:
    """A webhook on 127.0.0.1 that keeps what Apprise's json:// posts to it."""

    def __init__(self, status: int = 200) -> None:
        self.messages: list[dict[str, Any]] = []
        self.status = status
        self.app = web.Application()
        self.app.router.add_post("/hook", self.hook)

    async def hook(self, request: web.Request) -> web.Response:
        self.messages.append(json.loads(await request.read()))
        return web.json_response({"ok": self.status == 200}, status=self.status)


@pytest.fixture
def receiver(serve) -> tuple[Receiver, str]:
    rec = Receiver()
    url = serve(rec.app)
    return rec, url.replace("http://", "json://") + "/hook"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_success_sends_one_message(fake, receiver, tmp_path: Path) -> None:
    rec, url = receiver
    inp = write_csv(tmp_path / "in.csv", prompts(3))
    res = cli(submit_args(fake, tmp_path, inp, extra=["--notify", url]))
    assert res.exit_code == 0, res.output
    assert len(rec.messages) == 1
    msg = rec.messages[0]
    assert msg["title"] == "seedance-batch submit: exit 0 (everything OK)" and msg["type"] == "success"
    body = msg["message"]
    assert "exit code 0" in body and "requests: 3 (3 submitted)" in body
    assert f"results: {tmp_path / 'results.parquet'}" in body
    assert KEY not in json.dumps(msg)


def test_fatal_402_on_submit_sends_one_message_with_the_exit_code(start_fake, receiver, tmp_path: Path) -> None:
    rec, url = receiver
    fake = start_fake(faults=["402"])
    inp = write_csv(tmp_path / "in.csv", prompts(5))
    res = cli(submit_args(fake, tmp_path, inp, extra=["--notify", url, "--no-preflight"]))
    assert res.exit_code == 5, res.output
    assert len(rec.messages) == 1
    msg = rec.messages[0]
    assert msg["title"].startswith("seedance-batch submit: exit 5 (the provider refused the night)")
    assert msg["type"] == "failure" and "402" in msg["message"]
    assert KEY not in json.dumps(msg)


def test_fatal_exit_before_sending_is_told_too(fake, receiver, tmp_path: Path) -> None:
    rec, url = receiver
    res = cli(submit_args(fake, tmp_path, tmp_path / "missing.csv", extra=["--notify", url]))
    assert res.exit_code == 2
    assert len(rec.messages) == 1
    assert rec.messages[0]["title"].startswith("seedance-batch submit: exit 2")
    assert "missing.csv" in rec.messages[0]["message"]


def test_collect_tells_tasks_and_where_the_page_is(fake, receiver, tmp_path: Path) -> None:
    rec, url = receiver
    inp = write_csv(tmp_path / "in.csv", prompts(2))
    assert cli(submit_args(fake, tmp_path, inp)).exit_code == 0
    assert rec.messages == []  # no --notify: no message
    res = cli(["collect", "--state", str(tmp_path / "state.sqlite"), "--base-url", fake.url, "--rate", "0",
               "--results", str(tmp_path / "results.parquet"), "--download", str(tmp_path / "videos"),
               "--notify", url])
    assert res.exit_code == 0, res.output
    assert len(rec.messages) == 1
    body = rec.messages[0]["message"]
    assert rec.messages[0]["title"] == "seedance-batch collect: exit 0 (everything OK)"
    assert "tasks: 2 success" in body and "downloaded: 2" in body
    assert "estimated spend: 10.0 s of video (no price table)" in body  # 2 x the model's default 5 s
    assert f"page: {tmp_path / 'results.html'}" in body and (tmp_path / "results.html").exists()


@pytest.mark.parametrize("where", ["closed port", "answers 500"])
def test_a_failing_notification_never_changes_the_exit_code(fake, serve, tmp_path: Path, where: str) -> None:
    if where == "closed port":
        url = f"json://127.0.0.1:{closed_port()}/hook"
    else:
        rec = Receiver(status=500)
        url = serve(rec.app).replace("http://", "json://") + "/hook"
    inp = write_csv(tmp_path / "in.csv", prompts(2))
    res = cli(submit_args(fake, tmp_path, inp, extra=["--notify", url]))
    assert res.exit_code == 0, res.output
    failed = [json.loads(line) for line in res.output.splitlines() if '"notify_failed"' in line]
    assert len(failed) == 1 and failed[0]["level"] == "warning" and failed[0]["to"] == "json://127.0.0.1"
    assert "Traceback" not in res.output


def test_a_bad_notify_url_is_a_usage_error_before_anything_is_sent(fake, tmp_path: Path) -> None:
    inp = write_csv(tmp_path / "in.csv", prompts(2))
    res = cli(submit_args(fake, tmp_path, inp, extra=["--notify", "nosuchscheme://x"]))
    assert res.exit_code == 2
    assert "--notify nosuchscheme://***: not a notification URL Apprise knows" in res.output
    assert fake.state.submissions() == []


def test_job_file_notify(fake, receiver, tmp_path: Path) -> None:
    rec, url = receiver
    write_csv(tmp_path / "in.csv", prompts(2))
    job = tmp_path / "night.toml"
    job.write_text(f'inputs = ["in.csv"]\noutput = "out.parquet"\nstate = "s.sqlite"\nbase_url = "{fake.url}"\n'
                   f'rate = "0"\nnotify = ["{url}"]\n')
    res = cli(["run", str(job)])
    assert res.exit_code == 0, res.output
    assert len(rec.messages) == 1 and rec.messages[0]["title"].startswith(f"seedance-batch run {job}: exit 0")


def test_no_secret_reaches_the_receiver(receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    rec, url = receiver
    monkeypatch.setenv("PGPASSWORD", "pg-Secret-Pass-42")
    monkeypatch.setenv("DATABASE_URL", "postgresql://nightly:db%2Fpass-77@db.internal:5432/videos")
    logs.configure("warning", secrets=[KEY])
    error = (f"HTTP 401 for key {KEY}; proxy http://corp-user:proxy-pass-99@proxy.corp:3128 refused; "
             "Authorization: Bearer abc.def.ghi; connect to postgresql://nightly:db/pass-77@db.internal failed "
             "(password pg-Secret-Pass-42)")
    notify.arm([url], "submit", notify.url_secrets("http://corp-user:proxy-pass-99@proxy.corp:3128"))
    notify.fatal(5, error)
    notify.fatal(5, "a second fatal call sends nothing")
    assert len(rec.messages) == 1
    sent = json.dumps(rec.messages[0])
    for secret in (KEY, "proxy-pass-99", "corp-user", "abc.def.ghi", "db/pass-77", "db%2Fpass-77", "pg-Secret-Pass-42"):
        assert secret not in sent, secret
    assert "HTTP 401" in sent and "proxy.corp:3128" in sent  # the rest of the story stays


def test_the_working_directory_is_not_a_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The shell's PWD/OLDPWD are paths, not passwords: masking them blanked every path under
    $HOME in messages. Variables whose names say password still are masked."""
    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("OLDPWD", str(tmp_path.parent))
    monkeypatch.setenv("PGPASSWORD", "pg-Secret-Pass-42")
    monkeypatch.setenv("DB_PASSWD", "db-passwd-value-7")
    monkeypatch.setenv("PASSWORD", "plain-password-9")
    monkeypatch.setenv("MYSQL_PWD", "mysql-pwd-value-3")
    _, body = notify.compose("collect", 0, {"results": str(tmp_path / "results.parquet")}, None,
                             "pg-Secret-Pass-42 db-passwd-value-7 plain-password-9 mysql-pwd-value-3")
    text = notify.scrub(body)
    assert f"results: {tmp_path / 'results.parquet'}" in text
    for secret in ("pg-Secret-Pass-42", "db-passwd-value-7", "plain-password-9", "mysql-pwd-value-3"):
        assert secret not in text, secret
    assert text.count("***") == 4


def collect_args(fake, tmp_path: Path, url: str) -> list[str]:
    return ["collect", "--state", str(tmp_path / "state.sqlite"), "--base-url", fake.url, "--rate", "0",
            "--results", str(tmp_path / "results.parquet"), "--download", str(tmp_path / "videos"),
            "--notify", url, "--no-html"]


def test_a_second_collect_still_counts_the_tables_failed_tasks(fake, receiver, tmp_path: Path) -> None:
    """Terminal tasks are not followed again; a second collect exited 0 and said "everything OK"
    while the table held a failed task (README: collect exits 1 when some task is not success)."""
    rec, url = receiver
    inp = write_csv(tmp_path / "in.csv", [*prompts(2), {"prompt": "FAILTASK a fox"}])
    assert cli(submit_args(fake, tmp_path, inp)).exit_code == 0
    first = cli(collect_args(fake, tmp_path, url))
    second = cli(collect_args(fake, tmp_path, url))
    assert (first.exit_code, second.exit_code) == (1, 1), second.output
    assert len(rec.messages) == 2
    for msg in rec.messages:
        assert msg["title"] == "seedance-batch collect: exit 1 (finished, but some requests or tasks are not OK)"
        assert "tasks in the results table: 1 failed, 2 success" in msg["message"]
    assert "1 failed, 2 success" in second.output
    # A table whose every task succeeded and was downloaded is still exit 0 on a later pass.
    ok = tmp_path / "ok"
    ok.mkdir()
    assert cli(submit_args(fake, ok, write_csv(ok / "in.csv", prompts(2)))).exit_code == 0
    assert [cli(collect_args(fake, ok, url)).exit_code for _ in range(2)] == [0, 0]


def test_without_download_a_successful_table_is_ok_on_every_pass(fake, receiver, tmp_path: Path) -> None:
    """The table's tasks need their files only when --download is given."""
    _rec, url = receiver
    inp = write_csv(tmp_path / "in.csv", prompts(2))
    assert cli(submit_args(fake, tmp_path, inp)).exit_code == 0
    without = ["collect", "--state", str(tmp_path / "state.sqlite"), "--base-url", fake.url, "--rate", "0",
               "--results", str(tmp_path / "results.parquet"), "--notify", url]
    assert [cli(without).exit_code for _ in range(2)] == [0, 0]
    assert cli(collect_args(fake, tmp_path, url)).exit_code == 0  # downloads the two successful tasks


def test_collect_tells_the_top_failure_reasons(fake, receiver, tmp_path: Path) -> None:
    rec, url = receiver
    inp = write_csv(tmp_path / "in.csv", [*prompts(1), {"prompt": "FAILTASK a fox"}, {"prompt": "FAILTASK a cat"}])
    assert cli(submit_args(fake, tmp_path, inp)).exit_code == 0
    for _ in range(2):
        assert cli(collect_args(fake, tmp_path, url)).exit_code == 1
    for msg in rec.messages:
        assert "top errors:\n  2 x failed: 400: Content Moderation: the prompt was rejected" in msg["message"]


def test_submit_tells_the_spend_as_the_summary_does(fake, receiver, tmp_path: Path) -> None:
    """The spend line was a raw Python dict, and absent without prices."""
    rec, url = receiver
    inp = write_csv(tmp_path / "in.csv", prompts(3))
    prices = tmp_path / "prices.toml"
    prices.write_text('["bytedance/seedance-1.0-lite-t2v"]\n"480p" = 0.02\n"720p" = 0.08\n"1080p" = 0.16\n')
    res = cli(submit_args(fake, tmp_path, inp, extra=["--notify", url, "--prices", str(prices)]))
    assert res.exit_code == 0, res.output
    # 3 videos of the model's default 5 s at 720p, 0.08 USD/s, at the flex share of that (the default tier).
    line = next(x for x in res.output.splitlines() if "spend, night of" in x).strip()
    assert line.endswith(": 0.60 USD estimated (0.60 by this run, 0.00 by earlier runs)")
    body = rec.messages[0]["message"]
    assert line in body and "{" not in body and "15.0 s of video" in body
    unpriced = tmp_path / "unpriced"
    unpriced.mkdir()
    res = cli(submit_args(fake, unpriced, write_csv(unpriced / "in.csv", prompts(2, "Another night")),
                          extra=["--notify", url]))
    assert res.exit_code == 0, res.output
    assert "estimated spend: 10.0 s of video (no price table)" in rec.messages[1]["message"]


def test_collect_takes_prices_for_the_page_and_the_message(fake, receiver, tmp_path: Path) -> None:
    """The page said "give --prices FILE for USD" but collect had no --prices."""
    rec, url = receiver
    inp = write_csv(tmp_path / "in.csv", prompts(2))
    assert cli(submit_args(fake, tmp_path, inp)).exit_code == 0
    prices = tmp_path / "prices.toml"
    prices.write_text('["bytedance/seedance-1.0-lite-t2v"]\n"480p" = 0.02\n"720p" = 0.08\n"1080p" = 0.16\n')
    res = cli([*collect_args(fake, tmp_path, url)[:-1], "--prices", str(prices)])  # with the page
    assert res.exit_code == 0, res.output
    # 2 videos of 5 s at 720p, 0.08 USD/s at the flex share (the default tier).
    assert "estimated spend: 0.40 USD (10.0 s of video)" in rec.messages[0]["message"]
    page = (tmp_path / "results.html").read_text()
    assert "0.40" in page and "--prices FILE" not in page
    bad = tmp_path / "bad.toml"
    bad.write_text("not toml [")
    res = cli([*collect_args(fake, tmp_path, url)[:-1], "--prices", str(bad)])
    assert res.exit_code == 2 and "bad.toml" in res.output


def test_a_database_user_name_is_not_a_secret(receiver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """README's own example ledger user is `batch`: masking it turned the title into
    "seedance-*** submit", a results path into ".../***-results/...", and libpq's "password
    authentication failed" lost its words. A database URL's password still is a secret."""
    rec, url = receiver
    monkeypatch.setenv("SEEDANCE_BATCH_STATE", "postgresql://batch:Db-Pass-4242@127.0.0.1:5/seedance?ledger=x")
    table = tmp_path / "batch-results" / "o.parquet"
    notify.arm([url], "submit", [])
    notify.fatal(2, 'cannot use the ledger: password authentication failed for user "batch" (Db-Pass-4242); '
                    f"results: {table}")
    sent = rec.messages[0]
    assert sent["title"].startswith("seedance-batch submit: exit 2"), sent["title"]
    assert str(table) in sent["message"] and 'password authentication failed for user "batch"' in sent["message"]
    assert "Db-Pass-4242" not in json.dumps(sent)
