"""The whole run, one function per arrow:
file → rows (:mod:`load`) → requests (:mod:`expand`) → outcomes (:mod:`submit`)
→ results table (:mod:`results`), with the ledger and the run lock around it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from batch.client import Secret
from batch.errors import BatchError
from batch.expand import Expander, ExpandSpec
from batch.fake_api import start_fake
from batch.ledger import AsyncLedger, Ledger, RunLock, utcnow
from batch.load import load_inputs
from batch.progress import Progress
from batch.results import OK_STATUSES, Resolution, Tally, check_output_path, write_results
from batch.submit import SubmitConfig, Submitter

log = structlog.get_logger("batch")

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_INTERRUPTED = 4


class Interrupted(BaseException):
    """SIGINT/SIGTERM outside the event loop (while reading input or writing results)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class RunOptions:
    """One ``submit`` run, as the CLI (or a job file) resolved it."""

    inputs: tuple[str, ...]
    output: Path
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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_OK if set(self.counts) <= OK_STATUSES else EXIT_INCOMPLETE

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "counts": self.counts, "total": sum(self.counts.values()),
            "top_errors": [{"error": e, "count": n} for e, n in self.top_errors],
            "elapsed_s": round(self.elapsed_s, 3), "sent": self.sent,
            "send_rate_per_s": round(self.send_rate_per_s, 3), "stop_reason": self.stop_reason,
            "interrupted": self.interrupted, "results": self.results, "state": self.state,
            "exit_code": self.exit_code, **self.extra,
        }


@contextmanager
def interruptible() -> Iterator[None]:
    """Outside the event loop, turn SIGINT/SIGTERM into :class:`Interrupted`."""
    def raise_it(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_it) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_submit(opts: RunOptions) -> Summary:
    """Load, expand, submit and write the results; raise BatchError before sending on bad input."""
    started = time.monotonic()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    check_output_path(opts.output)
    tables = load_inputs(opts.inputs, opts.sheet)
    expander = Expander(tables, opts.expand)
    log.info("loaded", files=len(tables), rows=sum(t.df.height for t in tables), run_id=run_id,
             dry_run=opts.dry_run)

    if opts.dry_run:
        tally = write_results(opts.output, expander, expander.extra_dtypes, lambda ids: {},
                              Resolution(None, dry_run=True))
        return _summarize(run_id, tally, started, opts, None)

    lock = RunLock(opts.state)
    lock.acquire()
    try:
        ledger = Ledger(opts.state)
        try:
            ledger.start_run(run_id, opts.command)
            outcome = asyncio.run(_submit_all(opts, expander, ledger, run_id))
            resolution = Resolution(run_id, stop_reason=outcome.stop_reason)
            if outcome.aborted:
                # A second signal: leave now. The ledger is consistent; the table is not rewritten.
                summary = Summary(run_id, {}, [], time.monotonic() - started, outcome.sent,
                                  outcome.rate, outcome.stop_reason, outcome.interrupted,
                                  "", str(opts.state))
                ledger.finish_run(run_id, summary.as_dict())
                return summary
            with interruptible():
                tally = write_results(opts.output, expander, expander.extra_dtypes, ledger.lookup, resolution)
            summary = _summarize(run_id, tally, started, opts, outcome)
            ledger.finish_run(run_id, summary.as_dict())
            return summary
        finally:
            ledger.close()
    finally:
        lock.release()


@dataclass
class _Outcome:
    sent: int
    rate: float
    stop_reason: str | None
    interrupted: str | None
    aborted: bool


async def _submit_all(opts: RunOptions, expander: Expander, ledger: Ledger, run_id: str) -> _Outcome:
    loop = asyncio.get_running_loop()
    fake = await start_fake() if opts.fake_api else None
    config = opts.submit
    if fake is not None:
        config = replace(config, base_url=fake.url, api_key=Secret("fake-api-key"))
        log.info("fake_api", url=fake.url)
    aledger = AsyncLedger(ledger)
    progress = Progress(lambda: (expander.rows_seen, expander.total_rows), opts.progress_tty, opts.progress_interval)
    progress_task = asyncio.create_task(progress.run())
    submitter = Submitter(config, aledger, run_id, progress)
    state = {"interrupted": None, "aborted": False}

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if state["interrupted"] is None:
            state["interrupted"] = name
            submitter.halt(f"interrupted by {name}")
        else:
            state["aborted"] = True
            log.warning("abort", signal=name)
            submitter.abort()

    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, on_signal, s)
    deadline_handle = None
    if opts.deadline is not None:
        delay = max(0.0, opts.deadline - time.time())
        deadline_handle = loop.call_later(delay, submitter.halt, "deadline reached")
    try:
        stats = await submitter.run(expander, grace=opts.grace)
    except asyncio.CancelledError:
        stats = submitter.stats
    finally:
        progress_task.cancel()
        await asyncio.gather(progress_task, return_exceptions=True)
        if deadline_handle is not None:
            deadline_handle.cancel()
        await aledger.close()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)
        if fake is not None:
            await fake.close()
    return _Outcome(stats.sent, stats.send_rate, stats.stop_reason, state["interrupted"], bool(state["aborted"]))


def _summarize(run_id: str, tally: Tally, started: float, opts: RunOptions, outcome: _Outcome | None) -> Summary:
    summary = Summary(
        run_id=run_id,
        counts=dict(sorted(tally.counts.items())),
        top_errors=tally.errors.most_common(5),
        elapsed_s=time.monotonic() - started,
        sent=outcome.sent if outcome else 0,
        send_rate_per_s=outcome.rate if outcome else 0.0,
        stop_reason=outcome.stop_reason if outcome else None,
        interrupted=outcome.interrupted if outcome else None,
        results=str(opts.output),
        state="" if opts.dry_run else str(opts.state),
    )
    estimate = tally.estimate()
    if estimate:
        summary.extra["estimate"] = estimate
    write_summary_file(opts.output, summary)
    return summary


def summary_path(results: Path) -> Path:
    return results.with_name(results.name + ".summary.json")


def write_summary_file(results: Path, summary: Summary) -> None:
    path = summary_path(results)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = {**summary.as_dict(), "finished_at": utcnow(), "finished_unix": round(time.time(), 3)}
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["BatchError", "RunOptions", "Summary", "run_submit"]
