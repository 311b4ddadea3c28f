"""requests → outcomes: send valid requests concurrently, paced, each at most once.

A producer streams requests (never the whole job) through a bounded queue to a
fixed pool of workers; the ledger is consulted in chunks so that requests already
``submitted`` (or of unknown outcome) in an earlier run are not sent again. Each
attempt takes an in-flight slot, a rate-limiter slot and a *pre-wire* slot, is claimed
in the ledger as ``sending`` (a durable, conditional mark), and only then goes on the
wire.

Guarantees:

* **Nothing unmarked is sent; little marked is unsent.** At most ``PREWIRE`` requests are
  ever marked ``sending`` without their bytes having been handed to the socket (the
  payload reports the moment it is written), so a ``kill -9`` can leave at most that
  many ``unknown`` requests that the provider never saw. The run measures the time from
  mark to wire and reports it (``mark_to_wire_ms`` in the summary).
* **A stop waits only for the wire.** On SIGTERM, a deadline, a fatal answer or the
  circuit breaker, every worker that is queueing, pacing or backing off is cancelled at
  once (its request stays ``pending``); only requests on the wire get ``--grace``.
* **A spend cap that spends.** With ``--max-spend`` each request reserves its estimated
  cost before it is claimed (recorded with the claim, so the night's later runs through
  the same ledger count it); the run sends until the next request would take the night
  past the cap, then stops starting: the requests already holding their share still go.
* **A wrong route stops the night, not row by row.** A 404 on a submission means the
  route or model does not exist: the run stops at the first one and the request stays
  ``pending``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp.payload
import structlog

from batch.api import DOCUMENTED, endpoint_url, on_origin, origin
from batch.client import Kind, Secret, Transport, Verdict, clean_text, make_session, request_once, retry_wait
from batch.errors import ConfigError, StateError
from batch.expand import Request, chunks
from batch.ledger import AsyncLedger, Mark, utcnow
from batch.models import Catalog
from batch.mutant import mutant
from batch.prices import Pricing, resolution_of
from batch.progress import Progress
from batch.ratelimit import DEFAULT_RATE, Rate, SmoothLimiter
from batch.upload import Uploader, UploadError, placeholders

_STATUS = {Kind.OK: "submitted", Kind.FAIL: "failed", Kind.FATAL: "failed", Kind.UNKNOWN: "unknown"}
MAX_ADAPTIVE_CONCURRENCY = 512
WARM_UP_MAX = 0.1
UNLIMITED_RATE_CONCURRENCY = 64
# Requests marked ``sending`` but not yet written to a socket, at most: what a kill -9 can
# leave ``unknown`` although the provider never saw it. Measured with benchmarks/bench.py
# (20k unpaced requests, concurrency 64, two runs each): 8 took 5.4-5.5 s with mark-to-wire
# p50/p99 0.47/1.3 ms; 16, 4.8-5.8 s; 32, 4.9-5.1 s; 64 (no bound below the concurrency)
# 4.8-4.9 s and 2.0/8.3 ms. A tenth of the unpaced rate, which no provider's limit comes near,
# for an eighth of the exposure.
PREWIRE = 8
# One encoder for every body: json.dumps() with options builds a new one per call.
_WIRE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class SpendCap:
    """The night's spend, per ledger: each request's estimated cost is reserved before it
    is claimed (and recorded with the claim, for the night's later runs), given back when
    the provider certainly did not take it. With ``limit`` (``--max-spend``) the run stops
    starting requests when the next one would take the night past it; ``earlier`` is what
    the night's earlier runs spent. Without a limit the costs are only recorded."""

    limit: float | None
    pricing: Pricing
    catalog: Catalog
    night: str = ""
    earlier: float = 0.0

    def cost(self, req: Request) -> float | None:
        spec = self.catalog.get(req.model)
        cost = self.pricing.cost(spec, req.body)
        if cost is None and self.limit is not None:  # every model in use is checked first: a bug
            raise ConfigError(f"--max-spend: no price for {req.model} at {resolution_of(spec, req.body)}")
        return cost

    def fits(self, spent: float, cost: float) -> bool:
        # A cent's millionth of slack: five requests at 0.20 fit a cap of 1.00 whatever
        # the binary sum of 0.2s rounds to.
        return self.limit is None or self.earlier + spent + cost <= self.limit + 1e-9

    def reason(self, spent: float, next_cost: float) -> str:
        """The stop reason, from the same numbers the summary shows."""
        assert self.limit is not None
        tonight = self.earlier + spent
        return (f"--max-spend {self.limit:g} USD reached for the night of {self.night}: {tonight:.2f} USD estimated "
                f"({spent:.2f} by this run, {self.earlier:.2f} by earlier runs), "
                f"{max(0.0, self.limit - tonight):.2f} left; the next request would cost {next_cost:.2f}")


@dataclass(frozen=True)
class SubmitConfig:
    """Everything about how to talk to the API; built once by the CLI, passed down."""

    base_url: str
    api_key: Secret
    endpoint: str = DOCUMENTED  # each model's documented route, a route form (batch.api.ROUTE_FORMS) or a template
    routes: Mapping[str, str] = field(default_factory=dict)  # model -> path of its documented route
    rate: Rate | None = DEFAULT_RATE  # None: no pacing
    concurrency: int | None = None  # None: adapt to rate x observed latency
    max_attempts: int = 5
    timeout: float = 60.0
    connect_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    breaker_threshold: int = 10
    resend_unknown: bool = False
    max_requests: int | None = None  # the night's, through this ledger
    night: str = ""  # the run's night (batch.ledger.night_of)
    night_requests: int = 0  # sent by the night's earlier runs through this ledger
    rate_margin: float = 0.02
    prewire: int = PREWIRE
    spend_cap: SpendCap | None = None
    transport: Transport = field(default_factory=Transport)
    task_attempts: Mapping[str, int] = field(default_factory=dict)  # request id -> its task's attempt, when > 1

    def trace_id(self, request_id: str) -> str:
        """The x-request-id of a request's next task: the request id, ``.a<n>`` for the
        n-th task of a retried one (batch.retry), so each paid task is told apart."""
        n = self.task_attempts.get(request_id, 1)
        return request_id if n <= 1 else f"{request_id}.a{n}"

    def url_for(self, model: str) -> str:
        return endpoint_url(self.endpoint, self.base_url, model, self.routes.get(model))

    @property
    def pool_size(self) -> int:
        if self.concurrency:
            return self.concurrency
        return MAX_ADAPTIVE_CONCURRENCY if self.rate else UNLIMITED_RATE_CONCURRENCY


class InFlightGate:
    """Caps requests in flight. Without a fixed cap it follows rate x latency:
    to sustain r requests/s at latency L, about r x L must be in flight (Little's law);
    1.5x headroom plus 2 absorbs latency spikes. A 429 may come from the provider's
    concurrency limit rather than its window, so each one halves a ceiling on what is
    in flight, which every success raises by one again (AIMD, as TCP does)."""

    def __init__(self, fixed: int | None, rate: Rate | None) -> None:
        self.fixed = fixed
        self.rate = rate.per_second if rate else None
        self.latency = 2.0  # EWMA seconds, seeded pessimistically until answers arrive
        self.active = 0
        self.limit = fixed or self._adaptive()
        self.ceiling = float(self.limit)
        self._cond = asyncio.Condition()

    def _adaptive(self) -> int:
        if not self.rate:
            return UNLIMITED_RATE_CONCURRENCY
        wanted = math.ceil(self.rate * self.latency * 1.5) + 2
        return max(2, min(MAX_ADAPTIVE_CONCURRENCY, wanted))

    @property
    def allowed(self) -> int:
        return max(1, min(self.limit, int(self.ceiling)))

    def observe(self, seconds: float, throttled: bool) -> None:
        self.latency = 0.8 * self.latency + 0.2 * seconds
        if not self.fixed:
            self.limit = self._adaptive()
        if throttled:
            self.ceiling = max(1.0, min(self.ceiling, self.active) / 2)
        else:
            self.ceiling = min(float(self.limit), self.ceiling + 1)

    async def enter(self) -> None:
        # With a fixed cap and no throttling there is one worker per slot: counting is enough.
        if not self.fixed or self.ceiling < self.limit:
            async with self._cond:
                await self._cond.wait_for(lambda: self.active < self.allowed)
        self.active += 1

    async def leave(self) -> None:
        self.active -= 1
        async with self._cond:
            self._cond.notify()


@dataclass
class RunStats:
    counts: Counter[str] = field(default_factory=Counter)
    sent: int = 0  # HTTP attempts made
    first_send: float | None = None
    last_send: float | None = None
    stop_reason: str | None = None
    fatal: bool = False  # stopped by the provider: bad key, no balance, no such route
    state_error: str | None = None  # the ledger could not be written (disk full...)
    spend_usd: float = 0.0  # estimated cost of what this run may have had accepted (with prices)
    # Seconds, per attempt: packed doubles (8 bytes each, a list of floats takes 32), as
    # this grows with the run.
    mark_to_wire: array[float] = field(default_factory=lambda: array("d"))

    @property
    def send_rate(self) -> float:
        """Starts per second, start to start: comparable with --rate (n starts span n-1 gaps)."""
        if self.first_send is None or self.last_send is None or self.last_send <= self.first_send:
            return 0.0
        return (self.sent - 1) / (self.last_send - self.first_send)

    def window_ms(self) -> dict[str, float] | None:
        """Mark-to-wire time: median, 99th percentile and maximum, in milliseconds."""
        if not self.mark_to_wire:
            return None
        values = sorted(self.mark_to_wire)
        pick = lambda q: values[min(len(values) - 1, int(q * len(values)))] * 1000  # noqa: E731
        return {"p50": round(pick(0.5), 2), "p99": round(pick(0.99), 2), "max": round(values[-1] * 1000, 2)}


class WirePayload(aiohttp.payload.BytesPayload):
    """A request body that says when it has been handed to the socket: aiohttp writes it
    right after the headers, so this is the moment the provider may see the request."""

    def __init__(self, value: bytes, on_wire: Callable[[], None]) -> None:
        super().__init__(value, content_type="application/json")
        self._on_wire = on_wire

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        await super().write_with_length(writer, content_length)
        self._on_wire()


class _WireWatch:
    """One attempt's pre-wire slot: released, and the mark-to-wire time recorded, the
    moment the body is handed to the socket (or when the attempt ends without that)."""

    __slots__ = ("_done", "_marked_at", "_sem", "_times")

    def __init__(self, sem: asyncio.Semaphore, times: array[float]) -> None:
        self._sem, self._times = sem, times
        self._marked_at: float | None = None
        self._done = False

    def marked(self) -> None:
        self._marked_at = time.monotonic()

    def __call__(self) -> None:
        if self._marked_at is not None and not self._done:
            self._times.append(time.monotonic() - self._marked_at)
        self.release()

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._sem.release()


class Submitter:
    """Sends the valid requests of one run; ``halt()`` stops starting new ones."""

    uploader: Uploader | None = None  # local images to upload before their requests (batch.upload)

    def __init__(self, config: SubmitConfig, ledger: AsyncLedger, run_id: str,
                 progress: Progress | None = None, limiter: SmoothLimiter | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.run_id = run_id
        self.limiter = limiter or SmoothLimiter(config.rate, config.rate_margin)
        self.stats = RunStats()
        self.stopping = asyncio.Event()
        # Bound once per run: a module-level lazy proxy would rebuild its logger on every
        # call (structlog's cache is off so that each CLI invocation can reconfigure).
        self.log = structlog.get_logger("batch.sending").bind(run_id=run_id)
        self._unknown_streak = 0
        self._gate = InFlightGate(config.concurrency, config.rate)
        self._prewire = asyncio.Semaphore(config.prewire)
        self._api_origin = origin(config.base_url)
        self._api_prefix = self._api_origin + "/"
        self._transport = config.transport.pinned()  # the proxy decided once per run, not per request
        self._workers: list[asyncio.Task[None]] = []
        self._waiting: set[asyncio.Task[Any]] = set()  # cancellable now: not marked, not on the wire
        self.progress = progress
        # The first request of a run pays for connection set-up and aiohttp's lazy
        # initialisation (~10-20 ms here); the ones scheduled after it on warm
        # connections then reach the server bunched up: at 500/s the fake API saw 503
        # starts in one second. So the schedule starts once the first answer is in, or
        # after WARM_UP_MAX seconds (a slow provider must not stall the run).
        self._warm = asyncio.Event()
        self._warming = False
        self._producer: asyncio.Task[None] | None = None
        self._feed_error: Exception | None = None  # what the request generator raised
        self._cap_next: float | None = None  # set when the spend cap stopped the run: the next cost
        self._claimed: set[str] = set()  # marked ``sending``, no outcome recorded yet: may be on the wire

    def halt(self, reason: str, fatal: bool = False) -> None:
        """Stop starting requests; those on the wire finish and are recorded."""
        if not self.stopping.is_set():
            self.stats.stop_reason = reason
            self.stats.fatal = fatal
            self.stopping.set()
            self.log.warning("stopping", reason=reason)
        current = asyncio.current_task()
        for task in (self._producer, *self._waiting):
            if task is not None and task is not current:
                task.cancel()

    def abort(self) -> None:
        """Cancel in-flight requests now; they stay ``sending`` (unknown) in the ledger."""
        self.halt(self.stats.stop_reason or "aborted")
        for task in (self._producer, *self._workers):
            if task is not None:
                task.cancel()

    async def run(self, requests: Iterable[Request], grace: float | None = None) -> RunStats:
        cfg = self.config
        queue: asyncio.Queue[Request] = asyncio.Queue(maxsize=cfg.pool_size * 2)
        async with make_session(cfg.pool_size, cfg.timeout, cfg.connect_timeout, cfg.transport) as session:
            self._session = session
            self._workers = [asyncio.create_task(self._worker(queue)) for _ in range(cfg.pool_size)]
            self._producer = asyncio.create_task(self._produce(requests, queue))
            try:
                await self._until_done(queue, grace)
                self._settle_cap_reason()
                if self._feed_error is not None:
                    raise self._feed_error
            finally:
                tasks = [self._producer, *self._workers]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return self.stats

    async def _until_done(self, queue: asyncio.Queue[Request], grace: float | None) -> None:
        """Wait until every queued request is handled; once stopping, give the requests on
        the wire ``grace`` seconds (after it they are cancelled, and left ``sending``)."""
        assert self._producer is not None
        producer = self._producer

        async def drained() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            await queue.join()

        done = asyncio.create_task(drained())
        stop_wait = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({done, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if done.done() and not self.stopping.is_set():
            await done
            return
        done.cancel()
        busy = [w for w in self._workers if not w.done() and w not in self._waiting]
        if not busy:
            return
        _, late = await asyncio.wait(busy, timeout=grace)
        if late:
            self.log.warning("grace_expired", grace=grace, in_flight=len(late))

    async def _produce(self, requests: Iterable[Request], queue: asyncio.Queue[Request]) -> None:
        """Feed the queue. An exception from ``requests`` (a bug while a row is expanded)
        stops the feeding and drops what is queued (still ``pending``: the next run sends
        it); the requests workers already hold get their answers recorded, then
        :meth:`run` raises it (cancelling the workers here would leave accepted, paid tasks
        ``sending``)."""
        try:
            await self._feed(requests, queue)
        except Exception as exc:
            self._feed_error = exc
            while not queue.empty():
                queue.get_nowait()
                queue.task_done()
            self.log.error("input_failed", error=f"{type(exc).__name__}: {exc}",
                           handling="no more requests started; those in flight settle first")

    async def _feed(self, requests: Iterable[Request], queue: asyncio.Queue[Request]) -> None:
        cfg = self.config
        budget = None if cfg.max_requests is None else max(0, cfg.max_requests - cfg.night_requests)
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
                    earlier = f" ({cfg.night_requests} by earlier runs)" if cfg.night_requests else ""
                    self.stats.stop_reason = self.stats.stop_reason or (
                        f"--max-requests {cfg.max_requests} reached for the night of {cfg.night or 'tonight'}{earlier}")
                    return
                await queue.put(req)
                queued += 1
                if self.progress is not None:
                    self.progress.queued += 1
                if self.stopping.is_set():
                    return
        if self.progress is not None:
            self.progress.producer_done = True

    async def _worker(self, queue: asyncio.Queue[Request]) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self.stopping.is_set():
            self._waiting.add(me)
            req = await queue.get()
            try:
                await self._submit(req, me)
            except asyncio.CancelledError:
                raise
            except (StateError, sqlite3.Error, OSError) as exc:  # the ledger broke (disk full): stop
                self.stats.state_error = self.stats.state_error or str(exc)
                self.halt(str(exc))
            except Exception as exc:  # a fault handling this one request costs only this request
                self._unexpected(req, exc)
            finally:
                self._claimed.discard(req.request_id)
                self._waiting.discard(me)
                queue.task_done()

    def _unexpected(self, req: Request, exc: Exception) -> None:
        """Record what an unexpected error in one request's handling leaves: ``unknown``
        if it was marked and so may have been sent (never resent by a later run), else
        nothing (it stays ``pending``, sent by the next run). The run goes on."""
        error = f"unexpected error handling the request: {clean_text(f'{type(exc).__name__}: {exc}', self.config.api_key)}"
        self.log.error("request_error", request_id=req.request_id, error=error)
        if req.request_id not in self._claimed:
            return
        self.ledger.outcome(req.request_id, self.run_id, "unknown", error=error, attempts=1, submitted_at=utcnow())
        self.stats.counts["unknown"] += 1
        if self.progress is not None:
            self.progress.counts["unknown"] += 1

    async def _submit(self, req: Request, me: asyncio.Task[Any]) -> None:
        """One request: its share of the night's spend (reserved before it is claimed,
        given back when the provider certainly did not take it), then its attempts."""
        cap = self.config.spend_cap
        cost = None
        if cap is not None:
            if self._cap_next is not None:
                return  # the cap was reached: this one stays pending
            cost = cap.cost(req)
            if cost is not None:
                if not cap.fits(self.stats.spend_usd, cost):
                    self._cap_reached(cost)
                    return
                self.stats.spend_usd += cost
        taken = True  # an abort in mid-request keeps the reservation: it may have been accepted
        try:
            taken = await self._attempts(req, me, cost)
        finally:
            if cost and not taken:
                self.stats.spend_usd -= cost

    def _cap_reached(self, next_cost: float) -> None:
        """Stop starting requests, but not as :meth:`halt` does: the requests that already
        hold their share of the cap are still sent (halting would cancel them while they
        wait for the rate limiter, and the cap would send nothing)."""
        assert self.config.spend_cap is not None
        self._cap_next = next_cost
        reason = self.config.spend_cap.reason(self.stats.spend_usd, next_cost)
        if self.stats.stop_reason is None:
            self.stats.stop_reason = reason
            self.log.warning("stopping", reason=reason)
        if self._producer is not None and self._producer is not asyncio.current_task():
            self._producer.cancel()

    def _settle_cap_reason(self) -> None:
        """Requests refused after the cap was reached gave their share back: state the
        reason with the final numbers, which the summary shows too."""
        cap = self.config.spend_cap
        if cap is not None and self._cap_next is not None and (self.stats.stop_reason or "").startswith("--max-spend"):
            self.stats.stop_reason = cap.reason(self.stats.spend_usd, self._cap_next)

    async def _attempts(self, req: Request, me: asyncio.Task[Any], cost: float | None = None) -> bool:
        """All attempts for one request; whether the provider may have accepted it.
        Hand-written rather than tenacity: each attempt must pass the shared gate,
        limiter, pre-wire slot and a durable ledger claim, and the decision depends on the
        classified answer and its Retry-After, not on an exception. Waiting sections are
        cancellable (``self._waiting``); from the claim to the answer the worker is not,
        and settles the ledger row itself."""
        cfg, ledger, loop = self.config, self.ledger, asyncio.get_running_loop()
        text = _WIRE.encode(req.body)
        body = text.encode()
        url = cfg.url_for(req.model)
        mark = Mark(req.request_id, self.run_id, req.label, req.model, url, req.source, req.row, text, cost)
        if self.uploader is not None and placeholders(req.body):
            # The ledger keeps the body with its content placeholders (the identity); the
            # wire gets the uploaded URLs. An upload that fails sends nothing and pays nothing.
            try:
                body = _WIRE.encode(await self.uploader.resolve(req.body, self._session, self.limiter.acquire,
                                                                self.limiter.heed)).encode()
            except UploadError as exc:
                if await ledger.sending(mark):
                    status = "failed" if exc.definite else "pending"
                    ledger.outcome(req.request_id, self.run_id, status, error=str(exc), attempts=0)
                    self.stats.counts[status] += 1
                    self.log.warning("upload_failed", request_id=req.request_id, error=str(exc))
                return False
        attempts = 0
        while True:
            if not self._warm.is_set():
                if self._warming:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._warm.wait(), WARM_UP_MAX)
                    self._warm.set()
                else:
                    self._warming = True
            await self._gate.enter()
            try:
                await self.limiter.schedule()
                await self._prewire.acquire()
                wire = _WireWatch(self._prewire, self.stats.mark_to_wire)
                try:
                    if self.stopping.is_set():
                        return False
                    self._waiting.discard(me)  # from the claim on, settle the row here
                    if not mutant("mark_after_send") and not await ledger.sending(mark):
                        self.log.debug("already_taken", request_id=req.request_id)
                        return False  # the ledger shows it submitted or in flight elsewhere
                    self._claimed.add(req.request_id)
                    wire.marked()
                    paced_at = loop.time()
                    # The window guard counts wire times: a slow commit must not bunch requests.
                    if not await self._admit():
                        ledger.outcome(req.request_id, self.run_id, "pending", attempts=attempts,
                                       error=f"stopped before sending: {self.stats.stop_reason}")
                        return False
                    attempts += 1
                    started = loop.time()
                    if self.stats.first_send is None:
                        self.stats.first_send = paced_at
                    self.stats.last_send = paced_at
                    self.stats.sent += 1
                    try:
                        # x-request-id (as the provider's newer client sends one) lets its support
                        # trace a task: our request id (a hash of model and body, nothing secret),
                        # with the attempt for a retried request's later tasks.
                        verdict = await request_once(self._session, "POST", url, cfg.api_key,
                                                     WirePayload(body, wire),  # type: ignore[arg-type]
                                                     transport=self._transport,
                                                     extra_headers={"x-request-id": cfg.trace_id(req.request_id)})
                    finally:
                        self._warm.set()
                        if mutant("mark_after_send"):
                            await ledger.sending(mark)
                finally:
                    wire.release()
                self._gate.observe(loop.time() - started, verdict.http_status == 429)
                self.limiter.heed(verdict)
            finally:
                await self._gate.leave()
            if verdict.http_status == 404:
                # A definite rejection of the route, not of the row: stop the night here.
                ledger.outcome(req.request_id, self.run_id, "pending", error=f"HTTP 404 from {url}",
                               error_code=verdict.error_code, http_status=404, attempts=attempts)
                self.halt(f"HTTP 404 from {url}: the route or the model does not exist there "
                          f"({verdict.error}); check --model, --endpoint and --base-url", fatal=True)
                return False
            if verdict.kind is not Kind.RETRY:
                self._finish(req, verdict, attempts)
                return verdict.kind in (Kind.OK, Kind.UNKNOWN)
            wait = retry_wait(verdict, attempts, cfg.backoff_base, cfg.backoff_max)
            if attempts >= cfg.max_attempts:
                verdict.error = f"gave up after {attempts} attempts: {verdict.error}"
                verdict.kind = Kind.FAIL
                self._finish(req, verdict, attempts)
                return False
            ledger.outcome(req.request_id, self.run_id, "pending", error=verdict.error, error_code=verdict.error_code,
                           http_status=verdict.http_status, attempts=attempts)
            self._claimed.discard(req.request_id)  # certainly not accepted: pending until resent
            self.log.debug("retry", request_id=req.request_id, attempt=attempts, wait=round(wait, 3),
                           http_status=verdict.http_status, error=verdict.error)
            if self.stopping.is_set():
                return False
            self._waiting.add(me)
            await asyncio.sleep(wait)

    async def _admit(self) -> bool:
        """The limiter's window guard, unless the run stops meanwhile (the request is
        marked but not sent: the caller records it ``pending``)."""
        if self.stopping.is_set():
            return False
        if self.limiter.admit_now():
            return True
        admit = asyncio.ensure_future(self.limiter.admit())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({admit, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if admit.done():
            return True
        admit.cancel()
        return False

    def _poll_url(self, verdict: Verdict) -> str | None:
        """``data.get_result.url``, kept only on the API's own scheme and host: the key is
        sent to no other place."""
        result = (verdict.data or {}).get("get_result")
        url = result.get("url") if isinstance(result, dict) else None
        if not isinstance(url, str) or len(url) > 2048:
            return None
        if url.startswith(self._api_prefix) and not any(c in url for c in "\r\n\t #"):
            return url  # what the parse below accepts: the authority ends at that "/" (no parse per answer)
        try:
            same = on_origin(url, self._api_origin)
        except ValueError:
            return None
        if not same or any(c in url for c in "\r\n\t #"):
            if url:
                self.log.warning("poll_url_ignored", reason="not on the API's scheme and host")
            return None
        return url

    def _finish(self, req: Request, verdict: Verdict, attempts: int) -> None:
        status = _STATUS[verdict.kind]
        self.ledger.outcome(
            req.request_id, self.run_id, status, task_id=verdict.task_id, error=verdict.error,
            error_code=verdict.error_code, http_status=verdict.http_status, attempts=attempts,
            submitted_at=utcnow(), poll_url=self._poll_url(verdict) if verdict.kind is Kind.OK else None,
        )
        self._claimed.discard(req.request_id)
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
            self.halt(f"HTTP {verdict.http_status}: {verdict.error}", fatal=True)
