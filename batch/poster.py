"""Video in and out with PyAV (FFmpeg's libraries, shipped in the ``av`` wheel): the fake's
tiny clips and the page's poster frames.

Guarantee: :func:`extract_poster` never raises for a bad, hostile or missing video: it
answers a :class:`Poster` with an ``error`` saying why, so one broken file costs its own
card only. It decodes at most one frame of at most :data:`MAX_PIXELS` and reads at most
:data:`MAX_PACKETS` packets to find it, so a crafted file cannot hold the morning.

PyAV over imageio-ffmpeg (measured on this machine, README "A page for the night"): the
first frame of a clip decodes in-process in a few milliseconds, where imageio-ffmpeg
starts its bundled ``ffmpeg`` binary for every video (~20 ms each); both are FFmpeg.
JPEG thumbnails are encoded by FFmpeg's ``mjpeg`` encoder, so no imaging library is
needed besides.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

CLIP_SIZE = (64, 36)  # tiny, 16:9, even sides as yuv420p needs
CLIP_FPS = 12
CLIP_SECONDS = 1.5
POSTER_WIDTH = 160
MAX_PIXELS = 4096 * 4096  # a frame larger than this is not decoded (memory bound: 4K is 3840x2160)
MAX_SIDE = 8192
PROBE_BYTES = 1 << 20  # what FFmpeg may read to find the streams before we check their size
_IMAGES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
           (b"RIFF", "a RIFF file (WebP, AVI, WAV)"), (b"BM", "a BMP image"))
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
MAX_PACKETS = 2000  # packets read looking for the first decodable frame

RGB = tuple[int, int, int]


def colour_of(text: str) -> RGB:
    """A clip's colour from the prompt's hash: one prompt, one colour, run after run.
    Kept in a middle band so that the moving white bar stays visible."""
    digest = hashlib.sha256(text.encode("utf-8", "replace")).digest()
    return (40 + digest[0] % 160, 40 + digest[1] % 160, 40 + digest[2] % 160)


def _rgb_frame(rgb: RGB, bar_x: int | None) -> object:
    import av

    width, height = CLIP_SIZE
    frame = av.VideoFrame(width, height, "rgb24")
    stride = frame.planes[0].line_size
    row = bytearray(bytes(rgb) * width)
    if bar_x is not None:
        lo, hi = max(0, bar_x), min(width, bar_x + 4)
        row[lo * 3 : hi * 3] = b"\xff" * (3 * (hi - lo))
    frame.planes[0].update((bytes(row) + b"\0" * (stride - 3 * width)) * height)
    return frame


@lru_cache(maxsize=256)
def tiny_clip(rgb: RGB) -> bytes:
    """A valid H.264 MP4 (what browsers play) of ``CLIP_SECONDS`` seconds at 64x36: a solid
    ``rgb`` with a white bar crossing it, so a player visibly advances. Cached per colour:
    encoding costs ~8 ms, a download must not."""
    import av

    width, height = CLIP_SIZE
    frames = round(CLIP_FPS * CLIP_SECONDS)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30"}
        for i in range(frames):
            frame = _rgb_frame(rgb, i * width // frames)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@lru_cache(maxsize=256)
def tiny_png(rgb: RGB) -> bytes:
    """A valid PNG of the clip's last frame (for ``return_last_frame``)."""
    frame = _rgb_frame(rgb, None)
    return _encode_image(frame, "png", "rgb24")


def _encode_image(frame: object, codec: str, pix_fmt: str) -> bytes:
    import av

    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height = frame.width, frame.height  # type: ignore[attr-defined]
    ctx.pix_fmt = pix_fmt
    ctx.time_base = Fraction(1, 25)
    return b"".join(bytes(p) for p in ctx.encode(frame)) + b"".join(bytes(p) for p in ctx.encode(None))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Poster:
    """A JPEG thumbnail of a video's first frame, or why there is none."""

    jpeg: bytes | None
    error: str | None = None
    width: int = 0  # of the video
    height: int = 0
    duration_s: float | None = None


def extract_poster(source: Path | bytes, width: int = POSTER_WIDTH) -> Poster:
    """The first frame of ``source`` scaled to ``width`` pixels wide, as JPEG."""
    import av

    try:
        fileobj = io.BytesIO(source) if isinstance(source, bytes) else open_regular(source)
    except OSError as exc:
        return Poster(None, f"cannot open video: {_why(exc)}")
    hint = None
    if not isinstance(source, bytes):  # a file on disk must say it is a video before FFmpeg probes it
        head = fileobj.read(16)
        fileobj.seek(0)
        hint, why = container_of(head)
        if hint is None:
            fileobj.close()
            return Poster(None, why)
    try:
        # Probing bounded: FFmpeg otherwise reads and decodes up to 5 MB/5 s "to find the
        # streams", which for a crafted file is where the memory and time go.
        opened = av.open(fileobj, "r", format=hint, options={"probesize": str(PROBE_BYTES), "analyzeduration": "0"})
    except (av.FFmpegError, OSError, ValueError) as exc:
        fileobj.close()
        return Poster(None, f"cannot open video: {_why(exc)}")
    try:
        with fileobj, opened as container:
            if not container.streams.video:
                return Poster(None, "no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
                return Poster(None, f"frame {w}x{h} too large to decode", w, h)
            duration = float(container.duration) / 1_000_000 if container.duration else None
            for n, packet in enumerate(container.demux(stream)):
                if n >= MAX_PACKETS:
                    break
                for frame in packet.decode():
                    height = max(2, round(width * frame.height / max(1, frame.width)) // 2 * 2)
                    small = frame.reformat(width=width, height=height, format="yuvj420p")
                    return Poster(_encode_image(small, "mjpeg", "yuvj420p"), None, frame.width, frame.height, duration)
            return Poster(None, "no decodable frame", w, h, duration)
    except (av.FFmpegError, OSError, ValueError, MemoryError) as exc:
        return Poster(None, f"cannot decode video: {_why(exc)}")


def container_of(head: bytes) -> tuple[str | None, str]:
    """FFmpeg's demuxer for a file's first bytes (MP4/MOV or WebM/Matroska, what the API
    returns and browsers play), or (None, why not). Anything else is refused before FFmpeg
    sees it: given a PNG named .mp4 it would probe, pick its image decoder and decode a
    16000x16000 picture (2.2 GB) to "find the stream"."""
    if head[4:8] in _MP4_BOXES:
        return "mov", ""
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska", ""
    for magic, what in _IMAGES:
        if head.startswith(magic):
            return None, f"not a video ({what})"
    return None, "not a video (neither MP4/MOV nor WebM)"


def open_regular(path: Path) -> io.BufferedReader:
    """``path`` opened for reading if it is a regular file of its own, else ``OSError``.
    FFmpeg given a path opens whatever is there: a FIFO blocks it forever, a device reads
    without end. So we open it, without blocking and without following a link, check the
    descriptor, and hand FFmpeg the file object."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _why(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:200] if text else type(exc).__name__
