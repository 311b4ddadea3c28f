"""tasks → videos: follow submitted tasks to a terminal state and download their outputs.

Queries are idempotent, so unlike submissions every transient or ambiguous answer (429,
5xx, timeouts, dropped connections, bad JSON) is simply retried. Polls go through the
same :class:`~batch.ratelimit.SmoothLimiter` as submissions: they count against the same
per-key limit. A task still pending is polled again after an interval that grows with
the number of polls (``poll_min * 1.5**polls``, capped at ``poll_max``).

Downloads stream to ``DIR/.<name>.part`` in 64 KiB chunks (never a whole file in memory),
resume with ``Range`` after a failure, are checked against the announced size, fsynced
and renamed to ``DIR/<request_id>.<ext>``: a final name only ever holds a whole file. The
API key is never sent to resource URLs (they may be a CDN's).

The provider deletes outputs 24 hours after completion; a success seen more than
``output_ttl`` ago whose files are still missing is ``expired``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import structlog

from batch.api import TASK_PATH
from batch.client import Kind, Secret, backoff_delay, make_session, request_once
from batch.ledger import AsyncLedger, Entry, utcnow
from batch.ratelimit import DEFAULT_RATE, Rate, SmoothLimiter

TERMINAL = frozenset({"success", "failed", "expired"})
CHUNK = 1 << 16
T = TypeVar("T")

SQL_TASK = (
    "UPDATE requests SET task_status=?, resource_urls=COALESCE(?, resource_urls), resources=COALESCE(?, resources), "
    "failure_reason=?, "
    "completed_at=COALESCE(completed_at, ?), polls=polls+1, updated_at=? WHERE request_id=?"
)
SQL_DOWNLOAD = "UPDATE requests SET local_paths=?, download_error=?, task_status=?, updated_at=? WHERE request_id=?"


@dataclass(frozen=True)
class CollectConfig:
    base_url: str
    api_key: Secret
    rate: Rate | None = DEFAULT_RATE
    concurrency: int = 8
    max_attempts: int = 5
    http_timeout: float = 60.0
    wait: bool = False
    wait_timeout: float = 6 * 3600.0
    poll_min: float = 10.0
    poll_max: float = 600.0
    download_dir: Path | None = None
    download_concurrency: int = 4
    download_attempts: int = 5
    output_ttl: float = 24 * 3600.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0


@dataclass
class Task:
    request_id: str
    task_id: str
    return_last_frame: bool
    status: str | None  # task_status: None (never polled), pending, success, failed, expired
    resources: list[dict[str, Any]]
    completed_at: str | None
    local_paths: dict[str, Any] | None
    polls: int
    next_poll: float = 0.0
    download_tried: bool = False  # in this process: one pass of downloads per task

    @classmethod
    def from_entry(cls, e: Entry) -> Task:
        body = json.loads(e.body) if e.body else {}
        resources = json.loads(e.resources) if e.resources else []
        return cls(e.request_id, str(e.task_id), bool(body.get("return_last_frame")), e.task_status,
                   resources, e.completed_at, json.loads(e.local_paths) if e.local_paths else None, e.polls)


@dataclass
class CollectStats:
    task_status: Counter[str] = field(default_factory=Counter)
    polls: int = 0
    downloaded: int = 0
    download_skipped: int = 0
    download_failed: int = 0
    stop_reason: str | None = None
    interrupted: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"task_status": dict(sorted(self.task_status.items())), "polls": self.polls,
                "downloaded": self.downloaded, "download_skipped": self.download_skipped,
                "download_failed": self.download_failed, "stop_reason": self.stop_reason}


async def bounded(items: Iterable[T], fn: Callable[[T], Awaitable[None]], workers: int) -> None:
    """Run ``fn`` over ``items`` with at most ``workers`` at a time (no task per item)."""
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await fn(item)

    await asyncio.gather(*(worker() for _ in range(max(1, workers))))


def safe_name(request_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", request_id)


def _age_seconds(iso: str | None) -> float:
    if not iso:
        return 0.0
    return (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()


def wanted_files(task: Task, directory: Path) -> list[tuple[str, str, Path]]:
    """(role, url, final path) of each output to download for a successful task."""
    files = []
    for res in task.resources:
        url = res.get("url")
        if not isinstance(url, str):
            continue
        is_frame = res.get("role") == "last_frame" or res.get("type") == "image"
        if is_frame and not task.return_last_frame:
            continue
        ext = res.get("format") or Path(urlsplit(url).path).suffix.lstrip(".") or ("png" if is_frame else "mp4")
        stem = safe_name(task.request_id) + (".last_frame" if is_frame else "")
        files.append(("last_frame" if is_frame else "video", url, directory / f"{stem}.{ext}"))
    return files


class Collector:
    def __init__(self, config: CollectConfig, ledger: AsyncLedger) -> None:
        self.config = config
        self.ledger = ledger
        self.limiter = SmoothLimiter(config.rate)
        self.stats = CollectStats()
        self.stopping = asyncio.Event()
        self.log = structlog.get_logger("batch.collect")

    def interrupt(self, signame: str) -> None:
        self.stats.interrupted = True
        self.halt(f"interrupted by {signame}")

    def halt(self, reason: str) -> None:
        if not self.stopping.is_set():
            self.stats.stop_reason = reason
            self.stopping.set()
            self.log.warning("stopping", reason=reason)

    async def run(self, tasks: list[Task]) -> CollectStats:
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.wait_timeout
        async with make_session(cfg.concurrency, cfg.http_timeout, min(10.0, cfg.http_timeout)) as session, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=cfg.http_timeout,
                                                                    sock_connect=10)) as plain:
            self._session, self._plain = session, plain
            while not self.stopping.is_set():
                now = loop.time()
                due = [t for t in tasks if t.status not in TERMINAL and t.next_poll <= now]
                await bounded(due, self._poll, cfg.concurrency)
                if cfg.download_dir is not None:
                    ready = [t for t in tasks if t.status == "success" and not t.download_tried]
                    await bounded(ready, self._download, cfg.download_concurrency)
                waiting = [t for t in tasks if t.status not in TERMINAL]
                if not cfg.wait or not waiting:
                    break
                if loop.time() >= deadline:
                    self.halt(f"--timeout {cfg.wait_timeout:g}s reached with {len(waiting)} tasks pending")
                    break
                nap = min(min(t.next_poll for t in waiting), deadline) - loop.time()
                if nap > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), nap)
        for t in tasks:
            self.stats.task_status[t.status or "pending"] += 1
        return self.stats

    async def _poll(self, task: Task) -> None:
        cfg, loop = self.config, asyncio.get_running_loop()
        url = cfg.base_url.rstrip("/") + TASK_PATH.format(task_id=task.task_id)
        for attempt in range(1, cfg.max_attempts + 1):
            if self.stopping.is_set():
                return
            await self.limiter.acquire()
            verdict = await request_once(self._session, "GET", url, cfg.api_key)
            self.stats.polls += 1
            if verdict.kind is Kind.OK:
                self._record(task, verdict.data or {})
                break
            if verdict.kind is Kind.FATAL:
                self.halt(f"HTTP {verdict.http_status}: {verdict.error}")
                return
            if verdict.kind is Kind.FAIL:
                if verdict.http_status == 404:
                    self._set(task, "failed", None, "the provider does not know this task (HTTP 404)")
                    break
                self.log.warning("poll_rejected", request_id=task.request_id, http_status=verdict.http_status,
                                 error=verdict.error)
                break
            wait = backoff_delay(attempt, cfg.backoff_base, cfg.backoff_max)
            if verdict.retry_after is not None:
                wait = max(wait, verdict.retry_after)
                if verdict.http_status == 429:
                    self.limiter.cooldown(verdict.retry_after)
            self.log.debug("poll_retry", request_id=task.request_id, attempt=attempt, error=verdict.error)
            await asyncio.sleep(wait)
        task.polls += 1
        task.next_poll = loop.time() + min(cfg.poll_max, cfg.poll_min * 1.5 ** min(task.polls, 30))

    def _record(self, task: Task, data: dict[str, Any]) -> None:
        status = data.get("status")
        if status == "success":
            result = data.get("result") if isinstance(data.get("result"), dict) else {}
            resources = [r for r in (result or {}).get("resources", []) if isinstance(r, dict)]
            self._set(task, "success", resources, None)
        elif status == "failed":
            err = data.get("error")
            reason = (err.get("message") or err.get("code")) if isinstance(err, dict) else err
            self._set(task, "failed", None, str(reason or data.get("message") or "failed"))
        else:
            self._set(task, "pending", None, None)

    def _set(self, task: Task, status: str, resources: list[dict[str, Any]] | None, reason: str | None) -> None:
        now = utcnow()
        if status in TERMINAL and task.completed_at is None:
            task.completed_at = now
        if status == "success" and task.local_paths is None and _age_seconds(task.completed_at) > self.config.output_ttl:
            status, reason = "expired", "outputs are deleted 24 h after completion and were not downloaded"
        task.status = status
        if resources is not None:
            task.resources = resources
        urls = json.dumps([r.get("url") for r in resources]) if resources is not None else None
        full = json.dumps(resources) if resources is not None else None
        self.ledger.write(SQL_TASK, (status, urls, full, reason, task.completed_at if status in TERMINAL else None,
                                     now, task.request_id))
        self.log.debug("task", request_id=task.request_id, task_id=task.task_id, task_status=status)

    async def _download(self, task: Task) -> None:
        directory = self.config.download_dir
        assert directory is not None
        task.download_tried = True
        directory.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Any] = dict(task.local_paths or {})
        error = None
        fetched = False
        for role, url, final in wanted_files(task, directory):
            known = paths.get(role)
            if isinstance(known, dict) and final.exists() and final.stat().st_size == known.get("bytes"):
                continue  # already here with the right size
            try:
                size = await self._fetch(url, final)
            except DownloadError as exc:
                error = f"{role}: {exc}"
                if exc.gone:
                    task.status = "expired"
                break
            paths[role] = {"path": str(final), "bytes": size}
            fetched = True
        if error is not None:
            self.stats.download_failed += 1
        elif fetched:
            self.stats.downloaded += 1
        else:
            self.stats.download_skipped += 1
        if fetched or error is not None or paths != (task.local_paths or {}):
            task.local_paths = paths or None
            self.ledger.write(SQL_DOWNLOAD, (json.dumps(paths) if paths else None, error, task.status, utcnow(),
                                             task.request_id))
        if error is not None:
            self.log.warning("download_failed", request_id=task.request_id, error=error)

    async def _fetch(self, url: str, final: Path) -> int:
        """Download ``url`` to ``final`` via a resumable ``.part`` file; return its size."""
        part = final.with_name(f".{final.name}.part")
        last_error = "no attempt"
        for attempt in range(1, self.config.download_attempts + 1):
            if self.stopping.is_set():
                raise DownloadError(f"stopped ({last_error})")
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                async with self._plain.get(url, headers=headers, allow_redirects=True) as resp:
                    if resp.status in (403, 404, 410):
                        raise DownloadError(f"HTTP {resp.status}: output no longer available", gone=True)
                    if resp.status == 416 and have:
                        part.unlink()  # our partial file is longer than the output: start over
                        last_error = "HTTP 416"
                        continue
                    if resp.status not in (200, 206):
                        raise _Retry(f"HTTP {resp.status}")
                    total = _total_size(resp, have)
                    mode = "ab" if resp.status == 206 else "wb"
                    with open(part, mode) as out:
                        async for chunk in resp.content.iter_chunked(CHUNK):
                            out.write(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                size = part.stat().st_size
                if total is not None and size != total:
                    raise _Retry(f"got {size} of {total} bytes")
                os.replace(part, final)
                return size
            except DownloadError:
                raise
            except (_Retry, aiohttp.ClientError, TimeoutError, OSError) as exc:
                last_error = str(exc) or type(exc).__name__
                self.log.debug("download_retry", url_path=urlsplit(url).path, attempt=attempt, error=last_error)
                await asyncio.sleep(backoff_delay(attempt, self.config.backoff_base, self.config.backoff_max))
        raise DownloadError(f"gave up after {self.config.download_attempts} attempts: {last_error}")


class DownloadError(Exception):
    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


class _Retry(Exception):
    pass


def _total_size(resp: aiohttp.ClientResponse, have: int) -> int | None:
    if resp.status == 206:
        match = re.search(r"/(\d+)$", resp.headers.get("Content-Range", ""))
        return int(match.group(1)) if match else None
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None
