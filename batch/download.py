"""Downloads of task outputs, as careful as the provider's official CLI (``src/lib/task.ts``).

Guarantees:

* **Where bytes come from.** https only (plain http only when the API base itself is on
  loopback: the tests and the demo); no private, loopback or reserved address (literal or
  resolved) unless the API is on loopback; redirects followed by hand, at most 5, each
  target checked again; the API key is never sent, and no cookie either.
* **How much and how long.** A size cap per file (default 2 GiB) and per task (2 GiB, its
  files together, as the official CLI has it), enforced on the announced ``Content-Length``
  and on the bytes received; an overall deadline per file; a minimum throughput (a server
  dripping bytes is cut off); cancellation (SIGTERM) stops at once.
* **What a byte is.** Outputs are asked for uncompressed (``Accept-Encoding: identity``);
  a server that compresses anyway is unpacked, the caps count the unpacked bytes (and at
  most :data:`MAX_RATIO` times what was sent), its ``Content-Length`` is not compared with
  them, and it is never resumed.
* **Where bytes go.** The file name comes only from our request id and label, and the
  extension from a fixed allow-list, never from the URL or the answer. Every name is
  opened relative to the download directory's descriptor, held from the first download
  (a directory swapped for a symlink later is not followed), with ``O_NOFOLLOW``, and a
  new ``.part`` with ``O_EXCL``: a symlink or hard link planted at a ``.part`` or final
  name is never written through (it is removed, or replaced by the rename). Bytes go to
  ``.<name>.part`` (kept for a ``Range`` resume), are fsynced and renamed: a final name
  only ever holds a whole file. A download given up removes its ``.part``.
* **Never a crash.** A URL or ``Location`` that does not parse is a :class:`DownloadError`
  of its file, like any other refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import re
import socket
import stat
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import aiohttp.abc
import aiohttp.resolver
from aiohttp import compression_utils

from batch.client import Transport
from batch.storage import stream_upload

CHUNK = 1 << 16
VIDEO_EXTENSIONS = frozenset({"mp4", "mov", "webm"})
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
GIB = 1 << 30
# What aiohttp decodes here (one encoding, not a list): br and zstd only with their
# optional packages; without them aiohttp fails every attempt, so they are refused at once.
UNPACKED = frozenset({"gzip", "deflate"}
                     | ({"br"} if getattr(compression_utils, "HAS_BROTLI", False) else set())
                     | ({"zstd"} if getattr(compression_utils, "HAS_ZSTD", False) else set()))
MAX_RATIO = 64  # unpacked bytes per byte sent, for a server that compresses anyway (videos barely compress)


@dataclass(frozen=True)
class DownloadPolicy:
    allow_local: bool = False  # http and private addresses: only for an API on loopback
    # Issue #12 asks 2 GiB per file; the official CLI (provider-today.md) caps a file at
    # 1 GiB and a task's files together at 2 GiB, which the task cap here keeps.
    max_bytes: int = 2 * GIB
    task_max_bytes: int = 2 * GIB
    task_left: int | None = None  # what this task's earlier files left of task_max_bytes
    deadline: float = 1800.0  # seconds per file
    min_rate: float = 16 * 1024  # bytes/s, averaged over ``rate_window``
    rate_window: float = 30.0
    max_redirects: int = 5
    stall: float = 60.0  # seconds without a byte

    @property
    def cap(self) -> int:
        return self.max_bytes if self.task_left is None else min(self.max_bytes, self.task_left)

    def cap_text(self) -> str:
        if self.task_left is not None and self.task_left < self.max_bytes:
            return f"the {self.task_left} bytes left of the task's {self.task_max_bytes}-byte limit"
        return f"the {self.max_bytes}-byte limit"


class DownloadError(Exception):
    def __init__(self, message: str, gone: bool = False, retry: bool = False) -> None:
        super().__init__(message)
        self.gone = gone
        self.retry = retry


def _address_allowed(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return True  # a name: checked once resolved
    return address.is_global


def check_url(url: str, policy: DownloadPolicy) -> str:
    """``url`` if it may be fetched under ``policy``, else :class:`DownloadError`."""
    if not isinstance(url, str) or len(url) > 4096 or any(c in url for c in "\r\n\t "):
        raise DownloadError("not a usable URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is no number or out of range
    except ValueError:
        raise DownloadError("not a usable URL (it does not parse)") from None
    allowed = ("https", "http") if policy.allow_local else ("https",)
    if parts.scheme not in allowed:
        raise DownloadError(f"refusing a {parts.scheme or 'schemeless'} URL (https only)")
    if not parts.hostname:
        raise DownloadError("URL without a host")
    if parts.username or parts.password:
        raise DownloadError("refusing a URL with credentials")
    if not policy.allow_local and not _address_allowed(parts.hostname):
        raise DownloadError(f"refusing a private or reserved address ({parts.hostname})")
    return url


class PrivateAddress(OSError):
    """A name that resolves only into the local network."""


class PublicResolver(aiohttp.abc.AbstractResolver):
    """Resolves as usual, then keeps only public addresses: a name that points into the
    local network cannot make us fetch from it."""

    def __init__(self) -> None:
        self._inner = aiohttp.resolver.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if _address_allowed(r["host"])]
        if not public:
            raise PrivateAddress(errno.EACCES, f"{host} resolves only to private or reserved addresses")
        return public

    async def close(self) -> None:
        await self._inner.close()


def make_download_session(policy: DownloadPolicy, transport: Transport | None = None) -> aiohttp.ClientSession:
    transport = transport or Transport()
    # Through a proxy, names are resolved by the proxy: only literal addresses are checked here.
    resolver = None if policy.allow_local or transport.proxied else PublicResolver()
    connector = aiohttp.TCPConnector(limit=64, resolver=resolver, ssl=transport.ssl_context())
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=policy.stall),
    )


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def file_stem(request_id: str, label: str | None) -> str:
    """``<label>_<request_id>`` (or the id alone): letters, digits, ``.``, ``_``, ``-``
    only, never starting with a dot, at most 64 characters of label."""
    rid = _SAFE.sub("_", request_id)
    if not label:
        return rid
    clean = _SAFE.sub("_", label).lstrip(".")[:64]
    return f"{clean}_{rid}" if clean else rid


def extension(resource: dict[str, Any], is_frame: bool) -> str:
    fmt = resource.get("format")
    allowed = IMAGE_EXTENSIONS if is_frame else VIDEO_EXTENSIONS
    if isinstance(fmt, str) and fmt.lower() in allowed:
        return fmt.lower()
    return "png" if is_frame else "mp4"


def contained(directory: Path, name: str) -> Path:
    """``directory / name``, refusing a name that is not one plain entry of ``directory``.
    What is at that name is not looked at (a planted symlink must not decide): the sink
    opens it relative to the directory's descriptor, without following links."""
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise DownloadError(f"refusing to write outside {directory}")
    return directory.resolve() / name


def open_directory(directory: Path) -> int:
    """A descriptor of ``directory`` (created if need be): every name is then opened
    relative to it, whatever becomes of the path later."""
    directory.mkdir(parents=True, exist_ok=True)
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def regular_size(name: str, dir_fd: int) -> int | None:
    """The size of the regular file ``name`` in ``dir_fd``; ``None`` when there is none
    (or something else is there: a symlink, a directory, or a file with a second name:
    a hard link planted at a predictable name is someone else's file, never our output)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else None


class _Pace:
    """The minimum-throughput rule: over every ``window`` seconds after the first, at
    least ``min_rate * window`` bytes must arrive."""

    def __init__(self, policy: DownloadPolicy) -> None:
        self.policy = policy
        self.start = time.monotonic()
        self.mark_t = self.start
        self.mark_bytes = 0

    def check(self, received: int) -> None:
        now = time.monotonic()
        if now - self.start > self.policy.deadline:
            raise DownloadError(f"deadline of {self.policy.deadline:g} s passed", retry=False)
        if now - self.mark_t >= self.policy.rate_window:
            rate = (received - self.mark_bytes) / (now - self.mark_t)
            if rate < self.policy.min_rate:
                raise DownloadError(f"too slow ({rate:.0f} B/s over {now - self.mark_t:.0f} s; "
                                    f"minimum {self.policy.min_rate:.0f} B/s)", retry=True)
            self.mark_t, self.mark_bytes = now, received


def _total_size(resp: aiohttp.ClientResponse) -> int | None:
    if resp.status == 206:
        match = re.search(r"/(\d+)$", resp.headers.get("Content-Range", ""))
        return int(match.group(1)) if match else None
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


class FileSink:
    """A local file: bytes go to ``.<name>.part`` (kept for a ``Range`` resume), then are
    fsynced and renamed to the final name, every name relative to ``dir_fd`` (the
    download directory's descriptor; without one, the final path's directory is opened
    for each use)."""

    def __init__(self, final: Path, dir_fd: int | None = None) -> None:
        self.final = final
        self.part = final.with_name(f".{final.name}.part")
        self.dir_fd = dir_fd

    def _dir(self) -> contextlib.AbstractContextManager[int]:
        if self.dir_fd is not None:
            return contextlib.nullcontext(self.dir_fd)
        return _closing_fd(os.open(self.final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    def resume_from(self, max_bytes: int) -> int:
        with self._dir() as dfd:
            try:
                st = os.stat(self.part.name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return 0
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > max_bytes:
                # A planted link, or longer than the output may be: never appended to.
                os.unlink(self.part.name, dir_fd=dfd)
                return 0
            return st.st_size

    def restart(self) -> None:
        with self._dir() as dfd, contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(self.part.name, dir_fd=dfd)

    def _open(self, dfd: int, have: int) -> int:
        if have:
            fd = os.open(self.part.name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size == have:
                return fd
            os.close(fd)  # swapped since resume_from: start over
            raise DownloadError("partial file changed under us", retry=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.part.name, dir_fd=dfd)  # whatever is there (a link) goes, not its target
        return os.open(self.part.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o644, dir_fd=dfd)

    async def receive(self, chunks: AsyncIterator[bytes], have: int, total: int | None) -> int:
        with self._dir() as dfd:
            with open(self._open(dfd, have), "ab") as out:
                async for chunk in chunks:
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
                size = os.fstat(out.fileno()).st_size
            if total is not None and size != total:
                raise DownloadError(f"got {size} of {total} bytes", retry=True)
            # rename replaces whatever is at the final name (a planted link itself, never its target)
            os.rename(self.part.name, self.final.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        return size


@contextlib.contextmanager
def _closing_fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


class ObjectSink:
    """An object in a bucket: bytes stream into a multipart upload that completes only
    when every byte has arrived and been checked; any failure aborts it (no object)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def resume_from(self, max_bytes: int) -> int:
        return 0  # an object cannot be appended to: a retry starts over

    def restart(self) -> None:
        pass

    async def receive(self, chunks: AsyncIterator[bytes], have: int, total: int | None) -> int:
        received = 0

        async def checked() -> AsyncIterator[bytes]:
            nonlocal received
            async for chunk in chunks:
                received += len(chunk)
                yield chunk
            if total is not None and received != total:  # before the upload completes
                raise DownloadError(f"got {received} of {total} bytes", retry=True)

        try:
            await stream_upload(self.url, checked())
        except DownloadError:
            raise
        except Exception as exc:  # the bucket's errors: the upload was aborted
            raise DownloadError(f"cannot write {self.url} ({type(exc).__name__}: {str(exc)[:160]})",
                                retry=True) from None
        return received


Sink = FileSink | ObjectSink


async def fetch(session: aiohttp.ClientSession, url: str, sink: Sink, policy: DownloadPolicy,
                transport: Transport | None = None) -> int:
    """One attempt: download ``url`` into ``sink`` (a local file resumed with ``Range``, or
    an object); return the size. Raises :class:`DownloadError`. Each redirect hop takes
    the proxy for its own host (``NO_PROXY`` may list one and not the other)."""
    transport = transport or Transport()
    have = sink.resume_from(policy.cap)
    pace = _Pace(policy)
    target = check_url(url, policy)
    for _hop in range(policy.max_redirects + 1):
        # identity: a compressed answer's Content-Length counts packed bytes, and a Range of
        # packed bytes cannot resume a file of unpacked ones.
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
        remaining = policy.deadline - (time.monotonic() - pace.start)
        try:
            async with asyncio.timeout(max(0.001, remaining)):
                async with session.get(target, headers=headers, allow_redirects=False,
                                       proxy=transport.proxy_for(target)) as resp:
                    if resp.status in REDIRECTS:
                        location = resp.headers.get("Location")
                        if not location:
                            raise DownloadError(f"HTTP {resp.status} without Location")
                        try:
                            joined = urljoin(target, location)
                        except ValueError:
                            raise DownloadError(f"HTTP {resp.status} to a Location that is "
                                                "not a usable URL (it does not parse)") from None
                        target = check_url(joined, policy)
                        continue
                    if resp.status in (403, 404, 410):
                        raise DownloadError(f"HTTP {resp.status}: output no longer available", gone=True)
                    if resp.status == 416 and have:
                        sink.restart()  # our partial file is longer than the output: start over
                        raise DownloadError("HTTP 416", retry=True)
                    if resp.status not in (200, 206):
                        raise DownloadError(f"HTTP {resp.status}", retry=True)
                    start = have if resp.status == 206 else 0
                    total = _total_size(resp)
                    if total is not None and total > policy.cap:
                        raise DownloadError(f"output of {total} bytes is over {policy.cap_text()}")
                    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
                    packed = encoding not in ("", "identity")
                    if packed and encoding not in UNPACKED:  # aiohttp would hand us the packed bytes
                        raise DownloadError(f"answer in a Content-Encoding we do not unpack ({encoding[:40]})")
                    if packed and start:
                        sink.restart()  # unpacked bytes cannot continue from a packed offset
                        raise DownloadError("compressed answer to a resumed download", retry=True)
                    limit = None if not packed or total is None else max(total, 1) * MAX_RATIO
                    return await sink.receive(_bounded(resp, start, policy, pace, limit), start,
                                              None if packed else total)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, PrivateAddress):
                raise DownloadError(f"refusing a private or reserved address ({exc.os_error.strerror})") from None
            raise DownloadError(str(exc) or type(exc).__name__, retry=True) from None
        except aiohttp.ClientResponseError as exc:
            if "content-encoding" in str(exc.message).lower():  # aiohttp cannot unpack it here: no retry can
                raise DownloadError(f"answer in a Content-Encoding we do not unpack ({str(exc.message)[:80]})") \
                    from None
            raise DownloadError(str(exc) or type(exc).__name__, retry=True) from None
        except aiohttp.ClientError as exc:  # before TimeoutError: a stalled read is one of these
            raise DownloadError(str(exc) or type(exc).__name__, retry=True) from None
        except TimeoutError:
            raise DownloadError(f"deadline of {policy.deadline:g} s passed") from None
        except OSError as exc:
            raise DownloadError(exc.strerror or str(exc), retry=True) from None
        except ValueError:  # a URL yarl or aiohttp will not take although it split
            raise DownloadError("not a usable URL (it does not parse)") from None
    raise DownloadError(f"more than {policy.max_redirects} redirects")


async def _bounded(resp: aiohttp.ClientResponse, have: int, policy: DownloadPolicy,
                   pace: _Pace, unpacked_limit: int | None = None) -> AsyncIterator[bytes]:
    """The body in chunks (unpacked, when the server compressed it), under the size cap,
    the unpacking ratio and the minimum throughput."""
    received = have
    async for chunk in resp.content.iter_chunked(CHUNK):
        received += len(chunk)
        if received > policy.cap:
            raise DownloadError(f"output over {policy.cap_text()}")
        if unpacked_limit is not None and received > unpacked_limit:
            raise DownloadError(f"compressed answer unpacks to over {MAX_RATIO} times the bytes sent")
        pace.check(received)
        yield chunk
