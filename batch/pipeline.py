"""The whole run, one function per arrow:
file → rows (:mod:`load`) → requests (:mod:`expand`) → outcomes (:mod:`submit`)
→ results table (:mod:`results`), with the ledger and the run lock around it.

Guarantees kept here: a request counts as sent only for the API that took it (another
API's entries in the same ledger are refused, or moved on purpose with ``--moved-from``);
a dry run never overwrites a table that holds task ids; a disk that fails after sending
costs no accepted task id (exit 6, the outcomes in the table and a rescue file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import structlog

from batch.api import FAKE_API, api_identity, check_task_id, origin
from batch.client import Secret
from batch.collect import CollectConfig, Collector, CollectStats, Task
from batch.errors import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_LOCAL_FAULT,
    EXIT_OK,
    EXIT_PROVIDER,
    BatchError,
    ConfigError,
    InputError,
    ProviderError,
    StateError,
)
from batch.estimate import Estimator
from batch.expand import Expander, ExpandSpec, Request
from batch.ledger import AsyncLedger, Entry, Ledger, locked_ledger, utcnow
from batch.load import Unreadable, load_inputs
from batch.models import Catalog
from batch.preflight import Check, fatal, run_checks
from batch.prices import Pricing
from batch.progress import Progress
from batch.ratelimit import Rate, SharedBudget, SmoothLimiter
from batch.results import (
    OK_STATUSES,
    RESULT_DTYPES,
    AtomicTableWriter,
    RequestSpool,
    Resolution,
    Tally,
    check_output_path,
    csv_text,
    is_results_table,
    ledger_value,
    read_results,
    request_frames,
    request_schema_of,
    write_results,
    write_text_atomically,
)
from batch.storage import Target
from batch.submit import RunStats, SpendCap, SubmitConfig, Submitter

log = structlog.get_logger("batch")
ConfigT = TypeVar("ConfigT", SubmitConfig, CollectConfig)


class Interrupted(BaseException):
    """SIGINT/SIGTERM outside the event loop (while reading input or writing results)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class RunOptions:
    """One ``submit`` run, as the CLI (or a job file) resolved it."""

    inputs: tuple[str, ...]
    output: Target
    expand: ExpandSpec
    submit: SubmitConfig
    state: Path
    dry_run: bool = False
    fake_api: bool = False
    deadline: float | None = None  # epoch seconds
    grace: float = 30.0
    sheet: str | None = None
    command: str = "submit"
    progress_interval: float = 10.0
    progress_tty: bool | None = None  # None: decide by stderr being a TTY
    collect: CollectConfig | None = None  # submit --wait: follow this run's tasks too
    moved_from: tuple[str, ...] = ()  # other hosts of the same provider this ledger's entries count for
    budget_dir: Path | None = None  # where the per-key rate budget is shared; None: not shared
    models_dir: Path | None = None  # fetched and added model specs (they win over the shipped ones)
    pricing: Pricing = field(default_factory=Pricing)
    max_spend: float | None = None  # USD: stop starting requests before tonight's estimate passes it
    preflight: bool = True  # check the key, the models and the balance before sending

    @property
    def api(self) -> str:
        return api_identity(self.submit.base_url, self.fake_api)


@dataclass
class Summary:
    run_id: str
    counts: dict[str, int]
    top_errors: list[tuple[str, int]]
    elapsed_s: float
    sent: int = 0
    send_rate_per_s: float = 0.0
    stop_reason: str | None = None
    interrupted: str | None = None
    results: str = ""
    state: str = ""
    fatal: bool = False
    local_fault: str | None = None
    unreadable: list[Unreadable] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.local_fault:
            return EXIT_LOCAL_FAULT
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.fatal:
            return EXIT_PROVIDER
        collect = self.extra.get("collect")
        if (collect is not None and not collect_ok(collect)) or self.unreadable:
            return EXIT_INCOMPLETE
        return EXIT_OK if set(self.counts) <= OK_STATUSES else EXIT_INCOMPLETE

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "counts": self.counts, "total": sum(self.counts.values()),
            "top_errors": [{"error": e, "count": n} for e, n in self.top_errors],
            "elapsed_s": round(self.elapsed_s, 3), "sent": self.sent,
            "send_rate_per_s": round(self.send_rate_per_s, 3), "stop_reason": self.stop_reason,
            "interrupted": self.interrupted, "results": self.results, "state": self.state,
            "local_fault": self.local_fault, "exit_code": self.exit_code,
            "unreadable": [{"source": u.source, "error": u.error} for u in self.unreadable], **self.extra,
        }


@contextmanager
def interruptible(on_first: Callable[[int], None] | None = None) -> Iterator[None]:
    """Outside the event loop, turn SIGINT/SIGTERM into :class:`Interrupted`; with
    ``on_first``, the first one is only handed to it (the work goes on: the results table
    a run owes after sending) and a second one raises."""
    first = on_first

    def raise_it(signum: int, _frame: object) -> None:
        nonlocal first
        if first is not None:
            first, call = None, first
            call(signum)
            return
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_it) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def signals_to(callback: Callable[[int], None]) -> Iterator[None]:
    """Inside the event loop, hand SIGINT/SIGTERM to ``callback(signum)``."""
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, callback, s)
    try:
        yield
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)


def settle_apis(ledger: Ledger, api: str, moved_from: Iterable[str]) -> None:
    """Refuse a ledger whose entries were sent to another real API, unless the operator
    says that API is this one at another host (``--moved-from``): then its entries are
    moved, and count as sent here. The fake's entries are simply kept apart."""
    for old in moved_from:
        old_api = origin(old)
        if old_api != api:
            moved = ledger.move_api(old_api, api)
            log.warning("api_moved", old=old_api, new=api, requests=moved)
    known = ledger.apis()
    others = {a: n for a, n in known.items() if a not in (api, FAKE_API)}
    if others and api != FAKE_API:
        other, count = max(others.items(), key=lambda item: item[1])
        raise StateError(
            f"{ledger.path}: holds {count} requests sent to {other}, but this run targets {api}. If {api} is the "
            f"same provider at another host, add --moved-from {other} (those requests then count as sent, nothing "
            f"is resubmitted); if it is another account or environment, give this run its own --state")
    if FAKE_API in known and api != FAKE_API:
        log.info("fake_entries_ignored", count=known[FAKE_API], reason="the bundled fake's task ids never count here")


def dry_run_output(path: Target) -> Target:
    """Where a dry run writes: ``path``, unless that table holds task ids (then beside it)."""
    if not path.exists():
        return path
    try:
        table = read_results(path)
        holds_ids = "task_id" in table.columns and table["task_id"].drop_nulls().len() > 0
    except Exception:  # not a results table we can read: leave it alone too
        holds_ids = True
    if not holds_ids:
        return path
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    beside = path.sibling(f"{stem}.dry-run{path.suffix}")
    log.warning("dry_run_beside", results=str(path), written=str(beside),
                reason="the results table holds task ids; a dry run never overwrites it")
    return beside


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def consult_ledger(state: Path, api: str) -> Ledger | None:
    """The ledger, read-only and without the lock, for an estimate; ``None`` if there is
    none yet or it cannot be read (then everything counts as new, and a warning says so)."""
    try:
        return Ledger.open_readonly(state, api)
    except StateError as exc:
        log.warning("ledger_not_consulted", state=str(state), reason=str(exc),
                    consequence="the estimate counts every valid request as new")
        return None


def load_and_expand(opts: RunOptions, run_id: str) -> tuple[Expander, list[Unreadable]]:
    """file → rows → the expansion (requests are generated lazily from it)."""
    tables, unreadable = load_inputs(opts.inputs, opts.sheet)
    if any(opts.output.same_file(t.location) for t in tables):
        raise ConfigError(f"--output {opts.output} is also an input: it would overwrite tonight's prompts")
    for failed in unreadable:
        log.error("input_unreadable", source=failed.source, error=failed.error)
    expander = Expander(tables, opts.expand, Catalog(opts.models_dir))
    log.info("loaded", files=len(tables), rows=sum(t.df.height for t in tables), run_id=run_id,
             dry_run=opts.dry_run, columns=expander.mapping_lines())
    return expander, unreadable


def plan(opts: RunOptions, expander: Expander, output: Target | None,
         on_rows: Callable[[pl.DataFrame], None] | None = None) -> Tally:
    """What a run would do, sending nothing: every request validated, resolved against the
    ledger (read-only: already submitted, unknown, or would be sent), the estimate of what
    would be sent; the table written to ``output`` unless ``None``."""
    ledger = None if opts.state is None else consult_ledger(opts.state, opts.api)
    try:
        estimator = Estimator(expander.catalog, opts.pricing, ledger.labels if ledger is not None else None)
        schema = request_schema_of(expander)
        tally, _ = write_results(output, request_frames(expander, schema), schema,
                                 ledger.outcome_rows if ledger is not None else None,
                                 Resolution(None, dry_run=True, resend_unknown=opts.submit.resend_unknown),
                                 tally=Tally(estimator=estimator), on_rows=on_rows)
    finally:
        if ledger is not None:
            ledger.close()
    return tally


def spend_cap(opts: RunOptions, expander: Expander) -> SpendCap | None:
    """``--max-spend`` needs a price for every resolution of every model the run may send:
    a cap that cannot price a request would be a silent no-op."""
    if opts.max_spend is None:
        return None
    if not opts.pricing:
        raise ConfigError("--max-spend needs prices: give --prices FILE or [prices] in the job file")
    for slug in expander.models_in_use:
        missing = opts.pricing.missing(expander.catalog.get(slug))
        if missing:
            raise ConfigError(f"--max-spend: no price for {slug} at {', '.join(missing)} "
                              f"(add them to {opts.pricing.source or 'the prices'})")
    return SpendCap(opts.max_spend, opts.pricing, expander.catalog)


def run_submit(opts: RunOptions) -> Summary:
    """Load, expand, submit and write the results; raise BatchError before sending on bad input."""
    started = time.monotonic()
    run_id = new_run_id()
    check_output_path(opts.output)
    with interruptible():  # Ctrl-C while a large file loads: exit 4, not a traceback
        expander, unreadable = load_and_expand(opts, run_id)
        if opts.dry_run:
            output = dry_run_output(opts.output)
            tally = plan(opts, expander, output)
            summary = _summarize(run_id, tally, started, replace(opts, output=output), None, unreadable=unreadable)
            summary.extra["columns"] = expander.mapping_lines()
            return summary
        routes = {slug: expander.catalog.get(slug).route_path for slug in expander.models_in_use}
        opts = replace(opts, submit=replace(opts.submit, spend_cap=spend_cap(opts, expander), routes=routes))
        schema = request_schema_of(expander)
        estimate = planned_cost(opts, expander) if opts.preflight else None

    with locked_ledger(opts.state, opts.api) as ledger:  # local faults first, then the provider
        settle_apis(ledger, opts.api, opts.moved_from)
        if opts.preflight and not opts.fake_api:
            asyncio.run(preflight(opts, expander.models_in_use, estimate))
        try:
            ledger.start_run(run_id, opts.command)
        except sqlite3.Error as exc:
            raise StateError(f"{opts.state}: cannot write state ({exc}); nothing sent") from None
        spool = RequestSpool(opts.output.temp_dir(), schema)
        try:
            outcome = asyncio.run(_submit_all(opts, expander, spool.tee(expander), ledger, run_id))
            summary = _finish_submit(opts, expander, spool, ledger, run_id, outcome, started, unreadable)
        finally:
            spool.close()
        with contextlib.suppress(sqlite3.Error):  # a full disk: the summary already says so
            ledger.finish_run(run_id, summary.as_dict())
        return summary


@dataclass
class _Outcome:
    stats: RunStats
    interrupted: str | None
    aborted: bool
    collected: CollectStats | None = None
    rescue: Path | None = None
    unsaved: int = 0
    task_ids: int = 0


def _finish_submit(opts: RunOptions, expander: Expander, spool: RequestSpool, ledger: Ledger, run_id: str,
                   outcome: _Outcome, started: float, unreadable: list[Unreadable]) -> Summary:
    """Write the results table (unless a second signal aborted the run) and summarize."""
    stats = outcome.stats
    if outcome.aborted:
        # A second signal: leave now. The ledger is consistent; the table is not rewritten.
        return Summary(run_id, {}, [], time.monotonic() - started, stats.sent, stats.send_rate,
                       stats.stop_reason, outcome.interrupted, "", str(opts.state), unreadable=unreadable)
    # A run that stopped early has not read every request: expand the input again.
    frames = spool.frames() if spool.complete else request_frames(expander, spool.schema)

    def first_signal(signum: int) -> None:  # the table is the night's record: finish it, then exit 4
        outcome.interrupted = signal.Signals(signum).name
        log.warning("interrupted", signal=outcome.interrupted, detail="writing the results table first")

    with interruptible(None if outcome.interrupted else first_signal):
        tally, table_error = write_results(opts.output, frames, spool.schema, ledger.outcome_rows,
                                           Resolution(run_id, stop_reason=stats.stop_reason), tolerate_io=True)
    faults = []
    if stats.state_error:
        where = f"in {opts.output}" if not table_error else "in the summary below"
        kept = f" and {outcome.rescue}" if outcome.rescue else " (the rescue file could not be written either)"
        faults.append(f"{stats.state_error} after {stats.sent} requests were sent; their outcomes "
                      f"({outcome.unsaved} not in the ledger) are {where}{kept if outcome.unsaved else ''}; "
                      f"the next run replays the rescue file before sending")
    if table_error:
        faults.append(f"{table_error}; every outcome is in the ledger {opts.state}: rerun to write the table "
                      f"(nothing is sent twice)")
    return _summarize(run_id, tally, started, opts, outcome, "; ".join(faults) or None, unreadable)


def planned_cost(opts: RunOptions, expander: Expander) -> float | None:
    """The estimated cost of what the run would send, for the preflight's balance check
    (an extra pass over the input: only when prices are given)."""
    if not opts.pricing:
        return None
    estimate = plan(opts, expander, None).estimate()
    return estimate.get("cost_usd") if estimate else 0.0


@contextlib.asynccontextmanager
async def bundled_fake(config: ConfigT, wanted: bool) -> AsyncIterator[ConfigT]:
    """``config`` as given, or pointed at the bundled fake API started for this run and
    stopped after it (aiohttp.web, ~20 ms, is imported only then)."""
    if not wanted:
        yield config
        return
    from batch.fake_api import start_fake

    fake = await start_fake()
    try:
        yield replace(config, base_url=fake.url, api_key=Secret("fake-api-key"))
    finally:
        await fake.close()


@contextlib.contextmanager
def key_limiter(directory: Path | None, rate: Rate | None, key: Secret, margin: float = 0.02,
                shared: bool = True) -> Iterator[SmoothLimiter]:
    """The pacing of one API key, shared with the other processes using it through
    ``directory`` (never for the fake, whose key is no real one)."""
    budget = shared_budget(directory, key) if shared and rate else None
    try:
        yield SmoothLimiter(rate, margin, budget)
    finally:
        if budget is not None:
            budget.close()


async def preflight(opts: RunOptions, models: list[str], estimate: float | None,
                    config: SubmitConfig | None = None) -> list[Check]:
    """The checks of :mod:`batch.preflight`; a definite refusal stops here (exit 5)."""
    config = config or opts.submit
    with key_limiter(opts.budget_dir, config.rate, config.api_key, config.rate_margin,
                     shared=not opts.fake_api) as limiter:
        checks = await run_checks(config.base_url, config.api_key, models, estimate, limiter, config.transport)
    bad = fatal(checks)
    if bad:
        raise ProviderError("preflight: " + "; ".join(f"{c.name}: {c.detail}" for c in bad)
                            + "; nothing sent (--no-preflight skips the checks)")
    return checks


async def run_check(opts: RunOptions, models: list[str], estimate: float | None) -> list[Check]:
    """``seedance-batch check``: the preflight alone, against the fake too."""
    async with bundled_fake(opts.submit, opts.fake_api) as config:
        return await run_checks(config.base_url, config.api_key, models, estimate, transport=config.transport)


async def _submit_all(opts: RunOptions, expander: Expander, requests: Iterable[Request], ledger: Ledger,
                      run_id: str) -> _Outcome:
    async with bundled_fake(opts.submit, opts.fake_api) as config:
        if opts.fake_api:
            log.info("fake_api", url=config.base_url)
            if opts.preflight:
                await preflight(opts, expander.models_in_use, None, config)
        with key_limiter(opts.budget_dir, config.rate, config.api_key, config.rate_margin,
                         shared=not opts.fake_api) as limiter:
            return await _submit_paced(opts, expander, requests, ledger, run_id, config, limiter)


async def _submit_paced(opts: RunOptions, expander: Expander, requests: Iterable[Request], ledger: Ledger,
                        run_id: str, config: SubmitConfig, limiter: SmoothLimiter) -> _Outcome:
    loop = asyncio.get_running_loop()
    aledger = AsyncLedger(ledger, resend_unknown=config.resend_unknown)
    progress = Progress(lambda: (expander.rows_seen, expander.total_rows), opts.progress_tty, opts.progress_interval)
    progress_task = asyncio.create_task(progress.run())
    submitter = Submitter(config, aledger, run_id, progress, limiter)
    state: dict[str, Any] = {"interrupted": None, "aborted": False, "on_halt": None}

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if state["interrupted"] is None:
            state["interrupted"] = name
            submitter.halt(f"interrupted by {name}")
            if state.get("on_halt"):
                state["on_halt"](f"interrupted by {name}")
        else:
            state["aborted"] = True
            log.warning("abort", signal=name)
            submitter.abort()
            if state.get("on_halt"):
                state["on_halt"](f"aborted by a second {name}")

    deadline_handle = None
    if opts.deadline is not None:
        delay = max(0.0, opts.deadline - time.time())
        deadline_handle = loop.call_later(delay, submitter.halt, "deadline reached")
    collected: CollectStats | None = None
    with signals_to(on_signal):
        try:
            stats = await submitter.run(requests, grace=opts.grace)
            if opts.collect is not None and not submitter.stopping.is_set():
                progress_task.cancel()
                collector = Collector(replace(opts.collect, base_url=config.base_url, api_key=config.api_key),
                                      aledger, limiter)
                current = [t for t in await _follow(aledger, opts.collect, opts.api) if t.run_id == run_id]
                state["on_halt"] = collector.halt
                collected = await collector.run([Task.from_entry(e) for e in current])
        except asyncio.CancelledError:
            stats = submitter.stats
        finally:
            progress_task.cancel()
            await asyncio.gather(progress_task, return_exceptions=True)
            if deadline_handle is not None:
                deadline_handle.cancel()
            await aledger.close()
    if aledger.broken is not None and stats.state_error is None:
        stats.state_error = str(aledger.broken)
    return _Outcome(stats, state["interrupted"], bool(state["aborted"]), collected, aledger.rescue_path,
                    aledger.unsaved_count, aledger.committed_task_ids)


def shared_budget(directory: Path | None, key: Secret) -> SharedBudget | None:
    """The key's rate budget shared with other processes, or ``None`` (then the run paces alone)."""
    if directory is None:
        return None
    try:
        return SharedBudget(directory, key.reveal())
    except OSError as exc:
        log.warning("rate_budget_not_shared", directory=str(directory), error=exc.strerror or str(exc))
        return None


def _summarize(run_id: str, tally: Tally, started: float, opts: RunOptions, outcome: _Outcome | None,
               local_fault: str | None = None, unreadable: list[Unreadable] | None = None) -> Summary:
    stats = outcome.stats if outcome else None
    summary = Summary(
        run_id=run_id,
        counts=dict(sorted(tally.counts.items())),
        top_errors=tally.errors.most_common(5),
        elapsed_s=time.monotonic() - started,
        sent=stats.sent if stats else 0,
        send_rate_per_s=stats.send_rate if stats else 0.0,
        stop_reason=stats.stop_reason if stats else None,
        interrupted=outcome.interrupted if outcome else None,
        results=str(opts.output),
        state="" if opts.dry_run else str(opts.state),
        fatal=bool(stats and stats.fatal),
        local_fault=local_fault,
        unreadable=list(unreadable or []),
    )
    estimate = tally.estimate()
    if estimate:
        summary.extra["estimate"] = estimate
    if stats is not None and (window := stats.window_ms()):
        summary.extra["mark_to_wire_ms"] = window
    if stats is not None and opts.max_spend is not None:
        summary.extra["estimated_spend_usd"] = round(stats.spend_usd, 2)
    if outcome is not None and outcome.rescue is not None:
        summary.extra["rescue"] = str(outcome.rescue)
    if outcome is not None and outcome.collected is not None:
        summary.extra["collect"] = outcome.collected.as_dict()
    try:
        write_summary_file(opts.output, summary)
    except OSError as exc:
        log.error("summary_not_written", path=str(summary_path(opts.output)), error=exc.strerror or str(exc))
    return summary


def collect_ok(stats: dict[str, Any]) -> bool:
    """Every followed task succeeded, and no download failed."""
    return set(stats["task_status"]) <= {"success"} and not stats["download_failed"] and not stats["stop_reason"]


async def _follow(aledger: AsyncLedger, config: CollectConfig, api: str) -> list[Entry]:
    await aledger.flush()  # the outcomes just received must be readable
    return aledger.ledger.tasks_to_follow(include_success=config.download_dir is not None, apis=[api])


@dataclass(frozen=True)
class CollectOptions:
    state: Path
    config: CollectConfig
    results: Target | None = None
    fake_api: bool = False
    budget_dir: Path | None = None  # the per-key rate budget shared with submit runs

    @property
    def api(self) -> str:
        return api_identity(self.config.base_url, self.fake_api)


def run_collect(opts: CollectOptions) -> dict[str, Any]:
    """Poll (and download) the ledger's open tasks, each at the API that issued it (the
    bundled fake's only with ``--fake-api``); rebuild the results table if given."""
    started = time.monotonic()
    if opts.results is None and not opts.state.exists():
        raise StateError(f"{opts.state}: no state file (nothing submitted yet?)")
    table = _read_table(opts.results) if opts.results is not None and opts.results.exists() else None
    if opts.results is not None and table is None:
        raise InputError(f"{opts.results}: no such results table")
    with locked_ledger(opts.state, opts.api, "collect") as ledger:
        apis = [FAKE_API] if opts.fake_api else sorted(set(ledger.apis()) - {FAKE_API}) or [opts.api]
        only: set[str] | None = None
        if table is not None:
            only = _import_from_table(ledger, table, opts.api)
        entries = ledger.tasks_to_follow(include_success=opts.config.download_dir is not None, apis=apis)
        if only is not None:
            entries = [e for e in entries if e.request_id in only]
        stats = asyncio.run(_collect_all(opts, ledger, [Task.from_entry(e) for e in entries]))
        if opts.results is not None and table is not None:
            def first_signal(_signum: int) -> None:  # as for submit: finish the table, then exit 4
                stats.interrupted = True

            with interruptible(None if stats.interrupted else first_signal):
                update_table(opts.results, table, ledger, apis)
        summary = {"run_id": "collect", "followed": len(entries), **stats.as_dict(),
                   "elapsed_s": round(time.monotonic() - started, 3), "state": str(opts.state),
                   "results": str(opts.results or "")}
        summary["exit_code"] = EXIT_INTERRUPTED if stats.interrupted else (
            EXIT_PROVIDER if stats.fatal else (EXIT_OK if collect_ok(summary) else EXIT_INCOMPLETE))
        return summary


async def _collect_all(opts: CollectOptions, ledger: Ledger, tasks: list[Task]) -> CollectStats:
    # Any instance of the fake answers for its tasks.
    async with bundled_fake(opts.config, opts.fake_api) as config:
        with key_limiter(opts.budget_dir, config.rate, config.api_key, shared=not opts.fake_api) as limiter:
            aledger = AsyncLedger(ledger)
            collector = Collector(config, aledger, limiter)
            with signals_to(lambda signum: collector.interrupt(signal.Signals(signum).name)):
                try:
                    return await collector.run(tasks)
                finally:
                    await aledger.close()


def _read_table(path: Target) -> pl.DataFrame:
    try:
        table = read_results(path)
    except Exception as exc:  # polars raises many types for a bad file
        raise InputError(f"{path}: cannot read results table ({type(exc).__name__})") from None
    if not is_results_table(table):
        raise InputError(f"{path}: not a results table (no request_id and status columns)")
    return table


def _import_from_table(ledger: Ledger, table: pl.DataFrame, api: str) -> set[str]:
    """The table's request ids; tasks it names that the ledger lacks are adopted, under
    the API their endpoint names (else this run's)."""
    ids = table["request_id"].to_list()
    if "task_id" not in table.columns:
        return set(ids)
    rows = table.filter(pl.col("task_id").is_not_null() & pl.col("status").is_in(["submitted", "skipped"]))
    odd = [t for t in rows["task_id"].to_list() if check_task_id(t) is None]
    if odd:  # a table is input like any other: such an id would become a URL and a file name
        log.warning("task_ids_refused", count=len(odd), reason="not plain tokens; not followed")
        rows = rows.filter(~pl.col("task_id").is_in(odd))
    known = ledger.lookup(rows["request_id"].to_list(), sorted(set(ledger.apis()) | {api}))
    fields = [c for c in rows.columns if c in Catalog().known_fields()]
    for row in rows.iter_rows(named=True):
        if row["request_id"] in known:
            continue
        body = {k: row[k] for k in fields if row[k] is not None and row[k] != ""}
        endpoint = row.get("endpoint")
        submitted = row.get("submitted_at")
        ledger.import_task(origin(endpoint) if endpoint else api, row["request_id"], row["task_id"], row.get("model"),
                           endpoint, row.get("source"), row.get("row"), json.dumps(body, default=str),
                           str(submitted) if submitted else None)
    return {rid for rid in ids if rid is not None}


SUBMIT_COLUMNS = ("endpoint", "task_id", "error", "error_code", "http_status", "attempts", "submitted_at")
COLLECT_COLUMNS = ("task_status", "resource_urls", "failure_reason", "completed_at", "local_paths", "download_error")


def update_table(path: Target, table: pl.DataFrame, ledger: Ledger, apis: list[str]) -> None:
    """Rewrite the results table from the ledger, atomically: every submit and collect
    column of each row the ledger knows. A table that lost its task ids (a dry run of an
    older version wrote over it) gets them back."""
    csv = path.suffix == ".csv"
    ids = table["request_id"].to_list()
    entries = ledger.lookup([i for i in ids if i is not None], apis)
    statuses = table["status"].to_list()
    status = []
    for rid, old in zip(ids, statuses, strict=True):
        e = entries.get(rid)
        if e is not None and e.status == "submitted" and old not in ("submitted", "skipped"):
            status.append("submitted")
        elif e is not None and e.status in ("sending", "unknown") and old in (None, "dry_run", "pending"):
            status.append("unknown")
        else:
            status.append(old)
    columns = [pl.Series("status", status, dtype=pl.String())]
    for c in (*SUBMIT_COLUMNS, *COLLECT_COLUMNS):
        old_values = table[c].to_list() if c in table.columns else [None] * table.height
        values = [ledger_value(c, getattr(entries[rid], c)) if rid in entries else ledger_value(c, old)
                  for rid, old in zip(ids, old_values, strict=True)]
        dtype = RESULT_DTYPES[c]
        if csv:  # the table was read as text: write text back, as the writer spells it
            values = [csv_text(v) for v in values]
            dtype = pl.String()
        columns.append(pl.Series(c, values, dtype=dtype, strict=False))
    updated = table.with_columns(columns)
    writer = AtomicTableWriter(path)
    try:
        writer.write(updated)
        writer.commit(dict(updated.schema))
    except BaseException:
        writer.discard()
        raise


def summary_path(results: Target) -> Target:
    return results.sibling(results.name + ".summary.json")


def write_summary_file(results: Target, summary: Summary) -> None:
    data = {**summary.as_dict(), "finished_at": utcnow(), "finished_unix": round(time.time(), 3)}
    write_text_atomically(summary_path(results), json.dumps(data, indent=2, ensure_ascii=False) + "\n")


__all__ = ["BatchError", "RunOptions", "Summary", "run_submit"]
