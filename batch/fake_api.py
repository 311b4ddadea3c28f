"""A fake of the Seedance API on aiohttp.web: the tests' peer, the demo's backend,
the benchmark's target.

It validates submissions exactly as the provider documents them, answers with the
documented bodies, keeps tasks that move from ``pending`` to ``success`` (serving a
small MP4-like file on loopback) or ``failed``, and can inject by configuration:
latency, a strict sliding-window rate limit (429 + ``Retry-After``), any HTTP error,
``code != 0``, non-JSON bodies, a 2xx without task id and dropped connections.

Every request it receives is recorded in :attr:`FakeState.records`, so tests assert
on what the server saw, e.g. how many times the same body was *accepted*.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from batch.api import MODEL_ID, SUBMIT_PATH, TASK_PATH

_REASONS = {
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 413: "Payload Too Large", 422: "Unprocessable Entity",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}
# Kinds a fault may have besides an HTTP status.
FAULT_KINDS = ("code", "badjson", "no_task_id", "drop", "drop_accepted", "slow")


@dataclass
class Fault:
    """One injected fault.

    ``kind`` is an HTTP status (``"429"``, ``"500"``...) or one of :data:`FAULT_KINDS`.
    It applies to requests on ``endpoint`` (``submit``, ``query`` or ``download``)
    whose prompt (or task id) contains ``match``, with probability ``prob``, at most
    ``times`` times (``None``: forever). ``drop`` closes the connection after reading
    the request without creating a task; ``drop_accepted`` creates the task first,
    the case that makes resending dangerous; ``slow`` adds ``delay`` seconds.
    """

    kind: str
    prob: float = 1.0
    match: str | None = None
    times: int | None = None
    retry_after: str | None = None
    endpoint: str = "submit"
    delay: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """``KIND[,prob=P][,match=S][,times=N][,retry_after=S][,endpoint=E][,delay=S]``."""
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
            elif key in ("match", "retry_after", "endpoint"):
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
    faults: list[Fault] = field(default_factory=list)
    task_delay: float = 0.0  # seconds from submission to a terminal task state
    fail_match: str = "FAILTASK"  # prompts containing this end as failed tasks
    video_bytes: int = 4096
    download_bps: float | None = None  # throttle downloads (bytes/s) to test interrupted ones
    seed: int = 0
    record_bodies: bool = True


@dataclass
class Record:
    t: float  # time.monotonic() when the handler started
    method: str
    path: str
    body: Any
    status: int  # HTTP status answered; 0 for a dropped connection
    task_id: str | None  # set when a task was created (the request was accepted)


class FakeState:
    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.records: list[Record] = []
        self.tasks: dict[str, dict[str, Any]] = {}
        self.rng = random.Random(config.seed)
        self._ids = itertools.count(1)
        self._window: collections.deque[float] = collections.deque()

    def arrive(self, method: str, path: str, detail: Any = None) -> Record:
        """Record a request as its handler starts; the handler fills in status and task id."""
        record = Record(time.monotonic(), method, path, detail, 0, None)
        self.records.append(record)
        return record

    # -- views for assertions -------------------------------------------------
    def submissions(self) -> list[Record]:
        return [r for r in self.records if r.method == "POST" and r.path == SUBMIT_PATH]

    def accepted_bodies(self) -> list[Any]:
        """Bodies for which a task was created (each one a paid task)."""
        return [r.body for r in self.submissions() if r.task_id is not None]

    def accepted_count_by_prompt(self) -> collections.Counter[str]:
        return collections.Counter(
            json.dumps(b, sort_keys=True, ensure_ascii=False) for b in self.accepted_bodies()
        )

    def submit_times(self) -> list[float]:
        return [r.t for r in self.submissions()]

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
        """Seconds until a slot frees if this request breaks the sliding window."""
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

    def new_task(self, body: dict[str, Any]) -> str:
        task_id = f"task-video-{next(self._ids):08d}-{self.rng.getrandbits(32):08x}"
        prompt = body.get("prompt", "")
        self.tasks[task_id] = {
            "created": time.monotonic(),
            "body": body,
            "fails": self.config.fail_match in prompt,
        }
        return task_id

    def task_status(self, task_id: str) -> str:
        task = self.tasks[task_id]
        if time.monotonic() - task["created"] < self.config.task_delay:
            return "pending"
        return "failed" if task["fails"] else "success"


STATE_KEY = web.AppKey("state", FakeState)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"code": status, "message": f"{_REASONS.get(status, 'Error')}: {detail}"},
        status=status,
        headers=headers,
    )


def validate_body(body: Any) -> str | None:
    """Return why ``body`` breaks the documented schema, or None when it is valid."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    allowed = {
        "prompt", "ratio", "resolution", "duration", "frames", "seed", "camera_fixed",
        "service_tier", "execution_expires_after", "return_last_frame",
    }
    unknown = sorted(set(body) - allowed)
    if unknown:
        return f"unknown parameter {unknown[0]}"
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not 1 <= len(prompt) <= 2000:
        return "prompt is required, 1..2000 characters"
    enums = {
        "ratio": ("16:9", "4:3", "1:1", "3:4", "9:16", "21:9", "adaptive"),
        "resolution": ("480p", "720p", "1080p"),
        "service_tier": ("default", "flex"),
    }
    for name, choices in enums.items():
        if name in body and body[name] not in choices:
            return f"{name} must be one of {', '.join(choices)}"
    ranges = {
        "duration": (2, 12), "frames": (29, 289), "seed": (-1, 2147483647),
        "execution_expires_after": (3600, 259200),
    }
    for name, (lo, hi) in ranges.items():
        if name in body:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                return f"{name} must be an integer in [{lo}, {hi}]"
    if "frames" in body and (body["frames"] - 25) % 4:
        return "frames must be 25 + 4n"
    for name in ("camera_fixed", "return_last_frame"):
        if name in body and not isinstance(body[name], bool):
            return f"{name} must be a boolean"
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
    if kind.isdigit():
        status = int(kind)
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
        record.status = status
        return _error(status, "injected fault", headers)
    if kind == "code":
        record.status = 200
        return web.json_response({"code": 1001, "message": "Rejected: injected business error"})
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


def make_app(config: FakeConfig | None = None) -> web.Application:
    """The fake API as an aiohttp application; its state is ``app[STATE_KEY]``."""
    config = config or FakeConfig()
    state = FakeState(config)
    app = web.Application(client_max_size=1024 * 1024)
    app[STATE_KEY] = state

    async def admit(request: web.Request, record: Record) -> web.Response | None:
        """What the provider checks before the endpoint: the key, the per-key rate; then latency."""
        if not _authorized(request, config):
            record.status = 401
            return _error(401, "invalid or missing API key")
        wait = state.over_rate_limit(record.t)
        if wait is not None:
            record.status = 429
            return _error(429, "rate limit exceeded", {"Retry-After": str(max(1, int(wait + 0.999)))})
        await _latency(config, state)
        return None

    async def submit(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        record = state.arrive("POST", SUBMIT_PATH, body if config.record_bodies else None)
        refused = await admit(request, record)
        if refused is not None:
            return refused

        def accept() -> str:
            record.task_id = state.new_task(body)
            return record.task_id

        prompt = body.get("prompt", "") if isinstance(body, dict) else ""
        fault = state.pick_fault("submit", str(prompt))
        if fault is not None:
            answer = await _apply_fault(fault, request, state, record, accept)
            if answer is not None:
                return answer
        problem = validate_body(body)
        if problem is not None:
            record.status = 400
            return _error(400, problem)
        task_id = accept()
        record.status = 200
        return web.json_response(
            {"code": 0, "message": "success",
             "data": {"status": "pending", "task_id": task_id, "model_id": MODEL_ID}}
        )

    async def query(request: web.Request) -> web.StreamResponse:
        task_id = request.match_info["task_id"]
        record = state.arrive("GET", request.path)
        refused = await admit(request, record)
        if refused is not None:
            return refused
        fault = state.pick_fault("query", task_id)
        if fault is not None:
            answer = await _apply_fault(fault, request, state, record, lambda: None)
            if answer is not None:
                return answer
        if task_id not in state.tasks:
            record.status = 404
            return _error(404, f"task {task_id} not found")
        status = state.task_status(task_id)
        data: dict[str, Any] = {"status": status, "task_id": task_id, "model_id": MODEL_ID}
        if status == "success":
            base = f"{request.scheme}://{request.host}"
            resources = [{"url": f"{base}/files/{task_id}.mp4", "type": "video", "format": "mp4",
                          "width": 1280, "height": 720, "role": "video"}]
            if state.tasks[task_id]["body"].get("return_last_frame"):
                resources.append({"url": f"{base}/files/{task_id}.png", "type": "image",
                                  "format": "png", "role": "last_frame"})
            data["result"] = {"resources": resources}
        elif status == "failed":
            data["error"] = {"code": "generation_failed", "message": "content moderation rejected the prompt"}
        record.status = 200
        return web.json_response({"code": 0, "message": "success", "data": data})

    async def download(request: web.Request) -> web.StreamResponse:
        """Serves a task's output, with ``Range: bytes=N-`` for resumed downloads."""
        name = request.match_info["name"]
        task_id, _, ext = name.rpartition(".")
        record = state.arrive("GET", request.path, request.headers.get("Range"))
        if task_id not in state.tasks or state.task_status(task_id) != "success":
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
        if fault is not None:
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

    async def records(request: web.Request) -> web.Response:
        return web.json_response([r.__dict__ for r in state.records])

    app.router.add_post(SUBMIT_PATH, submit)
    app.router.add_get(TASK_PATH, query)
    app.router.add_get("/files/{name}", download)
    app.router.add_get("/_fake/records", records)
    return app


def fake_file_bytes(task_id: str, ext: str, size: int) -> bytes:
    """Deterministic content for a task's output: an ``ftyp`` box then filler."""
    head = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" if ext == "mp4" else b"\x89PNG\r\n\x1a\n"
    seed = hashlib.sha256(f"{task_id}.{ext}".encode()).digest()
    filler = (seed * (size // len(seed) + 1))[: max(0, size - len(head))]
    return head + filler


class FakeServer:
    """A running fake on 127.0.0.1; ``url`` is the base to give the client."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite, port: int) -> None:
        self.runner, self.site, self.port = runner, site, port
        self.url = f"http://127.0.0.1:{port}"
        self.state: FakeState = runner.app[STATE_KEY]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_fake(config: FakeConfig | None = None, port: int = 0) -> FakeServer:
    """Start the fake on 127.0.0.1 (``port=0``: a random free port)."""
    # In-flight handlers (an injected 30 s latency) must not hold up shutdown.
    runner = web.AppRunner(make_app(config), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    server = site._server
    assert server is not None
    real_port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return FakeServer(runner, site, real_port)


@contextmanager
def fake_in_thread(config: FakeConfig | None = None) -> Iterator[FakeServer]:
    """Run the fake on its own event loop in a thread (for CLI and subprocess tests)."""
    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        ready["server"] = loop.run_until_complete(start_fake(config))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="fake-api", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("fake API did not start")
    server: FakeServer = ready["server"]
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
