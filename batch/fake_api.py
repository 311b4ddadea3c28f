"""A fake of the Modellix API on aiohttp.web: the tests' peer, the demo's backend,
the benchmark's target.

It speaks the provider's dialect as ``shared/api/provider-today.md`` records it: the
three submit route forms, ``data.get_result.url``, tasks that move ``pending`` →
``processing`` → ``success`` (serving a real, tiny H.264 MP4 on loopback, its colour
from the prompt's hash: :mod:`batch.poster`), ``failed``
with a reason in the documented error envelope, or ``cancelled``; ``X-RateLimit-*``
headers over a per-minute window; a concurrency limit (429); and the read-only
endpoints (models, balance, key validation). It validates submissions as the provider
documents them. Optionally (``state_names="dsh"``, ``result_ttl``) it speaks the newer
client's state words (``queued``/``created``, ``running``/``in_progress``, ``done``) and
states ``result_expires_at``; it records each submission's ``x-request-id``.

Task ids carry their own creation time and fate, signed, so any instance of the fake
(a later ``collect --fake-api`` in another process) answers for tasks an earlier one
issued.

By configuration it injects latency, a strict sliding-window rate limit (429 +
``Retry-After``), any HTTP error, ``code != 0``, non-JSON bodies, a 2xx without task id
and dropped connections. Every request it receives is recorded in
:attr:`FakeState.records`, so tests assert on what the server saw, e.g. how many times
the same body was *accepted*.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import hashlib
import hmac
import itertools
import json
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fastjsonschema
from aiohttp import BodyPartReader, web

from batch.api import TASK_PATH
from batch.models import Catalog, shipped
from batch.poster import RGB, colour_of, tiny_clip, tiny_png
from batch.upload import MAX_BYTES as UPLOAD_MAX_BYTES
from batch.upload import UPLOAD_PATH, sniff
from batch.validate import RULES, BodyRule, FieldRule

_REASONS = {
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Entity", 425: "Too Early",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}
# Kinds a fault may have besides an HTTP status.
FAULT_KINDS = ("code", "badjson", "no_task_id", "drop", "drop_accepted", "slow",
               # Kinds of the simulation suite (tests/sim): answers a real provider might give
               # once, each after creating the task unless said otherwise.
               "odd_task_id", "huge", "dup_task_id", "echo_key", "echo_key_url",
               # query and download answers
               "bad_url", "redirect", "redirect_key", "gzip")
ROUTES = {
    "seed": "/api/v1/text-to-video/{provider}/{model}/async",
    "async": "/api/v1/{provider}/{model}/async",
    "v1": "/api/v1/{provider}/{model}",
}
_SIGNING_KEY = b"seedance-batch fake API"  # a fake's ids need no secret, only a check


@dataclass
class Fault:
    """One injected fault.

    ``kind`` is an HTTP status (``"429"``, ``"500"``...) or one of :data:`FAULT_KINDS`.
    It applies to requests on ``endpoint`` (``submit``, ``query`` or ``download``)
    whose prompt (or task id) contains ``match``, with probability ``prob``, at most
    ``times`` times (``None``: forever). ``drop`` closes the connection after reading
    the request without creating a task; ``drop_accepted`` creates the task first,
    the case that makes resending dangerous; ``slow`` adds ``delay`` seconds.
    ``accept`` creates the task before any other answer (a 500, a ``code`` ≠ 0, no task
    id...): the provider took the request although its answer does not say so.
    ``form`` is how ``echo_key*`` and ``redirect_key`` spell the key: ``exact``,
    ``lower``, ``upper`` or ``pct`` (percent-encoded).
    """

    kind: str
    prob: float = 1.0
    match: str | None = None
    times: int | None = None
    retry_after: str | None = None
    endpoint: str = "submit"
    delay: float = 0.0
    accept: bool = False
    form: str = "exact"

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """``KIND[,prob=P][,match=S][,times=N][,retry_after=S][,endpoint=E][,delay=S][,accept=1][,form=F]``."""
        kind, *opts = [p.strip() for p in spec.split(",")]
        if not (kind.isdigit() or kind in FAULT_KINDS):
            raise ValueError(f"unknown fault kind {kind!r}")
        kw: dict[str, Any] = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "prob":
                kw["prob"] = float(value)
            elif key == "times":
                kw["times"] = int(value)
            elif key == "delay":
                kw["delay"] = float(value)
            elif key == "accept":
                kw["accept"] = value not in ("", "0", "false")
            elif key in ("match", "retry_after", "endpoint", "form"):
                kw[key] = value
            else:
                raise ValueError(f"unknown fault option {key!r}")
        return cls(kind, **kw)


@dataclass
class FakeConfig:
    api_key: str | None = None  # None: any non-empty bearer token is accepted
    latency: float = 0.0
    jitter: float = 0.0
    rate_limit: int | None = None  # strict: at most N requests in any sliding 1 s window
    minute_limit: int | None = None  # X-RateLimit-* over a sliding window of window_s; 429 beyond it
    window_s: float = 60.0
    reset_form: str = "delta"  # X-RateLimit-Reset as seconds to wait ("delta") or an epoch time ("epoch")
    max_concurrent: int | None = None  # requests handled at once; 429 beyond it
    faults: list[Fault] = field(default_factory=list)
    task_delay: float = 0.0  # seconds from submission to a terminal task state
    fail_match: str = "FAILTASK"  # prompts containing this end as failed tasks
    cancel_match: str = "CANCELTASK"  # ... as cancelled tasks
    flaky_match: str = "FLAKYTASK"  # ... fail with an internal error on their first flaky_failures submissions
    flaky_failures: int = 1
    video_bytes: int = 4096  # an output's size: the real clip, padded up to this
    download_bps: float | None = None  # throttle downloads (bytes/s) to test interrupted ones
    seed: int = 0
    record_bodies: bool = True
    routes: tuple[str, ...] = ("seed", "async", "v1")  # the submit route forms served
    models: tuple[str, ...] | None = None  # listed by /api/v1/models and accepted; None: every shipped model
    schemas: dict[str, Any] = field(default_factory=dict)  # slug -> schema document served instead of the shipped
    balance: float = 100.0
    get_result: bool = True  # answer submissions with data.get_result.url
    # "dsh": task states as the provider's newer client reads them (queued/created, running/
    # in_progress, done) instead of pending/processing/success (provider-today.md, 2026-12-06)
    state_names: str = "documented"
    result_ttl: float | None = None  # seconds from completion: answer successes with result_expires_at


@dataclass
class Record:
    t: float  # time.monotonic() when the handler started
    method: str
    path: str
    body: Any
    status: int  # HTTP status answered; 0 for a dropped connection
    task_id: str | None  # set when a task was created (the request was accepted)
    kind: str = ""  # submit, query, download, models, balance, validate
    wall: float = 0.0  # time.time() when the handler started
    model: str | None = None
    x_request_id: str | None = None  # the submission's x-request-id header


class FakeState:
    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.records: list[Record] = []
        self.tasks: dict[str, dict[str, Any]] = {}
        self.rng = random.Random(config.seed)
        self._ids = itertools.count(1)
        self._window: collections.deque[float] = collections.deque()
        self._minute: collections.deque[float] = collections.deque()
        self.active = 0
        self.max_active = 0
        self._flaky_seen: dict[str, int] = {}
        self.last_key = ""  # the bearer key last seen, for answers that echo it

    def arrive(self, method: str, path: str, detail: Any = None, kind: str = "") -> Record:
        """Record a request as its handler starts; the handler fills in status and task id."""
        record = Record(time.monotonic(), method, path, detail, 0, None, kind, time.time())
        self.records.append(record)
        return record

    # -- views for assertions -------------------------------------------------
    def submissions(self) -> list[Record]:
        return [r for r in self.records if r.kind == "submit"]

    def accepted_bodies(self) -> list[Any]:
        """Bodies for which a task was created (each one a paid task)."""
        return [r.body for r in self.submissions() if r.task_id is not None]

    def accepted_count_by_prompt(self) -> collections.Counter[str]:
        return collections.Counter(
            json.dumps(b, sort_keys=True, ensure_ascii=False) for b in self.accepted_bodies()
        )

    def uploads(self) -> list[Record]:
        """The uploads the fake accepted (``detail``: sha256, size, filename)."""
        return [r for r in self.records if r.kind == "upload" and r.status == 200]

    def submit_times(self) -> list[float]:
        return [r.t for r in self.submissions()]

    def polls(self) -> list[Record]:
        return [r for r in self.records if r.kind == "query"]

    # -- behaviour --------------------------------------------------------------
    def pick_fault(self, endpoint: str, subject: str) -> Fault | None:
        for fault in self.config.faults:
            if fault.endpoint != endpoint or fault.times == 0:
                continue
            if fault.match is not None and fault.match not in subject:
                continue
            if fault.prob < 1.0 and self.rng.random() >= fault.prob:
                continue
            if fault.times is not None:
                fault.times -= 1
            return fault
        return None

    def over_rate_limit(self, now: float) -> float | None:
        """Seconds until a slot frees if this request breaks the sliding 1 s window."""
        limit = self.config.rate_limit
        if limit is None:
            return None
        window = self._window
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= limit:
            return window[0] + 1.0 - now
        window.append(now)
        return None

    def minute_window(self, now: float) -> tuple[int, float, bool]:
        """(remaining, seconds until the oldest request leaves the window, over the limit)."""
        limit, span = self.config.minute_limit or 0, self.config.window_s
        window = self._minute
        while window and window[0] <= now - span:
            window.popleft()
        over = len(window) >= limit
        if not over:
            window.append(now)
        reset = (window[0] + span - now) if window else span
        return max(0, limit - len(window)), reset, over

    def new_task(self, body: dict[str, Any], model: str) -> str:
        prompt = str(body.get("prompt", ""))
        flags = "".join(flag for flag, on in (
            ("f", self.config.fail_match in prompt), ("c", self.config.cancel_match in prompt),
            ("i", self.config.flaky_match in prompt and self._flaky(prompt)),
            ("l", bool(body.get("return_last_frame"))),
        ) if on) or "n"
        # The clip's colour rides in the id, so a later fake (collect's) serves the same video.
        colour = "".join(f"{c:02x}" for c in colour_of(prompt))
        core = f"{next(self._ids):08d}-{int(time.time() * 1000):x}-{flags}-{self.rng.getrandbits(32):08x}-{colour}"
        task_id = f"task-video-{core}-{_sign(core)}"
        self.tasks[task_id] = {"created": time.time(), "body": body, "model": model}
        return task_id

    def _flaky(self, prompt: str) -> bool:
        """Whether this submission of a flaky prompt still fails (counted per prompt)."""
        seen = self._flaky_seen.get(prompt, 0)
        self._flaky_seen[prompt] = seen + 1
        return seen < self.config.flaky_failures

    def task_status(self, task_id: str) -> str | None:
        """The task's state now, from its id alone; ``None`` for an id this fake never issued."""
        parsed = parse_task_id(task_id)
        if parsed is None:
            return None
        created, flags = parsed
        age = time.time() - created
        delay = self.config.task_delay
        if age < delay:
            return "pending" if age < delay / 2 else "processing"
        if "c" in flags:
            return "cancelled"
        return "failed" if "f" in flags or "i" in flags else "success"


_DSH_WORDS = {"pending": ("queued", "created"), "processing": ("running", "in_progress"), "success": ("done", "done")}


def _state_word(status: str, names: str, task_id: str) -> str:
    """A state as the chosen vocabulary spells it; alternate synonyms by task id so a
    sheet's tasks show each of them."""
    words = _DSH_WORDS.get(status) if names == "dsh" else None
    return words[int(task_id[-1], 16) % 2] if words else status


def _sign(core: str) -> str:
    return hmac.new(_SIGNING_KEY, core.encode(), hashlib.sha256).hexdigest()[:8]


_TASK_ID = re.compile(r"task-video-(\d{8}-([0-9a-f]+)-([a-z]+)-[0-9a-f]{8}(?:-([0-9a-f]{6}))?)-([0-9a-f]{8})")


def parse_task_id(task_id: str) -> tuple[float, str] | None:
    """(creation time, fate flags) of an id this fake issued, checked by its signature."""
    match = _TASK_ID.fullmatch(task_id)
    if match is None or not hmac.compare_digest(_sign(match.group(1)), match.group(5)):
        return None
    return int(match.group(2), 16) / 1000, match.group(3)


def task_colour(task_id: str) -> RGB:
    """The colour of a task's clip: its prompt's (carried in the id), else the id's own."""
    match = _TASK_ID.fullmatch(task_id)
    if match is not None and match.group(4):
        hex_ = match.group(4)
        return (int(hex_[0:2], 16), int(hex_[2:4], 16), int(hex_[4:6], 16))
    return colour_of(task_id)


STATE_KEY = web.AppKey("state", FakeState)
RATE_KEY = web.RequestKey("rate_headers", dict)  # X-RateLimit-* of this request, set by admit()


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"code": status, "message": f"{_REASONS.get(status, 'Error')}: {detail}"},
        status=status,
        headers=headers,
    )


def _ok(data: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": 0, "message": "success", "data": data}, headers=headers)


class BodyChecker:
    """The provider's check of a request body, read from the same specifications as our
    validator (:mod:`batch.models`) but by an independent reading: the JSON Schema through
    ``fastjsonschema``, then the named rules of :data:`batch.validate.RULES`."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._compiled: dict[str, Any] = {}

    def problem(self, slug: str, body: Any) -> str | None:
        """Why ``body`` breaks the model's schema, or None when it is valid."""
        spec = self.catalog.find(slug)
        if spec is None:
            return f"model {slug} not found"
        if slug not in self._compiled:
            self._compiled[slug] = fastjsonschema.compile(spec.schema, use_default=False)
        try:
            self._compiled[slug](body)
        except fastjsonschema.JsonSchemaValueException as exc:
            return f"{exc.name.removeprefix('data.')}: {exc.message.removeprefix(exc.name + ' ')}"
        for name in spec.rules:
            rule = RULES.get(name)
            if isinstance(rule, FieldRule) and rule.field in body and not rule.ok(body[rule.field]):
                return f"{rule.field} {rule.rule}"
            if isinstance(rule, BodyRule) and not rule.ok(body):
                return rule.message
        return None


def _authorized(request: web.Request, config: FakeConfig) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or not header[7:].strip():
        return False
    return config.api_key is None or header[7:] == config.api_key


async def _latency(config: FakeConfig, state: FakeState) -> None:
    delay = config.latency + (state.rng.uniform(0, config.jitter) if config.jitter else 0.0)
    if delay > 0:
        await asyncio.sleep(delay)


def _drop(request: web.Request) -> web.Response:
    if request.transport is not None:
        request.transport.abort()
    # The connection is gone; aiohttp discards whatever is returned now.
    return web.Response(status=500)


async def _apply_fault(
    fault: Fault, request: web.Request, state: FakeState, record: Record, accept: Any
) -> web.StreamResponse | None:
    """Answer per ``fault``; return None to go on normally. ``accept()`` creates the task."""
    kind = fault.kind
    if kind == "slow":
        await asyncio.sleep(fault.delay)
        return None
    if fault.accept and kind not in ("drop_accepted", "odd_task_id", "huge", "echo_key_url"):
        accept()
    key = spelled_key(state.last_key, fault.form)
    if kind == "odd_task_id":
        record.status = 200
        return _ok({"status": "pending", "task_id": f"../{accept()}/x y"})
    if kind == "huge":
        accept()
        record.status = 200
        return web.json_response({"code": 0, "message": "success", "data": {"pad": "x" * (1 << 21)}})
    if kind == "dup_task_id":
        previous = next((r.task_id for r in reversed(state.records) if r.task_id), None)
        record.status = 200
        return _ok({"status": "pending", "task_id": previous or "task-video-none"})
    if kind == "echo_key":
        record.status = 400
        return _error(400, f"invalid request for key {key}", {"X-Echo": key})
    if kind == "echo_key_url":
        task_id = accept()
        record.status = 200
        url = f"{request.scheme}://{request.host}{TASK_PATH.format(task_id=task_id)}?api_key={key}"
        return _ok({"status": "pending", "task_id": task_id, "get_result": {"method": "GET", "url": url}})
    if kind.isdigit():
        status = int(kind)
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
        record.status = status
        return _error(status, "injected fault", headers)
    if kind == "code":
        record.status = 200
        return web.json_response({"code": 1001, "message": f"Rejected: injected business error {key}"})
    if kind == "badjson":
        record.status = 200
        return web.Response(text="<html>upstream proxy error</html>", content_type="text/html")
    if kind == "no_task_id":
        record.status = 200
        return web.json_response({"code": 0, "message": "success", "data": {"status": "pending"}})
    if kind in ("drop", "drop_accepted"):
        if kind == "drop_accepted":
            accept()
        record.status = 0
        return _drop(request)
    raise AssertionError(kind)


def spelled_key(key: str, form: str) -> str:
    """The bearer key as a hostile answer would echo it."""
    if form == "lower":
        return key.lower()
    if form == "upper":
        return key.upper()
    if form == "pct":
        return "".join(f"%{b:02X}" for b in key.encode())
    return key


def make_app(config: FakeConfig | None = None) -> web.Application:
    """The fake API as an aiohttp application; its state is ``app[STATE_KEY]``."""
    config = config or FakeConfig()
    state = FakeState(config)
    app = web.Application(client_max_size=1024 * 1024)
    app[STATE_KEY] = state
    catalog = Catalog()
    checker = BodyChecker(catalog)
    served = config.models if config.models is not None else tuple(sorted(shipped()))

    async def admit(request: web.Request, record: Record, slow: bool = True) -> web.Response | None:
        """What the provider checks before the endpoint: the key, the per-key rate; then the
        latency of generation endpoints (``slow``; the read-only ones answer at once)."""
        state.last_key = request.headers.get("Authorization", "")[7:] or state.last_key
        if not _authorized(request, config):
            record.status = 401
            return _error(401, "invalid or missing API key")
        if config.max_concurrent is not None and state.active > config.max_concurrent:
            record.status = 429
            return _error(429, "concurrency limit exceeded")
        wait = state.over_rate_limit(record.t)
        if wait is not None:
            record.status = 429
            return _error(429, "rate limit exceeded", {"Retry-After": str(max(1, int(wait + 0.999)))})
        if config.minute_limit is not None:
            remaining, reset, over = state.minute_window(record.t)
            request[RATE_KEY] = rate_headers(remaining, reset)
            if over:
                record.status = 429
                return _error(429, "rate limit exceeded", request[RATE_KEY])
        if slow:
            await _latency(config, state)
        return None

    def rate_headers(remaining: int, reset: float) -> dict[str, str]:
        value = f"{reset:.3f}" if config.reset_form == "delta" else f"{time.time() + reset:.3f}"
        return {"X-RateLimit-Limit": str(config.minute_limit), "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": value}

    @web.middleware
    async def counting(request: web.Request, handler: Any) -> web.StreamResponse:
        state.active += 1
        state.max_active = max(state.max_active, state.active)
        try:
            response = await handler(request)
        finally:
            state.active -= 1
        if RATE_KEY in request and not response.prepared:
            response.headers.update(request[RATE_KEY])
        return response

    app.middlewares.append(counting)

    async def submit(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        record = state.arrive("POST", request.path, body if config.record_bodies else None, "submit")
        slug = f"{request.match_info['provider']}/{request.match_info['model']}"
        record.model = slug
        record.x_request_id = request.headers.get("x-request-id")
        refused = await admit(request, record)
        if refused is not None:
            return refused
        if slug not in served:
            record.status = 404
            return _error(404, f"model {slug} not found")

        def accept() -> str:
            record.task_id = state.new_task(body, slug)
            return record.task_id

        prompt = body.get("prompt", "") if isinstance(body, dict) else ""
        fault = state.pick_fault("submit", str(prompt))
        if fault is not None:
            answer = await _apply_fault(fault, request, state, record, accept)
            if answer is not None:
                return answer
        problem = checker.problem(slug, body)
        if problem is not None:
            record.status = 400
            return _error(400, problem)
        task_id = accept()
        record.status = 200
        data: dict[str, Any] = {"status": "pending", "task_id": task_id, "model_id": slug.partition("/")[2]}
        if config.get_result:
            data["get_result"] = {"method": "GET",
                                  "url": f"{request.scheme}://{request.host}{TASK_PATH.format(task_id=task_id)}"}
        return _ok(data)

    async def query(request: web.Request) -> web.StreamResponse:
        task_id = request.match_info["task_id"]
        record = state.arrive("GET", request.path, kind="query")
        refused = await admit(request, record)
        if refused is not None:
            return refused
        fault = state.pick_fault("query", task_id)
        if fault is not None and fault.kind == "bad_url" and state.task_status(task_id) == "success":
            record.status = 200
            return _ok({"status": "success", "task_id": task_id,
                        "result": {"resources": [{"url": "http://[bad/x.mp4", "type": "video", "format": "mp4"}]}})
        if fault is not None and fault.kind != "bad_url":
            answer = await _apply_fault(fault, request, state, record, lambda: None)
            if answer is not None:
                return answer
        status = state.task_status(task_id)
        if status is None:
            record.status = 404
            return _error(404, f"task {task_id} not found")
        data: dict[str, Any] = {"status": _state_word(status, config.state_names, task_id), "task_id": task_id}
        created, flags = parse_task_id(task_id) or (0.0, "")
        if status == "success" and config.result_ttl is not None:
            data["result_expires_at"] = datetime.fromtimestamp(
                created + config.task_delay + config.result_ttl, UTC).isoformat(timespec="seconds")
        if status == "success":
            base = f"{request.scheme}://{request.host}"
            resources = [{"url": f"{base}/files/{task_id}.mp4", "type": "video", "format": "mp4",
                          "width": 1280, "height": 720, "role": "video"}]
            if "l" in flags:
                resources.append({"url": f"{base}/files/{task_id}.png", "type": "image",
                                  "format": "png", "role": "last_frame"})
            data["result"] = {"resources": resources}
        elif status == "failed" and "i" in flags:
            data["error"] = {"code": 500, "message": "Internal Error: the generation failed, try again"}
        elif status == "failed":
            data["error"] = {"code": 400, "message": "Content Moderation: the prompt was rejected"}
        elif status == "cancelled":
            data["error"] = {"code": 499, "message": "Cancelled: the task was cancelled"}
        record.status = 200
        return _ok(data)

    async def download(request: web.Request) -> web.StreamResponse:
        """Serves a task's output, with ``Range: bytes=N-`` for resumed downloads."""
        name = request.match_info["name"]
        task_id, _, ext = name.rpartition(".")
        record = state.arrive("GET", request.path, request.headers.get("Range"), "download")
        if state.task_status(task_id) != "success":
            record.status = 404
            return _error(404, "no such file")
        data = fake_file_bytes(task_id, ext, config.video_bytes)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
        if match and int(match.group(1)) < len(data):
            start = int(match.group(1))
        part = data[start:]
        headers = {"Content-Type": "video/mp4" if ext == "mp4" else "image/png", "Content-Length": str(len(part))}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        fault = state.pick_fault("download", task_id)
        if fault is not None and fault.kind in ("redirect", "redirect_key") and "hop" not in request.query:
            record.status = 302
            key = spelled_key(state.last_key, fault.form)
            # With the key, to a file that is not there: the download fails on a URL that holds the key.
            target = f"/gone/{name}?api_key={key}" if fault.kind == "redirect_key" else f"/files/{name}?hop=1"
            raise web.HTTPFound(target)
        if fault is not None and fault.kind == "gzip":
            record.status = 200
            return web.Response(body=gzip.compress(part), status=200,
                                headers={"Content-Type": headers["Content-Type"], "Content-Encoding": "gzip"})
        if fault is not None and fault.kind not in ("redirect", "redirect_key"):
            if fault.kind in ("drop", "drop_accepted"):
                # Send half of what was asked, then cut the connection: a truncated download.
                response = web.StreamResponse(status=206 if start else 200, headers=headers)
                await response.prepare(request)
                await response.write(part[: len(part) // 2])
                record.status = 0
                return _drop(request)
            answer = await _apply_fault(fault, request, state, record, lambda: None)
            if answer is not None:
                return answer
        record.status = 206 if start else 200
        if config.download_bps:
            response = web.StreamResponse(status=record.status, headers=headers)
            await response.prepare(request)
            step = max(1, int(config.download_bps / 20))
            for offset in range(0, len(part), step):
                await response.write(part[offset : offset + step])
                await asyncio.sleep(0.05)
            await response.write_eof()
            return response
        return web.Response(body=part, status=record.status, headers=headers)

    def read_only(kind: str, answer: Callable[[], Any]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A free, read-only endpoint: counted, authorised and rate limited like the rest."""
        async def handler(request: web.Request) -> web.StreamResponse:
            record = state.arrive("GET", request.path, kind=kind)
            refused = await admit(request, record, slow=False)
            if refused is not None:
                return refused
            record.status = 200
            return _ok(answer())
        return handler

    kinds = {"t2v": "text-to-video", "i2v": "image-to-video", "v2v": "video-to-video"}
    models = read_only("models", lambda: {"models": [
        {"slug": slug, "type": kinds.get(spec.kind, spec.kind) if (spec := catalog.find(slug)) else "video",
         "status": "active", "docs_url": f"https://docs.modellix.ai/{slug.replace('.', '-')}"} for slug in served]})
    balance = read_only("balance", lambda: {"balance": config.balance, "currency": "USD"})

    async def api_schema(request: web.Request) -> web.StreamResponse:
        """The per-model schema document, at the path the provider publishes it."""
        slug = f"{request.match_info['provider']}/{request.match_info['model']}"
        record = state.arrive("GET", request.path, kind="schema")
        spec = catalog.find(slug)
        doc = config.schemas.get(slug) or ({"servers": [{"url": spec.route}], "post": {"requestBody": {"content": {
            "application/json": {"schema": spec.schema}}}}} if spec is not None else None)
        if doc is None:
            record.status = 404
            return _error(404, f"model {slug} not found")
        record.status = 200
        return web.json_response(doc)

    async def validate_key(request: web.Request) -> web.StreamResponse:
        record = state.arrive("GET", request.path, kind="validate")
        record.status = 200
        return _ok({"is_valid": _authorized(request, config)})

    async def media_upload(request: web.Request) -> web.StreamResponse:
        """``POST /api/v1/media/files``: one PNG, JPEG or WebP of at most 16 MiB, multipart
        (field ``file``); what else arrives is refused as the documentation says."""
        record = state.arrive("POST", request.path, None, "upload")
        refused = await admit(request, record, slow=False)
        if refused is not None:
            return refused
        fault = state.pick_fault("upload", "")
        if fault is not None:
            answer = await _apply_fault(fault, request, state, record, lambda: None)
            if answer is not None:
                return answer
        if not request.content_type.startswith("multipart/"):
            record.status = 400
            return _error(400, "expected multipart/form-data with a file")
        reader = await request.multipart()
        part = await reader.next()
        while part is not None and getattr(part, "name", None) != "file":
            part = await reader.next()
        if not isinstance(part, BodyPartReader):
            record.status = 400
            return _error(400, "no file part")
        data = bytearray()
        while chunk := await part.read_chunk(1 << 16):
            data += chunk
            if len(data) > UPLOAD_MAX_BYTES:
                record.status = 413
                return _error(413, "the file is over 16 MiB")
        mime = sniff(bytes(data[:16]))
        if mime is None:
            record.status = 415
            return _error(415, "only PNG, JPEG or WebP images")
        digest = hashlib.sha256(data).hexdigest()
        file_id = f"file-{digest[:24]}"
        ext = mime.rpartition("/")[2]
        record.detail = {"sha256": digest, "size": len(data), "filename": part.filename}
        record.status = 200
        return _ok({"file_id": file_id, "url": f"{request.scheme}://{request.host}/media/{file_id}.{ext}",
                    "type": mime, "filename": part.filename or "", "size": len(data),
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds")})

    async def records(request: web.Request) -> web.Response:
        return web.json_response([r.__dict__ for r in state.records])

    for form in config.routes:
        app.router.add_post(ROUTES[form], submit)
    app.router.add_get(TASK_PATH, query)
    app.router.add_get("/files/{name}", download)
    app.router.add_get("/api/v1/models", models)
    app.router.add_post(UPLOAD_PATH, media_upload)
    app.router.add_get("/api/v1/team/balance", balance)
    app.router.add_get("/api/v1/apikey/validate", validate_key)
    app.router.add_get("/models/{provider}/{model}/api_schema", api_schema)
    app.router.add_get("/_fake/records", records)
    return app


def fake_file_bytes(task_id: str, ext: str, size: int) -> bytes:
    """A task's output: a real MP4 (or PNG) that players and decoders accept, padded to
    ``size`` bytes (when smaller) with a trailing box of task-specific filler, so that
    tests can ask for large files and tell one task's bytes from another's. MP4 readers
    skip a ``free`` box; PNG readers stop at ``IEND``."""
    colour = task_colour(task_id)
    media = tiny_clip(colour) if ext == "mp4" else tiny_png(colour)
    pad = size - len(media)
    if pad <= 0:
        return media
    seed = hashlib.sha256(f"{task_id}.{ext}".encode()).digest()
    if ext != "mp4":
        return media + (seed * (pad // len(seed) + 1))[:pad]
    if pad < 8:  # a box needs its 8-byte header: grow to the next size that fits one
        pad += 8
    body = pad - 8
    return media + (pad).to_bytes(4, "big") + b"free" + (seed * (body // len(seed) + 1))[:body]


class FakeServer:
    """A running fake on 127.0.0.1; ``url`` is the base to give the client."""

    def __init__(self, url: str, state: FakeState, runner: web.AppRunner | None = None) -> None:
        self.url, self.state, self._runner = url, state, runner

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def start_fake(config: FakeConfig | None = None, port: int = 0) -> FakeServer:
    """Start the fake on 127.0.0.1 (``port=0``: a random free port)."""
    app = make_app(config)
    runner, real_port = await start_app(app, port)
    return FakeServer(f"http://127.0.0.1:{real_port}", app[STATE_KEY], runner)


async def start_app(app: web.Application, port: int = 0, ssl_context: Any = None) -> tuple[web.AppRunner, int]:
    """Serve any aiohttp application on 127.0.0.1 (``port=0``: a random free port)."""
    # In-flight handlers (an injected 30 s latency) must not hold up shutdown.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024, ssl_context=ssl_context)
    await site.start()
    server = site._server
    assert server is not None
    return runner, server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@contextmanager
def app_in_thread(app: web.Application, ssl_context: Any = None) -> Iterator[str]:
    """Serve an application on its own event loop in a thread; yield its base URL (the
    tests' hostile servers use this, as the fake does; with TLS, https://localhost:port)."""
    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        ready["runner"], ready["port"] = loop.run_until_complete(start_app(app, 0, ssl_context))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("server did not start")
    try:
        yield f"https://localhost:{ready['port']}" if ssl_context else f"http://127.0.0.1:{ready['port']}"
    finally:
        asyncio.run_coroutine_threadsafe(ready["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextmanager
def fake_in_thread(config: FakeConfig | None = None, ssl_context: Any = None) -> Iterator[FakeServer]:
    """Run the fake on its own event loop in a thread (for CLI and subprocess tests)."""
    app = make_app(config)
    with app_in_thread(app, ssl_context) as url:
        yield FakeServer(url, app[STATE_KEY])
