"""file → rows: read CSV, Parquet and Excel inputs into polars DataFrames.

CSV is read with every column as text: spreadsheets export integers as ``5.0``,
booleans as ``yes`` and lists as ``16:9|9:16``, and :mod:`batch.validate` interprets
those per field, so type inference here could only lose information (leading zeros in
an ``id``, say). Parquet and Excel keep their own types.

Guarantees:

* **One unreadable file does not cost the night**: :func:`load_inputs` returns the
  tables it could read and, for each file it could not, one line saying why.
* **The tool's own outputs are never prompts**: results and dry-run tables (marked in
  their Parquet metadata, recognised by their columns in any format), summaries, metrics
  and rescue files are skipped in directories and globs (:class:`Skipped`, for the
  summary) and refused when named explicitly, so a nightly ``-o in/{date}.parquet`` never
  pays again for earlier nights' rows.
* **No file or sheet silently left out**: every file a directory or glob yields that is
  not read is a :class:`Skipped` with its reason; a workbook with several sheets holding
  a ``prompt`` column is refused unless ``--sheet`` names them (or ``all``).
* **Files as people export them**: CSV/TSV with ``,``, ``;`` or tab delimiters (Excel's
  ``sep=`` line honoured; a decimal comma in a ``;`` file is a number), UTF-8 with or
  without BOM or UTF-16 ("Unicode text"), any other encoding only when ``--encoding``
  names it (never guessed: a wrong guess changes the prompt); a ragged line is named;
  Excel lock files (``~$*``) and hidden files are skipped; ``.xlsx`` and ``.xlsm``
  workbooks; the header is the first row holding a ``prompt`` column within the first
  rows (title rows above it are common) or the row ``--header-row`` names.
* **Nothing silently empty or silently text** (``.xlsx``): formula cells without a cached
  value, cells under a merged range and non-text cells are noted on the table
  (:attr:`Table.notes`, :attr:`Table.kinds`), for the expansion to refuse where it
  matters (:mod:`batch.xlsx`).
* **Bounded memory**: no cell over :data:`CELL_CHARS` characters is kept (it is noted and
  emptied), workbook parts are capped before they are expanded, and Parquet files are
  checked against :data:`MAX_PARQUET_BYTES` of uncompressed data from their metadata.
* **Locations people can find**: ``source`` is the path as given (plus ``[sheet]``), rows
  are numbered as a spreadsheet shows them (header = row 1, or the sheet's own row).
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import glob as globmod
import io
import itertools
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import fastexcel
import polars as pl
import pyarrow.parquet as pq

from batch import storage, xlsx
from batch.api import check_task_id
from batch.errors import InputError
from batch.mutant import mutant
from batch.names import normalize_name as header_name

SUFFIXES = (".csv", ".tsv", ".parquet", ".xlsx", ".xlsm")
WORKBOOKS = (".xlsx", ".xlsm")
TEXT_TABLES = (".csv", ".tsv")
KINDS = "a .csv, .tsv, .parquet, .xlsx or .xlsm"
# Key of the Parquet key-value metadata on every table the tool writes (results, dry runs).
OWN_MARK = b"seedance-batch"
# Columns every results table has (after request_id and status), whatever wrote it.
# Every status a results table holds (batch.results uses this tuple as its vocabulary).
OWN_STATUSES = ("submitted", "skipped", "failed", "invalid", "unknown", "pending", "dry_run")
RESULT_MARK_COLUMNS = frozenset({"task_id", "error", "endpoint", "attempts", "http_status", "submitted_at"})
HEAD_ROWS = xlsx.HEAD_ROWS
DEFAULT_PROMPT_NAMES = frozenset({"prompt"})
CELL_CHARS = 65_536  # a prompt is at most 2,000 characters; a 64 KiB cell is already invalid
MAX_PARQUET_BYTES = 8 << 30
DELIMITERS = (",", ";", "\t")


@dataclass(frozen=True)
class Table:
    """The rows of one input file (one sheet of a workbook)."""

    source: str  # the path as given, plus [sheet] for a workbook
    path: Path
    df: pl.DataFrame
    first_row: int = 2  # the spreadsheet row number of df row 0
    notes: Mapping[tuple[int, str], str] = field(default_factory=dict)  # (df row, column) -> why the cell is not usable
    kinds: Mapping[tuple[int, str], str] = field(default_factory=dict)  # (df row, column) -> n, b, d, e, date
    sheet: str | None = None
    first_col: int = 0  # the sheet column of df column 0
    location: str = ""  # the file or object as given (no sheet): an output must never be one

    def cell(self, index: int, column: str) -> str:
        """Where a cell is, as a person finds it: ``B7`` in a workbook, else ``column, row 7``."""
        row = self.first_row + index
        if self.sheet is not None and column in self.df.columns:
            return f"{xlsx.column_letters(self.first_col + self.df.columns.index(column))}{row}"
        return f"{column!r} row {row}"


@dataclass(frozen=True)
class Unreadable:
    """An input that could not be read, and why (one line)."""

    source: str
    error: str


@dataclass(frozen=True)
class Skipped:
    """A file (or sheet) a directory, glob or workbook yielded that was not read, and why."""

    source: str
    reason: str


class OwnOutputError(InputError):
    """The input is a file this tool wrote (a results table, a summary...), not prompts."""

    def __init__(self, path: object, kind: str) -> None:
        super().__init__(f"{path}: {kind} that seedance-batch wrote, not a prompt file: reading it would pay "
                         "again for the rows it records; give the prompt files instead")
        self.kind = kind


@dataclass(frozen=True)
class ReadOptions:
    """How inputs are read: which sheets, which header row, which encoding; which
    header names make a prompt column (to find the header and the sheets with prompts;
    empty when no prompt column is required: a template or ``--param prompt=``)."""

    sheet: str | None = None
    header_row: int | None = None  # 1-based, as the spreadsheet shows it
    encoding: str | None = None  # of CSV/TSV files that are not UTF-8/UTF-16
    prompt_names: frozenset[str] = DEFAULT_PROMPT_NAMES


def _lock_or_hidden(path: Path | PurePosixPath) -> str | None:
    """Excel's lock files (``~$name.xlsx``) and hidden files are never inputs."""
    if path.name.startswith("~$"):
        return "Excel lock file"
    if path.name.startswith("."):
        return "hidden file"
    return None


def own_name_kind(name: str) -> str | None:
    """What a non-table file the tool writes beside its tables is, by its name."""
    name = name.lower()
    if name.endswith(".summary.json"):
        return "a run summary"
    if name.endswith(".rescue.jsonl"):
        return "a ledger rescue file"
    return None


def own_file_kind(path: Path) -> str | None:
    """What a non-table file the tool writes beside its tables is, by name or content."""
    if (kind := own_name_kind(path.name)) is not None:
        return kind
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"# HELP seedance_batch_"):
        return "a metrics file"
    return None


def results_kind(df: pl.DataFrame, metadata: Mapping[bytes, bytes] | None = None) -> str | None:
    """Whether a table is one the tool wrote: its Parquet mark, or a results table's
    columns (request_id, status and the outcome columns), in whatever format it was saved."""
    if mutant("forget_own_tables"):
        return None
    if metadata and OWN_MARK in metadata:
        # The mark's value is the file's text: only the kinds the writer uses are echoed.
        kind = "dry-run results" if metadata[OWN_MARK] == b"dry-run results" else "results"
        return f"a {kind} table (marked in its Parquet metadata)"
    names = {header_name(c) for c in df.columns}
    if {"request_id", "status"} <= names and len(RESULT_MARK_COLUMNS & names) >= 3:
        return "a results table (its request_id, status and task_id... columns)"
    if {"status", "task_id"} <= names and _own_status_and_task_ids(df):
        return "a results table (its status and task_id columns hold the tool's statuses and task ids)"
    return None


def _own_status_and_task_ids(df: pl.DataFrame) -> bool:
    """A trimmed copy of a results table (Excel users delete columns: ``id, prompt,
    status, task_id``): every status one of the tool's words and every task id a plain
    token. A user's own status column ("approved", "todo") is never all of those."""
    column = {header_name(c): c for c in df.columns}
    statuses = {str(v).strip().lower() for v in df[column["status"]].drop_nulls().unique().head(10_000).to_list()}
    statuses.discard("")
    if not statuses or not statuses <= set(OWN_STATUSES):
        return False
    ids = [v for v in (str(v).strip() for v in df[column["task_id"]].drop_nulls().unique().head(10_000).to_list())
           if v]
    # Without a single task id only a dry run's word marks it: a planning sheet of "pending"
    # rows with an empty task_id column is the user's, and nothing in it was paid for.
    return all(check_task_id(v) is not None for v in ids) and (bool(ids) or "dry_run" in statuses)


def _not_input(kind: str | None) -> str:
    return f"{kind} of seedance-batch" if kind else f"not {KINDS} file"


def _candidate(path: Path, skipped: list[Skipped]) -> bool:
    """Whether a file a directory or glob yields is read; if not, why goes to ``skipped``."""
    if not path.is_file():
        return False  # subdirectories are not read (a glob with ** reaches into them)
    why = _lock_or_hidden(path)
    if why is None and path.suffix.lower() not in SUFFIXES:
        why = _not_input(own_file_kind(path))
    if why is not None:
        skipped.append(Skipped(str(path), why))
        return False
    return True


def resolve_inputs(specs: Iterable[str]) -> tuple[list[tuple[Path | str, bool]], list[Unreadable], list[Skipped]]:
    """Expand directories, prefixes and globs into input files or objects, in a stable
    (sorted) order: ``(path, named explicitly)``, the specs that yield nothing, and the
    files they yield that are not inputs."""
    paths: list[tuple[Path | str, bool]] = []
    missing: list[Unreadable] = []
    skipped: list[Skipped] = []
    for spec in specs:
        if storage.is_remote(spec):
            passed: list[str] = []
            try:
                objects = storage.list_objects(spec, SUFFIXES, passed)
            except InputError as exc:
                missing.append(Unreadable(spec, str(exc).removeprefix(f"{spec}: ")))
                continue
            for url in passed:
                name = PurePosixPath(url).name
                skipped.append(Skipped(url, _lock_or_hidden(PurePosixPath(name)) or _not_input(own_name_kind(name))))
            if not objects:
                missing.append(Unreadable(spec, f"no {KINDS.removeprefix('a ')} object matches"))
            paths.extend((o, o == spec) for o in objects)
        elif any(ch in spec for ch in "*?["):
            matches = sorted(Path(p) for p in globmod.glob(spec, recursive=True))
            found = [p for p in matches if _candidate(p, skipped)]
            if not found:
                missing.append(Unreadable(spec, f"no {KINDS.removeprefix('a ')} file matches"))
            paths.extend((p, False) for p in found)
        elif os.path.isdir(spec):
            found = [p for p in sorted(Path(spec).iterdir()) if _candidate(p, skipped)]
            if not found:
                missing.append(Unreadable(spec, f"directory holds no {KINDS.removeprefix('a ')} file"))
            paths.extend((p, False) for p in found)
        else:
            paths.append((Path(spec), True))
    seen: set[Path | str] = set()
    unique = []
    for p, explicit in paths:
        key = p if isinstance(p, str) else p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((p, explicit))
    return unique, missing, skipped


def load_inputs(specs: Iterable[str], sheet: str | None = None, options: ReadOptions | None = None,
                frames: Iterable[tuple[str, pl.DataFrame]] = ()) -> tuple[list[Table], list[Unreadable], list[Skipped]]:
    """Every readable input, one :class:`Unreadable` per input that is not, and one
    :class:`Skipped` per file (or sheet) that was found but is not an input. ``frames``
    (``(source, DataFrame)``, from the Python API) come first, each one table."""
    options = options or ReadOptions(sheet=sheet)
    paths, failed, skipped = resolve_inputs(specs)
    tables = [frame_table(source, df) for source, df in frames]
    if options.sheet is not None and paths:
        flat = [p for p, explicit in paths if explicit and _suffix(p) not in WORKBOOKS]
        if flat or not any(_suffix(p) in WORKBOOKS for p, _ in paths):
            named = flat[0] if flat else next((p for p, _ in paths), "the inputs")
            raise InputError(f"--sheet {options.sheet}: {named} is not a workbook (.xlsx/.xlsm); a sheet "
                             "applies to workbooks only")
    for path, explicit in paths:
        try:
            found, passed = load_tables(path, options)
        except OwnOutputError as exc:
            if explicit:
                raise
            skipped.append(Skipped(str(path), f"{exc.kind} of seedance-batch"))
            continue
        except InputError as exc:
            failed.append(Unreadable(str(path), str(exc).removeprefix(f"{path}: ")))
            continue
        tables.extend(found)
        skipped.extend(passed)
    if not tables:
        if failed:
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise InputError(f"{failed[0].source}: {failed[0].error}{more}; nothing could be loaded")
        if skipped:
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            raise InputError(f"no prompt file to read: skipped {skipped[0].source}: {skipped[0].reason}{more}")
        raise InputError("no input files given")
    return tables, failed, skipped


def _suffix(path: Path | str) -> str:
    return (path.suffix if isinstance(path, Path) else PurePosixPath(path).suffix).lower()


def load_table(path: Path | str, sheet: str | None = None, options: ReadOptions | None = None) -> Table:
    """Read one input file or object that holds one table (see :func:`load_tables`)."""
    tables, _ = load_tables(path, options or ReadOptions(sheet=sheet))
    if len(tables) != 1:
        raise InputError(f"{path}: holds {len(tables)} tables; name one sheet")
    return tables[0]


def load_tables(path: Path | str, options: ReadOptions) -> tuple[list[Table], list[Skipped]]:
    """Read one input file or object (a workbook: the sheets chosen, and the sheets passed
    over); any failure is an :class:`InputError` naming it, and a file the tool wrote an
    :class:`OwnOutputError`."""
    if isinstance(path, str):  # an object: read from a local copy, named as given
        suffix = PurePosixPath(path).suffix.lower()
        if suffix not in SUFFIXES:
            raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; use {KINDS} file")
        with storage.local_copy(path, suffix) as local:
            try:
                tables, passed = load_tables(local, options)
            except OwnOutputError as exc:
                raise OwnOutputError(path, exc.kind) from None
            except InputError as exc:
                raise InputError(str(exc).replace(str(local), path)) from None
        tables = [replace(t, source=path + (f"[{t.sheet}]" if t.sheet is not None else ""), location=path)
                  for t in tables]
        return tables, [replace(s, source=s.source.replace(str(local), path)) for s in passed]
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        kind = own_file_kind(path) if path.is_file() else None
        if kind is not None:
            raise OwnOutputError(path, kind)
        raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; use {KINDS} file")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    passed: list[Skipped] = []
    try:
        if suffix in WORKBOOKS:
            tables, passed = _read_workbook(path, options)
        elif suffix in TEXT_TABLES:
            tables = [_read_csv(path, options)]
        else:
            _check_parquet(path)
            metadata = pq.read_schema(path).metadata
            df = pl.read_parquet(path)
            if (kind := results_kind(df, metadata)) is not None:
                raise OwnOutputError(path, kind)
            tables = [Table(str(path), path, df)]
    except InputError:
        raise
    except Exception as exc:  # polars/pyarrow/fastexcel raise many unrelated types
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot read {suffix[1:]} file: {detail[:200]}") from None
    return [_checked(table, str(path)) for table in tables], passed


def _checked(table: Table, location: str) -> Table:
    """Every table read, from a file or handed in as a DataFrame, passes the same checks:
    not a table this tool wrote, headers trimmed, unnamed columns dropped, cells capped."""
    if (kind := results_kind(table.df)) is not None:
        raise OwnOutputError(table.source, kind)
    for i, name in enumerate(table.df.columns):  # Arrow's C interface (writing any table) panics on one
        if "\x00" in name:
            raise InputError(f"{table.source}: column {i + 1}'s header {name[:40]!r} holds a NUL character; "
                             "rename it")
    df = table.df.rename({c: c.strip() for c in table.df.columns if c != c.strip()})
    df = drop_unnamed(table, df)
    df, notes = cap_cells(df, table)
    return replace(table, df=df, notes=notes, location=location)


def frame_table(source: str, df: pl.DataFrame) -> Table:
    """A DataFrame handed to the Python API, as one more input named ``source``: read as
    a Parquet file's rows are (typed columns, row 2 is its first row), with the same checks;
    relative image paths in it are relative to the working directory."""
    if not isinstance(df, pl.DataFrame):
        raise InputError(f"{source}: not a polars DataFrame ({type(df).__name__})")
    if any(not isinstance(c, str) for c in df.columns):  # polars names are str; be explicit anyway
        raise InputError(f"{source}: column names must be text")
    return _checked(Table(source, Path(source), df), "")


def _unnamed(name: str) -> bool:
    """A column without a header, as polars (``""``, ``_duplicated_N``) or fastexcel
    (``__UNNAMED__N``) names it."""
    return not name.strip() or name.startswith("__UNNAMED__") or re.fullmatch(r"_duplicated_\d+", name) is not None


def drop_unnamed(table: Table, df: pl.DataFrame) -> pl.DataFrame:
    """Excel leaves empty columns without a header behind (``prompt,duration,,,``): they
    hold nothing and are dropped. A column without a header that holds values is an error
    naming its position: its values would otherwise travel under a made-up name."""
    drop = []
    for i, name in enumerate(df.columns):
        if not _unnamed(name):
            continue
        col = df[name]
        filled = (col.str.strip_chars().fill_null("") != "") if col.dtype == pl.String else col.is_not_null()
        if filled.any():
            first = int(filled.arg_true()[0])
            if name.startswith("__UNNAMED__") and name[11:].isdigit():
                where = f"column {xlsx.column_letters(int(name[11:]))}"
            elif table.sheet is not None:
                where = f"column {xlsx.column_letters(table.first_col + i)}"
            else:
                where = f"column {i + 1}"
            value = str(col[first])[:40]
            raise InputError(f"{table.source}: {where} has no header but holds values (row {table.first_row + first}: "
                             f"{value!r}); give it a header, or delete the column")
        drop.append(name)
    return df.drop(drop) if drop else df


# -- CSV ------------------------------------------------------------------------------

def _read_csv(path: Path, options: ReadOptions) -> Table:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    source: Path | bytes = path
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # Excel's "Unicode text" export: UTF-16 with a BOM, usually tab-separated.
        source = path.read_bytes().decode("utf-16").encode("utf-8")
    elif options.encoding is not None and not head.startswith(codecs.BOM_UTF8):
        source = _transcode(path, options.encoding)
    else:
        _check_utf8(path)
    if isinstance(source, bytes):
        head = source[: 1 << 16]
    text = head.decode("utf-8", errors="replace").removeprefix("\ufeff")
    sep_line = SEP_LINE.match(text)
    if sep_line:  # Excel's "sep=;" first line names the delimiter (and Excel does not show it)
        separator = sep_line.group(1)
        text = text[sep_line.end():]
    else:
        separator = "\t" if path.suffix.lower() == ".tsv" else _sniff(text, options.prompt_names or DEFAULT_PROMPT_NAMES)
    records = list(itertools.islice(csv.reader(io.StringIO(text), delimiter=separator), HEAD_ROWS))
    skip = _header_index(path, [[str(c) for c in r] for r in records], options)
    duplicate_header(path, records[skip] if skip < len(records) else [])
    try:
        df = pl.read_csv(source, separator=separator, infer_schema=False, raise_if_empty=False,
                         skip_rows=skip + (1 if sep_line else 0))
    except pl.exceptions.ComputeError as exc:
        if "more fields" in str(exc):
            raise InputError(f"{path}: {_ragged_line(source, separator, skip + (1 if sep_line else 0))}") from None
        raise
    if separator == ";":
        df = _decimal_commas(df)
    return Table(str(path), path, df, first_row=skip + 2)


SEP_LINE = re.compile(r"sep=(.)\r?\n", re.IGNORECASE)
_COMMA_NUMBER = r"^\s*[+-]?\d+(,\d+)?\s*$"


def _decimal_commas(df: pl.DataFrame) -> pl.DataFrame:
    """In a ``;``-separated file (a decimal-comma locale's export) a column of numbers
    written ``5,0`` holds numbers: written with a point for the validator. Only columns
    whose every value is such a number: a prompt saying ``3,5`` is never touched."""
    fixed = []
    for name, dtype in df.schema.items():
        if dtype != pl.String:
            continue
        col = df[name].drop_nulls()
        if col.len() and col.str.contains(_COMMA_NUMBER).all() and col.str.contains(",", literal=True).any():
            fixed.append(pl.col(name).str.replace(",", ".", literal=True))
    return df.with_columns(fixed) if fixed else df


def _header_index(path: Path, records: list[list[str]], options: ReadOptions) -> int:
    """Which of the first records is the header: ``--header-row``, else the first one
    holding a prompt column (title rows above it are common), else the first."""
    if options.header_row is not None:
        if options.header_row > len(records) and options.header_row > HEAD_ROWS:
            raise InputError(f"{path}: --header-row {options.header_row}: only the first {HEAD_ROWS} rows are "
                             "searched for the header")
        if options.header_row > len(records):
            raise InputError(f"{path}: --header-row {options.header_row}: the file has {len(records)} rows")
        return options.header_row - 1
    for labels in (False, True):
        for i, record in enumerate(records):
            if names_prompt(record, options.prompt_names, labels):
                return i
    return 0


def names_prompt(cells: Iterable[str], names: frozenset[str], labels: bool = True) -> bool:
    """Whether a row holds a prompt column's header. ``Prompt:`` is a title row's label
    ("Prompt: December campaign"): a header row without the colon below it wins
    (``labels=False`` first), and it is the header only when no such row is there."""
    return any(header_name(c) in names and (labels or not str(c).rstrip().endswith(":")) for c in cells)


def _check_utf8(path: Path) -> None:
    """UTF-8 or an error that says how to read the file: nothing is guessed, since a wrong
    guess silently changes the prompt (``é`` read as cp1252 vs latin-1 vs...)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                line = lines + chunk[: max(exc.start, 0)].count(b"\n") + 1
                bad = chunk[exc.start:exc.start + 1].hex() if 0 <= exc.start < len(chunk) else "?"
                raise InputError(
                    f"{path}: line {line} is not UTF-8 (byte 0x{bad}): give its encoding, e.g. --encoding cp1252 "
                    "(Excel's 'CSV' on Windows), or save it as UTF-8 (Excel: 'CSV UTF-8')") from None
            lines += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputError(f"{path}: ends inside a UTF-8 character: give its encoding with --encoding, "
                             "or save it as UTF-8 (Excel: 'CSV UTF-8')") from None


def _transcode(path: Path, encoding: str) -> bytes:
    """A file in the encoding the user named, as UTF-8 (an undecodable byte is an error)."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InputError(f"--encoding {encoding}: unknown encoding (e.g. cp1252, latin-1, utf-16)") from None
    data = path.read_bytes()
    try:
        return data.decode(encoding).encode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line} is not {encoding} (byte 0x{data[exc.start:exc.start + 1].hex()})"
                         ) from None


def _sniff(text: str, names: frozenset[str] = DEFAULT_PROMPT_NAMES) -> str:
    """The delimiter, of ``,`` ``;`` and tab: the one under which a row has a prompt column
    (a header ``prompt;Notes, remarks`` is no comma file), and of those (or of all, when
    none has) the one whose count on that header line the most lines below repeat, then
    the most frequent. Quotes are honoured; the choice only splits, never edits, a cell."""
    best, best_key = ",", (0, 0)
    split = {d: list(itertools.islice(csv.reader(io.StringIO(text), delimiter=d), 50)) for d in DELIMITERS}
    header = {d: next((i for i, r in enumerate(records) if any(header_name(c) in names for c in r)), None)
              for d, records in split.items()}
    found = [d for d in DELIMITERS if header[d] is not None]
    for d in found or DELIMITERS:
        records = split[d]
        at = header[d] or 0
        width = len(records[at]) - 1 if at < len(records) else 0
        if width <= 0:
            continue
        agree = sum(1 for r in records[at + 1:] if len(r) - 1 == width)
        if (agree, width) > best_key:
            best, best_key = d, (agree, width)
    return best


def _ragged_line(source: Path | bytes, separator: str, skip: int = 0) -> str:
    """Which record has more fields than the header (only run when polars says one does)."""
    handle = io.StringIO(source.decode("utf-8", "replace")) if isinstance(source, bytes) \
        else open(source, encoding="utf-8-sig", errors="replace", newline="")  # noqa: SIM115
    with handle:
        reader = csv.reader(handle, delimiter=separator)
        for _ in range(skip):  # a sep= line, title rows
            next(reader, None)
        width = len(next(reader, []))
        for record in reader:
            if len(record) > width:
                return (f"line {reader.line_num} has {len(record)} fields, the header has {width} "
                        f"(a delimiter inside an unquoted cell?)")
    return "a line has more fields than the header"


def duplicate_header(path: Path, header: Iterable[object]) -> None:
    """Two columns with one name: which one would be the prompt? An error, not a guess."""
    names = [str(h).strip() for h in header if h is not None and str(h).strip()]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise InputError(f"{path}: column {dups[0]!r} appears more than once in the header")


# -- Parquet ---------------------------------------------------------------------------

def _check_parquet(path: Path) -> None:
    meta = pq.ParquetFile(path).metadata
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if size > MAX_PARQUET_BYTES:
        raise InputError(f"{path}: holds {size >> 30} GiB of uncompressed data, more than the "
                         f"{MAX_PARQUET_BYTES >> 30} GiB read at once; split it")


# -- Excel -----------------------------------------------------------------------------

def _shown(sheets: list[xlsx.SheetInfo]) -> str:
    return ", ".join(f"{i}: {s.name}" + ("" if s.state == "visible" else f" ({s.state})")
                     for i, s in enumerate(sheets, 1))


def _pick_sheet(path: Path, sheets: list[xlsx.SheetInfo], wanted: str) -> xlsx.SheetInfo:
    if wanted.strip().isdigit():
        n = int(wanted)
        if not 1 <= n <= len(sheets):
            raise InputError(f"{path}: no sheet number {wanted} (sheets are numbered from 1: {_shown(sheets)})")
        return sheets[n - 1]
    for s in sheets:
        if s.name == wanted or s.name.strip().lower() == wanted.strip().lower():
            return s
    raise InputError(f"{path}: no sheet named {wanted!r} (sheets: {_shown(sheets)})")


def _named_sheets(path: Path, sheets: list[xlsx.SheetInfo], wanted: str) -> list[xlsx.SheetInfo]:
    """``--sheet NAME``, ``--sheet 2`` or a comma list of them (a name with a comma is
    taken whole first)."""
    if any(s.name == wanted for s in sheets) or "," not in wanted:
        return [_pick_sheet(path, sheets, wanted)]
    picked = [_pick_sheet(path, sheets, part.strip()) for part in wanted.split(",") if part.strip()]
    return list(dict.fromkeys(picked))


def _find_header(scan: xlsx.SheetScan, texts: dict[int, str], options: ReadOptions) -> int | None:
    """The sheet row of the header: ``--header-row``, else the first head row holding a
    prompt column; ``None`` when no head row holds one."""
    if options.header_row is not None:
        return options.header_row
    for labels in (False, True):
        for row in sorted(scan.head):
            if names_prompt(scan.row_texts(row, texts).values(), options.prompt_names, labels):
                return row
    return None


def _read_workbook(path: Path, options: ReadOptions) -> tuple[list[Table], list[Skipped]]:
    """The sheets to read (``--sheet``; by default the visible sheets holding a prompt
    column: one is read, several are refused, none falls back to the first visible one
    unless a prompt column is required), each from its header row."""
    passed: list[Skipped] = []
    with xlsx.open_workbook(path) as zf:
        sheets = xlsx.list_sheets(zf)
        if not sheets:
            raise InputError(f"{path}: the workbook lists no sheets")
        visible = [s for s in sheets if s.state == "visible"]
        wanted = options.sheet
        every = wanted is not None and wanted.strip().lower() == "all" and not any(s.name == wanted for s in sheets)
        candidates = visible if wanted is None or every else _named_sheets(path, sheets, wanted)
        styles = xlsx.date_styles(zf)
        trusted = not xlsx.values_are_placeholders(zf)
        scans = {s.name: xlsx.scan_sheet(zf, s.part, styles, CELL_CHARS, trusted) for s in candidates}
        wanted_strings = set().union(*(sc.header_strings() for sc in scans.values()))
        try:
            oversized, texts = xlsx.shared_strings(zf, CELL_CHARS, wanted_strings)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
        headers = {name: _find_header(sc, texts, options) for name, sc in scans.items()}
        with_prompt = [s for s in candidates if headers[s.name] is not None and options.prompt_names
                       and any(header_name(t) in options.prompt_names
                               for t in scans[s.name].row_texts(headers[s.name] or 0, texts).values())]
        if wanted is None or every:
            if not visible:
                raise InputError(f"{path}: no visible sheet (sheets: {_shown(sheets)})")
            if len(with_prompt) > 1 and not every:
                names = ", ".join(repr(s.name) for s in with_prompt)
                raise InputError(f"{path}: sheets {names} each have a prompt column: name the ones to read with "
                                 "--sheet NAME, --sheet 'NAME,NAME' or --sheet all")
            # One visible sheet without a prompt column is read from its first row: the
            # column mapping then says what it lacks (and may map another header to prompt).
            if not with_prompt and options.prompt_names and len(visible) > 1:
                looked = ", ".join(repr(s.name) for s in visible)
                hidden = [s.name for s in sheets if s.state != "visible"]
                raise InputError(f"{path}: no sheet has a 'prompt' column in its first {HEAD_ROWS} rows (looked at "
                                 f"{looked}" + (f"; hidden, not read: {', '.join(map(repr, hidden))}" if hidden else "")
                                 + "); name the header row with --header-row N, or the sheet with --sheet")
            chosen = with_prompt or visible[:1]
            passed = [Skipped(f"{path}[{s.name}]", "no prompt column") for s in visible
                      if s not in chosen and (every or len(visible) > 1)]
            # Hidden sheets are never read unless named (`all` means the visible ones: a
            # hidden sheet is often an old or a helper copy), but never passed over unsaid.
            passed += [Skipped(f"{path}[{s.name}]", f"hidden sheet, not read; --sheet {shlex.quote(s.name)} reads it")
                       for s in sheets if s.state != "visible"]
        else:
            chosen = candidates
        for info in chosen:
            header = headers[info.name] or scans[info.name].first_row or 1
            if options.header_row is not None and header not in scans[info.name].head:
                raise InputError(f"{path}[{info.name}]: --header-row {header}: that row is empty or not among the "
                                 f"first {HEAD_ROWS} rows with values")
            duplicate_header(f"{path}[{info.name}]", scans[info.name].row_texts(header, texts).values())
            _check_extent(f"{path}[{info.name}]", scans[info.name])
        readable = xlsx.sanitized_copy(zf, oversized) if oversized else path
    try:
        reader = fastexcel.read_excel(readable)
        tables = [_sheet_table(path, reader, sheets.index(info), info, scans[info.name],
                               headers[info.name] or scans[info.name].first_row or 1) for info in chosen]
    finally:
        if readable != path:
            readable.unlink(missing_ok=True)
    return tables, passed


def _check_extent(where: str, scan: xlsx.SheetScan) -> None:
    """Refuse a sheet fastexcel would read into more than :data:`xlsx.MAX_CELLS` cells
    (calamine holds every cell from A1 to the farthest one): that file only, before it can
    take the process's memory (one cell at XFD1048576 aborted the run)."""
    if scan.far is not None:
        row, col = scan.far
        raise InputError(f"{where}: a cell at {xlsx.column_letters(col)}{row} makes the sheet {row:,} rows x "
                         f"{col + 1:,} columns, more than the {xlsx.MAX_CELLS:,} cells read from one sheet; delete "
                         "what is below and right of the table, or export it as CSV")
    if scan.cells > xlsx.MAX_CELLS:
        raise InputError(f"{where}: {scan.cells:,} cells, more than the {xlsx.MAX_CELLS:,} cells read from one "
                         "sheet; split it or export it as CSV")


def _sheet_table(path: Path, reader: fastexcel.ExcelReader, index: int, info: xlsx.SheetInfo,
                 scan: xlsx.SheetScan, header: int) -> Table:
    # fastexcel's header_row is the 0-based sheet row (rows above it are skipped).
    sheet = reader.load_sheet(index, header_row=header - 1)
    columns = {c.absolute_index: c.name for c in sheet.available_columns()}
    df = sheet.to_polars()
    where = f"{path}[{info.name}]"
    first_row = header + 1
    notes: dict[tuple[int, str], str] = {}

    def at(row: int, col: int) -> tuple[int, str] | None:
        name = columns.get(col)
        index = row - first_row
        return (index, name) if name is not None and 0 <= index < df.height else None

    for row, col in scan.formulas:
        if (key := at(row, col)) is not None:
            notes[key] = (f"cell {xlsx.column_letters(col)}{row} is a formula without a saved value (the file was "
                          "written by a program that does not calculate, or asks to be recalculated when opened): "
                          "open it in Excel and save it, or paste values")
    for r1, c1, r2, c2, ref in scan.merged:
        for row in range(r1, r2 + 1):
            for col in range(c1, c2 + 1):
                if (row, col) != (r1, c1) and (key := at(row, col)) is not None:
                    notes[key] = (f"cell {xlsx.column_letters(col)}{row} is inside merged cells {ref}: its value "
                                  f"belongs to row {r1} only; unmerge and fill the cells")
    for (row, col), length in scan.inline_oversized.items():
        if (key := at(row, col)) is not None:
            notes[key] = _oversized(f"cell {xlsx.column_letters(col)}{row}", length)
    # One comprehension, no call per cell: a sheet of numbers has a kind for each of them.
    last_row = first_row + df.height
    kinds = {(row - first_row, columns[col]): kind for (row, col), kind in scan.types.items()
             if col in columns and first_row <= row < last_row}
    col_of = {name: col for col, name in columns.items()}
    for (index, name), kind in kinds.items():
        if kind == "date" and (index, name) not in notes and (hint := _ratio_hint(df[name][index])):
            notes[(index, name)] = f"cell {xlsx.column_letters(col_of[name])}{index + first_row} {hint}"
    return Table(where, path, df, first_row, notes, kinds, info.name, min(columns) if columns else 0)


_EXCEL_TIME = re.compile(r"(?:1899-12-3[01][ T])?(\d\d):(\d\d)(?::00(?:\.0+)?)?")


def _ratio_hint(value: object) -> str | None:
    """Excel turns ``16:9`` typed into a cell into the time 16:09: say so, not just 'no text'."""
    hours = minutes = None
    if isinstance(value, str) and (m := _EXCEL_TIME.fullmatch(value.strip())):
        hours, minutes = int(m.group(1)), int(m.group(2))  # a mixed column: fastexcel gives text
    elif isinstance(value, dt.timedelta) and value < dt.timedelta(days=1):
        hours, minutes = divmod(int(value.total_seconds()) // 60, 60)
    elif isinstance(value, dt.time) or (isinstance(value, dt.datetime)
                                        and value.date() in (dt.date(1899, 12, 31), dt.date(1899, 12, 30))):
        hours, minutes = value.hour, value.minute
    if hours is None or minutes is None or not (1 <= hours <= 21 and 1 <= minutes <= 21):
        return None
    return (f"holds the time {hours:02d}:{minutes:02d}, which is how Excel stores {hours}:{minutes} typed into a cell: "
            f"format the column as Text and type {hours}:{minutes} again")


# -- cells -----------------------------------------------------------------------------

def _oversized(where: str, length: int) -> str:
    return f"{where} holds {length:,} characters, more than the {CELL_CHARS:,} a cell may hold (a prompt is at most 2,000)"


def cap_cells(df: pl.DataFrame, table: Table) -> tuple[pl.DataFrame, dict[tuple[int, str], str]]:
    """Empty every text cell over :data:`CELL_CHARS` characters (and the markers of a
    sanitized workbook), noting each on the table, so nothing downstream holds them."""
    notes = dict(table.notes)
    replaced = []
    for name, dtype in df.schema.items():
        if dtype != pl.String:
            continue
        col = df[name]
        if (col.str.len_bytes().max() or 0) <= CELL_CHARS and not col.str.starts_with(xlsx.MARKER).any():
            continue  # bytes >= characters: nothing here can be over the cap
        lengths = col.str.len_chars()
        for index in (lengths > CELL_CHARS).arg_true().to_list() + col.str.starts_with(xlsx.MARKER).arg_true().to_list():
            value = col[index]
            length = int(value.removeprefix(xlsx.MARKER)) if value.startswith(xlsx.MARKER) else len(value)
            notes[(index, name)] = _oversized(f"cell {table.cell(index, name)}", length)
        replaced.append(pl.when((lengths > CELL_CHARS) | col.str.starts_with(xlsx.MARKER))
                        .then(None).otherwise(pl.col(name)).alias(name))
    return (df.with_columns(replaced) if replaced else df), notes
