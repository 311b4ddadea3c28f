"""Issue 18 review: hostile text and files an attacker reproduced after the first fixes.

Lone surrogate escapes in answers (valid JSON, not encodable text), an exception in one
request's handling, a planted hard link at a download name, the key in encodings the
scrubber missed, and planted ledger companions. Servers written here answer over real
HTTP on 127.0.0.1 through the real CLI.
"""

import json
import sqlite3
import time
from pathlib import Path

import polars as pl
import pytest
from aiohttp import web
from conftest import cli, results
from test_collect_hostile import rows_by_prompt, video
from test_hostile import ROUTE, collect, files_app, ok, submit

# -- a lone surrogate in an answer never bricks the table -------------------------------------

def surrogate_url(host: str, tid: str) -> list[dict]:
    # json.dumps writes the lone surrogate as the escape "\ud800": valid JSON, no valid UTF-8.
    return [{"url": f"http://{host}/files/{tid}\ud800", "type": "video", "format": "mp4\udfff"}]


def test_a_lone_surrogate_in_a_task_answer_costs_only_its_task(serve, tmp_path: Path) -> None:
    """Reported: collect exited 6 on every rerun (UnicodeEncodeError writing the table), a
    later submit crashed in entries_frame, and submit --wait --download wrote no table."""
    url = serve(files_app({"good": video(), "sur": video(), "resources:sur": surrogate_url}))
    rows = [{"prompt": "good"}, {"prompt": "sur"}]
    first = submit(url, tmp_path, rows, "--wait", "--download", str(tmp_path / "v"))
    assert "Traceback" not in first.output + first.stderr, first.output + first.stderr
    for _ in range(2):  # and every rerun
        res = collect(url, tmp_path, "--download", str(tmp_path / "v"))
        assert "Traceback" not in res.output + res.stderr, res.output + res.stderr
        assert res.exit_code in (0, 1), res.output + res.stderr
        by = rows_by_prompt(tmp_path / "r.parquet")
        assert by["good"]["local_paths"] and by["good"]["download_error"] is None
        assert by["sur"]["task_status"] == "success", {k: v for k, v in by["sur"].items() if v is not None}
        assert "\ufffd" in "".join(by["sur"]["resource_urls"] or []) + (by["sur"]["download_error"] or ""), by["sur"]
    again = submit(url, tmp_path, rows)
    assert again.exit_code == 0 and "Traceback" not in again.output + again.stderr, again.output + again.stderr
    assert sorted(results(tmp_path / "r.parquet")["prompt"]) == ["good", "sur"]


def test_a_lone_surrogate_in_a_refusal_records_it_failed_and_the_run_finishes(serve, tmp_path: Path) -> None:
    """Reported: the 2nd of 3 requests refused with HTTP 400 whose message held "\\ud800"
    hung the run (done 2 / 3, the 3rd never sent) and recorded a definite refusal unknown."""
    app = web.Application()
    seen: list[str] = []

    async def post(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        seen.append(prompt)
        if prompt == "refused":
            return web.json_response({"code": 400, "message": "bad \ud800 prompt"}, status=400)
        return ok({"task_id": f"t{len(seen)}"})

    app.router.add_post(ROUTE, post)
    url = serve(app)
    started = time.monotonic()
    res = submit(url, tmp_path, [{"prompt": "a"}, {"prompt": "refused"}, {"prompt": "c"}], "--concurrency", "1")
    assert time.monotonic() - started < 60
    assert "Traceback" not in res.output + res.stderr, res.output + res.stderr
    assert sorted(seen) == ["a", "c", "refused"]
    by = rows_by_prompt(tmp_path / "r.parquet")
    assert by["refused"]["status"] == "failed" and "\ufffd" in by["refused"]["error"], by["refused"]
    assert by["a"]["status"] == by["c"]["status"] == "submitted"


def test_an_old_ledger_holding_lone_surrogates_does_not_brick_the_table(serve, tmp_path: Path) -> None:
    """Ledgers written by an older version may already hold such values: reading them
    back, the table writer replaces them rather than failing every night."""
    url = serve(files_app({"good": video()}))
    assert submit(url, tmp_path, [{"prompt": "good"}, {"prompt": "old"}]).exit_code == 0
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        # An older version kept the URLs as JSON text, the lone surrogate as its escape.
        db.execute("UPDATE requests SET resource_urls = ?", ('["http://x/a.mp4\\ud800"]',))
    res = submit(url, tmp_path, [{"prompt": "good"}, {"prompt": "old"}])
    assert "Traceback" not in res.output + res.stderr, res.output + res.stderr
    assert res.exit_code == 0, res.output + res.stderr
    assert results(tmp_path / "r.parquet").height == 2


def test_entries_frame_wholes_the_json_escapes_an_older_ledger_stored() -> None:
    """The writer's own guard: ledger rows whose JSON lists hold a lone surrogate escape."""
    from batch.ledger import OUTCOME_COLUMNS
    from batch.results import entries_frame

    row = dict.fromkeys(OUTCOME_COLUMNS)
    row.update(request_id="r1", status="submitted", attempts=1,
               resource_urls='["http://x/a\\ud800.mp4"]', earlier_task_ids='["t\\udfff"]')
    frame = entries_frame([tuple(row[c] for c in OUTCOME_COLUMNS)])
    assert frame["resource_urls"].to_list() == [["http://x/a\ufffd.mp4"]]
    assert frame["earlier_task_ids"].to_list() == [["t\ufffd"]]


def test_an_unexpected_error_in_one_request_records_it_unknown_and_the_run_goes_on(
        serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any fault in one request's handling once it was marked (here injected after the
    answer came back: no HTTP shape reaches it any more) records that request ``unknown``
    with the error, and the other requests are still sent; the run never waits forever."""
    from batch.sending import Submitter

    app = web.Application()
    seen: list[str] = []

    async def post(request: web.Request) -> web.Response:
        seen.append((await request.json())["prompt"])
        return ok({"task_id": f"t{len(seen)}", "get_result": {"url": "boom"}})

    real = Submitter._poll_url

    def poll_url(self: Submitter, verdict: object) -> str | None:
        if verdict.task_id == "t2":  # type: ignore[attr-defined]
            raise RuntimeError("injected fault")
        return real(self, verdict)  # type: ignore[arg-type]

    monkeypatch.setattr(Submitter, "_poll_url", poll_url)
    app.router.add_post(ROUTE, post)
    url = serve(app)
    res = submit(url, tmp_path, [{"prompt": p} for p in "abcd"], "--concurrency", "1")
    assert "Traceback" not in res.output + res.stderr, res.output + res.stderr
    assert sorted(seen) == list("abcd")
    statuses = results(tmp_path / "r.parquet")["status"].to_list()
    assert sorted(statuses) == ["submitted", "submitted", "submitted", "unknown"], statuses
    row = results(tmp_path / "r.parquet").filter(pl.col("status") == "unknown").row(0, named=True)
    assert "injected fault" in row["error"], row


# -- a planted name beside a video is never taken for, nor written through as, its poster ----

@pytest.mark.parametrize("planted", ["poster_hardlink", "poster_symlink", "tmp_symlink"])
def test_a_planted_poster_name_is_neither_trusted_nor_written_through(tmp_path: Path, planted: str) -> None:
    import os

    from batch.page import POSTER_SUFFIX, Posters
    from batch.poster import tiny_clip

    video = tmp_path / "v.mp4"
    video.write_bytes(tiny_clip((10, 200, 30)))
    target = tmp_path / "elsewhere.jpg"
    target.write_bytes(b"precious")
    poster = tmp_path / f"v.mp4{POSTER_SUFFIX}"
    if planted == "poster_hardlink":
        os.link(target, poster)
    elif planted == "poster_symlink":
        poster.symlink_to(target)
    else:
        (tmp_path / f".{poster.name}.tmp-{os.getpid()}").symlink_to(target)
    os.utime(target, (time.time() + 60, time.time() + 60))  # "newer than the video"
    found, why = Posters().of(str(video))
    assert why is None and found == poster
    assert target.read_bytes() == b"precious"
    assert not poster.is_symlink() and poster.stat().st_nlink == 1
    assert poster.read_bytes()[:2] == b"\xff\xd8"  # our JPEG


# -- the key in base64 after a prefix (Basic-auth style) and in hex ---------------------------

def test_the_scrubber_finds_the_key_base64_at_every_alignment_and_in_hex() -> None:
    import base64

    from conftest import KEY

    from batch.client import Secret

    secret = Secret(KEY)
    raw = KEY.encode()
    forms = [raw.hex(), raw.hex().upper()]
    for prefix in (b"", b"u:", b"Bearer ", b"x", b"ab", b"abc:"):
        for suffix in (b"", b"!", b":xy"):
            for enc in (base64.b64encode, base64.urlsafe_b64encode):
                forms.append(enc(prefix + raw + suffix).decode())
    for form in forms:
        text = f"Authorization: Basic {form} (echoed)"
        out = secret.scrub(text)
        assert "***" in out, form
        # What is left of the form cannot hold 6 consecutive key characters' worth of it.
        assert form not in out, form
    assert secret.scrub("plain text, no key: sk-test-0123 deadbeef") == "plain text, no key: sk-test-0123 deadbeef"


def test_a_key_hex_or_base64_in_a_task_answer_never_reaches_an_output(serve, tmp_path: Path) -> None:
    import base64

    from conftest import KEY
    from test_collect_hostile import haystack

    raw = KEY.encode()
    forms = [raw.hex(), raw.hex().upper(), base64.b64encode(b"u:" + raw).decode(),
             base64.b64encode(b"Bearer " + raw).decode(), base64.urlsafe_b64encode(b"x" + raw).decode()]
    app = web.Application()

    async def post(request: web.Request) -> web.Response:
        i = int((await request.json())["prompt"][1:])
        return ok({"task_id": forms[i] if i < 2 else f"t{i}"})

    async def task(request: web.Request) -> web.Response:
        tid = request.match_info["tid"]
        return ok({"status": "failed", "task_id": tid, "error": {"code": 7, "message": f"key {forms[int(tid[1:])]}"}})

    app.router.add_post(ROUTE, post)
    app.router.add_get("/api/v1/tasks/{tid}", task)
    url = serve(app)
    sub = submit(url, tmp_path, [{"prompt": f"p{i}"} for i in range(len(forms))], "--log-level", "debug")
    col = collect(url, tmp_path, "--log-level", "debug")
    text = haystack(tmp_path, *(r.output + r.stderr for r in (sub, col)))
    for form in forms:
        assert form not in text, form


# -- task ids only the table holds are adopted before a run sends or rewrites it -------------

@pytest.mark.parametrize("ledger_has", ["sending", "unknown", "missing"])
def test_task_ids_only_the_table_holds_survive_the_rerun(fake, tmp_path: Path, ledger_has: str) -> None:
    """Reported: after the ledger disk filled (exit 6: the ids are in the table, the rescue
    file could not be written), the rerun rewrote the table with those rows unknown and an
    empty task_id: the only copy of 4 paid task ids wiped. Here the ledger is left as that
    run left it: the outcomes of 3 requests never committed."""
    from conftest import prompts, submit_args, write_csv

    path = write_csv(tmp_path / "in.csv", prompts(6))
    assert cli(submit_args(fake, tmp_path, path, out="r.csv")).exit_code == 0
    table = results(tmp_path / "r.csv")
    lost = dict(zip(table["request_id"][:3], table["task_id"][:3], strict=True))
    with sqlite3.connect(tmp_path / "state.sqlite") as db:
        marks = ",".join("?" * len(lost))
        if ledger_has == "missing":
            db.execute(f"DELETE FROM requests WHERE request_id IN ({marks})", list(lost))
        else:
            db.execute(f"UPDATE requests SET status = ?, task_id = NULL, submitted_at = NULL "
                       f"WHERE request_id IN ({marks})", [ledger_has, *lost])
    # The broken run's marker counted only the task ids it committed.
    mark = tmp_path / "state.sqlite.runmark"
    mark.write_text(json.dumps({**json.loads(mark.read_text()), "task_ids": 3}))
    res = cli(submit_args(fake, tmp_path, path, out="r.csv"))
    assert res.exit_code == 0, res.output
    assert len(fake.state.submissions()) == 6  # nothing paid twice
    after = {r["request_id"]: r for r in results(tmp_path / "r.csv").iter_rows(named=True)}
    for rid, tid in lost.items():
        assert after[rid]["task_id"] == tid and after[rid]["status"] == "skipped", after[rid]
    with sqlite3.connect(tmp_path / "state.sqlite") as db:
        kept = dict(db.execute(f"SELECT request_id, task_id FROM requests WHERE status = 'submitted' "
                               f"AND request_id IN ({marks})", list(lost)).fetchall())
    assert kept == lost


# -- an encoding this machine cannot unpack is refused at once, not retried -------------------

@pytest.mark.parametrize("encoding", ["br", "zstd"])
def test_a_compression_this_machine_cannot_unpack_is_refused_at_once(serve, tmp_path: Path, encoding: str) -> None:
    from aiohttp import compression_utils

    if getattr(compression_utils, {"br": "HAS_BROTLI", "zstd": "HAS_ZSTD"}[encoding]):
        pytest.skip(f"aiohttp unpacks {encoding} here")
    asked: list[int] = []

    async def packed(request: web.Request) -> web.Response:
        asked.append(1)
        return web.Response(body=b"packed bytes?", headers={"Content-Encoding": encoding})

    url = serve(files_app({"z": packed}))
    submit(url, tmp_path, [{"prompt": "z"}])
    res = collect(url, tmp_path, "--download", str(tmp_path / "v"))
    assert "Traceback" not in res.output + res.stderr, res.output + res.stderr
    assert res.exit_code == 1
    assert "Content-Encoding we do not unpack" in results(tmp_path / "r.parquet")["download_error"][0]
    assert len(asked) == 1 and list((tmp_path / "v").iterdir()) == []


def test_a_location_with_bytes_that_are_not_utf8_costs_only_its_task(serve, tmp_path: Path) -> None:
    """Sibling: header values reach Python with undecodable bytes as lone surrogates
    (aiohttp decodes them with surrogateescape); the error that quotes one is stored."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]

    def raw_redirects() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://[bad\xff\xfe/x.mp4\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")

    threading.Thread(target=raw_redirects, daemon=True).start()

    async def to_raw(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": f"http://127.0.0.1:{port}/x.mp4"})

    try:
        url = serve(files_app({"good": video(), "raw": to_raw}))
        submit(url, tmp_path, [{"prompt": "good"}, {"prompt": "raw"}])
        for _ in range(2):
            res = collect(url, tmp_path, "--download", str(tmp_path / "v"))
            assert "Traceback" not in res.output + res.stderr, res.output + res.stderr
            assert res.exit_code == 1, res.output + res.stderr
            by = rows_by_prompt(tmp_path / "r.parquet")
            assert by["good"]["local_paths"] and by["raw"]["download_error"], by["raw"]
            assert "not a usable URL" in by["raw"]["download_error"], by["raw"]["download_error"]
    finally:
        listener.close()
