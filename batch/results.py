"""outcomes → results table: one typed row per expanded request, written atomically.

The table is written after the run, in input order, chunk by chunk, looking outcomes
up in the ledger, so memory stays flat however many rows the input has. Its request
columns come from a :class:`RequestSpool` filled while the requests streamed to the
workers (or, when the run stopped before reading them all, from a second pass over
the deterministic expansion). It is written to a temporary file in the same
directory, fsynced and renamed over the target: a reader sees the old table or the
new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import structlog

from batch.errors import ConfigError
from batch.expand import Request, chunks
from batch.ledger import Entry
from batch.validate import FIELD_NAMES, FIELDS, RuleError, coerce

STATUSES = ("submitted", "skipped", "failed", "invalid", "unknown", "pending", "dry_run")
OK_STATUSES = frozenset({"submitted", "skipped", "dry_run"})
RESULT_SUFFIXES = (".parquet", ".csv")
# Spreadsheet tools run a cell starting with one of these as a formula (OWASP CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

_FIELD_DTYPES: dict[str, pl.DataType] = {
    name: {"int": pl.Int64(), "bool": pl.Boolean()}.get(f.kind, pl.String()) for name, f in FIELDS.items()
}
_OUTCOME_DTYPES: dict[str, pl.DataType] = {
    "status": pl.String(), "task_id": pl.String(), "error": pl.String(), "error_code": pl.Int64(),
    "http_status": pl.Int64(), "attempts": pl.Int64(), "submitted_at": pl.Datetime("ms", "UTC"),
    "task_status": pl.String(), "resource_urls": pl.String(), "failure_reason": pl.String(),
    "completed_at": pl.Datetime("ms", "UTC"), "local_paths": pl.String(), "download_error": pl.String(),
}


def check_output_path(path: Path) -> None:
    if path.suffix.lower() not in RESULT_SUFFIXES:
        raise ConfigError(f"--output {path}: use a .parquet or .csv file name")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ConfigError(f"--output {path}: directory is not writable")


@dataclass(frozen=True)
class Resolution:
    """How ledger entries turn into result statuses for this run."""

    run_id: str | None
    dry_run: bool = False
    stop_reason: str | None = None


def resolve(invalid: str | None, entry: Entry | None, how: Resolution) -> dict[str, Any]:
    """The outcome columns of one request's result row (``invalid``: its validation error)."""
    if invalid is not None:
        return {"status": "invalid", "error": invalid}
    if how.dry_run:
        return {"status": "dry_run"}
    if entry is None:
        reason = f"not sent: {how.stop_reason}" if how.stop_reason else "not sent"
        return {"status": "pending", "error": reason}
    out: dict[str, Any] = {
        "task_id": entry.task_id, "error": entry.error, "error_code": entry.error_code,
        "http_status": entry.http_status, "attempts": entry.attempts, "submitted_at": entry.submitted_at,
        "task_status": entry.task_status, "resource_urls": entry.resource_urls,
        "failure_reason": entry.failure_reason, "completed_at": entry.completed_at,
        "local_paths": entry.local_paths, "download_error": entry.download_error,
    }
    this_run = entry.run_id == how.run_id
    if entry.status == "submitted":
        out["status"] = "submitted" if this_run else "skipped"
        if not this_run:
            out["attempts"] = 0
    elif entry.status == "sending":
        out["status"] = "unknown"
        out["error"] = (
            "interrupted after sending; the provider may have accepted it" if this_run else
            "an earlier run stopped after sending it; outcome unknown, not resent (use --resend-unknown)"
        )
    elif entry.status == "unknown":
        out["status"] = "unknown"
        if not this_run:
            out["error"] = f"earlier run: {entry.error}; not resent (use --resend-unknown)"
    elif entry.status == "failed" and this_run:
        out["status"] = "failed"
    else:  # pending, or a failure of an earlier run not retried tonight
        out["status"] = "pending"
        last = f"; last error: {entry.error}" if entry.error else ""
        out["error"] = f"not sent this run{': ' + how.stop_reason if how.stop_reason else ''}{last}"
        if not this_run:
            out["attempts"] = 0
    return out


def _typed_field(name: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        return coerce(name, value)
    except RuleError:
        return str(value) if _FIELD_DTYPES[name] == pl.String() else None


def _to_datetime(text: Any) -> datetime | None:
    return datetime.fromisoformat(text) if isinstance(text, str) else text


def result_schema(extra_dtypes: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    schema = request_schema(extra_dtypes)
    del schema[INVALID]
    schema.update(_OUTCOME_DTYPES)
    return schema


INVALID = "__invalid"  # a request frame's validation error; becomes status/error in the table


def request_schema(extra_dtypes: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    """The columns a request contributes to its row, before its outcome is known."""
    schema: dict[str, pl.DataType] = {"request_id": pl.String(), "source": pl.String(), "row": pl.Int64()}
    schema.update(_FIELD_DTYPES)
    schema.update(extra_dtypes)
    schema[INVALID] = pl.String()
    return schema


def request_frame(reqs: Sequence[Request], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """The request columns of a chunk of requests, built column by column: one list
    comprehension per column is about twice as fast as appending row by row (cProfile)."""
    columns: dict[str, list[Any]] = {
        "request_id": [r.request_id for r in reqs],
        "source": [r.source for r in reqs],
        "row": [r.row for r in reqs],
    }
    for name in FIELD_NAMES:
        columns[name] = [_typed_field(name, r.body.get(name)) if r.error else r.body.get(name) for r in reqs]
    for name in schema:
        if name not in columns and name != INVALID:
            columns[name] = [r.extra.get(name) for r in reqs]
    columns[INVALID] = [r.error for r in reqs]
    return pl.DataFrame(columns, schema=schema, strict=False)


def request_frames(requests: Iterable[Request], schema: dict[str, pl.DataType],
                   chunk_size: int = 20_000) -> Iterator[pl.DataFrame]:
    for chunk in chunks(requests, chunk_size):
        yield request_frame(chunk, schema)


def outcome_frame(outs: Sequence[dict[str, Any]]) -> pl.DataFrame:
    columns: dict[str, list[Any]] = {}
    for name in _OUTCOME_DTYPES:
        if name in ("submitted_at", "completed_at"):
            columns[name] = [_to_datetime(o.get(name)) for o in outs]
        else:
            columns[name] = [o.get(name) for o in outs]
    return pl.DataFrame(columns, schema=_OUTCOME_DTYPES, strict=False)


class RequestSpool:
    """The request frames of a run, kept in an anonymous temporary file while the
    requests stream to the workers, so that the results table is written without
    expanding the input a second time (that second pass was ~0.2 s of a 4 s, 20k-request
    run, benchmarks/bench.py). Memory stays flat: a frame is spooled every ``chunk_size``
    requests. :attr:`complete` is true only once every request has passed through;
    a write error turns the spool off (the caller then expands again), never the run.
    """

    def __init__(self, directory: Path, schema: dict[str, pl.DataType], chunk_size: int = 2_048) -> None:
        self.schema = schema
        self.chunk_size = chunk_size
        self.complete = False
        self._buffer: list[Request] = []
        self._writer: ipc.RecordBatchStreamWriter | None = None
        self._failed = False
        # Unlinked at once: nothing is left behind, even after kill -9.
        self._file = tempfile.TemporaryFile(dir=directory if directory.is_dir() else None)  # noqa: SIM115

    def tee(self, requests: Iterable[Request]) -> Iterator[Request]:
        for req in requests:
            yield req
            self._buffer.append(req)
            if len(self._buffer) >= self.chunk_size:
                self._spill()
        self._spill()
        self.complete = not self._failed

    def _spill(self) -> None:
        if self._failed or not self._buffer:
            self._buffer.clear()
            return
        try:
            table = request_frame(self._buffer, self.schema).to_arrow()
            if self._writer is None:
                self._writer = ipc.new_stream(self._file, table.schema)
            self._writer.write_table(table)
        except (OSError, ValueError, pa.ArrowException) as exc:  # disk full, closed: expand again at the end
            self._failed = True
            structlog.get_logger("batch.results").warning("spool_failed", error=str(exc))
        self._buffer.clear()

    def frames(self, chunk_size: int = 20_000) -> Iterator[pl.DataFrame]:
        """The spooled request frames, in order, regrouped into ``chunk_size`` rows."""
        if self._writer is None:
            return
        self._writer.close()
        self._file.seek(0)
        pending: list[pa.RecordBatch] = []
        rows = 0
        for batch in ipc.open_stream(self._file):
            pending.append(batch)
            rows += batch.num_rows
            if rows >= chunk_size:
                yield _frame_of(pending)
                pending, rows = [], 0
        if pending:
            yield _frame_of(pending)

    def close(self) -> None:
        self._file.close()


def _frame_of(batches: list[pa.RecordBatch]) -> pl.DataFrame:
    df = pl.from_arrow(pa.Table.from_batches(batches))
    assert isinstance(df, pl.DataFrame)  # a Table always gives a DataFrame
    return df


def escape_formulas(df: pl.DataFrame) -> pl.DataFrame:
    """Prefix cells that a spreadsheet would evaluate with ``'`` (CSV output only)."""
    exprs = []
    for name, dtype in df.schema.items():
        if dtype == pl.String():
            col = pl.col(name)
            risky = pl.any_horizontal([col.str.starts_with(p) for p in FORMULA_PREFIXES])
            exprs.append(pl.when(risky).then(pl.lit("'") + col).otherwise(col).alias(name))
    return df.with_columns(exprs) if exprs else df


class AtomicTableWriter:
    """Writes chunks to ``<dir>/.<name>.tmp-<pid>``; :meth:`commit` renames it into place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.csv = path.suffix.lower() == ".csv"
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/discard
        self._parquet: pq.ParquetWriter | None = None
        self._header = True

    def write(self, df: pl.DataFrame) -> None:
        if self.csv:
            escape_formulas(df).write_csv(self._file, include_header=self._header)
            self._header = False
            return
        table = df.to_arrow()
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._file, table.schema, compression="zstd")
        self._parquet.write_table(table)

    def commit(self, empty_schema: dict[str, pl.DataType]) -> None:
        if self._parquet is None and (not self.csv or self._header):
            self.write(pl.DataFrame(schema=empty_schema))
        if self._parquet is not None:
            self._parquet.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class Tally:
    """Requests by status, the errors of those not OK, and what a dry run would send:
    requests per tier and seconds of video per resolution (``frames`` at 24 fps where
    set, else ``duration``, else the API's 5 s default, at its 720p default)."""

    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    by_tier: Counter[str] = field(default_factory=Counter)
    seconds_by_resolution: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: dict[str, Any], body: Mapping[str, Any] | None = None) -> None:
        """Count one request; ``body`` (its fields, ``None`` where unset) feeds the estimate."""
        status = outcome["status"]
        self.counts[status] += 1
        if status not in OK_STATUSES and outcome.get("error"):
            self.errors[outcome["error"]] += 1
        if status == "dry_run" and body is not None:
            self.by_tier[body.get("service_tier") or "default"] += 1
            frames, duration = body.get("frames"), body.get("duration")
            seconds = frames / 24 if frames is not None else duration if duration is not None else 5
            self.seconds_by_resolution[body.get("resolution") or "720p"] += seconds

    def estimate(self) -> dict[str, Any] | None:
        if not self.by_tier:
            return None
        return {
            "requests_by_tier": dict(sorted(self.by_tier.items())),
            "video_seconds_by_resolution": {k: round(v, 1) for k, v in sorted(self.seconds_by_resolution.items())},
        }


def write_results(
    path: Path,
    frames: Iterable[pl.DataFrame],
    extra_dtypes: dict[str, pl.DataType],
    lookup: Callable[[list[str]], dict[str, Entry]],
    how: Resolution,
) -> Tally:
    """Write the results table from request frames; return the tally of statuses,
    errors and the estimate."""
    schema = result_schema(extra_dtypes)
    tally = Tally()
    writer = AtomicTableWriter(path)
    try:
        for frame in frames:
            ids, invalid = frame["request_id"].to_list(), frame[INVALID].to_list()
            valid = [rid for rid, err in zip(ids, invalid, strict=True) if err is None]
            known = lookup(valid) if valid and not how.dry_run else {}
            outs = [resolve(err, known.get(rid), how) for rid, err in zip(ids, invalid, strict=True)]
            if how.dry_run:
                bodies = frame.select("service_tier", "frames", "duration", "resolution").iter_rows(named=True)
                for outcome, body in zip(outs, bodies, strict=True):
                    tally.add(outcome, body)
            else:
                for outcome in outs:
                    tally.add(outcome)
            writer.write(pl.concat([frame.drop(INVALID), outcome_frame(outs)], how="horizontal").select(list(schema)))
        writer.commit(schema)
    except BaseException:
        writer.discard()
        raise
    return tally


def read_results(path: Path) -> pl.DataFrame:
    if path.suffix.lower() == ".csv":
        return pl.read_csv(path, infer_schema=False)
    return pl.read_parquet(path)
