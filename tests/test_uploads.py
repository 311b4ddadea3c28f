"""Local reference images (issue 20, item 2), over HTTP against the fake's
``POST /api/v1/media/files``: checked before anything is paid, uploaded once per content,
reused by reruns and later nights, and refused with the cell named when bad."""

import asyncio
import os
import sqlite3
from pathlib import Path

import aiohttp
from aiohttp import web
from conftest import cli, results, write_csv

from batch.upload import MAX_BYTES

I2V = "bytedance/seedance-2.0-fast-i2v"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))
JPEG = b"\xff\xd8\xff\xe0" + b"JFIF" + bytes(range(64))
WEBP = b"RIFF\x40\x00\x00\x00WEBPVP8 " + bytes(range(64))


def run(fake, tmp_path: Path, sheet: Path, *extra: str, out: str = "r.parquet"):
    return cli(["submit", str(sheet), "-o", str(tmp_path / out), "--base-url", fake.url, "--state",
                str(tmp_path / "s.sqlite"), "--rate", "0", "--model", I2V, "--no-preflight", *extra])


def images(folder: Path) -> Path:
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "a.png").write_bytes(PNG)
    (folder / "refs" / "b.jpg").write_bytes(JPEG)
    (folder / "refs" / "c.webp").write_bytes(WEBP)
    (folder / "refs" / "a-copy.png").write_bytes(PNG)  # same bytes, another name: one upload
    return folder


def test_a_sheet_of_local_images_is_uploaded_once_per_content_and_sent_as_urls(fake, tmp_path: Path) -> None:
    sheet_dir = images(tmp_path / "night1")
    sheet = write_csv(sheet_dir / "in.csv", [
        {"prompt": "one", "first_frame_image": "refs/a.png"},
        {"prompt": "two", "first_frame_image": "refs/b.jpg"},
        {"prompt": "three", "first_frame_image": f"file://{sheet_dir / 'refs' / 'c.webp'}"},
        {"prompt": "four", "first_frame_image": "refs/a-copy.png"},
        {"prompt": "five", "first_frame_image": "https://example.com/frame.jpg"},  # a URL: sent as it is
    ])
    res = run(fake, tmp_path, sheet)
    assert res.exit_code == 0, res.output
    assert len(fake.state.uploads()) == 3 and "uploads: 3 local images" in res.output
    sent = {r.body["prompt"]: r.body["first_frame_image"] for r in fake.state.submissions()}
    assert sent["one"] == sent["four"] and sent["one"].startswith(f"{fake.url}/media/file-")
    assert sent["five"] == "https://example.com/frame.jpg"
    assert len({sent["one"], sent["two"], sent["three"]}) == 3
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        rows = db.execute("SELECT sha256, url, type, size FROM uploads").fetchall()
    assert len(rows) == 3 and {r[2] for r in rows} == {"image/png", "image/jpeg", "image/webp"}
    # the same picture under two names is the same request: one paid video
    table = results(tmp_path / "r.parquet")
    assert table.height == 5 and table["status"].to_list().count("submitted") == 5


def test_a_rerun_and_a_later_night_upload_nothing(fake, tmp_path: Path) -> None:
    sheet_dir = images(tmp_path / "night1")
    sheet = write_csv(sheet_dir / "in.csv", [{"prompt": "one", "first_frame_image": "refs/a.png"}])
    assert run(fake, tmp_path, sheet).exit_code == 0
    assert len(fake.state.uploads()) == 1
    # night 2: another folder, the same picture copied there, new prompts
    other = images(tmp_path / "night2")
    sheet2 = write_csv(other / "in.csv", [{"prompt": "new one", "first_frame_image": "refs/a-copy.png"},
                                         {"prompt": "again", "first_frame_image": "./refs/a.png"}])
    res = run(fake, tmp_path, sheet2, out="r2.parquet")
    assert res.exit_code == 0, res.output
    assert len(fake.state.uploads()) == 1  # nothing new uploaded
    urls = {r.body["first_frame_image"] for r in fake.state.submissions()}
    assert len(urls) == 1
    # a dry run over the same sheet: nothing would be uploaded
    dry = run(fake, tmp_path, sheet2, "--dry-run", out="dry.parquet")
    assert "would be uploaded" not in dry.output


def test_bad_files_make_their_row_invalid_naming_the_cell_before_anything_is_paid(fake, tmp_path: Path) -> None:
    sheet_dir = images(tmp_path / "sheet")
    (sheet_dir / "refs" / "big.png").write_bytes(PNG + bytes(MAX_BYTES))  # just over 16 MiB
    (sheet_dir / "refs" / "notes.png").write_bytes(b"these are notes, not a picture")
    outside = tmp_path / "secret.png"
    outside.write_bytes(PNG)
    os.symlink(outside, sheet_dir / "refs" / "link.png")
    rows = [{"prompt": "big", "first_frame_image": "refs/big.png"},
            {"prompt": "text", "first_frame_image": "refs/notes.png"},
            {"prompt": "link", "first_frame_image": "refs/link.png"},
            {"prompt": "up", "first_frame_image": "../secret.png"},
            {"prompt": "gone", "first_frame_image": "refs/missing.png"},
            {"prompt": "fine", "first_frame_image": "refs/b.jpg"}]
    sheet = write_csv(sheet_dir / "in.csv", rows)
    res = run(fake, tmp_path, sheet)
    assert res.exit_code == 1
    table = {r["prompt"]: r for r in results(tmp_path / "r.parquet").iter_rows(named=True)}
    expect = {"big": "over the provider's 16 MiB limit", "text": "not a PNG, JPEG or WebP image",
              "link": "a symlink leading out of the sheet's folder", "up": "outside the sheet's folder",
              "gone": "no such file"}
    for prompt, words in expect.items():
        row = table[prompt]
        assert row["status"] == "invalid" and words in row["error"], (prompt, row["error"])
        assert "first_frame_image=" in row["error"] and "cell 'first_frame_image' row" in row["error"]
    assert table["fine"]["status"] == "submitted"
    assert [r.body["prompt"] for r in fake.state.submissions()] == ["fine"]
    assert len(fake.state.uploads()) == 1  # only the good one


def test_validate_and_dry_run_say_how_many_files_and_bytes_would_be_uploaded(fake, tmp_path: Path) -> None:
    sheet_dir = images(tmp_path / "sheet")
    sheet = write_csv(sheet_dir / "in.csv", [{"prompt": "one", "first_frame_image": "refs/a.png"},
                                             {"prompt": "two", "first_frame_image": "refs/a-copy.png"},
                                             {"prompt": "three", "first_frame_image": "refs/b.jpg"}])
    want = f"uploads: 2 local images, {len(PNG) + len(JPEG)} bytes would be uploaded"
    res = cli(["validate", str(sheet), "--model", I2V, "--state", str(tmp_path / "s.sqlite")])
    assert want in res.output, res.output
    res = run(fake, tmp_path, sheet, "--dry-run")
    assert want in res.output, res.output
    assert fake.state.uploads() == [] and fake.state.submissions() == []


def test_the_fake_refuses_what_the_documentation_refuses(fake) -> None:
    async def post(data: bytes, name: str = "file") -> int:
        form = aiohttp.FormData()
        form.add_field(name, data, filename="x.png", content_type="image/png")
        async with aiohttp.ClientSession() as s, s.post(f"{fake.url}/api/v1/media/files", data=form,
                                                        headers={"Authorization": "Bearer k"}) as resp:
            return resp.status

    assert asyncio.run(post(PNG)) == 200
    assert asyncio.run(post(b"GIF89a" + bytes(32))) == 415
    assert asyncio.run(post(PNG + bytes(MAX_BYTES))) == 413
    assert asyncio.run(post(PNG, name="image")) == 400


def test_an_upload_redirected_elsewhere_carries_the_key_nowhere_and_pays_nothing(serve, tmp_path: Path) -> None:
    elsewhere: list[str] = []

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(request.headers.get("Authorization", ""))
        return web.json_response({"code": 0, "data": {"url": "https://x.test/f.png"}})

    second = web.Application()
    second.router.add_route("*", "/{tail:.*}", other)
    target = serve(second)
    submits: list[str] = []

    async def upload(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": f"{target}/api/v1/media/files"})

    async def submit(request: web.Request) -> web.Response:
        submits.append(request.path)
        return web.json_response({"code": 0, "data": {"task_id": "t1", "status": "pending"}})

    first = web.Application()
    first.router.add_post("/api/v1/media/files", upload)
    first.router.add_post("/{tail:.*}", submit)
    base = serve(first)
    sheet_dir = images(tmp_path / "sheet")
    sheet = write_csv(sheet_dir / "in.csv", [{"prompt": "one", "first_frame_image": "refs/a.png"}])
    res = cli(["submit", str(sheet), "-o", str(tmp_path / "r.parquet"), "--base-url", base, "--state",
               str(tmp_path / "s.sqlite"), "--rate", "0", "--model", I2V, "--no-preflight", "--max-attempts", "2"])
    assert res.exit_code == 1
    assert elsewhere == [] and submits == []
    row = results(tmp_path / "r.parquet").row(0, named=True)
    assert row["status"] == "pending" and "upload" in row["error"]


def test_uploads_take_their_turn_in_the_keys_rate_budget(start_fake, tmp_path: Path) -> None:
    fake = start_fake(rate_limit=5)  # the fake refuses a sixth request within any second
    sheet_dir = tmp_path / "sheet"
    (sheet_dir / "refs").mkdir(parents=True)
    rows = []
    for i in range(10):  # ten different pictures: ten uploads and ten submissions
        (sheet_dir / "refs" / f"{i}.png").write_bytes(PNG + bytes([i]) * 16)
        rows.append({"prompt": f"shot {i}", "first_frame_image": f"refs/{i}.png"})
    res = run(fake, tmp_path, write_csv(sheet_dir / "in.csv", rows), "--rate", "4/s")  # a margin for a loaded machine
    assert res.exit_code == 0, res.output
    assert len(fake.state.uploads()) == 10 and len(fake.state.submissions()) == 10
    assert [r for r in fake.state.records if r.status == 429] == []


def test_every_image_cell_that_is_not_a_url_is_a_local_file_checked_before_anything_is_paid(
        fake, tmp_path: Path) -> None:
    """Reported: cells without a known image extension (``frames/hero``, ``shot.jfif``, a
    missing ``refs/cat``) were never checked and went raw to the provider. Whatever its
    name, an image cell that is not an http(s) URL, a data: URI or Base64 image data names
    a local file: checked (contained, exists, an image by its bytes), else the row is invalid."""
    import base64

    sheet_dir = images(tmp_path / "sheet")
    (sheet_dir / "frames").mkdir()
    (sheet_dir / "frames" / "hero").write_bytes(PNG)
    (sheet_dir / "shot.jfif").write_bytes(JPEG)
    (sheet_dir / "frames" / "notes").write_bytes(b"plain words")
    raw = base64.b64encode(WEBP).decode()
    rows = [{"prompt": "hero", "first_frame_image": "frames/hero"},
            {"prompt": "jfif", "first_frame_image": "shot.jfif"},
            {"prompt": "cat", "first_frame_image": "refs/cat"},
            {"prompt": "notes", "first_frame_image": "frames/notes"},
            {"prompt": "ftp", "first_frame_image": "ftp://example.com/x.png"},
            {"prompt": "b64", "first_frame_image": raw},
            {"prompt": "datauri", "first_frame_image": f"data:image/webp;base64,{raw}"},
            {"prompt": "url", "first_frame_image": "HTTPS://example.com/frame.jpg"}]
    sheet = write_csv(sheet_dir / "in.csv", rows)
    res = run(fake, tmp_path, sheet)
    assert res.exit_code == 1, res.output
    table = {r["prompt"]: r for r in results(tmp_path / "r.parquet").iter_rows(named=True)}
    expect = {"cat": "first_frame_image='refs/cat' (cell 'first_frame_image' row 4): no such file",
              "notes": "not a PNG, JPEG or WebP image",
              "ftp": "not an http(s) URL, a data: URI, Base64 image data or a local file"}
    for prompt, words in expect.items():
        assert table[prompt]["status"] == "invalid" and words in table[prompt]["error"], table[prompt]["error"]
    sent = {r.body["prompt"]: r.body["first_frame_image"] for r in fake.state.submissions()}
    assert set(sent) == {"hero", "jfif", "b64", "datauri", "url"}
    assert sent["hero"].startswith(f"{fake.url}/media/file-") and sent["jfif"].startswith(f"{fake.url}/media/")
    assert sent["b64"] == raw and sent["url"] == "HTTPS://example.com/frame.jpg"
    assert len(fake.state.uploads()) == 2


def test_a_reference_image_item_is_checked_too(fake, tmp_path: Path) -> None:
    sheet_dir = images(tmp_path / "sheet")
    sheet = write_csv(sheet_dir / "in.csv", [{"prompt": "refs", "reference_images": '["refs/a.png", "refs/cat"]'}])
    res = run(fake, tmp_path, sheet)
    assert res.exit_code == 1
    row = results(tmp_path / "r.parquet").row(0, named=True)
    assert row["status"] == "invalid" and "reference_images[1]='refs/cat'" in row["error"], row["error"]
    assert "no such file" in row["error"] and fake.state.submissions() == [] and fake.state.uploads() == []


def test_validate_and_dry_run_count_only_images_of_rows_that_would_be_sent(fake, tmp_path: Path) -> None:
    """Reported: an invalid row's good images were counted as "would be uploaded"."""
    sheet_dir = images(tmp_path / "sheet")
    sheet = write_csv(sheet_dir / "in.csv", [
        {"prompt": "bad", "reference_images": '["refs/a.png", "refs/c.webp", "refs/nope.jpg"]'},  # invalid
        {"prompt": "good", "reference_images": '["refs/b.jpg"]'}])
    want = f"uploads: 1 local images, {len(JPEG)} bytes would be uploaded"
    res = cli(["validate", str(sheet), "--model", I2V, "--state", str(tmp_path / "s.sqlite")])
    assert want in res.output, res.output
    res = run(fake, tmp_path, sheet, "--dry-run")
    assert want in res.output, res.output
    res = run(fake, tmp_path, sheet)
    assert "uploads: 1 local images" in res.output and len(fake.state.uploads()) == 1


def test_a_local_path_in_a_video_or_audio_field_is_invalid_not_sent(fake, tmp_path: Path) -> None:
    """Sibling: only images are uploaded, and video_urls/audio_urls take URLs (the specs:
    "each item a non-empty string (URL, or Base64 for images)"); a local path there went raw
    to the provider as a paid request."""
    v2v = "bytedance/seedance-2.0-fast-v2v"
    sheet = write_csv(tmp_path / "in.csv", [
        {"prompt": "local clip", "video_urls": "clips/a.mp4"},
        {"prompt": "local sound", "video_urls": "https://example.com/a.mp4", "audio_urls": "sounds/x.mp3"},
        {"prompt": "fine", "video_urls": "https://example.com/a.mp4"}])
    res = run(fake, tmp_path, sheet, "--model", v2v)
    assert res.exit_code == 1, res.output
    table = {r["prompt"]: r for r in results(tmp_path / "r.parquet").iter_rows(named=True)}
    assert table["local clip"]["status"] == "invalid"
    assert "video_urls[0]='clips/a.mp4' (cell 'video_urls' row 2): not an http(s) URL" in table["local clip"]["error"]
    assert table["local sound"]["status"] == "invalid" and "audio_urls[0]='sounds/x.mp3'" in table["local sound"]["error"]
    assert [r.body["prompt"] for r in fake.state.submissions()] == ["fine"]
