"""Hostile files beside (and instead of) the night's videos: planted names, FIFOs, image bombs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import polars as pl
from test_page_build import cards_of

from batch.page import POSTER_SUFFIX, Posters, render_page, write_page
from batch.poster import tiny_clip


def _table(tmp_path: Path, video: Path) -> Path:
    table = tmp_path / "r.parquet"
    pl.DataFrame({"request_id": ["a"], "status": ["submitted"], "task_status": ["success"], "source": ["in.csv"],
                  "row": [2], "model": ["m"], "prompt": ["x"], "local_paths": [[str(video)]]}).write_parquet(table)
    return table


def test_the_page_and_its_temp_names_are_never_written_through(tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    video.write_bytes(tiny_clip((10, 200, 30)))
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    page = tmp_path / "night.html"
    page.symlink_to(victim)
    for name in (f".{page.name}.tmp-{os.getpid()}", f".v.mp4{POSTER_SUFFIX}.tmp-{os.getpid()}"):
        (tmp_path / name).symlink_to(victim)
    write_page(str(_table(tmp_path, video)), str(page))
    assert victim.read_bytes() == b"precious"
    assert not page.is_symlink() and "<html" in page.read_text(encoding="utf-8").lower()


def test_a_planted_regular_file_at_the_poster_name_is_not_inlined_unless_a_jpeg(tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    video.write_bytes(tiny_clip((10, 200, 30)))
    poster = tmp_path / f"v.mp4{POSTER_SUFFIX}"
    poster.write_bytes(b"SEEDANCE_API_KEY=sk-live-secret\n")  # its own file, one link, newer than the video
    os.utime(poster, (time.time() + 60, time.time() + 60))
    html, _ = render_page(str(_table(tmp_path, video)), str(tmp_path / "p.html"))
    card = cards_of(html)[0]
    import base64
    assert base64.b64decode(card["po"].split(",", 1)[1])[:3] == b"\xff\xd8\xff"  # regenerated: our JPEG
    assert poster.read_bytes()[:3] == b"\xff\xd8\xff"


def test_the_page_inlines_the_bytes_it_checked_never_a_reread_of_the_name(tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    video.write_bytes(tiny_clip((10, 200, 30)))
    secret = tmp_path / "secret"
    secret.write_bytes(b"\xff\xd8\xff sk-live-secret")
    _, jpeg, why = Posters().take(str(video))
    assert why is None and jpeg is not None and jpeg[:3] == b"\xff\xd8\xff"
    assert b"sk-live-secret" not in jpeg  # the bytes we inline are the bytes we checked, never a re-read path


def test_a_fifo_at_a_video_path_gets_its_card_and_never_hangs_the_page(tmp_path: Path) -> None:
    import subprocess
    import sys

    fifo = tmp_path / "v.mp4"
    os.mkfifo(fifo)
    table = _table(tmp_path, fifo)
    code = ("import sys, json; from batch.page import render_page; from test_page_build import cards_of; "
            "html, _ = render_page(sys.argv[1], sys.argv[2]); print(json.dumps(cards_of(html)))")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, str(table), str(tmp_path / "p.html")], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [os.environ.get("PYTHONPATH", ""), str(Path(__file__).parent)])})
    assert done.returncode == 0, done.stderr
    import json
    card = json.loads(done.stdout)[0]
    assert card["pe"] == "video cannot be decoded (cannot open video: not a regular file)"
    assert time.monotonic() - started < 30


def _big_png(width: int, height: int) -> bytes:
    """A real PNG, large in pixels and small on disk (one colour compresses to nothing)."""
    import av

    frame = av.VideoFrame(width, height, "gray")
    from batch.poster import _encode_image
    return _encode_image(frame, "png", "gray")


def test_an_image_saved_as_a_video_is_refused_before_decoding_and_not_retried(tmp_path: Path) -> None:
    from batch.poster import extract_poster

    bomb = tmp_path / "v.mp4"
    bomb.write_bytes(_big_png(8000, 8000))
    started = time.monotonic()
    assert extract_poster(bomb).error == "not a video (a PNG image)"
    assert time.monotonic() - started < 0.5  # no probing, no decoding
    maker = Posters()
    assert maker.take(str(bomb))[2] == "video cannot be decoded (not a video (a PNG image))"
    marker = tmp_path / "v.mp4.poster.failed"
    assert marker.is_file() and not marker.is_symlink()
    marker.write_text(marker.read_text().replace("PNG", "remembered"))  # proves the next pass reads it
    assert Posters().take(str(bomb))[2] == "video cannot be decoded (not a video (a remembered image))"
    bomb.write_bytes(tiny_clip((1, 2, 3)))  # a new file (size and mtime): tried again
    assert Posters().take(str(bomb))[1] is not None


def test_a_failed_marker_name_is_never_written_through(tmp_path: Path) -> None:
    bomb = tmp_path / "v.mp4"
    bomb.write_bytes(b"GIF89a" + b"\0" * 100)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "v.mp4.poster.failed").symlink_to(victim)
    assert Posters().take(str(bomb))[2] == "video cannot be decoded (not a video (a GIF image))"
    assert victim.read_bytes() == b"precious" and not (tmp_path / "v.mp4.poster.failed").is_symlink()
