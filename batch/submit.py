"""requests → outcomes: send valid requests concurrently, paced, each at most once.

A producer streams requests (never the whole job) through a bounded queue to a
fixed pool of workers; the ledger is consulted in chunks so that requests already
``submitted`` (or of unknown outcome) in an earlier run are not sent again. Each
attempt takes an in-flight slot, then a rate-limiter slot, is committed to the ledger
as ``sending``, and only then goes on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from batch.client import Kind, Secret, Verdict, backoff_delay, make_session, request_once, submit_url
from batch.expand import Request, chunks
from batch.ledger import AsyncLedger, utcnow
from batch.progress import Progress
from batch.ratelimit import DEFAULT_RATE, Rate, SmoothLimiter

_STATUS = {Kind.OK: "submitted", Kind.FAIL: "failed", Kind.FATAL: "failed", Kind.UNKNOWN: "unknown"}
MAX_ADAPTIVE_CONCURRENCY = 512
WARM_UP_MAX = 0.1
UNLIMITED_RATE_CONCURRENCY = 64
# One encoder for every body: json.dumps() with options builds a new one per call.
_WIRE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class SubmitConfig:
    """Everything about how to talk to the API; built once by the CLI, passed down."""

    base_url: str
    api_key: Secret
    rate: Rate | None = DEFAULT_RATE  # None: no pacing
    concurrency: int | None = None  # None: adapt to rate x observed latency
    max_attempts: int = 5
    timeout: float = 60.0
    connect_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    breaker_threshold: int = 10
    resend_unknown: bool = False
    max_requests: int | None = None
    rate_margin: float = 0.02

    @property
    def pool_size(self) -> int:
        if self.concurrency:
            return self.concurrency
        return MAX_ADAPTIVE_CONCURRENCY if self.rate else UNLIMITED_RATE_CONCURRENCY


class InFlightGate:
    """Caps requests in flight. Without a fixed cap it follows rate x latency:
    to sustain r requests/s at latency L, about r x L must be in flight (Little's law);
    1.5x headroom plus 2 absorbs latency spikes, and the provider's own concurrency
    limit still answers 429 if we overshoot."""

    def __init__(self, fixed: int | None, rate: Rate | None) -> None:
        self.fixed = fixed
        self.rate = rate.per_second if rate else None
        self.latency = 2.0  # EWMA seconds, seeded pessimistically until answers arrive
        self.active = 0
        self.limit = fixed or self._adaptive()
        self._cond = asyncio.Condition()

    def _adaptive(self) -> int:
        if not self.rate:
            return UNLIMITED_RATE_CONCURRENCY
        wanted = math.ceil(self.rate * self.latency * 1.5) + 2
        return max(2, min(MAX_ADAPTIVE_CONCURRENCY, wanted))

    def observe(self, seconds: float) -> None:
        self.latency = 0.8 * self.latency + 0.2 * seconds
        if not self.fixed:
            self.limit = self._adaptive()

    async def __aenter__(self) -> None:
        # With a fixed cap there is one worker per slot: counting is enough.
        if not self.fixed:
            async with self._cond:
                await self._cond.wait_for(lambda: self.active < self.limit)
        self.active += 1

    async def __aexit__(self, *exc: object) -> None:
        self.active -= 1
        if not self.fixed:
            async with self._cond:
                self._cond.notify()


@dataclass
class RunStats:
    counts: Counter[str] = field(default_factory=Counter)
    sent: int = 0  # HTTP attempts made
    first_send: float | None = None
    last_send: float | None = None
    stop_reason: str | None = None

    @property
    def send_rate(self) -> float:
        """Starts per second, start to start: comparable with --rate (n starts span n-1 gaps)."""
        if self.first_send is None or self.last_send is None or self.last_send <= self.first_send:
            return 0.0
        return (self.sent - 1) / (self.last_send - self.first_send)


class Submitter:
    """Sends the valid requests of one run; ``halt()`` stops starting new ones."""

    def __init__(self, config: SubmitConfig, ledger: AsyncLedger, run_id: str,
                 progress: Progress | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.run_id = run_id
        self.limiter = SmoothLimiter(config.rate, config.rate_margin)
        self.stats = RunStats()
        self.stopping = asyncio.Event()
        # Bound once per run: a module-level lazy proxy would rebuild its logger on every
        # call (structlog's cache is off so that each CLI invocation can reconfigure).
        self.log = structlog.get_logger("batch.submit").bind(run_id=run_id)
        self._unknown_streak = 0
        self._gate = InFlightGate(config.concurrency, config.rate)
        self._url = submit_url(config.base_url)
        self._workers: list[asyncio.Task[None]] = []
        self.progress = progress
        # The first request of a run pays for connection set-up and aiohttp's lazy
        # initialisation (~10-20 ms here); the ones scheduled after it on warm
        # connections then reach the server bunched up: at 500/s the fake API saw 503
        # starts in one second. So the schedule starts once the first answer is in, or
        # after WARM_UP_MAX seconds (a slow provider must not stall the run).
        self._warm = asyncio.Event()
        self._warming = False
        self._producer: asyncio.Task[None] | None = None
        self._error: Exception | None = None

    def halt(self, reason: str) -> None:
        """Stop starting requests; those in flight finish and are recorded."""
        if not self.stopping.is_set():
            self.stats.stop_reason = reason
            self.stopping.set()
            self.log.warning("stopping", reason=reason)

    def abort(self) -> None:
        """Cancel in-flight requests now; they stay ``sending`` (unknown) in the ledger."""
        self.halt(self.stats.stop_reason or "aborted")
        for task in (self._producer, *self._workers):
            if task is not None:
                task.cancel()

    async def run(self, requests: Iterable[Request], grace: float | None = None) -> RunStats:
        cfg = self.config
        queue: asyncio.Queue[Request] = asyncio.Queue(maxsize=cfg.pool_size * 2)
        async with make_session(cfg.pool_size, cfg.timeout, cfg.connect_timeout) as session:
            self._session = session
            self._workers = [asyncio.create_task(self._worker(queue)) for _ in range(cfg.pool_size)]
            self._producer = asyncio.create_task(self._produce(requests, queue))
            try:
                await self._until_done(queue, grace)
            finally:
                tasks = [self._producer, *self._workers]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if self._error is not None:
            raise self._error
        return self.stats

    async def _until_done(self, queue: asyncio.Queue[Request], grace: float | None) -> None:
        """Wait until every queued request is handled; once stopping, give in-flight
        requests ``grace`` seconds before they are cancelled (and left ``sending``)."""
        assert self._producer is not None
        producer = self._producer

        async def drained() -> None:
            await producer
            await queue.join()

        done = asyncio.create_task(drained())
        stop_wait = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({done, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if done.done():
            await done
            return
        try:
            await asyncio.wait_for(done, grace)
        except TimeoutError:
            self.log.warning("grace_expired", grace=grace, in_flight=self._gate.active)

    async def _produce(self, requests: Iterable[Request], queue: asyncio.Queue[Request]) -> None:
        budget = self.config.max_requests
        queued = 0
        valid = (r for r in requests if r.error is None)
        for chunk in chunks(valid, 256):
            await asyncio.sleep(0)  # expanding a chunk is CPU work: let the workers run
            if self.stopping.is_set():
                return
            known = self.ledger.lookup([r.request_id for r in chunk])
            for req in chunk:
                entry = known.get(req.request_id)
                if entry is not None and (
                    entry.status == "submitted"
                    or (entry.status in ("sending", "unknown") and not self.config.resend_unknown)
                ):
                    continue
                if budget is not None and queued >= budget:
                    # Not halt(): the requests already queued still go out.
                    self.stats.stop_reason = self.stats.stop_reason or f"--max-requests {budget} reached"
                    return
                # Blocks while the workers are busy; they keep draining after a halt.
                await queue.put(req)
                queued += 1
                if self.progress is not None:
                    self.progress.queued += 1
                if self.stopping.is_set():
                    return
        if self.progress is not None:
            self.progress.producer_done = True

    async def _worker(self, queue: asyncio.Queue[Request]) -> None:
        while True:
            req = await queue.get()
            try:
                if not self.stopping.is_set():  # after a halt: drained unsent, reported pending
                    await self._submit(req)
            except Exception as exc:  # a ledger write failed: stop the run, keep draining
                self._error = self._error or exc
                self.halt(f"internal error: {exc}")
            finally:
                queue.task_done()

    async def _submit(self, req: Request) -> None:
        """All attempts for one request. Hand-written rather than tenacity: each attempt
        must pass the shared gate, limiter and a durable ledger mark, and the decision
        depends on the classified answer and its Retry-After, not on an exception."""
        cfg, ledger, loop = self.config, self.ledger, asyncio.get_running_loop()
        text = _WIRE.encode(req.body)
        body = text.encode()
        attempts = 0
        verdict: Verdict | None = None
        while True:
            if not self._warm.is_set():
                if self._warming:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._warm.wait(), WARM_UP_MAX)
                    self._warm.set()
                else:
                    self._warming = True
            async with self._gate:
                await self.limiter.schedule()
                if self.stopping.is_set():
                    if verdict is not None:
                        ledger.outcome(req.request_id, "pending", error=f"stopped before retry: {verdict.error}",
                                       http_status=verdict.http_status, attempts=attempts)
                    return
                paced_at = loop.time()  # when the limiter let it go: the rate's own clock
                await ledger.sending(req.request_id, self.run_id, req.source, req.row, text)
                # The window guard counts wire times: a slow commit must not bunch requests.
                # (Waiting here leaves the mark: only after a stall, for under one window.)
                await self.limiter.admit()
                attempts += 1
                started = loop.time()
                if self.stats.first_send is None:
                    self.stats.first_send = paced_at
                self.stats.last_send = paced_at
                self.stats.sent += 1
                try:
                    verdict = await request_once(self._session, "POST", self._url, cfg.api_key, body)
                finally:
                    self._warm.set()
                self._gate.observe(loop.time() - started)
            if verdict.kind is not Kind.RETRY:
                self._finish(req, verdict, attempts)
                return
            wait = backoff_delay(attempts, cfg.backoff_base, cfg.backoff_max)
            if verdict.retry_after is not None:
                wait = max(wait, verdict.retry_after)
            if verdict.http_status == 429:
                self.limiter.cooldown(verdict.retry_after if verdict.retry_after is not None else wait)
            if attempts >= cfg.max_attempts:
                verdict.error = f"gave up after {attempts} attempts: {verdict.error}"
                verdict.kind = Kind.FAIL
                self._finish(req, verdict, attempts)
                return
            ledger.outcome(req.request_id, "pending", error=verdict.error, error_code=verdict.error_code,
                           http_status=verdict.http_status, attempts=attempts)
            self.log.debug("retry", request_id=req.request_id, attempt=attempts, wait=round(wait, 3),
                           http_status=verdict.http_status, error=verdict.error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), wait)

    def _finish(self, req: Request, verdict: Verdict, attempts: int) -> None:
        status = _STATUS[verdict.kind]
        self.ledger.outcome(
            req.request_id, status, task_id=verdict.task_id, error=verdict.error,
            error_code=verdict.error_code, http_status=verdict.http_status, attempts=attempts,
            submitted_at=utcnow(),
        )
        self.stats.counts[status] += 1
        if self.progress is not None:
            self.progress.counts[status] += 1
        self.log.debug("outcome", request_id=req.request_id, status=status, task_id=verdict.task_id,
                  http_status=verdict.http_status, error=verdict.error, attempts=attempts)
        if verdict.kind is Kind.UNKNOWN:
            self._unknown_streak += 1
            if self._unknown_streak >= self.config.breaker_threshold:
                self.halt(f"circuit breaker: {self._unknown_streak} ambiguous outcomes in a row "
                          f"(last: {verdict.error})")
        else:
            self._unknown_streak = 0
        if verdict.kind is Kind.FATAL:
            self.halt(f"HTTP {verdict.http_status}: {verdict.error}")
