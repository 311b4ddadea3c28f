"""The fake serves real videos, and posters are taken from them with a real decoder (PyAV)."""

from pathlib import Path

import av
from conftest import cli, results, submit_args, write_csv

from batch.poster import CLIP_SECONDS, colour_of, extract_poster


def first_pixel(path: Path) -> tuple[int, int, int]:
    """The centre-left pixel of the first frame, as RGB (left of the moving bar's start)."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0)).reformat(format="rgb24")
        plane = bytes(frame.planes[0])
        stride = frame.planes[0].line_size
        offset = (frame.height // 2) * stride + 3 * (frame.width - 8)
        return plane[offset], plane[offset + 1], plane[offset + 2]


def test_fake_downloads_are_real_h264_clips_coloured_by_prompt(fake, tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "A red fox in snow"}, {"id": "b", "prompt": "A blue whale at dusk"},
            {"id": "c", "prompt": "A red fox in snow"}]
    inp = write_csv(tmp_path / "in.csv", rows)
    assert cli(submit_args(fake, tmp_path, inp)).exit_code == 0
    res = cli(["collect", "--state", str(tmp_path / "state.sqlite"), "--base-url", fake.url, "--rate", "0",
               "--results", str(tmp_path / "results.parquet"), "--download", str(tmp_path / "videos")])
    assert res.exit_code == 0, res.output
    df = results(tmp_path / "results.parquet")
    seen = {}
    for row in df.iter_rows(named=True):
        video = Path(row["local_paths"][0])
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"  # what every browser plays
            frames = sum(1 for _ in container.decode(stream))
            assert abs(frames / float(stream.average_rate) - CLIP_SECONDS) < 0.2
        want = colour_of(row["prompt"])
        got = first_pixel(video)
        assert all(abs(g - w) <= 12 for g, w in zip(got, want, strict=True)), (got, want)  # yuv420p rounding
        seen[row["id"]] = got
    assert seen["a"] == seen["c"] != seen["b"]


def test_poster_of_a_clip_is_a_small_jpeg(tmp_path: Path) -> None:
    from batch.poster import tiny_clip

    poster = extract_poster(tiny_clip(colour_of("x")))
    assert poster.error is None and poster.jpeg is not None
    assert poster.jpeg[:3] == b"\xff\xd8\xff" and len(poster.jpeg) < 8192
    assert (poster.width, poster.height) == (64, 36) and poster.duration_s is not None
    decoded = extract_poster(poster.jpeg)  # FFmpeg reads its own JPEG back: 160 px wide
    assert decoded.error is None and decoded.width == 160


def test_undecodable_videos_say_why_never_raise(tmp_path: Path) -> None:
    from batch.poster import tiny_clip

    clip = tiny_clip(colour_of("y"))
    bad = tmp_path / "bad.mp4"
    cases = {
        "garbage": b"<html>not a video</html>" * 10,
        "truncated": clip[: len(clip) // 2],
        "empty": b"",
    }
    for name, data in cases.items():
        bad.write_bytes(data)
        poster = extract_poster(bad)
        assert poster.jpeg is None and poster.error, name
    assert extract_poster(tmp_path / "missing.mp4").error == "cannot open video: No such file or directory"
