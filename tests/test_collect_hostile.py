"""Issue 18, items 7, 8, 9 and 11: hostile download answers against collect.

Servers written here answer as an attacker (or a broken CDN) would: output URLs and
redirects that do not parse, compressed and bomb answers, redirects carrying the key;
and a shell on the cron box plants symlinks in the download directory. Everything goes
over real HTTP on 127.0.0.1 through the real CLI; after each run every file under
``tmp_path`` and every output is searched for the key in every form.
"""

import base64
import gzip
import hashlib
import os
from pathlib import Path
from urllib.parse import quote, quote_plus

import polars as pl
import pytest
from aiohttp import web
from conftest import KEY, cli, results, write_csv
from test_hostile import collect, files_app, submit

from batch.client import Secret
from batch.ratelimit import SharedBudget


def video(body: bytes = b"video bytes") -> object:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body)
    return handler


def rows_by_prompt(path: Path) -> dict[str, dict]:
    return {r["prompt"]: r for r in results(path).iter_rows(named=True)}


# -- item 7: one bad answer costs only that task ------------------------------------------

def bad_url(host: str, tid: str) -> list[dict]:
    return [{"url": "http://[bad/x.mp4", "type": "video", "format": "mp4"}]


async def bad_location(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "http://[bad/x.mp4"})


@pytest.mark.parametrize("handlers", [
    {"bad": video(), "resources:bad": bad_url},
    {"bad": bad_location},
], ids=["output-url", "redirect-location"])
def test_an_unparsable_url_costs_only_its_task(serve, tmp_path: Path, handlers: dict) -> None:
    url = serve(files_app({"good": video(), **handlers}))
    submit(url, tmp_path, [{"prompt": "good"}, {"prompt": "bad"}, {"prompt": "good"}])
    res = collect(url, tmp_path, "--download", str(tmp_path / "v"))
    assert "Traceback" not in res.output + res.stderr, res.output + res.stderr
    assert res.exit_code == 1, res.output
    df = results(tmp_path / "r.parquet")
    good = df.filter(pl.col("prompt") == "good")
    assert good["local_paths"].null_count() == 0 and good["download_error"].null_count() == 2
    bad = df.filter(pl.col("prompt") == "bad").row(0, named=True)
    assert bad["local_paths"] is None and "not a usable URL" in bad["download_error"], bad
    assert sorted(p.read_bytes() for p in (tmp_path / "v").iterdir()
                  if not p.name.endswith((".poster.jpg", ".poster.failed"))) == [b"video bytes"] * 2


def test_submit_wait_download_writes_the_table_despite_an_unparsable_url(serve, tmp_path: Path) -> None:
    url = serve(files_app({"good": video(), "bad": video(), "resources:bad": bad_url}))
    res = submit(url, tmp_path, [{"prompt": "good"}, {"prompt": "bad"}], "--wait",
                 "--download", str(tmp_path / "v"))
    assert "Traceback" not in res.output + res.stderr, res.output + res.stderr
    rows = rows_by_prompt(tmp_path / "r.parquet")
    assert rows["good"]["local_paths"] and rows["good"]["download_error"] is None
    assert "not a usable URL" in rows["bad"]["download_error"]


# -- item 8: nothing written through a name an attacker could plant ------------------------

@pytest.mark.parametrize("planted", ["part", "final", "frame_part", "frame_final", "hardlink_part",
                                     "hardlink_final", "hardlink_frame_final"])
def test_a_planted_symlink_is_never_written_through(serve, tmp_path: Path, planted: str) -> None:
    def both(host: str, tid: str) -> list[dict]:
        return [{"url": f"http://{host}/files/{tid}", "type": "video", "format": "mp4"},
                {"url": f"http://{host}/files/{tid}", "type": "image", "role": "last_frame", "format": "png"}]

    url = serve(files_app({"p": video(b"V" * 11), "resources:p": both}))
    submit(url, tmp_path, [{"id": "lbl", "prompt": "p", "return_last_frame": "true"}])
    request_id = results(tmp_path / "r.parquet")["request_id"][0]
    target = tmp_path / "elsewhere.txt"
    target.write_bytes(b"precious" + b"!" * 3)  # the size of the video: "already there" must not trust it
    directory = tmp_path / "v"
    directory.mkdir()
    final = f"lbl_{request_id}" + (".last_frame.png" if "frame" in planted else ".mp4")
    name = f".{final}.part" if planted.endswith("part") else final
    if planted.startswith("hardlink"):
        os.link(target, directory / name)  # O_NOFOLLOW alone does not see this one
    else:
        (directory / name).symlink_to(target)
    res = collect(url, tmp_path, "--download", str(directory))
    assert "Traceback" not in res.output + res.stderr, res.output + res.stderr
    assert target.read_bytes() == b"precious!!!"
    assert res.exit_code == 0, res.output
    for written in (f"lbl_{request_id}.mp4", f"lbl_{request_id}.last_frame.png"):
        path = directory / written
        assert not path.is_symlink() and path.read_bytes() == b"V" * 11
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


def test_a_directory_swapped_for_a_symlink_mid_download_is_not_followed(serve, tmp_path: Path) -> None:
    directory, elsewhere = tmp_path / "v", tmp_path / "elsewhere"
    elsewhere.mkdir()

    async def swapping(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "10"})
        await resp.prepare(request)
        await resp.write(b"12345")
        directory.rename(tmp_path / "v-moved")  # the attacker swaps the directory while bytes flow
        directory.symlink_to(elsewhere)
        await resp.write(b"67890")
        return resp

    url = serve(files_app({"s": swapping}))
    submit(url, tmp_path, [{"prompt": "s"}])
    directory.mkdir()
    res = collect(url, tmp_path, "--download", str(directory))
    assert "Traceback" not in res.output + res.stderr, res.output + res.stderr
    assert list(elsewhere.iterdir()) == []
    assert [p.read_bytes() for p in (tmp_path / "v-moved").glob("*.mp4")] == [b"1234567890"]


# -- item 9: compressed answers ------------------------------------------------------------

def test_a_compressed_download_is_asked_as_identity_and_unpacked_when_sent_anyway(serve, tmp_path: Path) -> None:
    asked: list[str | None] = []
    payload = bytes(range(256)) * 20

    async def gzipped(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Accept-Encoding"))
        return web.Response(body=gzip.compress(payload), headers={"Content-Encoding": "gzip"})

    url = serve(files_app({"z": gzipped}))
    submit(url, tmp_path, [{"prompt": "z"}])
    res = collect(url, tmp_path, "--download", str(tmp_path / "v"))
    assert res.exit_code == 0, res.output
    assert asked == ["identity"]
    assert [p.read_bytes() for p in (tmp_path / "v").iterdir() if not p.name.endswith(".poster.failed")] == [payload]


def test_a_compression_bomb_is_capped_and_leaves_no_part_file(serve, tmp_path: Path) -> None:
    bomb = gzip.compress(b"\0" * 2_000_000)  # ~2 KB on the wire

    async def bombing(request: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

    url = serve(files_app({"b": bombing}))
    submit(url, tmp_path, [{"prompt": "b"}])
    res = collect(url, tmp_path, "--download", str(tmp_path / "v"), "--download-max-bytes", "100000")
    assert res.exit_code == 1
    assert "over the 100000-byte limit" in results(tmp_path / "r.parquet")["download_error"][0]
    assert list((tmp_path / "v").iterdir()) == []  # no video and no .part left behind


def test_a_download_that_keeps_failing_leaves_no_part_file(serve, tmp_path: Path, quick_download_retries: None) -> None:
    async def short(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "100"})
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        request.transport.close()  # always cut short: every attempt fails
        return resp

    url = serve(files_app({"s": short}))
    submit(url, tmp_path, [{"prompt": "s"}])
    res = collect(url, tmp_path, "--download", str(tmp_path / "v"))
    assert res.exit_code == 1
    assert "gave up after 5 attempts" in results(tmp_path / "r.parquet")["download_error"][0]
    assert list((tmp_path / "v").iterdir()) == []


def test_an_encoding_that_cannot_be_unpacked_is_refused_not_stored(serve, tmp_path: Path) -> None:
    async def odd(request: web.Request) -> web.Response:
        return web.Response(body=b"packed?", headers={"Content-Encoding": "x-custom, gzip"})

    url = serve(files_app({"o": odd}))
    submit(url, tmp_path, [{"prompt": "o"}])
    res = collect(url, tmp_path, "--download", str(tmp_path / "v"))
    assert res.exit_code == 1
    assert "Content-Encoding we do not unpack" in results(tmp_path / "r.parquet")["download_error"][0]
    assert list((tmp_path / "v").iterdir()) == []


# -- item 11: the key is never stored, in any form -------------------------------------------

def key_forms(key: str = KEY) -> list[str]:
    return [key, key.lower(), key.upper(), key.swapcase(), quote(key, safe=""), quote_plus(key),
            quote(key, safe="").lower(), "".join(f"%{b:02X}" for b in key.encode()),
            base64.b64encode(key.encode()).decode(), base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")]


def haystack(tmp_path: Path, *outputs: str) -> str:
    text = "".join(outputs)
    for f in tmp_path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            text += f.read_bytes().decode("latin-1")
    return text


def test_the_scrubber_finds_every_form_of_the_key() -> None:
    secret = Secret(KEY)
    for form in key_forms():
        assert form not in secret.scrub(f"at https://cdn.example/x?api_key={form}&a=1 !"), form
    mixed = "".join(c if i % 2 else f"%{ord(c):02x}" for i, c in enumerate(KEY))  # partly encoded
    assert "***" in secret.scrub(mixed)
    assert secret.scrub("plain text, no key: sk-test-0123") == "plain text, no key: sk-test-0123"


def test_a_redirect_carrying_the_key_never_reaches_a_stored_row_or_output(serve, tmp_path: Path,
                                                                         quick_download_retries: None) -> None:
    """Reported: a redirect's Location carrying the key (in its query, or as its host) put
    it in download_error, the ledger and report output; lower-cased or encoded too."""
    def to(location: str) -> object:
        async def redirect(request: web.Request) -> web.Response:
            return web.Response(status=302, headers={"Location": location})
        return redirect

    handlers = {
        "query": to(f"http://127.0.0.1:1/x.mp4?api_key={KEY}"),
        "lower": to(f"http://{KEY.lower()}.invalid/x.mp4"),  # the key as a host that cannot be reached
        "upper": to(f"http://{KEY.upper()}.invalid/x.mp4"),
        "encoded": to(f"http://{quote(KEY, safe='').replace('-', '%2D')}.invalid/x.mp4"),
    }
    url = serve(files_app(handlers))
    sub = submit(url, tmp_path, [{"prompt": p} for p in handlers])
    col = collect(url, tmp_path, "--download", str(tmp_path / "v"), "--log-level", "debug")
    rep = cli(["report", str(tmp_path / "r.parquet")])
    rep_json = cli(["report", str(tmp_path / "r.parquet"), "--json"])
    errors = results(tmp_path / "r.parquet")["download_error"].to_list()
    assert all(errors), errors  # each failed, with a reason
    text = haystack(tmp_path, *(r.output + r.stderr for r in (sub, col, rep, rep_json)))
    assert "***" in text  # the key arrived in error texts, scrubbed
    for variant in key_forms():
        assert variant not in text, variant


def test_the_key_in_a_poll_answer_in_any_form_never_reaches_an_output(serve, tmp_path: Path) -> None:
    """Siblings: submit, poll and preflight answers echoing the key lower-cased or encoded."""
    forms = key_forms()
    app = web.Application()

    async def post(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        if prompt.startswith("E"):
            return web.json_response({"code": 400, "message": f"bad key {forms[int(prompt[1:])]}"}, status=400)
        return web.json_response({"code": 0, "message": "success", "data": {"task_id": prompt}})

    async def task(request: web.Request) -> web.Response:
        tid = request.match_info["tid"]
        form = forms[int(tid[1:])]
        return web.json_response({"code": 0, "message": "success", "data": {
            "status": "failed", "task_id": tid, "error": {"code": 7, "message": f"key {form} refused"}}})

    def preflight(form: str) -> object:
        async def answer(request: web.Request) -> web.Response:
            return web.json_response({"code": 400, "message": f"no such key {form}"}, status=400)
        return answer

    app.router.add_post("/api/v1/text-to-video/bytedance/seedance-1.0-lite-t2v/async", post)
    app.router.add_get("/api/v1/tasks/{tid}", task)
    for path, form in zip(("apikey/validate", "models", "team/balance"), forms[1:], strict=False):
        app.router.add_get(f"/api/v1/{path}", preflight(form))
    url = serve(app)
    rows = [{"prompt": f"{c}{i}"} for c in "ET" for i in range(len(forms))]
    sub = submit(url, tmp_path, rows, "--log-level", "debug")
    col = collect(url, tmp_path, "--log-level", "debug")
    rep = cli(["report", str(tmp_path / "r.parquet"), "--json"])
    assert rep.exit_code == 0, rep.output
    text = haystack(tmp_path, *(r.output + r.stderr for r in (sub, col, rep)))
    assert text.count("***") >= len(forms)
    for variant in forms:
        assert variant not in text, variant


def test_a_planted_temporary_name_beside_the_results_table_is_never_written_through(fake, tmp_path: Path) -> None:
    """Sibling of item 8: the table and summary were staged at ``.<name>.tmp-<pid>``, a name
    anyone can plant beforehand; the rename then put the planted link in the table's place."""
    target = tmp_path / "elsewhere.txt"
    target.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("r.csv", "r.csv.summary.json"):
        (out / f".{name}.tmp-{os.getpid()}").symlink_to(target)
    path = write_csv(tmp_path / "in.csv", [{"prompt": "a calm lake"}])
    res = cli(["submit", str(path), "-o", str(out / "r.csv"), "--base-url", fake.url, "--state",
               str(tmp_path / "s.sqlite"), "--rate", "0"])
    assert res.exit_code == 0, res.output
    assert target.read_bytes() == b"precious"
    assert not (out / "r.csv").is_symlink() and results(out / "r.csv")["status"].to_list() == ["submitted"]


def test_a_planted_rate_budget_link_is_not_followed(tmp_path: Path) -> None:
    """Sibling of item 8: the per-key budget file was opened following a symlink, and a
    file elsewhere truncated and overwritten with the budget."""
    target = tmp_path / "elsewhere.txt"
    target.write_bytes(b"precious")
    directory = tmp_path / "budgets"
    directory.mkdir()
    digest = hashlib.sha256(KEY.encode()).hexdigest()[:16]
    planted = directory / f"budget-{digest}.bin"
    for plant in (planted.symlink_to, lambda t: os.link(t, planted)):
        plant(target)
        with pytest.raises(OSError):
            SharedBudget(directory, KEY)  # the run then paces alone (rate_budget_not_shared)
        assert target.read_bytes() == b"precious"
        planted.unlink()
