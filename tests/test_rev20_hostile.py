"""Issue 20 under a fresh-eyes attack: what a hostile provider's task answers and a hostile
sheet did to the new features (expiry, retry classification, local images), over real HTTP
on 127.0.0.1 through the real CLI."""

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from conftest import cli, results, write_csv

ROUTE = "/{tail:.*}"


def tasks_app(answers: dict[str, Callable[[str, str], dict]], seen: list[dict]) -> web.Application:
    """Every submission accepted as ``<prompt>-<n>``; a task's answer (``data``) is
    ``answers[prompt](host, task_id)``; every submission body is kept in ``seen``."""
    app = web.Application()
    counter = iter(range(10_000))

    async def post(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        return web.json_response({"code": 0, "message": "success",
                                  "data": {"task_id": f"{body['prompt']}-{next(counter)}", "status": "pending"}})

    async def task(request: web.Request) -> web.Response:
        tid = request.match_info["tid"]
        data = {"task_id": tid, **answers[tid.rsplit("-", 1)[0]](request.host, tid)}
        return web.Response(text=json.dumps(data and {"code": 0, "message": "success", "data": data}),
                            content_type="application/json")

    async def files(request: web.Request) -> web.Response:
        return web.Response(body=b"\x00\x00\x00\x18ftypmp42" + b"\0" * 64, content_type="video/mp4")

    app.router.add_get("/api/v1/tasks/{tid}", task)
    app.router.add_get("/files/{tid}", files)
    app.router.add_post(ROUTE, post)
    return app


def submit(url: str, tmp_path: Path, rows: list[dict], *extra: str):
    path = write_csv(tmp_path / "in.csv", rows)
    return cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--base-url", url, "--state",
                str(tmp_path / "s.sqlite"), "--rate", "0", "--max-attempts", "2", *extra])


def collect(url: str, tmp_path: Path, *extra: str):
    return cli(["collect", "--state", str(tmp_path / "s.sqlite"), "--base-url", url, "--rate", "0",
                "--results", str(tmp_path / "r.parquet"), *extra])


def success(expires: object) -> Callable[[str, str], dict]:
    def answer(host: str, tid: str) -> dict:
        return {"status": "success", "result_expires_at": expires,
                "result": {"resources": [{"url": f"http://{host}/files/{tid}", "type": "video", "format": "mp4"}]}}
    return answer


# -- item 3: an expiry no clock can hold is "unknown expiry", never a task stuck pending ----

def test_an_overflowing_or_absurd_expiry_is_ignored_and_the_video_downloaded(serve, tmp_path: Path) -> None:
    answers = {"huge": success(10 ** 400), "neg": success(-(10 ** 400)), "inf": success(1e308 * 10),
               "text": success("9" * 64), "year": success("99999-01-01T00:00:00"), "list": success([1, 2]),
               "fine": success(None)}
    url = serve(tasks_app(answers, []))
    assert submit(url, tmp_path, [{"prompt": p} for p in answers]).exit_code == 0
    res = collect(url, tmp_path, "--download", str(tmp_path / "v"))
    assert "Traceback" not in res.output + res.stderr
    assert res.exit_code == 0, res.output + res.stderr
    table = results(tmp_path / "r.parquet")
    assert table["task_status"].to_list() == ["success"] * len(answers), table
    assert table["local_paths"].null_count() == 0
    assert "task_error" not in res.stderr
    assert res.stderr.count("result_expires_at_ignored") == len(answers) - 1  # "fine" states none
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        assert db.execute("SELECT count(*) FROM task_expiry").fetchone() == (0,)


# -- item 4: a content-policy failure is never retried, however long the provider's words --

def failed(**fields: object) -> Callable[[str, str], dict]:
    return lambda host, tid: {"status": "failed", **fields}


def test_a_long_reason_never_pushes_content_policy_out_of_the_classification(serve, tmp_path: Path) -> None:
    noise = "Internal server error, please try again later. " + "detail " * 80  # retryable words, 600 chars
    answers = {
        "blocked": failed(error={"code": "InternalError", "message": noise},
                          failure_reason="The output was blocked by the content policy"),
        "blocked-code": failed(error={"code": "OutputSensitive", "message": noise}, message=noise),
        "blocked-msg": failed(error={"code": "Timeout", "message": noise + " moderation rejected the video"}),
        "flaky": failed(error={"code": "InternalError", "message": noise}),
    }
    seen: list[dict] = []
    url = serve(tasks_app(answers, seen))
    rows = [{"prompt": p} for p in answers]
    assert submit(url, tmp_path, rows).exit_code == 0
    collect(url, tmp_path)
    table = results(tmp_path / "r.parquet")
    assert all(len(r) <= 300 for r in table["failure_reason"].to_list())  # truncated for storage only
    res = submit(url, tmp_path, rows, "--retry-failed")
    assert "Traceback" not in res.output + res.stderr
    assert [b["prompt"] for b in seen] == [*answers, "flaky"], seen  # only the provider's own failure is paid again
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        lineage = dict(db.execute("SELECT r.prompt_text, l.failure_class FROM task_lineage l "
                                  "JOIN (SELECT request_id, json_extract(body, '$.prompt') AS prompt_text "
                                  "FROM requests) r USING (request_id)").fetchall())
    assert lineage == {"flaky": "retryable"}


# -- item 1: a cell no file system call can take costs its row, never the night ------------

I2V = "bytedance/seedance-2.0-fast-i2v"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR"


def test_a_nul_byte_in_an_image_cell_makes_its_row_invalid_and_the_night_goes_on(fake, tmp_path: Path) -> None:
    sheet_dir = tmp_path / "sheet"
    sheet_dir.mkdir()
    rows = []
    for i in range(40):
        (sheet_dir / f"c{i}.png").write_bytes(PNG + bytes([i]) * 32)  # 40 contents: 40 uploads
        rows.append({"prompt": f"frame {i}", "first_frame_image": f"c{i}.png"})
    rows[25]["first_frame_image"] = "file:///x%00.png"
    rows[30]["first_frame_image"] = "c30%00.png"  # a name with an escaped NUL: a plain missing file
    sheet = write_csv(sheet_dir / "in.csv", rows)
    args = [str(sheet), "--state", str(tmp_path / "s.sqlite"), "--model", I2V]
    res = cli(["submit", *args, "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url, "--rate", "0",
               "--no-preflight"])
    assert "Traceback" not in res.output + res.stderr
    assert res.exit_code == 1, res.output + res.stderr  # an invalid row, nothing lost
    table = results(tmp_path / "r.parquet")
    statuses = dict(zip(table["prompt"], table["status"], strict=True))
    assert statuses.pop("frame 25") == "invalid" and statuses.pop("frame 30") == "invalid"
    assert set(statuses.values()) == {"submitted"} and len(statuses) == 38
    bad = table.filter(table["prompt"] == "frame 25").row(0, named=True)
    assert "first_frame_image" in bad["error"] and "x%00.png" in bad["error"] and "cell" in bad["error"]
    assert len(fake.state.submissions()) == 38
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        recorded = {url for (url,) in db.execute("SELECT url FROM uploads")}
        assert db.execute("SELECT count(*) FROM requests WHERE status = 'sending'").fetchone() == (0,)
    assert {r.body["first_frame_image"] for r in fake.state.submissions()} <= recorded  # every URL used is recorded
    # validate and a rerun read the same cell the same way
    val = cli(["validate", str(sheet), "--model", I2V])
    assert "Traceback" not in val.output + val.stderr and "x%00.png" in val.output + val.stderr
    again = cli(["submit", *args, "-o", str(tmp_path / "r2.parquet"), "--base-url", fake.url, "--rate", "0",
                 "--no-preflight"])
    assert again.exit_code == 1 and len(fake.state.submissions()) == 38


def test_check_survives_every_error_a_path_can_raise(tmp_path: Path) -> None:
    from batch.upload import LocalImages
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "long.png").write_bytes(PNG)
    images = LocalImages()
    for cell in ["a\x00b.png", "file:///x%00.png", "loop/x.png", "x" * 300 + ".png", ("d/" * 300) + "x.png",
                 "loop"]:
        verdict = images.check(cell, tmp_path)
        assert isinstance(verdict, str), cell  # a reason, never an exception


def test_when_expanding_raises_mid_night_every_accepted_task_is_still_recorded(serve, tmp_path: Path) -> None:
    """The producer side: an exception from the request generator (any bug while a row is
    expanded) stops feeding, but the requests in flight get their answers recorded; the
    run then fails with the error. Nothing the provider accepted is left ``sending``."""
    import asyncio

    import pytest
    from conftest import KEY, prompts

    from batch.api import api_identity
    from batch.client import Secret
    from batch.expand import Expander, ExpandSpec
    from batch.ledger import AsyncLedger, Ledger, create_ledger
    from batch.load import load_table
    from batch.ratelimit import SmoothLimiter
    from batch.sending import SubmitConfig, Submitter

    accepted: list[str] = []

    async def slow_accept(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(0.4)  # long enough to be on the wire when the generator breaks
        accepted.append(body["prompt"])
        return web.json_response({"code": 0, "message": "success",
                                  "data": {"task_id": f"t-{len(accepted)}", "status": "pending"}})

    app = web.Application()
    app.router.add_post(ROUTE, slow_accept)
    url = serve(app)
    state = tmp_path / "s.sqlite"
    create_ledger(state)
    all_requests = list(Expander([load_table(write_csv(tmp_path / "in.csv", prompts(300)))], ExpandSpec()))

    def feed():
        yield from all_requests[:270]  # past the producer's first chunk of 256
        raise ValueError("embedded null byte")  # as os.stat raised for a NUL in a cell

    async def night() -> Submitter:
        ledger = Ledger(state, api_identity(url))
        submitter = Submitter(SubmitConfig(url, Secret(KEY), rate=None, concurrency=8), AsyncLedger(ledger),
                              "night", limiter=SmoothLimiter(None))
        try:
            with pytest.raises(ValueError, match="embedded null byte"):
                await submitter.run(feed())
        finally:
            await submitter.ledger.close()
            ledger.close()
        return submitter

    submitter = asyncio.run(night())
    with sqlite3.connect(state) as db:
        rows = dict(db.execute("SELECT json_extract(body, '$.prompt'), status FROM requests").fetchall())
        tasks = {tid for (tid,) in db.execute("SELECT task_id FROM requests WHERE task_id IS NOT NULL")}
    assert accepted, "nothing was in flight: the test proves nothing"
    assert [p for p, s in rows.items() if s == "sending"] == []
    assert {rows[p] for p in accepted} == {"submitted"} and len(tasks) == len(accepted)
    assert submitter.stats.counts["submitted"] == len(accepted)


# -- item 2: a directory swapped for a symlink mid-check never lets outside bytes in -------

def _exchanger() -> Callable[[Path, Path], None]:
    """An atomic swap of two names: renameat2(RENAME_EXCHANGE) when libc has it, else a
    rename loop (two steps, the same race from the reader's side)."""
    import ctypes
    import ctypes.util
    import os

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        def swap(a: Path, b: Path) -> None:
            fn(-100, bytes(a), -100, bytes(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
        return swap

    def swap_by_rename(a: Path, b: Path) -> None:
        tmp = a.with_name(".swap")
        os.rename(a, tmp)
        os.rename(b, a)
        os.rename(tmp, b)
    return swap_by_rename


def test_a_directory_swapped_for_a_symlink_never_yields_an_outside_file(tmp_path: Path) -> None:
    import hashlib
    import threading
    import time

    from batch.upload import LocalImage, LocalImages, read_checked

    sheet, outside = tmp_path / "sheet", tmp_path / "outside"
    (sheet / "imgs").mkdir(parents=True)
    outside.mkdir()
    (sheet / "imgs" / "a.png").write_bytes(PNG + b"inside")
    (outside / "a.png").write_bytes(PNG + b"OUTSIDE SECRET")
    (sheet / "link").symlink_to(outside)
    secret = hashlib.sha256(PNG + b"OUTSIDE SECRET").hexdigest()
    swap, stop = _exchanger(), threading.Event()

    def flip() -> None:
        while not stop.is_set():
            swap(sheet / "imgs", sheet / "link")

    thread = threading.Thread(target=flip, daemon=True)
    thread.start()
    seen: dict[str, int] = {}
    try:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            found = LocalImages().check("imgs/a.png", sheet)  # a fresh cache: every check reads
            data, direct = read_checked(str(sheet / "imgs" / "a.png"), str(sheet.resolve()))
            for verdict in (found, direct):
                key = verdict.sha256 if isinstance(verdict, LocalImage) else "refused"
                seen[key] = seen.get(key, 0) + 1
            assert data is None or b"OUTSIDE" not in data
    finally:
        stop.set()
        thread.join()
    assert secret not in seen, seen  # the outside file was never accepted
    assert seen.get("refused") and len(seen) >= 2, seen  # the race ran: both outcomes were seen
