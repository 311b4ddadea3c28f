"""tasks → videos: follow submitted tasks to a terminal state and download their outputs.

Queries are idempotent, so unlike submissions every transient or ambiguous answer (429,
5xx, timeouts, dropped connections, bad JSON) is simply retried. Polls go through the
same :class:`~batch.ratelimit.SmoothLimiter` as submissions: they count against the same
per-key limit. A task still pending is polled again after an interval that grows with
the number of polls (``poll_min * 1.5**polls``, capped at ``poll_max``).

Guarantees:

* **One bad answer costs one task.** Each task answer is validated on its own
  (:func:`read_task`): a malformed one is recorded on that task (it stays non-terminal, or
  fails with the reason) and every other task goes on; an unexpected error while handling
  one task is logged and that task is polled again next pass.
* **Task states as the provider has them.** ``pending`` (also ``queued``/``created``) and
  ``processing`` (also ``running``/``in_progress``) are not terminal; ``success`` (also
  ``succeeded``/``completed``/``done``) is; ``failed``, ``cancelled``/``canceled``,
  ``error`` and ``expired`` are terminal failures with the reason the answer carries; an
  unknown state is logged once per value and kept non-terminal.
* **A success must be downloadable.** A success without a usable video URL is a
  ``download_error`` ("success without a downloadable output"), never a quiet exit 0.
* **One bad output costs one task.** Every per-task step of a download (the URL, each
  redirect, the file, the rename, the upload) fails into that task's ``download_error``,
  never into the run: the other tasks are downloaded and the table is written.
* **The key is never stored.** Every error text built from an answer, an exception or a
  URL passes :meth:`~batch.client.Secret.scrub` before it is logged or stored.
* **Bounded.** ``--timeout`` bounds the whole collect, downloads included; SIGTERM stops
  polls and downloads at once (partial files stay for a resume); see :mod:`batch.download`.

The provider deletes outputs 24 hours after completion; a success seen more than
``output_ttl`` ago, or past the ``result_expires_at`` its answer states, whose files are
still missing is ``expired``. Downloads go soonest-expiring first (:mod:`batch.expiry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from batch import expiry, retry
from batch.api import FAKE_API, task_url, whole_json
from batch.client import (
    Kind,
    Secret,
    Transport,
    backoff_delay,
    clean_text,
    make_session,
    request_once,
    retry_wait,
)
from batch.download import (
    DownloadError,
    DownloadPolicy,
    FileSink,
    ObjectSink,
    Sink,
    contained,
    extension,
    fetch,
    file_stem,
    make_download_session,
    open_directory,
    regular_size,
)
from batch.expiry import parse_expiry
from batch.ledger import AsyncLedger, Entry, utcnow
from batch.ratelimit import DEFAULT_RATE, Rate, SmoothLimiter
from batch.storage import ObjectUrl, object_size_async

TERMINAL = frozenset({"success", "failed", "expired"})
SUCCESS_STATES = frozenset({"success", "succeeded", "completed", "done"})
FAILURE_STATES = frozenset({"failed", "cancelled", "canceled", "error", "expired"})
RUNNING_STATES = frozenset({"pending", "processing", "queued", "created", "running", "in_progress"})
GENERATING_STATES = frozenset({"processing", "running", "in_progress"})  # the rest of RUNNING_STATES: pending
MAX_RESOURCES = 100
NO_OUTPUT = "success without a downloadable output"
T = TypeVar("T")
_SAFE_WORD = re.compile(r"[A-Za-z0-9_.:/+-]{1,32}")

SQL_TASK = (
    "UPDATE requests SET task_status=?, resource_urls=COALESCE(?, resource_urls), resources=COALESCE(?, resources), "
    "failure_reason=?, failure_class=?, completed_at=COALESCE(completed_at, ?), polls=polls+1, updated_at=? "
    "WHERE api=? AND request_id=?"
)
SQL_DOWNLOAD = ("UPDATE requests SET local_paths=?, download_error=?, task_status=?, updated_at=? "
                "WHERE api=? AND request_id=?")


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
    download_dir: Path | str | None = None  # a directory, or a bucket prefix s3://bucket/videos/
    download_concurrency: int = 4
    download_attempts: int = 5
    output_ttl: float = 24 * 3600.0
    next_collect: float = expiry.NEXT_COLLECT  # outputs expiring sooner than this are warned about
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    download: DownloadPolicy = field(default_factory=DownloadPolicy)
    transport: Transport = field(default_factory=Transport)


@dataclass
class Task:
    api: str
    request_id: str
    task_id: str
    label: str | None
    poll_url: str | None
    return_last_frame: bool
    status: str | None  # task_status: None (never polled), pending, processing, success, failed, expired
    resources: list[dict[str, Any]]
    completed_at: str | None
    local_paths: dict[str, Any] | None
    polls: int
    next_poll: float = 0.0
    download_tried: bool = False  # in this process: one pass of downloads per task
    expires_at: str | None = None  # result_expires_at (batch.expiry), UTC ISO

    @classmethod
    def from_entry(cls, e: Entry) -> Task:
        body = _json(e.body, {})
        resources = _json(e.resources, [])
        paths = _json(e.local_paths, None)
        return cls(e.api, e.request_id, str(e.task_id), e.label, e.poll_url,
                   bool(body.get("return_last_frame")) if isinstance(body, dict) else False, e.task_status,
                   resources if isinstance(resources, list) else [], e.completed_at,
                   paths if isinstance(paths, dict) else None, e.polls)


def _json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return whole_json(json.loads(text))  # an older version stored "\\ud800" escapes
    except ValueError:
        return default


@dataclass(frozen=True)
class TaskView:
    """What one task answer says, after validation."""

    status: str | None  # pending, processing, success, failed; None: unusable answer
    resources: list[dict[str, Any]] | None = None
    reason: str | None = None  # why it failed, or what is wrong with the answer
    unknown_state: str | None = None
    expires_at: str | None = None  # result_expires_at, UTC ISO
    expiry_ignored: str | None = None  # a result_expires_at stated but unreadable (clipped repr)
    failure_class: str | None = None  # batch.retry's class of a failure, read on the whole answer


def _word(value: Any) -> str | None:
    return value if isinstance(value, str) and _SAFE_WORD.fullmatch(value) else None


def read_resources(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The usable outputs of a success: dicts (or bare strings) with an http(s) URL."""
    result = data.get("result")
    raw = result.get("resources") if isinstance(result, dict) else data.get("resources")
    if not isinstance(raw, list):
        return []
    found = []
    for item in raw[:MAX_RESOURCES]:
        resource = {"url": item} if isinstance(item, str) else item
        if not isinstance(resource, dict):
            continue
        url = resource.get("url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")) or len(url) > 4096:
            continue
        kept = {"url": url}
        for key in ("type", "role", "format"):
            if (value := _word(resource.get(key))) is not None:
                kept[key] = value
        found.append(kept)
    return found


def _scalar(value: Any) -> bool:
    """A text or a number a provider may put in an error field (a bool is neither)."""
    return isinstance(value, (str, int)) and not isinstance(value, bool) and value != ""


def _answer_texts(body: dict[str, Any], data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A failed task's answer's text, as (the nested error's code and message, every other
    field that may say why: the task's message or reason, its code, the envelope's message
    when it is not "success")."""
    err = data.get("error")
    if isinstance(err, dict):
        error = [str(err[k]) for k in ("code", "message") if _scalar(err.get(k))]
    else:
        error = [str(err)] if _scalar(err) else []
    rest = [data[k] for k in ("message", "reason", "failure_reason", "error_message", "fail_reason")
            if isinstance(data.get(k), str)]
    if _scalar(data.get("code")):
        rest.append(f"code {data['code']}")
    envelope = body.get("message")
    if isinstance(envelope, str) and envelope.lower() not in ("success", "ok", ""):
        rest.append(envelope)
    return error, rest


def failure_parts(body: dict[str, Any], data: dict[str, Any], state: str) -> list[str]:
    """Every piece of text a failed task's answer carries, each field on its own and whole
    (the retry classifier reads each), and the state when it is not ``failed``."""
    error, rest = _answer_texts(body, data)
    return [p for p in ([] if state == "failed" else [f"{state}:"]) + error + rest if p]


def failure_reason(body: dict[str, Any], data: dict[str, Any], state: str) -> str:
    """The same text as one line for the results table: the nested error as "code: message",
    then the rest, each once."""
    error, rest = _answer_texts(body, data)
    parts = ([": ".join(error)] if error else []) + rest
    text = "; ".join(p for p in dict.fromkeys(parts) if p) or "no reason given"
    return clean_text(text if state == "failed" else f"{state}: {text}", None)


def _clip_repr(value: Any) -> str:
    """A provider value for a log line, without converting a huge int to text (which
    Python refuses past 4300 digits) or copying a huge string."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10 ** 30:
        return f"an integer of about {value.bit_length() * 3 // 10} digits"
    if isinstance(value, str):
        return repr(value[:64])
    return type(value).__name__ if isinstance(value, (dict, list)) else repr(value)


def read_task(body: Any, task_id: str) -> TaskView:
    """Validate one task answer (the whole JSON body) on its own."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        return TaskView(None, reason="answer without a data object")
    raw = data.get("status")
    if not isinstance(raw, str) or not raw.strip() or len(raw) > 64:
        return TaskView(None, reason="answer without a usable status")
    echoed = data.get("task_id")
    if echoed is not None and echoed != task_id:
        return TaskView(None, reason="answer about another task id")
    state = clean_text(raw.strip().lower(), None, 64)
    if state in SUCCESS_STATES:
        stated = data.get("result_expires_at")
        expires = parse_expiry(stated)
        ignored = None if stated is None or expires is not None else clean_text(_clip_repr(stated), None, 80)
        return TaskView("success", resources=read_resources(data), expires_at=expires, expiry_ignored=ignored)
    if state in FAILURE_STATES:
        return TaskView("failed", reason=failure_reason(body, data, state),
                        failure_class=retry.classify_parts(failure_parts(body, data, state)))
    if state in RUNNING_STATES:
        return TaskView("processing" if state in GENERATING_STATES else "pending")
    return TaskView("pending", unknown_state=state)


@dataclass
class CollectStats:
    task_status: Counter[str] = field(default_factory=Counter)
    polls: int = 0
    downloaded: int = 0
    download_skipped: int = 0
    download_failed: int = 0
    no_output: int = 0
    expiring: list[str] = field(default_factory=list)  # request ids whose outputs go before the next collect
    stop_reason: str | None = None
    interrupted: bool = False
    fatal: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"task_status": dict(sorted(self.task_status.items())), "polls": self.polls,
                "downloaded": self.downloaded, "download_skipped": self.download_skipped,
                "download_failed": self.download_failed + self.no_output, "no_output": self.no_output,
                "expiring_before_next_collect": len(self.expiring), "stop_reason": self.stop_reason}


async def bounded(items: Iterable[T], fn: Callable[[T], Awaitable[None]], workers: int) -> None:
    """Run ``fn`` over ``items`` with at most ``workers`` at a time (no task per item)."""
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await fn(item)

    await asyncio.gather(*(worker() for _ in range(max(1, workers))))


def _age_seconds(iso: str | None) -> float:
    if not iso:
        return 0.0
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()
    except ValueError:
        return 0.0


def wanted_files(task: Task) -> list[tuple[str, str, str]]:
    """(role, url, file name) of each output to download for a successful task: the
    name from our request id and label, the extension from an allow-list."""
    files = []
    stem = file_stem(task.request_id, task.label)
    seen: Counter[str] = Counter()
    for res in task.resources:
        url = res.get("url")
        if not isinstance(url, str):
            continue
        is_frame = res.get("role") == "last_frame" or res.get("type") == "image"
        if is_frame and not task.return_last_frame:
            continue
        kind = "last_frame" if is_frame else "video"
        seen[kind] += 1
        n = seen[kind]
        role = kind if n == 1 else f"{kind}_{n}"
        suffix = (".last_frame" if is_frame else "") + (f".{n}" if n > 1 else "")
        files.append((role, url, f"{stem}{suffix}.{extension(res, is_frame)}"))
    return files


def has_video(task: Task) -> bool:
    return any(not (r.get("role") == "last_frame" or r.get("type") == "image") for r in task.resources)


class Collector:
    def __init__(self, config: CollectConfig, ledger: AsyncLedger, limiter: SmoothLimiter | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.limiter = limiter or SmoothLimiter(config.rate)
        self.stats = CollectStats()
        self.stopping = asyncio.Event()
        self.log = structlog.get_logger("batch.following")
        self._main: asyncio.Task[None] | None = None
        self._unknown_states: set[str] = set()
        self._dir_fd: int | None = None  # the download directory, opened once (batch.download)
        self._dir_path = Path()

    def _clean(self, text: str) -> str:
        """Network- or provider-made text fit to store: the key scrubbed in every form."""
        return clean_text(text, self.config.api_key, 500)

    def interrupt(self, signame: str) -> None:
        self.stats.interrupted = True
        self.halt(f"interrupted by {signame}", at_once=True)

    def halt(self, reason: str, at_once: bool = False, fatal: bool = False) -> None:
        """Stop polling; ``at_once`` also cancels polls and downloads under way."""
        if not self.stopping.is_set():
            self.stats.stop_reason = reason
            self.stats.fatal = fatal
            self.stopping.set()
            self.log.warning("stopping", reason=reason)
        if at_once and self._main is not None and self._main is not asyncio.current_task():
            self._main.cancel()

    def base_for(self, task: Task) -> str:
        """The API that issued the task: the bundled fake is wherever it runs now."""
        return self.config.base_url if task.api == FAKE_API else task.api

    async def run(self, tasks: list[Task]) -> CollectStats:
        cfg = self.config
        loop = asyncio.get_running_loop()
        expire = loop.call_later(cfg.wait_timeout, lambda: self.halt(
            f"--timeout {cfg.wait_timeout:g}s reached with "
            f"{sum(1 for t in tasks if t.status not in TERMINAL)} tasks pending", at_once=True))
        with self.ledger.reading() as ledger:
            known = ledger.expiries()
        for t in tasks:
            t.expires_at = t.expires_at or known.get((t.api, t.request_id))
        self._main = asyncio.create_task(self._loop(tasks))
        try:
            await asyncio.wait({self._main})
            if not self._main.cancelled():
                self._main.result()
        finally:
            expire.cancel()
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None
        for t in tasks:
            self.stats.task_status[t.status or "pending"] += 1
            if t.status == "success" and not t.local_paths and expiry.before(t.expires_at, cfg.next_collect):
                self.stats.expiring.append(t.request_id)
        if self.stats.expiring:
            self.log.warning("outputs_expire_before_next_collect", count=len(self.stats.expiring),
                             within_seconds=cfg.next_collect, request_ids=self.stats.expiring[:20])
        return self.stats

    async def _loop(self, tasks: list[Task]) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        async with make_session(cfg.concurrency, cfg.http_timeout, min(10.0, cfg.http_timeout), cfg.transport) \
                as session, make_download_session(cfg.download, cfg.transport) as plain:
            self._session, self._plain = session, plain
            while not self.stopping.is_set():
                now = loop.time()
                due = [t for t in tasks if t.status not in TERMINAL and t.next_poll <= now]
                await bounded(due, self._poll, cfg.concurrency)
                ready = sorted((t for t in tasks if t.status == "success" and not t.download_tried),
                               key=lambda t: expiry.sort_key(t.expires_at))
                for t in ready:
                    if not has_video(t):
                        self._no_output(t)
                if cfg.download_dir is not None:
                    ready = [t for t in ready if has_video(t)]
                    await bounded(ready, self._download, cfg.download_concurrency)
                waiting = [t for t in tasks if t.status not in TERMINAL]
                if not cfg.wait or not waiting:
                    break
                nap = min(t.next_poll for t in waiting) - loop.time()
                if nap > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), nap)

    async def _poll(self, task: Task) -> None:
        try:
            await self._poll_once(task)
        except Exception as exc:  # one task's surprise must not cost the others
            self.log.error("task_error", request_id=task.request_id, error=self._clean(f"{type(exc).__name__}: {exc}"))
        cfg = self.config
        task.polls += 1
        task.next_poll = asyncio.get_running_loop().time() + min(cfg.poll_max, cfg.poll_min * 1.5 ** min(task.polls, 30))

    async def _poll_once(self, task: Task) -> None:
        cfg = self.config
        # The fake moves to a new port with each process: its get_result URLs go stale.
        url = task.poll_url if task.poll_url and task.api != FAKE_API else task_url(self.base_for(task), task.task_id)
        for attempt in range(1, cfg.max_attempts + 1):
            if self.stopping.is_set():
                return
            await self.limiter.acquire()
            verdict = await request_once(self._session, "GET", url, cfg.api_key, transport=cfg.transport)
            self.stats.polls += 1
            self.limiter.heed(verdict)
            status = verdict.http_status or 0
            if 200 <= status < 300 and isinstance(verdict.body, dict) and "data" in verdict.body:
                self._record(task, read_task(verdict.body, task.task_id))
                return
            if verdict.kind is Kind.FATAL:
                self.halt(f"HTTP {verdict.http_status}: {verdict.error}", fatal=True)
                return
            if verdict.kind is Kind.FAIL:
                if status == 404:
                    self._set(task, "failed", None, "the provider does not know this task (HTTP 404)")
                else:
                    self.log.warning("poll_rejected", request_id=task.request_id, http_status=status,
                                     error=verdict.error)
                return
            wait = retry_wait(verdict, attempt, cfg.backoff_base, cfg.backoff_max)
            self.log.debug("poll_retry", request_id=task.request_id, attempt=attempt, error=verdict.error)
            await asyncio.sleep(wait)

    def _record(self, task: Task, view: TaskView) -> None:
        if view.status is None:
            self.log.warning("task_answer_unusable", request_id=task.request_id, problem=view.reason)
            self._set(task, task.status or "pending", None, f"last answer unusable: {view.reason}")
            return
        if view.unknown_state and view.unknown_state not in self._unknown_states:
            self._unknown_states.add(view.unknown_state)
            self.log.warning("task_state_unknown", state=view.unknown_state, request_id=task.request_id,
                             handling="kept non-terminal")
        if view.expiry_ignored is not None:
            self.log.warning("result_expires_at_ignored", request_id=task.request_id, value=view.expiry_ignored,
                             handling="unknown expiry; the 24 h rule still holds")
        if view.expires_at is not None and view.expires_at != task.expires_at:
            task.expires_at = view.expires_at
            self.ledger.record_expiry(task.api, task.request_id, view.expires_at)
        self._set(task, view.status, view.resources, view.reason, view.failure_class)

    def _set(self, task: Task, status: str, resources: list[dict[str, Any]] | None, reason: str | None,
             failure_class: str | None = None) -> None:
        now = utcnow()
        if status in TERMINAL and task.completed_at is None:
            task.completed_at = now
        if status == "success" and task.local_paths is None and _age_seconds(task.completed_at) > self.config.output_ttl:
            status, reason = "expired", "outputs are deleted 24 h after completion and were not downloaded"
        elif status == "success" and task.local_paths is None and expiry.before(task.expires_at, 0):
            status, reason = "expired", f"outputs expired at {task.expires_at} (result_expires_at) and were not downloaded"
        task.status = status
        if resources is not None:
            task.resources = resources
        urls = json.dumps([r.get("url") for r in resources]) if resources is not None else None
        full = json.dumps(resources) if resources is not None else None
        self.ledger.write(SQL_TASK, (status, urls, full, reason, failure_class if status == "failed" else None,
                                     task.completed_at if status in TERMINAL else None,
                                     now, task.api, task.request_id))
        self.log.debug("task", request_id=task.request_id, task_id=task.task_id, task_status=status)

    def _no_output(self, task: Task) -> None:
        task.download_tried = True
        self.stats.no_output += 1
        self.ledger.write(SQL_DOWNLOAD, (None, NO_OUTPUT, task.status, utcnow(), task.api, task.request_id))
        self.log.warning("no_output", request_id=task.request_id, task_id=task.task_id, error=NO_OUTPUT)

    def _destination(self, name: str) -> tuple[str, Sink]:
        """Where one output goes, checked: a file inside the download directory, or an
        object under the bucket prefix (streamed there, never staged on local disk)."""
        dest = self.config.download_dir
        assert dest is not None
        if isinstance(dest, str):
            if "/" in name or name.startswith("."):
                raise DownloadError(f"refusing the object name {name!r}")
            url = str(ObjectUrl.parse(dest).child(name))
            return url, ObjectSink(url)
        if self._dir_fd is None:
            self._dir_fd = open_directory(dest)
            self._dir_path = dest.resolve()  # where the descriptor is, whatever the path becomes
        final = contained(self._dir_path, name)
        return str(final), FileSink(final, self._dir_fd)

    async def _present(self, where: str, sink: Sink) -> int | None:
        """The size of an output already there: a final file name or an object only ever
        holds a whole download, so being there is being complete. Only a regular file
        counts (a planted symlink of the right size does not)."""
        if isinstance(sink, FileSink):
            return regular_size(sink.final.name, sink.dir_fd) if sink.dir_fd is not None else None
        return await object_size_async(where)

    async def _download(self, task: Task) -> None:
        task.download_tried = True
        try:
            await self._download_task(task)
        except Exception as exc:  # one task's surprise must not cost the others, nor the table
            error = self._clean(f"{type(exc).__name__}: {exc}")
            self.stats.download_failed += 1
            self.ledger.write(SQL_DOWNLOAD, (json.dumps(task.local_paths) if task.local_paths else None, error,
                                             task.status, utcnow(), task.api, task.request_id))
            self.log.warning("download_failed", request_id=task.request_id, error=error)

    async def _download_task(self, task: Task) -> None:
        directory = self.config.download_dir
        assert directory is not None
        paths: dict[str, Any] = dict(task.local_paths or {})
        error = None
        fetched = False
        try:
            files = [(role, url, *self._destination(name)) for role, url, name in wanted_files(task)]
        except (OSError, ValueError, DownloadError) as exc:
            files, error = [], self._clean(f"{exc}")
        policy, used = self.config.download, 0
        for role, url, where, sink in files:
            known = paths.get(role)
            try:
                present = await self._present(where, sink)
            except Exception as exc:  # a bucket that cannot be asked: try the download itself
                self.log.debug("present_unknown", where=where, error=self._clean(str(exc)))
                present = None
            if present is not None and (not isinstance(known, dict) or present == known.get("bytes")):
                paths[role] = {"path": where, "bytes": present}
                used += present
                continue  # already here with the right size
            room = policy.task_max_bytes - used
            if room <= 0:
                error = f"{role}: the task's outputs pass the {policy.task_max_bytes}-byte limit per task"
                break
            try:
                size = await self._fetch(url, sink, replace(policy, task_left=room))
            except DownloadError as exc:
                error = self._clean(f"{role}: {exc}")
                if exc.gone:
                    task.status = "expired"
                break
            except (OSError, ValueError) as exc:  # the file or the bucket: this output only
                error = self._clean(f"{role}: {type(exc).__name__}: {exc}")
                break
            paths[role] = {"path": where, "bytes": size}
            used += size
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
                                             task.api, task.request_id))
        if error is not None:
            self.log.warning("download_failed", request_id=task.request_id, error=error)

    async def _fetch(self, url: str, sink: Sink, policy: DownloadPolicy) -> int:
        """Download with retries. Stopped (SIGTERM, --timeout), the ``.part`` stays for a
        resume; given up, it goes: a rerun starts over, and no dead partial piles up."""
        last: DownloadError | None = None
        for attempt in range(1, self.config.download_attempts + 1):
            if self.stopping.is_set():
                raise DownloadError(f"stopped ({last or 'before the first attempt'})")
            try:
                return await fetch(self._plain, url, sink, policy, self.config.transport)
            except DownloadError as exc:
                if not exc.retry:
                    self._discard(sink)
                    raise
                last = exc
                self.log.debug("download_retry", attempt=attempt, error=self._clean(str(exc)))
                await asyncio.sleep(backoff_delay(attempt, self.config.backoff_base, self.config.backoff_max))
        self._discard(sink)
        raise DownloadError(f"gave up after {self.config.download_attempts} attempts: {last}")

    def _discard(self, sink: Sink) -> None:
        if self.stopping.is_set():
            return  # stopped, not given up: keep the partial file for a resume
        try:
            sink.restart()
        except OSError as exc:
            self.log.warning("part_not_removed", error=self._clean(f"{exc}"))
