"""Figures of the night page (README, "A page for the night"):

* poster extraction per video, PyAV in-process against imageio-ffmpeg's bundled ``ffmpeg``
  (when installed: it is not a dependency, only the alternative that was measured), on the
  fake's tiny clip and on a 1280x720, 5 s H.264 clip like the provider's;
* a 10,000-request page: Python build time, size, and in headless chromium the time until
  the first page of cards is painted (``performance.now()`` from navigation start).

    python -m benchmarks.page_bench [--requests 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import polars as pl

from batch.page import render_page
from batch.poster import colour_of, extract_poster, tiny_clip


def hd_clip(seconds: float = 5.0, fps: int = 24) -> bytes:
    """A 1280x720 H.264 clip with motion (a gradient that shifts every frame), so the
    encoder makes real P-frames and the first frame is a real keyframe."""
    import av

    width, height = 1280, 720
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        base = bytes(range(256)) * (width // 256 + 1)
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame(width, height, "gray")
            stride = frame.planes[0].line_size
            rows = b"".join(base[(y + 4 * i) % 256:][:width].ljust(stride, b"\0") for y in range(height))
            frame.planes[0].update(rows)
            for packet in stream.encode(frame.reformat(format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def time_posters(path: Path, repeats: int) -> dict[str, float | None]:
    """Median milliseconds per poster, PyAV and imageio-ffmpeg (None when not installed)."""
    pyav = []
    for _ in range(repeats):
        started = time.perf_counter()
        assert extract_poster(path).jpeg is not None
        pyav.append((time.perf_counter() - started) * 1000)
    ffmpeg_ms = None
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            out = subprocess.run([exe, "-v", "error", "-i", str(path), "-frames:v", "1", "-vf", "scale=160:-2",
                                  "-f", "image2pipe", "-c:v", "mjpeg", "-"], capture_output=True, check=True)
            assert out.stdout[:3] == b"\xff\xd8\xff"
            runs.append((time.perf_counter() - started) * 1000)
        ffmpeg_ms = round(statistics.median(runs), 1)
    except ImportError:
        pass
    return {"pyav_ms": round(statistics.median(pyav), 1), "imageio_ffmpeg_ms": ffmpeg_ms}


def synthetic_night(directory: Path, n: int, videos: int = 50) -> Path:
    """A results table of ``n`` requests as collect leaves it: most downloaded (``videos``
    real clips shared between rows), some failed, invalid or not sent."""
    vdir = directory / "videos"
    vdir.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(videos):
        path = vdir / f"v{i:03d}.mp4"
        path.write_bytes(tiny_clip(colour_of(str(i))))
        clips.append(str(path))
    statuses = ["submitted"] * 8 + ["invalid", "pending"]
    rows = []
    for i in range(n):
        status = statuses[i % len(statuses)]
        task = ("failed" if i % 97 == 0 else "success") if status == "submitted" else None
        rows.append({
            "request_id": f"{i:016x}", "source": f"/data/night/sheet{i % 3}.xlsx[Prompts]", "row": i + 2,
            "model": ["bytedance/seedance-1.0-lite-t2v", "bytedance/seedance-1.5-pro-t2v"][i % 2],
            "prompt": f"Request {i}: a slow dolly shot over a misty valley at sunrise, birds in the distance, "
                      f"cinematic lighting, 35mm film grain, variant {i % 17}",
            "resolution": "720p", "duration": 5, "service_tier": "flex",
            "status": status, "task_id": f"task-video-{i:08d}" if status == "submitted" else None,
            "error": {"invalid": "duration='15': must be an integer in [2, 12]",
                      "pending": "not sent: deadline reached"}.get(status),
            "task_status": task, "failure_reason": "Content Moderation: rejected" if task == "failed" else None,
            "local_paths": [clips[i % videos]] if task == "success" else None,
        })
    table = directory / "night.parquet"
    pl.DataFrame(rows, schema_overrides={"local_paths": pl.List(pl.String)}).write_parquet(table)
    return table


def browser_paint_ms(page: Path, loads: int) -> list[float]:
    """Milliseconds from navigation start to the first page of cards painted, per load."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="page-bench-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        times = []
        for _ in range(loads):
            driver.get(page.resolve().as_uri())
            WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.paintedMs"))
            times.append(float(driver.execute_script("return document.body.dataset.paintedMs")))
        return times
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="page-bench-") as tmp:
        work = Path(tmp)
        tiny, hd = work / "tiny.mp4", work / "hd.mp4"
        tiny.write_bytes(tiny_clip(colour_of("bench")))
        hd.write_bytes(hd_clip())
        out: dict[str, object] = {
            "poster_tiny": time_posters(tiny, args.repeats * 4),
            "poster_720p_5s": {**time_posters(hd, args.repeats * 4), "video_bytes": hd.stat().st_size},
        }
        table = synthetic_night(work, args.requests)
        started = time.perf_counter()
        html, info = render_page(str(table), str(work / "night.html"))
        out["page"] = {"requests": info.requests, "build_s": round(time.perf_counter() - started, 2),
                       "bytes": info.bytes, "bytes_per_request": round(info.bytes / max(1, info.requests))}
        (work / "night.html").write_text(html, encoding="utf-8")
        out["paint_ms"] = browser_paint_ms(work / "night.html", args.repeats)
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
