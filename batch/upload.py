"""Local reference images, checked before anything is paid and uploaded once per content.

The provider takes images by URL. Its newer client (``Modellix/dsh-modellix``,
``src/design/media-upload-client.ts``, CHANGELOG 0.2.0 of 2026-08-31, as recorded in
``shared/api/provider-today.md``) uploads one PNG, JPEG or WebP image of at most 16 MiB as
multipart to ``POST {api}/api/v1/media/files`` and reads ``file_id``, ``url``, ``type``,
``filename``, ``size`` and ``created_at`` from the answer. The multipart field's name is
not recorded there: ``file`` is our choice (inferred, the common one).

Guarantees:

* **Checked first.** Every value of an image field that is not an http(s) URL, a data: URI
  or Base64 image data names a local file (a path relative to the sheet, whatever its
  name, or a ``file://`` URL) and is checked while the sheet is expanded: it must lie in
  the sheet's folder tree (``..`` and symlinks leading out are refused), be a regular
  readable file of at most 16 MiB (opened by walking from the sheet's folder with
  ``O_NOFOLLOW``, so a directory swapped for a symlink after the check is refused, not
  followed), and *be* a PNG, JPEG or WebP by its bytes (not its
  name). A bad one makes the row ``invalid`` naming the cell, before anything is paid; so
  does a value of a URL-only field (``video_urls``, ``audio_urls``) that is not an http(s) URL.
  Only a row whose every image passed counts (and later uploads) its images.
* **Identity by content.** A checked file becomes ``local-image:sha256:<hex>`` in the
  request body, so the request id (and the ledger's memory) follows the image's bytes, not
  its path: a renamed or copied file is the same request.
* **Once per content.** Just before a request is sent its placeholders become URLs: the
  ledger's ``uploads`` table (one row per API and SHA-256, in either store, so hosts
  sharing a PostgreSQL ledger share its uploads) is consulted first, so reruns, duplicates
  and later nights upload nothing again (no lifetime of the URL is documented, so a recorded URL is reused). Concurrent requests
  with the same image share one upload. The bytes are re-read and re-hashed at upload
  time: a file changed since the check fails its request, never sends other bytes.
* **Same rules as submissions.** An upload takes its turn in the key's rate budget, goes
  to the API's own host (the key goes nowhere else), and is retried on 429/503 and
  connection failures (an upload is free: resending it costs nothing).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp

from batch.client import Kind, Secret, Transport, Verdict, classify, describe, retry_wait

UPLOAD_PATH = "/api/v1/media/files"
MAX_BYTES = 16 << 20
PLACEHOLDER = "local-image:sha256:"
IMAGE_FIELDS = frozenset({"first_frame_image", "last_frame_image", "reference_images"})
# Fields that take URLs only ("URL, or Base64 for images"): nothing is uploaded for them, so a
# local path there is refused before it is paid for, not sent raw.
URL_FIELDS = frozenset({"video_urls", "audio_urls"})
_PLACEHOLDER = re.compile(re.escape(PLACEHOLDER) + r"([0-9a-f]{64})")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_BUCKET = re.compile(r"(s3|gs|gcs|az|abfs|r2)://", re.IGNORECASE)

class UploadError(Exception):
    """An image could not be uploaded; ``definite``: the provider refused it (no retry helps)."""

    def __init__(self, message: str, definite: bool) -> None:
        super().__init__(message)
        self.definite = definite


@dataclass(frozen=True)
class LocalImage:
    path: str  # resolved, inside the sheet's tree
    sha256: str
    size: int
    mime: str


def sniff(head: bytes) -> str | None:
    """The image type by its first bytes: the three the provider takes, else ``None``."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def base64_image(text: str) -> bool:
    """Whether ``text`` is Base64 image data, which the specs let an image field carry
    ("a URL or Base64 data"): strict Base64 whose bytes start as a PNG, JPEG or WebP. A
    path such as ``frames/hero`` is Base64 too by its letters, but not an image."""
    if len(text) < 16 or not _BASE64.fullmatch(text):
        return False
    try:
        return sniff(base64.b64decode(text[:24], validate=True)) is not None
    except ValueError:
        return False


def local_reference(value: Any) -> str | None:
    """The path a cell value of an image field names, else ``None``: an http(s) URL, a
    data: URI or Base64 image data is sent as it is; *every* other value names a local
    file (or a bucket, or another scheme: :meth:`LocalImages.check` says why not), whatever
    its name looks like, so nothing unchecked reaches the provider."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    lower = text.lower()
    if lower.startswith(("http://", "https://", "data:")) or base64_image(text):
        return None
    if lower.startswith("file://"):
        parts = urlsplit(text)
        return unquote(parts.path) if parts.netloc in ("", "localhost") else text
    return text


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _open_inside(root: str, real: str) -> int:
    """A descriptor for ``real`` (a resolved path inside ``root``) opened by walking from
    ``root`` one component at a time, never following a symlink: a directory swapped for
    a symlink after ``realpath`` fails the walk (``ELOOP``/``ENOTDIR``) instead of leading
    the open out of the tree."""
    parts = os.path.relpath(real, root).split(os.sep)
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), dir_fd=fd)
    finally:
        os.close(fd)


def read_checked(path: str, root: str) -> tuple[bytes | None, LocalImage | str]:
    """The file's bytes and its :class:`LocalImage`, or the reason it is refused. The bytes
    hashed are the bytes returned (and uploaded): read once, from one descriptor."""
    try:
        real = os.path.realpath(path)  # EINVAL, ELOOP while a directory is being swapped
    except (OSError, ValueError) as exc:
        return None, f"cannot be checked ({exc.strerror if isinstance(exc, OSError) else exc})"
    if real == root or not real.startswith(root.rstrip(os.sep) + os.sep):
        inside = os.path.abspath(path)
        leads = inside == root or inside.startswith(root.rstrip(os.sep) + os.sep)
        if real != root or not leads:
            return None, ("a symlink leading out of the sheet's folder" if leads else "outside the sheet's folder")
        return None, "not a regular file"
    try:
        fd = _open_inside(root, real)
    except FileNotFoundError:
        return None, "no such file"
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return None, "a symlink leading out of the sheet's folder (it changed while checked)"
        return None, f"cannot be read ({exc.strerror})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file"
        if info.st_size > MAX_BYTES:
            return None, f"{info.st_size} bytes, over the provider's 16 MiB limit"
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror})"
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        return None, "over the provider's 16 MiB limit"
    mime = sniff(data[:16])
    if mime is None:
        return None, "not a PNG, JPEG or WebP image (judged by its bytes)"
    return data, LocalImage(real, hashlib.sha256(data).hexdigest(), len(data), mime)


class LocalImages:
    """The local images of one run's sheets: checked once per file, counted per content."""

    def __init__(self) -> None:
        self.by_hash: dict[str, LocalImage] = {}
        self.planned: tuple[int, int] = (0, 0)  # files, bytes a run would upload (set by a dry run's plan)
        self._checked: dict[tuple[str, int, int], LocalImage | str] = {}  # per path as named

    def check(self, value: str, sheet: Path | None) -> LocalImage | str:
        """One cell's file, checked (cached per file, size and mtime), or why it is refused.
        Never raises: a NUL byte, a name too long, a loop, a directory swapped mid-check
        is that cell's problem (its row ``invalid``), never the night's."""
        try:
            return self._check(value, sheet)
        except (ValueError, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return f"cannot be checked ({why})"

    def _check(self, value: str, sheet: Path | None) -> LocalImage | str:
        if _BUCKET.match(value.strip()):
            return "a bucket URL: images in buckets are not uploaded (give a local path next to the sheet or an https URL)"
        named = local_reference(value)
        if named is None:
            return "not a local file"
        if named.lower().startswith("file://"):
            return "a file:// URL naming another host"
        if "://" in named:
            return "not an http(s) URL, a data: URI, Base64 image data or a local file"
        if len(named) > 1024 or "\n" in named or "\x00" in named:
            return "not a file name (too long, or a line break or NUL in it)"
        if sheet is None:
            return "a local image path needs a sheet on local disk"
        root = os.path.realpath(sheet)
        path = os.path.join(root, os.path.expanduser(named)) if not os.path.isabs(named) else named
        try:
            info = os.stat(path)
            key = (os.path.abspath(path), info.st_size, info.st_mtime_ns)  # the name given: its verdict
        except OSError:
            key = None
        if key is not None and key in self._checked:
            return self._checked[key]
        _, found = read_checked(path, root)
        if key is not None:
            self._checked[key] = found
        return found

    def localize(self, body: dict[str, Any], sheet: Path | None, where: Callable[[str], str]) -> list[str]:
        """Replace each local image of ``body`` by its placeholder; the problems, each
        naming the field, the value and the cell (``where(field)``), a value of a URL-only
        field (:data:`URL_FIELDS`) that is not an http(s) URL among them."""
        problems: list[str] = []
        good: list[LocalImage] = []

        def one(name: str, value: Any, item: int | None) -> Any:
            if local_reference(value) is None:
                return value
            found = self.check(value, sheet)
            if isinstance(found, str):
                at = f"{name}[{item}]" if item is not None else name
                shown = value if len(value) <= 200 else f"{value[:200]}..."
                problems.append(f"{at}={shown!r} (cell {where(name)}): {found}")
                return value
            good.append(found)
            return PLACEHOLDER + found.sha256

        for name in IMAGE_FIELDS & body.keys():
            value = body[name]
            body[name] = [one(name, v, i) for i, v in enumerate(value)] if isinstance(value, list) \
                else one(name, value, None)
        for name in URL_FIELDS & body.keys():
            value = body[name]
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                if isinstance(v, str) and not v.strip().lower().startswith(("http://", "https://")):
                    shown = v if len(v) <= 200 else f"{v[:200]}..."
                    problems.append(f"{name}[{i}]={shown!r} (cell {where(name)}): not an http(s) URL "
                                    "(only images are uploaded from local files)")
        if not problems:  # only a row that will be sent uploads (and counts) its images
            self.by_hash.update((img.sha256, img) for img in good)
        return problems

    def totals(self, known: set[str]) -> tuple[int, int]:
        """(files, bytes) that would be uploaded: the contents the ledger has no URL for."""
        new = [img for sha, img in self.by_hash.items() if sha not in known]
        return len(new), sum(img.size for img in new)


def placeholders(body: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for name in IMAGE_FIELDS & body.keys():
        value = body[name]
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and (m := _PLACEHOLDER.fullmatch(v)):
                found.add(m.group(1))
    return found


def read_answer(verdict: Verdict) -> dict[str, Any] | None:
    """The upload answer's fields, from ``data`` or the top level (the envelope of this
    endpoint is not recorded); ``None`` without an http(s) ``url``."""
    body = verdict.body if isinstance(verdict.body, dict) else {}
    data = body.get("data") if isinstance(body.get("data"), dict) else body
    url = data.get("url")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")) or len(url) > 4096:
        return None
    return {k: data.get(k) if isinstance(data.get(k), (str, int)) and not isinstance(data.get(k), bool) else None
            for k in ("file_id", "type", "filename", "size", "created_at")} | {"url": url}


class Uploader:
    """Turns placeholders into URLs at send time, uploading each content at most once."""

    def __init__(self, images: LocalImages, base_url: str, key: Secret, api: str, known: dict[str, str],
                 record: Callable[[tuple[Any, ...]], None], max_attempts: int = 5,
                 transport: Transport | None = None, backoff: tuple[float, float] = (0.5, 30.0)) -> None:
        self.images = images
        self.url = base_url.rstrip("/") + UPLOAD_PATH
        self.key, self.api, self.known, self.record = key, api, dict(known), record
        self.max_attempts, self.transport, self.backoff = max_attempts, transport, backoff
        self.uploads = 0
        self.bytes = 0
        self._pending: dict[str, asyncio.Future[str]] = {}

    async def resolve(self, body: dict[str, Any], session: aiohttp.ClientSession, acquire: Callable[[], Any],
                      heed: Callable[[Verdict], None]) -> dict[str, Any]:
        wanted = placeholders(body)
        if not wanted:
            return body
        urls = {sha: await self._url(sha, session, acquire, heed) for sha in sorted(wanted)}

        def swap(v: Any) -> Any:
            return urls[m.group(1)] if isinstance(v, str) and (m := _PLACEHOLDER.fullmatch(v)) else v

        return {k: ([swap(x) for x in v] if isinstance(v, list) else swap(v)) if k in IMAGE_FIELDS else v
                for k, v in body.items()}

    async def _url(self, sha: str, session: aiohttp.ClientSession, acquire: Callable[[], Any],
                   heed: Callable[[Verdict], None]) -> str:
        if sha in self.known:
            return self.known[sha]
        if sha in self._pending:  # another request with this image is uploading it
            return await asyncio.shield(self._pending[sha])
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[sha] = fut
        try:
            url = await self._upload(sha, session, acquire, heed)
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, UploadError) else UploadError(str(exc), False))
            fut.exception()  # retrieved: waiters get it, nobody is warned of an unawaited one
            del self._pending[sha]
            raise
        self.known[sha] = url
        fut.set_result(url)
        return url

    async def _upload(self, sha: str, session: aiohttp.ClientSession, acquire: Callable[[], Any],
                      heed: Callable[[Verdict], None]) -> str:
        image = self.images.by_hash.get(sha)
        if image is None:
            raise UploadError(f"image sha256:{sha[:12]} is not among this run's checked files", True)
        try:
            data, found = read_checked(image.path, os.path.dirname(image.path))
        except (ValueError, OSError):  # swapped since the check: refused like a change
            data, found = None, "unreadable"
        if data is None or not isinstance(found, LocalImage) or found.sha256 != sha:
            raise UploadError(f"{image.path} changed since it was checked; not uploaded", True)
        name = "image" + {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}[image.mime]
        verdict = Verdict(Kind.UNKNOWN)
        proxy = self.transport.proxy_for(self.url) if self.transport is not None else None
        for attempt in range(1, self.max_attempts + 1):
            await acquire()
            form = aiohttp.FormData()
            form.add_field("file", data, filename=name, content_type=image.mime)
            try:
                async with session.post(self.url, data=form, headers={"Authorization": f"Bearer {self.key.reveal()}"},
                                        allow_redirects=False, proxy=proxy) as resp:
                    raw = await resp.content.read(1 << 20)
                    verdict = classify(resp.status, raw, resp.headers, self.key)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                verdict = Verdict(Kind.RETRY, error=f"upload: {describe(exc)}")
            heed(verdict)
            status = verdict.http_status or 0
            if 200 <= status < 300:
                answer = read_answer(verdict)
                if answer is None:
                    raise UploadError(f"upload answered HTTP {status} without a usable url", False)
                self.uploads += 1
                self.bytes += image.size
                self.record((self.api, sha, answer["file_id"], answer["url"], answer["type"], answer["filename"],
                             answer["size"], answer["created_at"], datetime.now(UTC).isoformat(timespec="seconds")))
                return str(answer["url"])
            if verdict.kind in (Kind.FAIL, Kind.FATAL):
                raise UploadError(f"upload refused (HTTP {status}): {verdict.error}", True)
            if attempt < self.max_attempts:
                await asyncio.sleep(retry_wait(verdict, attempt, *self.backoff))
        raise UploadError(f"upload failed after {self.max_attempts} attempts: {verdict.error}", False)
