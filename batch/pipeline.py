"""The whole run, one function per arrow:
file → rows (:mod:`load`) → requests (:mod:`expand`) → outcomes (:mod:`submit`)
→ results table (:mod:`results`), with the ledger and the run lock around it.

Guarantees kept here: a request counts as sent only for the API that took it (another
API's entries in the same ledger are refused, or moved on purpose with ``--moved-from``);
a dry run never overwrites a table that holds task ids; every place the run will write
(table, summary, metrics, downloads) is probed before the first request is sent (exit 2
otherwise); and once a request was sent, *whatever* fails (a full disk, a bug) costs no
accepted task id: the results table and summary are written, from the ledger alone if
need be, or exit 6 says where the task ids are (the ledger, a rescue file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import structlog

from batch import retry
from batch.api import FAKE_API, api_identity, check_task_id, origin
from batch.client import Secret
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
from batch.following import CollectConfig, Collector, CollectStats, Task
from batch.ledger import (
    AsyncLedger,
    Entry,
    LedgerStore,
    PgLocation,
    State,
    locked_ledger,
    night_of,
    open_readonly,
    utcnow,
)
from batch.ledger.base import one_line
from batch.load import ReadOptions, Skipped, Unreadable, header_name, load_inputs
from batch.models import Catalog
from batch.mutant import mutant
from batch.offline import RememberingLedger
from batch.preflight import Check, fatal, run_checks
from batch.prices import Pricing
from batch.progress import Progress
from batch.ratelimit import Rate, SharedBudget, SmoothLimiter
from batch.results import (
    OK_STATUSES,
    RESULT_DTYPES,
    RequestSpool,
    Resolution,
    Tally,
    check_output_path,
    csv_text,
    holds_task_ids,
    is_results_table,
    ledger_frame,
    ledger_value,
    read_results,
    request_schema_of,
    write_frame,
    write_results,
    write_text_atomically,
)
from batch.sending import RunStats, SpendCap, SubmitConfig, Submitter
from batch.storage import Target, probe
from batch.upload import Uploader

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
    state: State  # a SQLite file or a PostgreSQL ledger
    dry_run: bool = False
    fake_api: bool = False
    deadline: float | None = None  # epoch seconds
    grace: float = 30.0
    sheet: str | None = None
    header_row: int | None = None  # 1-based row of the header (default: the first holding a prompt column)
    encoding: str | None = None  # of CSV/TSV inputs that are neither UTF-8 nor UTF-16
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
    metrics_file: Path | None = None  # Prometheus textfile written after the run (by the CLI)
    results_from: tuple[Target, ...] = ()  # earlier results tables whose task ids the ledger must know
    retry_failed: bool = False  # resend requests whose task failed on the provider's side (batch.retry)
    retry_cap: int = retry.DEFAULT_CAP  # tasks per request in all, across nights
    frames: tuple[tuple[str, pl.DataFrame], ...] = ()  # DataFrames given to the Python API: (source, rows)

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
    skipped: list[Skipped] = field(default_factory=list)  # files (sheets) found but not inputs
    extra: dict[str, Any] = field(default_factory=dict)
    table_written: bool = False  # the results table holds this run's outcomes (not in as_dict)

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
            "unreadable": [{"source": u.source, "error": u.error} for u in self.unreadable],
            "skipped_files": [{"source": s.source, "reason": s.reason} for s in self.skipped], **self.extra,
        }


def _main_thread() -> bool:
    """Signals reach the main thread only, and only it may handle them: a run that the
    Python API starts in a worker thread (an orchestrator's, a notebook's executor) goes
    without, and its caller's own stop applies."""
    return threading.current_thread() is threading.main_thread()


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

    if not _main_thread():
        yield
        return
    previous = {s: signal.signal(s, raise_it) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def signals_to(callback: Callable[[int], None]) -> Iterator[None]:
    """Inside the event loop, hand SIGINT/SIGTERM to ``callback(signum)``."""
    if not _main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, callback, s)
    try:
        yield
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)


def settle_apis(ledger: LedgerStore, api: str, moved_from: Iterable[str]) -> None:
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
        holds_ids = holds_task_ids(path)
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


def consult_ledger(state: State, api: str) -> LedgerStore | None:
    """The ledger, read-only and without the lock, for an estimate; ``None`` if there is
    none yet or it cannot be read (then everything counts as new, and a warning says so)."""
    try:
        return open_readonly(state, api)
    except StateError as exc:
        log.warning("ledger_not_consulted", state=str(state), reason=str(exc),
                    consequence="the estimate counts every valid request as new")
        return None


def read_options(opts: RunOptions) -> ReadOptions:
    """How the loader reads the inputs; which headers name the prompt column (none is
    required when a template or ``--param prompt=`` makes the prompt)."""
    spec = opts.expand
    names: frozenset[str] = frozenset()
    if not spec.prompt_template and "prompt" not in spec.params:
        synonyms = {alias for alias, name in Catalog(opts.models_dir).aliases().items() if name == "prompt"}
        names = frozenset({"prompt"} | synonyms | {header_name(src) for src, dst in spec.columns.items()
                                                   if header_name(dst) == "prompt"})
    return ReadOptions(opts.sheet, opts.header_row, opts.encoding, names)


def load_and_expand(opts: RunOptions, run_id: str) -> tuple[Expander, list[Unreadable], list[Skipped]]:
    """file → rows → the expansion (requests are generated lazily from it)."""
    tables, unreadable, skipped = load_inputs(opts.inputs, options=read_options(opts), frames=opts.frames)
    if any(t.location and opts.output.same_file(t.location) for t in tables):
        raise ConfigError(f"--output {opts.output} is also an input: it would overwrite tonight's prompts")
    for failed in unreadable:
        log.error("input_unreadable", source=failed.source, error=failed.error)
    for passed in skipped:
        log.warning("input_skipped", source=passed.source, reason=passed.reason)
    expander = Expander(tables, opts.expand, Catalog(opts.models_dir))
    log.info("loaded", files=len(tables), rows=sum(t.df.height for t in tables), run_id=run_id,
             dry_run=opts.dry_run, columns=expander.mapping_lines())
    return expander, unreadable, skipped


def plan(opts: RunOptions, expander: Expander, output: Target | None,
         on_rows: Callable[[pl.DataFrame], None] | None = None) -> Tally:
    """What a run would do, sending nothing: every request validated, resolved against the
    ledger (read-only: already submitted, unknown, or would be sent), the estimate of what
    would be sent; the table written to ``output`` unless ``None``."""
    ledger = None if opts.state is None else consult_ledger(opts.state, opts.api)
    try:
        estimator = Estimator(expander.catalog, opts.pricing, ledger.labels if ledger is not None else None)
        schema = request_schema_of(expander)
        rows_of = ledger.outcome_rows if ledger is not None else None
        if ledger is not None and opts.retry_failed:
            rows_of = retried_as_pending(ledger, opts.retry_cap)
        tally, table_error = write_results(output, expander.frames(schema), schema, rows_of,
                                           Resolution(None, dry_run=True, resend_unknown=opts.submit.resend_unknown),
                                           tally=Tally(estimator=estimator), on_rows=on_rows, tolerate_io=True)
        if table_error:  # nothing was sent: an output that cannot take the table (an earlier one stays whole)
            raise ConfigError(f"{table_error}; nothing was sent")
        known = ledger.uploads() if ledger is not None else {}
        expander.images.planned = expander.images.totals(set(known))
    finally:
        if ledger is not None:
            ledger.close()
    return tally


def retried_as_pending(ledger: LedgerStore, cap: int) -> Callable[[list[str]], list[tuple[Any, ...]]]:
    """The ledger's rows as a ``--retry-failed`` run would find them: the failed tasks it
    would send again are ``pending``, so a dry run shows them as sent and its estimate (and
    the preflight's) counts what they would cost."""
    def rows_of(ids: list[str]) -> list[tuple[Any, ...]]:
        again = set(retry.plan(retry.failed_tasks(ledger, ids), cap).retried)
        return [(row[0], "pending", *row[2:]) if row[0] in again else row
                for row in ledger.outcome_rows(ids)]
    return rows_of


def spend_cap(opts: RunOptions, expander: Expander) -> SpendCap | None:
    """The night's spend meter: with prices, every request's cost is recorded in the
    ledger; ``--max-spend`` needs a price for every resolution of every model the run may
    send (a cap that cannot price a request would be a silent no-op)."""
    if opts.max_spend is None:
        return SpendCap(None, opts.pricing, expander.catalog) if opts.pricing else None
    if not opts.pricing:
        raise ConfigError("--max-spend needs prices: give --prices FILE or [prices] in the job file")
    for slug in expander.models_in_use:  # the models of rows that will be sent, the default only if used
        missing = opts.pricing.missing(expander.catalog.get(slug))
        if missing:
            raise ConfigError(f"--max-spend: no price for {slug} at {', '.join(missing)} "
                              f"(add them to {opts.pricing.source or 'the prices'})")
    return SpendCap(opts.max_spend, opts.pricing, expander.catalog)


def probe_outputs(opts: RunOptions, output: Target) -> None:
    """Every place the run writes takes a file, or the run stops here, sending nothing:
    the table (its summary, its temporary files and the request spool go beside it), the
    metrics file and the download directory or bucket."""
    probe(output.text, "--output")
    probe(summary_path(output).text, "--output's summary")  # a directory in its name: exit 6 after sending
    if opts.metrics_file is not None:
        probe(opts.metrics_file, "--metrics-file")
    if opts.collect is not None and opts.collect.download_dir is not None:
        probe(opts.collect.download_dir, "--download", directory=True)


def night_spend(ledger: LedgerStore, cap: SpendCap, night: str) -> float:
    """What the night's earlier runs through this ledger may have had accepted: each
    request's recorded cost, or for one sent without prices, its cost at today's prices
    (a request no price covers counts as nothing, and a warning says so)."""
    total, unpriced = 0.0, 0
    for model, body, cost in ledger.night_requests(night):
        if cost is None:
            try:
                cost = cap.pricing.cost(cap.catalog.get(model or ""), json.loads(body or "{}"))
            except (ValueError, BatchError):  # an unknown model or a damaged body
                cost = None
        if cost is None:
            unpriced += 1
        else:
            total += cost
    if unpriced:
        log.warning("night_spend_unpriced", night=night, requests=unpriced,
                    consequence="sent tonight without a price; not counted against --max-spend")
    return total


def run_submit(opts: RunOptions) -> Summary:
    """Load, expand, submit and write the results; raise BatchError before sending on bad input."""
    started = time.monotonic()
    run_id = new_run_id()
    check_output_path(opts.output)
    with interruptible():  # Ctrl-C while a large file loads: exit 4, not a traceback
        expander, unreadable, skipped = load_and_expand(opts, run_id)
        if opts.dry_run:
            output = dry_run_output(opts.output)
            probe_outputs(opts, output)
            tally = plan(opts, expander, output)
            summary = _summarize(run_id, tally, started, replace(opts, output=output), None, unreadable=unreadable,
                                 passthrough=expander.passthrough_columns(), skipped=skipped)
            summary.extra["columns"] = expander.mapping_lines()
            files, size = expander.images.planned
            summary.extra["uploads"] = {"files": files, "bytes": size, "planned": True}
            record_summary(output, summary, opts, sent=False)
            return summary
        probe_outputs(opts, opts.output)
        replaced = table_task_ids(opts.output)
        routes = {slug: expander.catalog.get(slug).route_path for slug in expander.models_named}  # a superset: harmless
        opts = replace(opts, submit=replace(opts.submit, spend_cap=spend_cap(opts, expander), routes=routes))
        schema = request_schema_of(expander)
        estimate = planned_cost(opts, expander) if opts.preflight else None
        earlier = tables_to_adopt(opts)

    # A signal while the ledger is opened and read, before the loop takes signals over (a
    # database that blocks a statement: a table locked by someone else): exit 4 at once,
    # nothing sent (psycopg's wait is interrupted and the query cancelled with the session).
    with interruptible(), locked_ledger(opts.state, opts.api) as ledger:  # local faults first, then the provider
        try:  # the ledger read before sending: a database that blocks or fails is one line, nothing sent
            conflicts = ledger.rescue_conflicts  # a replayed rescue file's outcomes kept aside
            settle_apis(ledger, opts.api, opts.moved_from)
            for target, frame in earlier:
                adopted = _import_from_table(ledger, frame, opts.api)
                if adopted.imported:
                    log.warning("task_ids_adopted", results=str(target), imported=adopted.imported,
                                unknown=adopted.unknown, state=str(opts.state),
                                reason="the table holds task ids this ledger did not know; they are not sent again")
            night = night_of()
            cap = opts.submit.spend_cap
            if cap is not None:  # under the lock: no other submit run spends meanwhile
                cap = replace(cap, night=night, earlier=0.0 if mutant("spend_cap_per_run") else night_spend(ledger, cap, night))
                opts = replace(opts, submit=replace(opts.submit, spend_cap=cap))
            if opts.submit.max_requests is not None:  # the night's, as the spend cap
                opts = replace(opts, submit=replace(opts.submit, night=night,
                                                    night_requests=len(ledger.night_requests(night))))
        except ledger.write_errors as exc:
            why = one_line(exc)
            raise StateError(f"{opts.state}: cannot read the ledger "
                             f"({opts.state.scrub(why) if isinstance(opts.state, PgLocation) else why}); "
                             "nothing sent") from None
        if opts.preflight and not opts.fake_api:
            asyncio.run(preflight(opts, expander.models_in_use, estimate))
        try:
            ledger.start_run(run_id, opts.command, output_record(opts.output), night)
            retried = retry_failed(opts, expander, ledger, run_id) if opts.retry_failed else None
            opts = replace(opts, submit=replace(opts.submit, task_attempts=ledger.next_attempts()))
        except ledger.write_errors as exc:
            raise StateError(f"{opts.state}: cannot write state ({exc}); nothing sent") from None
        spool = RequestSpool(opts.output.temp_dir(), schema)
        outcome: _Outcome | None = None
        # A database can go away mid-run: remember what the run read and committed, so that
        # its table can be written without it (batch.offline). SQLite reads on after a failed
        # write (a full disk), and its path stays as fast as it was.
        memo = RememberingLedger(ledger, run_id) if isinstance(opts.state, PgLocation) else None
        try:
            try:
                outcome = asyncio.run(_submit_all(opts, expander, spool.tee(expander), memo or ledger, run_id))
            except Exception as exc:
                if memo is not None and memo.unreachable:
                    ledger = memo  # type: ignore[assignment]  # no more reads of a database gone away
                claimed = _claimed(ledger, run_id)
                if claimed == 0:
                    raise  # nothing was sent: the error as it is (a usage error, a refusal...)
                log.error("run_failed_after_sending", error=_describe(exc))
                rescue = ledger.rescue_file()  # written by the ledger if it broke meanwhile
                outcome = _Outcome(RunStats(sent=claimed, stop_reason="internal error"), None, False,
                                   crash=_describe(exc), rescue=rescue if rescue.exists() else None)
            if memo is not None and memo.unreachable:
                ledger = memo  # type: ignore[assignment]  # no more reads of a database gone away
            if outcome.stats.state_error and outcome.stats.sent == 0 and _claimed(ledger, run_id) == 0:
                # It broke before the first request was claimed: there are no task ids to
                # point at, and exit 6 ("after sending") would send the operator looking for them.
                raise StateError(f"{outcome.stats.state_error}; nothing was sent")
            summary = _finish_submit(opts, expander, spool, ledger, run_id, outcome, started, unreadable,
                                     skipped)
            if retried is not None:
                summary.extra["retry_failed"] = {**retried.as_dict(),
                                                 "sent": ledger.retries_sent(run_id)}
        except Exception as exc:
            if _claimed(ledger, run_id) == 0:
                raise
            log.error("results_failed_after_sending", error=_describe(exc))
            summary = _rescue(opts, ledger, run_id, outcome, started, unreadable, exc, skipped)
        except Interrupted:  # a signal while the table is written: exit 4, saying where the ids are
            log.error("interrupted_after_sending", results=str(opts.output),
                      where=where_ids(opts, False, outcome.rescue if outcome else None))
            raise
        finally:
            spool.close()
        if memo is not None and memo.unreachable:
            note_unreachable(summary, opts, memo.unreachable, outcome)
        else:
            try:
                ledger.finish_run(run_id, summary.as_dict())
            except Exception as exc:  # the outcomes are committed already; the table says what happened
                add_fault(summary, f"cannot record the end of run {run_id} in the ledger ({_describe(exc)}); "
                                   f"{where_ids(opts, summary.table_written)}")
        if summary.table_written and replaced:
            dropped = len(replaced - table_task_ids(opts.output))
            if dropped:
                log.warning("table_replaced", results=str(opts.output), task_ids_dropped=dropped,
                            note=f"the table held {dropped} task ids of requests not in tonight's input; they "
                                 f"remain in the ledger {opts.state}: collect follows them; give each night its "
                                 f"own table (-o 'results/{{date}}.parquet') to keep them in a table")
                summary.extra["table_replaced"] = {"task_ids_dropped": dropped}
        if conflicts is not None:
            summary.extra["rescue_conflicts"] = str(conflicts)
        if not (outcome is not None and outcome.aborted):  # a second signal: leave at once, as before
            record_summary(opts.output, summary, opts, sent=summary.sent > 0)
        return summary


def ledger_failure(state: State, why: str) -> str:
    """The first line of a database's error, scrubbed of the password, without the ledger's
    own "state write failed (...)" wrapping (the driver's message is several lines)."""
    why = state.scrub(why) if isinstance(state, PgLocation) else why
    first = why.strip().splitlines()[0] if why.strip() else ""
    return first.removeprefix("state write failed (").rstrip(")")[:200] or "connection lost"


def note_unreachable(summary: Summary, opts: RunOptions, why: str, outcome: _Outcome | None) -> None:
    """Say in the summary (and so in the exit-6 message) that the table was written without
    the ledger, from what the run itself saw, and where the answers the ledger lacks are."""
    why = ledger_failure(opts.state, why)
    rescue = outcome.rescue if outcome is not None else None
    unsaved = outcome.unsaved if outcome is not None else 0
    if not unsaved:
        kept = ""
    elif rescue is not None:
        kept = (f"; {unsaved} task ids the ledger could not take are kept in the rescue file {rescue}, which the "
                f"next run replays into the ledger before it sends")
    else:
        kept = f"; {unsaved} task ids the ledger could not take are only in the table (the rescue file failed too)"
    table = (f"the results table {opts.output} was written without it, from what this run read before and the "
             f"answers it holds: every task id the provider gave this run is in it, and rows whose state could "
             f"not be confirmed are 'unknown' and say so" if summary.table_written else "the results table is not written")
    sent = outcome.stats.sent if outcome is not None else 0
    add_fault(summary, f"the ledger {opts.state} became unreachable mid-run ({why}) after {sent} requests were "
                       f"sent; sending stopped; {table}{kept}; a rerun with the ledger back rewrites the table "
                       f"(nothing is sent twice)")
    summary.extra["ledger_unreachable"] = why


def table_task_ids(output: Target) -> set[str]:
    """The task ids a results table at ``output`` holds (none when there is no table or it
    cannot be read): what rewriting it would drop is said, not lost silently."""
    try:
        if not output.exists():
            return set()
        table = read_results(output)
    except Exception:  # not a table this tool can read: nothing to compare
        return set()
    if "task_id" not in table.columns:
        return set()
    return {t for t in table["task_id"].cast(pl.String).to_list() if t}


def output_record(output: Target) -> str:
    """The results table as the ledger records it: a URL as given, a path made absolute
    (a collect from cron's working directory still finds it)."""
    return output.text if output.remote else os.path.abspath(output.text)


def _describe(exc: BaseException) -> str:
    text = (getattr(exc, "strerror", None) if isinstance(exc, OSError) else None) or str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _claimed(ledger: LedgerStore, run_id: str) -> int:
    """How many requests this run marked ``sending`` (so may have paid for); a ledger that
    cannot say counts as "some"."""
    try:
        return len(ledger.run_places(run_id)) + len(ledger.unsaved)
    except Exception:
        return 1


def where_ids(opts: RunOptions, table: bool, rescue: Path | None = None) -> str:
    """Where the task ids of a run that met a local fault are: the same words for every fault."""
    places = ([f"the results table {opts.output}"] if table else []) + [f"the ledger {opts.state}"]
    if rescue is not None:
        places.append(f"the rescue file {rescue}")
    return "the task ids are in " + " and ".join(places)


def add_fault(summary: Summary, fault: str) -> None:
    summary.local_fault = f"{summary.local_fault}; {fault}" if summary.local_fault else fault


def record_summary(output: Target, summary: Summary, opts: RunOptions, sent: bool = True) -> None:
    """``<results>.summary.json``; after sending, a failure is a local fault (exit 6) that
    says where the task ids are, never a traceback."""
    try:
        write_summary_file(output, summary)
    except Exception as exc:
        log.error("summary_not_written", path=str(summary_path(output)), error=_describe(exc))
        if sent:
            add_fault(summary, f"cannot write summary {summary_path(output)} ({_describe(exc)}; the summary is on "
                               f"stdout and in the log); {where_ids(opts, summary.table_written)}")


def retry_failed(opts: RunOptions, expander: Expander, ledger: LedgerStore, run_id: str) -> retry.RetryPlan:
    """Before sending: tonight's requests whose task failed on the provider's side become
    ``pending`` again (their task kept in the lineage); they then go out like any request."""
    ids = [r.request_id for r in expander if r.error is None]
    plan = retry.prepare(ledger, ids, opts.retry_cap, run_id)
    log.info("retry_failed", **plan.as_dict(), cap=opts.retry_cap)
    if plan.never or plan.unclassified:
        log.warning("not_retried", content_policy=plan.never[:20], unclassified=plan.unclassified[:20],
                    why="a content-policy, invalid-input or unclassified failure would fail again, paid")
    return plan


@dataclass
class _Outcome:
    stats: RunStats
    interrupted: str | None
    aborted: bool
    collected: CollectStats | None = None
    rescue: Path | None = None
    unsaved: int = 0
    task_ids: int = 0
    crash: str | None = None  # an unexpected failure after sending: the run stopped there
    uploads: tuple[int, int] = (0, 0)  # images uploaded by this run: files, bytes


def _finish_submit(opts: RunOptions, expander: Expander, spool: RequestSpool, ledger: LedgerStore, run_id: str,
                   outcome: _Outcome, started: float, unreadable: list[Unreadable],
                   skipped: list[Skipped] | None = None) -> Summary:
    """Write the results table (unless a second signal aborted the run) and summarize."""
    stats = outcome.stats
    if outcome.aborted:
        # A second signal: leave now. The ledger is consistent; the table is not rewritten,
        # but the summary still says what this run did, as the ledger records it.
        summary = Summary(run_id, _run_counts(ledger, run_id), [], time.monotonic() - started, stats.sent,
                          stats.send_rate, stats.stop_reason, outcome.interrupted, "", str(opts.state),
                          unreadable=unreadable, skipped=list(skipped or []))
        summary.extra["aborted"] = True
        summary.extra["note"] = ("results table not written (a second signal); rerun to write it: "
                                 "nothing submitted is sent again")
        try:
            write_summary_file(opts.output, summary)
        except OSError as exc:
            log.error("summary_not_written", path=str(summary_path(opts.output)), error=exc.strerror or str(exc))
        return summary
    # A run that stopped early has not read every request: expand the input again.
    frames = spool.frames() if spool.finish() else expander.frames(spool.schema)

    def first_signal(signum: int) -> None:  # the table is the night's record: finish it, then exit 4
        outcome.interrupted = signal.Signals(signum).name
        log.warning("interrupted", signal=outcome.interrupted, detail="writing the results table first")

    with interruptible(None if outcome.interrupted else first_signal):
        tally, table_error = write_results(opts.output, frames, spool.schema, ledger.outcome_rows,
                                           Resolution(run_id, stop_reason=stats.stop_reason,
                                                      resend_unknown=opts.submit.resend_unknown), tolerate_io=True,
                                           tally=Tally(labels=lambda labels: ledger.labels(labels, run_id),
                                                       sent=Estimator(expander.catalog)))
    faults = []
    if outcome.crash:
        faults.append(f"the run stopped after {stats.sent} requests were sent ({outcome.crash}); "
                      f"{where_ids(opts, not table_error, outcome.rescue)}; nothing is sent twice on a rerun")
    if stats.state_error and not (isinstance(ledger, RememberingLedger) and ledger.unreachable):  # noted apart
        where = f"in {opts.output}" if not table_error else "in the summary below"
        if outcome.rescue:
            kept = f" and {outcome.rescue}; the next run replays the rescue file before sending"
        elif not table_error:
            kept = (" (the rescue file could not be written either); the next run adopts them from "
                    f"{opts.output} before sending: keep that table")
        else:
            kept = " (neither the rescue file nor the table could be written): keep them"
        faults.append(f"{stats.state_error} after {stats.sent} requests were sent; their task ids "
                      f"({outcome.unsaved} not in the ledger) are {where}{kept if outcome.unsaved else ''}")
    if table_error:
        faults.append(f"{table_error}; {where_ids(opts, False, outcome.rescue)}: rerun to write the table "
                      f"(nothing is sent twice)")
    summary = _summarize(run_id, tally, started, opts, outcome, "; ".join(faults) or None, unreadable,
                         expander.passthrough_columns(), skipped)
    summary.table_written = not table_error
    if table_error:  # stdout's "results:" line must not point at a table that is not there
        summary.results = f"not written ({where_ids(opts, False, outcome.rescue)})"
    return summary


def _rescue(opts: RunOptions, ledger: LedgerStore, run_id: str, outcome: _Outcome | None, started: float,
            unreadable: list[Unreadable], exc: BaseException, skipped: list[Skipped] | None = None) -> Summary:
    """The results table could not be built the usual way after requests were sent: write
    one from the ledger alone (this run's requests, each with its task id), and a summary
    that says so; exit 6 either way."""
    rescue = outcome.rescue if outcome is not None else None
    counts: dict[str, int] = {}
    table = False
    try:
        places = ledger.run_places(run_id)
        ids = [p[0] for p in places]
        frame = ledger_frame(places, ledger.outcome_rows(ids) if ids else [])
        counts = dict(sorted(frame["status"].value_counts().iter_rows()))
        write_frame(opts.output, frame)
        table = True
    except Exception as again:  # the ledger or the disk fails too: the message says where the ids are
        log.error("rescue_table_not_written", results=str(opts.output), error=_describe(again))
    what = "written from the ledger: this run's requests only" if table else "not written"
    stats = outcome.stats if outcome is not None else RunStats()
    fault = (f"the results could not be completed after requests were sent ({_describe(exc)}); the table is "
             f"{what}; {where_ids(opts, table, rescue)}; a rerun writes the whole table (nothing is sent twice)")
    summary = Summary(run_id, counts, [], time.monotonic() - started, stats.sent, stats.send_rate,
                      stats.stop_reason, outcome.interrupted if outcome else None,
                      str(opts.output) if table else f"not written ({where_ids(opts, False, rescue)})",
                      str(opts.state), local_fault=fault, unreadable=unreadable,
                      skipped=list(skipped or []))
    summary.table_written = table
    if rescue is not None:
        summary.extra["rescue"] = str(rescue)
    return summary


def _run_counts(ledger: LedgerStore, run_id: str) -> dict[str, int]:
    """This run's requests by status, read back from the ledger (one scan, once, on abort).
    A mark still ``sending`` is a request whose outcome is unknown, and is counted so."""
    counts: dict[str, int] = {}
    try:
        rows = ledger.run_counts(run_id)
    except ledger.write_errors as exc:
        log.error("summary_counts_unread", state=str(ledger.path), error=str(exc))
        return counts
    for status, n in rows:
        status = "unknown" if status == "sending" else status
        counts[status] = counts.get(status, 0) + n
    return dict(sorted(counts.items()))


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
                shared: bool = True, state: State | None = None) -> Iterator[SmoothLimiter]:
    """The pacing of one API key, shared with the other processes using it through
    ``directory``, or, when the ledger is in PostgreSQL, through that database (every
    host's runs and collects with that key); never for the fake, whose key is no real one."""
    budget: Any = None
    if shared and rate and isinstance(state, PgLocation):
        budget = database_budget(state, key, rate)
        if budget is not None:
            # Starts from several hosts reach the provider along different paths, and each
            # admission is a round trip to the database: a wider margin (the hard window
            # becomes 1.03 periods) keeps the provider's window under the rate.
            margin = max(margin, 0.06)
    if budget is None:
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
                     shared=not opts.fake_api, state=opts.state) as limiter:
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


async def _submit_all(opts: RunOptions, expander: Expander, requests: Iterable[Request], ledger: LedgerStore,
                      run_id: str) -> _Outcome:
    async with bundled_fake(opts.submit, opts.fake_api) as config:
        if opts.fake_api:
            log.info("fake_api", url=config.base_url)
            if opts.preflight:
                await preflight(opts, expander.models_in_use, None, config)
        with key_limiter(opts.budget_dir, config.rate, config.api_key, config.rate_margin,
                         shared=not opts.fake_api, state=opts.state) as limiter:
            return await _submit_paced(opts, expander, requests, ledger, run_id, config, limiter)


async def _submit_paced(opts: RunOptions, expander: Expander, requests: Iterable[Request], ledger: LedgerStore,
                        run_id: str, config: SubmitConfig, limiter: SmoothLimiter) -> _Outcome:
    loop = asyncio.get_running_loop()
    # Commits on the loop's thread: the writer thread (writer_thread=True) measured no better in
    # three runs of benchmarks/bench.py --submit-only, and off it one run gave 366 vs 605 us per
    # request (README "The submit hot path"): to be settled on a quieter machine.
    aledger = AsyncLedger(ledger, resend_unknown=config.resend_unknown)
    progress = Progress(lambda: (expander.rows_seen, expander.total_rows), opts.progress_tty, opts.progress_interval)
    progress_task = asyncio.create_task(progress.run())
    submitter = Submitter(config, aledger, run_id, progress, limiter)
    uploader = submitter.uploader = Uploader(
        expander.images, config.base_url, config.api_key, ledger.api, ledger.uploads(),
        aledger.record_upload, config.max_attempts, config.transport)
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
                    aledger.unsaved_count, aledger.committed_task_ids, uploads=(uploader.uploads, uploader.bytes))


def database_budget(state: PgLocation, key: Secret, rate: Rate) -> Any:
    """The key's rate budget in the ledger's database, or ``None`` (then the local file's)."""
    from batch.ledger.postgres import PgBudget

    try:
        return PgBudget(state, key.reveal(), min(1 << 16, max(1, math.floor(rate.count))))
    except Exception as exc:  # the ledger itself says whether the database is usable
        log.warning("rate_budget_not_in_database", state=str(state), error=state.scrub(one_line(exc, 200)))
        return None


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
               local_fault: str | None = None, unreadable: list[Unreadable] | None = None,
               passthrough: dict[str, list[str]] | None = None, skipped: list[Skipped] | None = None) -> Summary:
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
        skipped=list(skipped or []),
    )
    estimate = tally.estimate()
    if estimate:
        summary.extra["estimate"] = estimate
    if not opts.dry_run:  # like the dry run's estimate: each one a new paid video
        summary.extra["edited"] = tally.edited
    summary.extra["passthrough_columns"] = passthrough or {}
    if tally.sent is not None:  # what the night will show, priced or not
        summary.extra["video_seconds"] = round(sum(tally.sent.seconds_by_resolution.values()), 1)
    if stats is not None and (window := stats.window_ms()):
        summary.extra["mark_to_wire_ms"] = window
    cap = opts.submit.spend_cap
    if stats is not None and cap is not None and cap.night:
        tonight = cap.earlier + stats.spend_usd
        summary.extra["spend"] = {
            "night": cap.night, "max_usd": cap.limit, "earlier_runs_usd": round(cap.earlier, 2),
            "this_run_usd": round(stats.spend_usd, 2), "tonight_usd": round(tonight, 2),
            "left_usd": None if cap.limit is None else round(max(0.0, cap.limit - tonight), 2)}
    if outcome is not None and outcome.rescue is not None:
        summary.extra["rescue"] = str(outcome.rescue)
    if outcome is not None and outcome.collected is not None:
        summary.extra["collect"] = outcome.collected.as_dict()
    if outcome is not None:
        summary.extra["uploads"] = {"files": outcome.uploads[0], "bytes": outcome.uploads[1], "planned": False}
    return summary


def collect_ok(stats: dict[str, Any]) -> bool:
    """Every followed task succeeded, no download failed, and every task of the results
    tables succeeded (and, with a download, has its files): terminal tasks are not
    followed again, so a second collect must still count last pass's failures."""
    return (set(stats["task_status"]) <= {"success"} and not stats["download_failed"] and not stats["stop_reason"]
            and set(stats.get("table_tasks") or {}) <= {"success"} and not stats.get("not_downloaded"))


def collect_outcome(ledger: LedgerStore, apis: list[str], table_ids: Iterable[str] | None, followed: Iterable[str],
                    download: bool) -> dict[str, Any]:
    """What the results tables' tasks (``table_ids``; None: no table) are now, from the
    ledger: their states, how many successful ones lack their files (with a download), and
    the top failure reasons and download errors of those and of the tasks followed."""
    tables = set(table_ids) if table_ids is not None else None
    entries = ledger.lookup(sorted((tables or set()) | set(followed)), apis)
    states: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    missing = 0
    for rid, e in entries.items():
        if e.status != "submitted" or not e.task_id:
            continue  # invalid, failed at submit, never sent: not a task (submit reports those)
        state = e.task_status or "pending"
        files = ledger_value("local_paths", e.local_paths)
        absent = download and state == "success" and not files
        if tables is not None and rid in tables:
            states[state] += 1
            missing += absent
        if state != "success" and e.failure_reason:
            errors[f"failed: {e.failure_reason}"] += 1
        if (absent or state != "success") and e.download_error:
            errors[f"download: {e.download_error}"] += 1
    outcome: dict[str, Any] = {"top_errors": [{"error": k, "count": n} for k, n in errors.most_common(5)]}
    if tables is not None:
        outcome["table_tasks"] = dict(sorted(states.items()))
        if download:
            outcome["not_downloaded"] = missing
    return outcome


async def _follow(aledger: AsyncLedger, config: CollectConfig, api: str) -> list[Entry]:
    await aledger.flush()  # the outcomes just received must be readable
    with aledger.reading() as ledger:
        return ledger.tasks_to_follow(include_success=config.download_dir is not None, apis=[api])


@dataclass(frozen=True)
class CollectOptions:
    state: State  # a SQLite file or a PostgreSQL ledger
    config: CollectConfig
    results: Target | None = None
    fake_api: bool = False
    budget_dir: Path | None = None  # the per-key rate budget shared with submit runs
    # A job's output before {date} was filled in: the tables of the runs whose tasks are
    # followed that match it are found through the ledger (last night's, after midnight).
    run_tables: str | None = None
    pricing: Pricing = field(default_factory=Pricing)  # the page's and the notification's spend (--prices)

    @property
    def api(self) -> str:
        return api_identity(self.config.base_url, self.fake_api)


def template_pattern(template: str) -> re.Pattern[str]:
    """The names a job's ``output`` template gives: ``{date}`` and ``{datetime}`` as the
    job file fills them in (:mod:`batch.jobfile`), everything else literally."""
    fills = {"{date}": r"\d{4}-\d{2}-\d{2}", "{datetime}": r"\d{4}-\d{2}-\d{2}T\d{6}"}
    parts = re.split(r"(\{date\}|\{datetime\})", template)
    return re.compile("".join(fills.get(p, re.escape(p)) for p in parts))


def _run_tables(opts: CollectOptions, ledger: LedgerStore, apis: list[str], given: Target | None) -> list[Target]:
    """The results tables the runs of the followed tasks recorded, that the job's output
    template names and that still exist (the given table aside)."""
    if not opts.run_tables:
        return []
    pattern = template_pattern(opts.run_tables)
    open_tasks = ledger.tasks_to_follow(include_success=opts.config.download_dir is not None, apis=apis)
    found: list[Target] = []
    for output in sorted(set(ledger.run_outputs({e.run_id for e in open_tasks}).values())):
        target = Target(output)
        if not pattern.fullmatch(output) or (given is not None and given.same_file(output)):
            continue
        try:
            if target.exists():
                found.append(target)
        except BatchError as exc:  # a bucket that no longer answers: the others still count
            log.warning("run_table_unreadable", results=output, error=str(exc))
    return found


def _known_tables(opts: CollectOptions) -> str:
    """A hint for a results table that is not there: the tables the ledger's runs with
    tasks still open recorded (a cron line's date may have moved on since)."""
    try:
        ledger = open_readonly(opts.state, opts.api)
    except BatchError:
        return ""
    if ledger is None:
        return ""
    try:
        apis = sorted(set(ledger.apis()) - {FAKE_API}) or [opts.api]
        open_tasks = ledger.tasks_to_follow(include_success=opts.config.download_dir is not None, apis=apis)
        outputs = sorted(set(ledger.run_outputs({e.run_id for e in open_tasks}).values()))
    except Exception:  # a ledger from before runs.output, or a server gone: only a hint is lost
        return ""
    finally:
        ledger.close()
    return f" (the runs whose tasks are open wrote: {', '.join(outputs[:5])})" if outputs else ""


def run_collect(opts: CollectOptions) -> dict[str, Any]:
    """Poll (and download) the ledger's open tasks, each at the API that issued it (the
    bundled fake's only with ``--fake-api``); rebuild the results table if given, and the
    tables of the runs followed that the job's output names (``run_tables``)."""
    started = time.monotonic()
    if opts.results is None and not opts.state.exists():
        raise StateError(f"{opts.state}: no state file (nothing submitted yet?)")
    table = _read_table(opts.results) if opts.results is not None and opts.results.exists() else None
    if opts.results is not None and table is None and not (opts.run_tables and opts.state.exists()):
        raise InputError(f"{opts.results}: no such results table{_known_tables(opts)}")
    if opts.config.download_dir is not None:
        probe(opts.config.download_dir, "--download", directory=True)
    with interruptible(), locked_ledger(opts.state, opts.api, "collect") as ledger:  # as submit's
        apis = [FAKE_API] if opts.fake_api else sorted(set(ledger.apis()) - {FAKE_API}) or [opts.api]
        tables = [(opts.results, table)] if opts.results is not None and table is not None else []
        for found in _run_tables(opts, ledger, apis, opts.results if table is not None else None):
            try:
                tables.append((found, _read_table(found)))
            except InputError as exc:
                log.warning("run_table_unreadable", results=str(found), error=str(exc))
        if opts.results is not None and not tables:
            raise InputError(f"{opts.results}: no such results table, and no run this ledger follows recorded a "
                             f"table named like {opts.run_tables}")
        for found, _ in tables[1 if table is not None else 0:]:
            log.info("run_table_found", results=str(found), reason="a run followed here wrote it")
        only: set[str] | None = None
        for _, frame in tables:
            only = (only or set()) | _import_from_table(ledger, frame, opts.api)
        entries = ledger.tasks_to_follow(include_success=opts.config.download_dir is not None, apis=apis)
        if only is not None:
            entries = [e for e in entries if e.request_id in only]
        stats, broken = asyncio.run(_collect_all(opts, ledger, [Task.from_entry(e) for e in entries]))
        faults = []
        if broken is not None and not isinstance(opts.state, PgLocation):
            broken = None  # SQLite (a full disk) is still read: the tables are rewritten from it as before
        if broken is not None:
            # The ledger went away mid-collect (a database gone): what this pass learnt is
            # not recorded, so the tables are left as they are (each keeps every task id it
            # held) and nothing more is read from it. Polls and downloads cost nothing: the
            # next collect polls again; the files written stay where they are.
            faults.append(unreachable_in_collect(opts, broken, tables, stats))
            tables = []

        def first_signal(_signum: int) -> None:  # as for submit: finish the tables, then exit 4
            stats.interrupted = True

        with interruptible(None if stats.interrupted else first_signal):
            for target, frame in tables:
                try:
                    update_table(target, frame, ledger, apis)
                except Exception as exc:  # a full results disk: the ledger holds every state
                    faults.append(f"cannot rewrite results table {target} ({_describe(exc)}); every task's state "
                                  f"and file are in the ledger {opts.state}: rerun collect to write the table")
        summary = {"run_id": "collect", "followed": len(entries), **stats.as_dict(),
                   "elapsed_s": round(time.monotonic() - started, 3), "state": str(opts.state),
                   "results": ", ".join(str(t) for t, _ in tables) or str(opts.results or ""),
                   "tables": [str(t) for t, _ in tables],
                   "local_fault": "; ".join(faults) or None}
        table_ids = {rid for _, frame in tables for rid in frame["request_id"].to_list() if rid is not None}
        if broken is None:
            summary.update(collect_outcome(ledger, apis, table_ids if tables else None,
                                           (e.request_id for e in entries), opts.config.download_dir is not None))
        else:
            summary["ledger_unreachable"] = ledger_failure(opts.state, broken)
        summary["exit_code"] = EXIT_LOCAL_FAULT if faults else EXIT_INTERRUPTED if stats.interrupted else (
            EXIT_PROVIDER if stats.fatal else (EXIT_OK if collect_ok(summary) else EXIT_INCOMPLETE))
        return summary


async def _collect_all(opts: CollectOptions, ledger: LedgerStore, tasks: list[Task]) -> tuple[CollectStats, str | None]:
    """The collect pass, and why the ledger failed during it (``None``: it did not)."""
    # Any instance of the fake answers for its tasks.
    async with bundled_fake(opts.config, opts.fake_api) as config:
        with key_limiter(opts.budget_dir, config.rate, config.api_key, shared=not opts.fake_api,
                         state=opts.state) as limiter:
            aledger = AsyncLedger(ledger)
            collector = Collector(config, aledger, limiter)
            with signals_to(lambda signum: collector.interrupt(signal.Signals(signum).name)):
                try:
                    stats = await collector.run(tasks)
                finally:
                    await aledger.close()
            return stats, None if aledger.broken is None else str(aledger.broken)


def unreachable_in_collect(opts: CollectOptions, why: str, tables: list[tuple[Target, pl.DataFrame]],
                           stats: CollectStats) -> str:
    """The exit-6 message of a collect whose ledger failed mid-pass: what is kept where."""
    why = ledger_failure(opts.state, why)
    left = (f"the results table {', '.join(str(t) for t, _ in tables)} is left as it was (every task id it held "
            f"is kept)" if tables else "no results table was rewritten")
    files = (f"; the {stats.downloaded} files downloaded stay in {opts.config.download_dir}"
             if opts.config.download_dir is not None and stats.downloaded else "")
    return (f"the ledger {opts.state} became unreachable mid-collect ({why}): the task states and files this "
            f"collect saw are not recorded; {left}{files}; a collect with the ledger back polls again and rewrites "
            f"the table (polls and downloads cost nothing)")


def _read_table(path: Target) -> pl.DataFrame:
    try:
        table = read_results(path)
    except Exception as exc:  # polars raises many types for a bad file
        raise InputError(f"{path}: cannot read results table ({type(exc).__name__})") from None
    if not is_results_table(table):
        raise InputError(f"{path}: not a results table (no request_id and status columns)")
    return table


def tables_to_adopt(opts: RunOptions) -> list[tuple[Target, pl.DataFrame]]:
    """The results tables whose task ids a submit run must know before it sends: its own
    output (a fresh state directory, e.g. a new container each night, would otherwise pay
    again for everything it records) and each ``--results-from``. A table that exists but
    cannot be read stops the run (exit 2): the ids it may hold cannot be checked."""
    found: list[tuple[Target, pl.DataFrame]] = []
    for target, given in ((opts.output, False), *((t, True) for t in opts.results_from)):
        fix = (f"the task ids it may hold cannot be checked against the ledger {opts.state}, so requests it "
               f"records could be paid again. Restore the table, or (after checking it holds nothing sent) move it "
               f"away, or name a readable copy with --results-from; nothing sent")
        try:
            if not target.remote and os.path.isfile(target.text) and os.path.getsize(target.text) == 0:
                continue  # an empty file records nothing
            table = read_results(target)
        except FileNotFoundError:
            if given:
                raise InputError(f"--results-from {target}: no such results table; nothing sent") from None
            continue
        except Exception as exc:  # polars raises many types for a bad file
            raise InputError(f"{target}: cannot read this results table ({type(exc).__name__}): {fix}") from None
        if not is_results_table(table):
            raise InputError(f"{target}: not a results table (no request_id and status columns): {fix}")
        found.append((target, table))
    return found


class Adopted(set[str]):
    """The request ids of a table, with how many of its tasks the ledger adopted."""

    imported = 0
    unknown = 0


def _import_from_table(ledger: LedgerStore, table: pl.DataFrame, api: str) -> Adopted:
    """The table's request ids; tasks it names that the ledger lacks are adopted, under
    the API their endpoint names (else this run's; the bundled fake's are the fake's), in
    one transaction. A row the ledger has is left as it is, unless a run whose ledger write
    failed left it ``sending``/``unknown`` without a task id and the table holds that id:
    then it is recorded ``submitted`` with it (no rewrite of the table loses the only copy
    of a paid task id, no run sends it again). A row the table calls ``unknown`` (the
    provider may hold it, no task id) is adopted as ``unknown``: sent again only with
    ``--resend-unknown``."""
    ids = Adopted(rid for rid in table["request_id"].to_list() if rid is not None)
    if "task_id" not in table.columns:
        return ids
    has_task = pl.col("task_id").is_not_null() & (pl.col("task_id").cast(pl.Utf8) != "")
    if "status" in table.columns:
        rows = table.filter((has_task & (pl.col("status").is_null() | (pl.col("status") != "invalid")))
                            | (pl.col("status") == "unknown"))
    else:
        rows = table.filter(has_task)
    rows = rows.filter(pl.col("request_id").is_not_null())
    odd = [t for t in rows["task_id"].to_list() if t is not None and t != "" and check_task_id(t) is None]
    if odd:  # a table is input like any other: such an id would become a URL and a file name
        log.warning("task_ids_refused", count=len(odd), reason="not plain tokens; not followed")
        rows = rows.filter(pl.col("task_id").is_null() | ~pl.col("task_id").is_in(odd))
    if rows.is_empty():
        return ids
    # Only the ids, status and task id of what the ledger knows: a 20,000-row rerun asks
    # the store for three short columns, not whole rows.
    known = ledger.task_states(rows["request_id"].to_list(), sorted(set(ledger.apis()) | {api}))
    fields = [c for c in rows.columns if c in Catalog().known_fields()]
    adopt = []
    for row in rows.iter_rows(named=True):
        task_id = row["task_id"] if row["task_id"] not in (None, "") and row.get("status") != "unknown" else None
        state = known.get(row["request_id"])
        if state is not None and not (task_id and state[1] in ("sending", "unknown") and not state[2]):
            continue  # a rerun through the same ledger: nothing to adopt
        body = {k: row[k] for k in fields if row[k] is not None and row[k] != ""}
        endpoint = row.get("endpoint")
        submitted = row.get("submitted_at")
        where = state[0] if state is not None else api if api == FAKE_API or not endpoint else origin(endpoint)
        adopt.append((where, row["request_id"], task_id, row.get("model"), endpoint, row.get("source"),
                      row.get("row"), json.dumps(body, default=str), str(submitted) if submitted else None))
    ledger.import_tasks(adopt)
    ids.imported = len(adopt)
    ids.unknown = sum(1 for a in adopt if a[2] is None)
    return ids


SUBMIT_COLUMNS = ("endpoint", "task_id", "error", "error_code", "http_status", "attempts", "submitted_at")
COLLECT_COLUMNS = ("task_status", "resource_urls", "failure_reason", "completed_at", "local_paths", "download_error")


def update_table(path: Target, table: pl.DataFrame, ledger: LedgerStore, apis: list[str]) -> None:
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
    write_frame(path, table.with_columns(columns))


def summary_path(results: Target) -> Target:
    return results.sibling(results.name + ".summary.json")


def write_summary_file(results: Target, summary: Summary) -> None:
    data = {**summary.as_dict(), "finished_at": utcnow(), "finished_unix": round(time.time(), 3)}
    write_text_atomically(summary_path(results), json.dumps(data, indent=2, ensure_ascii=False) + "\n")


__all__ = ["BatchError", "RunOptions", "Summary", "run_submit"]
