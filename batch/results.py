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

import contextlib
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import structlog

from batch.api import whole_text
from batch.errors import ConfigError
from batch.estimate import LABEL, Estimator, Labels, count_edited
from batch.expand import Expander, Request, chunks
from batch.ledger import OUTCOME_COLUMNS
from batch.load import OWN_MARK, OWN_STATUSES
from batch.storage import Target

STATUSES = OWN_STATUSES  # the loader recognises a trimmed copy of a results table by them
OK_STATUSES = frozenset({"submitted", "skipped", "dry_run"})
RESULT_SUFFIXES = (".parquet", ".csv")
# Spreadsheet tools run a cell starting with one of these as a formula (OWASP CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

_JSON_DTYPES: dict[str, pl.DataType] = {
    "string": pl.String(), "integer": pl.Int64(), "number": pl.Float64(), "boolean": pl.Boolean(),
}


def field_dtypes(types: dict[str, str]) -> dict[str, pl.DataType]:
    """Result dtypes of the API fields (JSON types, ``array:<item type>`` for arrays)."""
    out: dict[str, pl.DataType] = {}
    for name, kind in types.items():
        item = kind.partition(":")[2]
        out[name] = pl.List(_JSON_DTYPES.get(item, pl.String())) if kind.startswith("array") \
            else _JSON_DTYPES.get(kind, pl.String())
    return out
RESULT_DTYPES: dict[str, pl.DataType] = {
    "status": pl.String(), "endpoint": pl.String(), "task_id": pl.String(), "error": pl.String(), "error_code": pl.Int64(),
    "http_status": pl.Int64(), "attempts": pl.Int64(), "submitted_at": pl.Datetime("ms", "UTC"),
    "task_status": pl.String(), "resource_urls": pl.List(pl.String()), "failure_reason": pl.String(),
    "completed_at": pl.Datetime("ms", "UTC"), "local_paths": pl.List(pl.String()), "download_error": pl.String(),
    "task_attempt": pl.Int64(), "earlier_task_ids": pl.List(pl.String()),  # batch.retry: the request's lineage
}


def check_output_path(target: Target) -> None:
    if target.suffix not in RESULT_SUFFIXES:
        raise ConfigError(f"--output {target}: use a .parquet or .csv file name")
    if target.remote:
        return  # a bucket is probed with a real write before sending (batch.storage.probe)
    parent = target.path.parent if str(target.path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ConfigError(f"--output {target}: directory is not writable")


@dataclass(frozen=True)
class Resolution:
    """How ledger entries turn into result statuses for this run."""

    run_id: str | None
    dry_run: bool = False
    stop_reason: str | None = None
    resend_unknown: bool = False  # would the run resend (dry run) or did it try to (an unsent one: why)


# Ledger.outcome_rows, typed; the ledger's status and run_id only decide the row's status.
_ENTRY_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.String(), "_status": pl.String(), "_run_id": pl.String(),
    **{c: RESULT_DTYPES[c] for c in OUTCOME_COLUMNS[3:]},
}
_TIMESTAMPS = ("submitted_at", "completed_at")
_LISTS = ("resource_urls", "local_paths", "earlier_task_ids")
CSV_DATETIME = "%Y-%m-%dT%H:%M:%S%.3fZ"  # one ISO 8601 UTC spelling in every CSV table


def csv_text(value: Any) -> str | None:
    """A value as the CSV writer spells it (for a table that was read back as text)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    if isinstance(value, list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def ledger_value(column: str, value: Any) -> Any:
    """A ledger cell as the results table holds it: timestamps as datetimes, the URLs
    and the downloaded files as lists (the ledger keeps JSON text)."""
    if value is None:
        return None
    if column in _TIMESTAMPS:
        if isinstance(value, str):
            return _to_datetime(value) if value else None
        return value
    if column in _LISTS:
        try:
            parsed = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            return None
        if column == "local_paths" and isinstance(parsed, dict):
            return [str(v.get("path")) for v in parsed.values() if isinstance(v, dict) and v.get("path")]
        # An older version stored a lone surrogate as its JSON escape: whole it again.
        return [whole_text(str(v)) for v in parsed] if isinstance(parsed, list) else None
    return whole_text(value) if isinstance(value, str) else value


def entries_frame(rows: Sequence[tuple[Any, ...]]) -> pl.DataFrame:
    """Ledger rows (``OUTCOME_COLUMNS``) as a typed frame. Timestamps are parsed with
    ``datetime.fromisoformat``: tasks adopted from another machine's table may carry
    another ISO spelling than ours."""
    converted = {c: (pl.String() if c in _TIMESTAMPS or c in _LISTS else t) for c, t in _ENTRY_SCHEMA.items()}
    df = pl.DataFrame(rows, schema=converted, orient="row")
    return df.with_columns(
        pl.Series(c, [ledger_value(c, v) for v in df[c].to_list()], dtype=_ENTRY_SCHEMA[c])
        for c in (*_TIMESTAMPS, *_LISTS)
    )


def resolve_frame(frame: pl.DataFrame, entries: pl.DataFrame | None, how: Resolution) -> pl.DataFrame:
    """A chunk of result rows: its request columns, and each request's status, error and
    ledger columns as this run sees them:

    * ``invalid`` (the rule it broke), or ``pending`` if the ledger has no row;
    * ``submitted`` this run, or ``skipped`` (an earlier run's, attempts 0 tonight);
    * ``unknown`` if it is or was ``sending``/``unknown``: it may have been accepted;
    * ``failed`` this run; otherwise ``pending`` (certainly not accepted), with the last error;
    * in a dry run: ``skipped`` and ``unknown`` as a run would find them, else ``dry_run``
      (what the run would send).
    """
    if entries is None:
        entries = pl.DataFrame(schema=_ENTRY_SCHEMA)
    rows = frame.join(entries, on="request_id", how="left", maintain_order="left")
    invalid, st, err = pl.col(INVALID), pl.col("_status"), pl.col("error")
    this_run = pl.col("_run_id") == pl.lit(how.run_id, pl.String())
    stop = f": {how.stop_reason}" if how.stop_reason else ""
    has_error = err.is_not_null() & (err != "")
    # An earlier run's unknown left unsent: the hint names the option, unless it was given
    # (then the run stopped before it: the cap, the deadline, a signal).
    unsent = (f"not resent this run{stop}" if how.resend_unknown and not how.dry_run
              else "not resent (use --resend-unknown)")
    may_exist = st.is_in(["sending", "unknown"]) & pl.lit(not how.resend_unknown)
    status = (
        pl.when(invalid.is_not_null()).then(pl.lit("invalid"))
        .when(pl.lit(how.dry_run)).then(
            pl.when(st == "submitted").then(pl.lit("skipped"))
            .when(may_exist).then(pl.lit("unknown"))
            .otherwise(pl.lit("dry_run")))
        .when(st.is_null()).then(pl.lit("pending"))
        .when(st == "submitted").then(pl.when(this_run).then(pl.lit("submitted")).otherwise(pl.lit("skipped")))
        .when(st.is_in(["sending", "unknown"])).then(pl.lit("unknown"))
        .when((st == "failed") & this_run).then(pl.lit("failed"))
        .otherwise(pl.lit("pending"))
    )
    error = (
        pl.when(invalid.is_not_null()).then(invalid)
        .when(pl.lit(how.dry_run)).then(
            pl.when(may_exist).then(pl.lit("an earlier run may have sent it; it would not be resent "
                                           "(use --resend-unknown)"))
            .otherwise(pl.lit(None, pl.String())))
        .when(st.is_null()).then(pl.lit(f"not sent{stop}"))
        .when(st == "sending").then(
            pl.when(this_run).then(pl.lit("interrupted after sending; the provider may have accepted it"))
            .otherwise(pl.lit(f"an earlier run stopped after sending it; outcome unknown, {unsent}")))
        .when((st == "unknown") & ~this_run).then(
            pl.lit("earlier run: ") + err.fill_null("outcome unknown") + pl.lit(f"; {unsent}"))
        .when(st.is_in(["submitted", "unknown"]) | ((st == "failed") & this_run)).then(err)
        .otherwise(pl.lit(f"not sent this run{stop}")
                   + pl.when(has_error).then(pl.lit("; last error: ") + err).otherwise(pl.lit("")))
    )
    # Attempts count tonight's: none for an earlier run's success, failure or pending row.
    earlier = ~this_run & ~st.is_in(["sending", "unknown"])
    attempts = pl.when(earlier).then(pl.lit(0, pl.Int64())).otherwise(pl.col("attempts"))
    return rows.with_columns(status=status, error=error, attempts=attempts).drop("_status", "_run_id")


def _to_datetime(text: Any) -> datetime | None:
    return datetime.fromisoformat(text) if isinstance(text, str) else text


def result_schema(request: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    """The results table's columns, from a request schema (:func:`request_schema`):
    ``as_written`` follows ``error``, the two say what was wrong with an invalid row."""
    schema = dict(request)
    del schema[INVALID], schema[LABEL], schema[AS_WRITTEN]
    for name, dtype in RESULT_DTYPES.items():
        schema[name] = dtype
        if name == "error":
            schema[AS_WRITTEN] = pl.String()
    return schema


INVALID = "__invalid"  # a request frame's validation error; becomes status/error in the table
# An invalid request's values as the user wrote them (JSON text): a typed column cannot
# hold a seed of 3.7 or a model nobody knows; valid rows leave it empty.
AS_WRITTEN = "as_written"


def request_schema(extra_dtypes: dict[str, pl.DataType], fields: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    """The columns a request contributes to its row, before its outcome is known: its
    place, its model, the API fields of the models in use, the pass-through columns
    (whose names never equal a field's, see :func:`batch.expand.map_columns`)."""
    schema: dict[str, pl.DataType] = {"request_id": pl.String(), "source": pl.String(), "row": pl.Int64(),
                                      "model": pl.String()}
    schema.update(fields)
    schema.update(extra_dtypes)
    schema[AS_WRITTEN] = pl.String()
    schema[INVALID] = pl.String()
    schema[LABEL] = pl.String()
    return schema


def request_schema_of(expander: Expander) -> dict[str, pl.DataType]:
    return request_schema(expander.extra_dtypes, field_dtypes(expander.field_types()))


def request_frame(reqs: Sequence[Request], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """The request columns of a chunk of requests, built column by column: one list
    comprehension per column is about twice as fast as appending row by row (cProfile)."""
    columns: dict[str, list[Any]] = {
        "request_id": [r.request_id for r in reqs],
        "source": [r.source for r in reqs],
        "row": [r.row for r in reqs],
        "model": [r.model for r in reqs],
    }
    for name in schema:
        if name not in columns and name not in (INVALID, LABEL, AS_WRITTEN):
            columns[name] = [r.body[name] if name in r.body else r.extra.get(name) for r in reqs]
    columns[AS_WRITTEN] = [None if r.written is None else json.dumps(r.written, ensure_ascii=False, default=str)
                           for r in reqs]
    columns[INVALID] = [r.error for r in reqs]
    columns[LABEL] = [r.label for r in reqs]
    return pl.DataFrame(columns, schema=schema, strict=False)


# Rows per chunk of a submit run's results table. The chunk is the run's high-water mark
# (its outcome rows as Python tuples, then frames and Arrow copies): at 20,000 rows the
# table's writing took a 50,000-request run from ~150 MiB while sending to a 245 MiB peak;
# at 4,096, 187 MiB (issue #21, sampled every second from /proc). A dry run keeps its
# larger chunks (request_frames): it has no outcome rows and a million rows to write.
SUBMIT_CHUNK = 4_096


def request_frames(requests: Iterable[Request], schema: dict[str, pl.DataType],
                   chunk_size: int = 20_000) -> Iterator[pl.DataFrame]:
    for chunk in chunks(requests, chunk_size):
        yield request_frame(chunk, schema)


class RequestSpool:
    """The request frames of a run, kept in an anonymous temporary file while the
    requests stream to the workers, so that the results table is written without
    expanding the input a second time (that second pass was ~0.2 s of a 4 s, 20k-request
    run, benchmarks/bench.py). Memory stays flat: a frame is spooled every ``chunk_size``
    requests. :attr:`complete` is true only once every request has passed through;
    a write error turns the spool off (the caller then expands again), never the run.
    """

    def __init__(self, directory: Path | None, schema: dict[str, pl.DataType], chunk_size: int = 2_048) -> None:
        self.schema = schema
        self.chunk_size = chunk_size
        self.complete = False
        self._buffer: list[Request] = []
        self._writer: ipc.RecordBatchStreamWriter | None = None
        self._failed = False
        self._writer_closed = False
        self._file: Any = None
        try:  # Unlinked at once: nothing is left behind, even after kill -9.
            self._file = tempfile.TemporaryFile(  # noqa: SIM115
                dir=directory if directory is not None and directory.is_dir() else None)
        except OSError as exc:  # no room for even an empty file: expand again at the end
            self._off(exc)

    def _off(self, exc: BaseException) -> None:
        self._failed = True
        structlog.get_logger("batch.results").warning("spool_failed", error=str(exc))

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
            self._off(exc)
        self._buffer.clear()

    def finish(self) -> bool:
        """Close the spool for writing (its last bytes reach the disk now, which may be
        full); true if :meth:`frames` holds every request."""
        if not self.complete or self._failed:
            return False
        try:
            if self._writer is not None:
                self._writer.close()
                self._writer_closed = True
            self._file.flush()
        except (OSError, ValueError, pa.ArrowException) as exc:
            self._off(exc)
            return False
        return True

    def frames(self, chunk_size: int = SUBMIT_CHUNK) -> Iterator[pl.DataFrame]:
        """The spooled request frames, in order, regrouped into ``chunk_size`` rows (after
        :meth:`finish` said they are all there)."""
        if self._writer is None:
            return
        if not self._writer_closed:
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
        if self._file is not None:
            with contextlib.suppress(OSError):  # closing flushes: a full disk fails again; the file is unlinked
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


def write_text_atomically(path: Path | Target, text: str) -> None:
    """The whole text or nothing (:meth:`batch.storage.Target.write_text`)."""
    (path if isinstance(path, Target) else Target(str(path))).write_text(text)


class AtomicTableWriter:
    """Writes chunks to a temporary file (``<dir>/.<name>.tmp-<pid>-<random>``, created exclusively, or the system's for
    a bucket); :meth:`commit` renames it into place or uploads it as one object."""

    def __init__(self, target: Target | Path) -> None:
        target = target if isinstance(target, Target) else Target(str(target))
        self.target = target
        self.tmp = target.new_temp()
        self.csv = target.suffix == ".csv"
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/discard
        self._parquet: pq.ParquetWriter | None = None
        self._header = True
        self.kind = "results"

    def write(self, df: pl.DataFrame) -> None:
        if self.csv:
            # Lists as JSON text, timestamps in one ISO spelling, and a BOM first so that
            # Excel opens non-ASCII text as UTF-8.
            flat = df.with_columns(
                pl.col(c).map_elements(lambda v: json.dumps(list(v), ensure_ascii=False), return_dtype=pl.String)
                for c, t in df.schema.items() if isinstance(t, pl.List))
            escape_formulas(flat).write_csv(self._file, include_header=self._header, include_bom=self._header,
                                            datetime_format=CSV_DATETIME)
            self._header = False
            return
        table = df.to_arrow()
        if self._parquet is None:
            # Marked as the tool's own, so that a results table left (or renamed) among the
            # inputs is never read as prompts again (batch.load.results_kind).
            schema = table.schema.with_metadata({**(table.schema.metadata or {}), OWN_MARK: self.kind.encode()})
            self._parquet = pq.ParquetWriter(self._file, schema, compression="zstd")
        self._parquet.write_table(table.replace_schema_metadata(self._parquet.schema.metadata))

    def commit(self, empty_schema: dict[str, pl.DataType]) -> None:
        if self._parquet is None and (not self.csv or self._header):
            self.write(pl.DataFrame(schema=empty_schema))
        if self._parquet is not None:
            self._parquet.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.target.publish(self.tmp)

    def discard(self) -> None:
        if self._parquet is not None:  # its footer goes nowhere; never again (pyarrow retries in __del__)
            with contextlib.suppress(Exception):
                self._parquet.close()
            self._parquet.is_open = False
            self._parquet = None
        if not self._file.closed:
            with contextlib.suppress(OSError):  # closing flushes: a full disk fails again
                self._file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class Tally:
    """Requests by status, the errors of those not OK, and what a dry run would send
    (:class:`batch.estimate.Estimator`, over the ``dry_run`` rows only)."""

    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    estimator: Estimator | None = None
    labels: Labels | None = None  # a real run: Ledger.labels of the earlier runs, to count edited rows
    edited: int | None = 0  # submitted this run although their id was sent before with other content; None: unknown
    sent: Estimator | None = None  # a real run: the video its ``submitted`` rows ask for (seconds, without prices)

    def add(self, rows: pl.DataFrame) -> None:
        """Count a chunk of result rows (``status``, ``error`` and the API fields), in order
        of first appearance: equal counts then rank as they came, run after run."""
        for status, n in rows.group_by("status", maintain_order=True).len().iter_rows():
            self.counts[status] += n
        failed = rows.filter(~pl.col("status").is_in(list(OK_STATUSES)) & (pl.col("error").fill_null("") != ""))
        for error, n in failed.group_by("error", maintain_order=True).len().iter_rows():
            self.errors[error] += n
        if self.estimator is not None:
            self.estimator.add(rows.filter(pl.col("status") == "dry_run"))
        if self.sent is not None:
            self.sent.add(rows.filter(pl.col("status") == "submitted"))
        if self.labels is not None:
            try:
                self.edited = (self.edited or 0) + count_edited(rows.filter(pl.col("status") == "submitted"),
                                                                self.labels)
            except Exception as exc:
                structlog.get_logger("batch.results").warning("edited_not_counted", error=str(exc))
                self.labels, self.edited = None, None

    def estimate(self) -> dict[str, Any] | None:
        found = self.estimator.as_dict() if self.estimator is not None else None
        if found is not None:
            found["already_submitted"] = self.counts.get("skipped", 0)
            found["unknown"] = self.counts.get("unknown", 0)
        return found


# What a failed write of the table raises: the file object's OSError, or pyarrow's.
WRITE_ERRORS = (OSError, pa.ArrowException)


def write_results(
    path: Target | Path | None,
    frames: Iterable[pl.DataFrame],
    request: dict[str, pl.DataType],
    outcome_rows: Callable[[list[str]], list[tuple[Any, ...]]] | None,
    how: Resolution,
    tolerate_io: bool = False,
    tally: Tally | None = None,
    on_rows: Callable[[pl.DataFrame], None] | None = None,
) -> tuple[Tally, str | None]:
    """Write the results table from request frames, with outcomes from ``outcome_rows``
    (``Ledger.outcome_rows``; ``None`` without a ledger); return the tally, and with
    ``tolerate_io`` the reason the table could not be written (disk full...) instead of
    raising it: the tally of every request is complete either way. Without ``path`` the
    rows are only tallied and shown to ``on_rows`` (``validate``)."""
    schema = result_schema(request)
    tally = tally or Tally()
    writer: AtomicTableWriter | None = None
    error: str | None = None

    def failed(exc: BaseException) -> None:
        nonlocal writer, error
        if not tolerate_io:
            raise exc
        if writer is not None:
            writer.discard()
            writer = None
        error = f"cannot write results table {path} ({getattr(exc, 'strerror', None) or exc})"

    try:
        if path is not None:
            writer = AtomicTableWriter(path)
            writer.kind = "dry-run results" if how.dry_run else "results"
    except WRITE_ERRORS as exc:
        failed(exc)
    try:
        for frame in frames:
            entries = None
            if outcome_rows is not None:
                valid = frame.filter(pl.col(INVALID).is_null())["request_id"].to_list()
                entries = entries_frame(outcome_rows(valid)) if valid else None
            rows = resolve_frame(frame, entries, how)
            tally.add(rows)
            if on_rows is not None:
                on_rows(rows)
            if writer is not None:
                try:
                    writer.write(rows.select(list(schema)))
                except WRITE_ERRORS as exc:
                    failed(exc)
        if writer is not None:
            try:
                writer.commit(schema)
            except WRITE_ERRORS as exc:
                failed(exc)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return tally, error


# A ledger status as a results table shows it when the table is rebuilt from the ledger alone.
_LEDGER_STATUS = {"submitted": "submitted", "sending": "unknown", "unknown": "unknown", "failed": "failed",
                  "pending": "pending"}


def ledger_frame(places: Sequence[tuple[str, str | None, int | None, str | None]],
                 rows: Sequence[tuple[Any, ...]]) -> pl.DataFrame:
    """A results table from the ledger alone, for when the table cannot be built from the
    input (a failure after sending): one row per request the run claimed, with its place
    (``request_id, source, row, model``) and its outcome (``Ledger.outcome_rows``). It
    holds every task id, and ``collect`` reads it like any results table."""
    place = pl.DataFrame(list(places), schema={"request_id": pl.String(), "source": pl.String(), "row": pl.Int64(),
                                              "model": pl.String()}, orient="row")
    outcomes = entries_frame(rows)
    status = outcomes["_status"].replace_strict(_LEDGER_STATUS, default="unknown", return_dtype=pl.String())
    outcomes = outcomes.with_columns(status=status).drop("_status", "_run_id")
    table = place.join(outcomes, on="request_id", how="left", maintain_order="left")
    return table.select("request_id", "source", "row", "model", *RESULT_DTYPES)


def write_frame(path: Target | Path, df: pl.DataFrame) -> None:
    """One frame as a whole table, atomically (:class:`AtomicTableWriter`)."""
    writer = AtomicTableWriter(path)
    try:
        writer.write(df)
        writer.commit(dict(df.schema))
    except BaseException:
        writer.discard()
        raise


def read_results(target: Target | Path) -> pl.DataFrame:
    """A results table, local or in a bucket; ``FileNotFoundError`` when there is none."""
    target = target if isinstance(target, Target) else Target(str(target))
    source: Any = target.text
    if target.remote:
        data = target.read_bytes()
        if data is None:
            raise FileNotFoundError(str(target))
        source = io.BytesIO(data)
    if target.suffix == ".csv":
        return pl.read_csv(source, infer_schema=False)
    return pl.read_parquet(source)


def holds_task_ids(target: Target) -> bool:
    """Whether a results table names any task id. A local Parquet table is scanned for
    that one column (reading last night's 1,000,000-row table whole cost ~300 MiB)."""
    if target.remote or target.suffix == ".csv":
        table = read_results(target)
        return "task_id" in table.columns and table["task_id"].drop_nulls().len() > 0
    scan = pl.scan_parquet(target.text)
    if "task_id" not in scan.collect_schema():
        return False
    return bool(scan.select(pl.col("task_id").is_not_null().any()).collect().item())


def is_results_table(df: pl.DataFrame) -> bool:
    return {"request_id", "status"} <= set(df.columns)
