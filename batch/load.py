"""file → rows: read CSV, Parquet and Excel inputs into polars DataFrames.

CSV is read with every column as text: spreadsheets export integers as ``5.0``,
booleans as ``yes`` and lists as ``16:9|9:16``, and :mod:`batch.validate` interprets
those per field, so type inference here could only lose information (leading zeros in
an ``id``, say). Parquet and Excel keep their own types.

Guarantees:

* **One unreadable file does not cost the night**: :func:`load_inputs` returns the
  tables it could read and, for each file it could not, one line saying why.
* **Files as people export them**: CSV with ``,``, ``;`` or tab delimiters, UTF-8 with or
  without BOM or UTF-16 ("Unicode text"); a ragged line is named; Excel lock files
  (``~$*``) and hidden files are skipped in directories and globs; the default sheet is
  the first *visible* one, and a bad sheet name lists the sheets.
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
import glob as globmod
import io
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import fastexcel
import polars as pl
import pyarrow.parquet as pq

from batch import storage, xlsx
from batch.errors import InputError

SUFFIXES = (".csv", ".parquet", ".xlsx")
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


def _skipped(path: Path) -> bool:
    """Excel's lock files (``~$name.xlsx``) and hidden files are never inputs."""
    return path.name.startswith(("~$", "."))


def resolve_inputs(specs: Iterable[str]) -> tuple[list[Path | str], list[Unreadable]]:
    """Expand directories, prefixes and globs into input files or objects, in a stable
    (sorted) order."""
    paths: list[Path | str] = []
    missing: list[Unreadable] = []
    for spec in specs:
        if storage.is_remote(spec):
            try:
                objects = storage.list_objects(spec, SUFFIXES)
            except InputError as exc:
                missing.append(Unreadable(spec, str(exc).removeprefix(f"{spec}: ")))
                continue
            if not objects:
                missing.append(Unreadable(spec, "no .csv, .parquet or .xlsx object matches"))
            paths.extend(objects)
        elif any(ch in spec for ch in "*?["):
            matches = sorted(Path(p) for p in globmod.glob(spec, recursive=True))
            found = [p for p in matches if p.suffix.lower() in SUFFIXES and p.is_file() and not _skipped(p)]
            if not found:
                missing.append(Unreadable(spec, "no .csv, .parquet or .xlsx file matches"))
            paths.extend(found)
        elif os.path.isdir(spec):
            found = sorted(p for p in Path(spec).iterdir()
                           if p.suffix.lower() in SUFFIXES and p.is_file() and not _skipped(p))
            if not found:
                missing.append(Unreadable(spec, "directory holds no .csv, .parquet or .xlsx file"))
            paths.extend(found)
        else:
            paths.append(Path(spec))
    seen: set[Path | str] = set()
    unique = []
    for p in paths:
        key = p if isinstance(p, str) else p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, missing


def load_inputs(specs: Iterable[str], sheet: str | None = None) -> tuple[list[Table], list[Unreadable]]:
    """Every readable input, and one :class:`Unreadable` per input that is not."""
    paths, failed = resolve_inputs(specs)
    tables = []
    for path in paths:
        try:
            tables.append(load_table(path, sheet))
        except InputError as exc:
            failed.append(Unreadable(str(path), str(exc).removeprefix(f"{path}: ")))
    if not tables:
        if failed:
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise InputError(f"{failed[0].source}: {failed[0].error}{more}; nothing could be loaded")
        raise InputError("no input files given")
    return tables, failed


def load_table(path: Path | str, sheet: str | None = None) -> Table:
    """Read one input file or object; any failure is an :class:`InputError` naming it."""
    if isinstance(path, str):  # an object: read from a local copy, named as given
        suffix = PurePosixPath(path).suffix.lower()
        if suffix not in SUFFIXES:
            raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv, .parquet or .xlsx")
        with storage.local_copy(path, suffix) as local:
            try:
                table = load_table(local, sheet)
            except InputError as exc:
                raise InputError(str(exc).replace(str(local), path)) from None
        source = path + (f"[{table.sheet}]" if table.sheet is not None else "")
        return replace(table, source=source, location=path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv, .parquet or .xlsx")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        if suffix == ".xlsx":
            table = _read_workbook(path, sheet)
        elif suffix == ".csv":
            table = Table(str(path), path, _read_csv(path))
        else:
            _check_parquet(path)
            table = Table(str(path), path, pl.read_parquet(path))
    except InputError:
        raise
    except Exception as exc:  # polars/pyarrow/fastexcel raise many unrelated types
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "utf-8" in detail.lower() or "utf8" in detail.lower():
            detail += " (save it as UTF-8: in Excel, 'CSV UTF-8')"
        raise InputError(f"{path}: cannot read {suffix[1:]} file: {detail[:200]}") from None
    df = table.df.rename({c: c.strip() for c in table.df.columns if c != c.strip()})
    df = drop_unnamed(table, df)
    df, notes = cap_cells(df, table)
    return replace(table, df=df, notes=notes, location=str(path))


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

def _read_csv(path: Path) -> pl.DataFrame:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    source: Path | bytes = path
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # Excel's "Unicode text" export: UTF-16 with a BOM, usually tab-separated.
        source = path.read_bytes().decode("utf-16").encode("utf-8")
        head = source[: 1 << 16]
    text = head.decode("utf-8", errors="replace").removeprefix("\ufeff")
    separator = _sniff(text)
    header = next(csv.reader(io.StringIO(text), delimiter=separator), []) if text else []
    duplicate_header(path, header)
    try:
        return pl.read_csv(source, separator=separator, infer_schema=False, raise_if_empty=False)
    except pl.exceptions.ComputeError as exc:
        if "more fields" in str(exc):
            raise InputError(f"{path}: {_ragged_line(source, separator)}") from None
        raise


def _sniff(text: str) -> str:
    """The delimiter of the header line: the most frequent of ``,`` ``;`` and tab outside quotes."""
    line, quoted = [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch in "\r\n" and not quoted:
            break
        elif not quoted:
            line.append(ch)
    counts = {d: line.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def _ragged_line(source: Path | bytes, separator: str) -> str:
    """Which record has more fields than the header (only run when polars says one does)."""
    handle = io.StringIO(source.decode("utf-8", "replace")) if isinstance(source, bytes) \
        else open(source, encoding="utf-8-sig", errors="replace", newline="")  # noqa: SIM115
    with handle:
        reader = csv.reader(handle, delimiter=separator)
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

def _pick_sheet(path: Path, sheets: list[xlsx.SheetInfo], wanted: str | None) -> xlsx.SheetInfo:
    shown = ", ".join(f"{i}: {s.name}" + ("" if s.state == "visible" else f" ({s.state})")
                      for i, s in enumerate(sheets, 1))
    if wanted is None:
        visible = [s for s in sheets if s.state == "visible"]
        if not visible:
            raise InputError(f"{path}: no visible sheet (sheets: {shown})")
        return visible[0]
    if wanted.strip().isdigit():
        n = int(wanted)
        if not 1 <= n <= len(sheets):
            raise InputError(f"{path}: no sheet number {wanted} (sheets are numbered from 1: {shown})")
        return sheets[n - 1]
    for s in sheets:
        if s.name == wanted or s.name.strip().lower() == wanted.strip().lower():
            return s
    raise InputError(f"{path}: no sheet named {wanted!r} (sheets: {shown})")


def _read_workbook(path: Path, wanted: str | None) -> Table:
    with xlsx.open_workbook(path) as zf:
        sheets = xlsx.list_sheets(zf)
        if not sheets:
            raise InputError(f"{path}: the workbook lists no sheets")
        info = _pick_sheet(path, sheets, wanted)
        where = f"{path}[{info.name}]"
        scan = xlsx.scan_sheet(zf, info.part, xlsx.date_styles(zf), CELL_CHARS)
        oversized, texts = xlsx.shared_strings(zf, CELL_CHARS, scan.header_strings())
        duplicate_header(where, scan.header_texts(texts))
        readable = xlsx.sanitized_copy(zf, oversized) if oversized else path
    try:
        reader = fastexcel.read_excel(readable)
        sheet = reader.load_sheet(sheets.index(info), header_row=0)
        columns = {c.absolute_index: c.name for c in sheet.available_columns()}
        df = sheet.to_polars()
    finally:
        if readable != path:
            readable.unlink(missing_ok=True)
    first_row = (scan.first_row or 1) + 1
    notes: dict[tuple[int, str], str] = {}
    kinds: dict[tuple[int, str], str] = {}

    def at(row: int, col: int) -> tuple[int, str] | None:
        name = columns.get(col)
        index = row - first_row
        return (index, name) if name is not None and 0 <= index < df.height else None

    for row, col in scan.formulas:
        if (key := at(row, col)) is not None:
            notes[key] = (f"cell {xlsx.column_letters(col)}{row} is a formula without a saved value (the file was "
                          "written by a program that does not calculate): open it in Excel and save it, or paste "
                          "values")
    for r1, c1, r2, c2, ref in scan.merged:
        for row in range(r1, r2 + 1):
            for col in range(c1, c2 + 1):
                if (row, col) != (r1, c1) and (key := at(row, col)) is not None:
                    notes[key] = (f"cell {xlsx.column_letters(col)}{row} is inside merged cells {ref}: its value "
                                  f"belongs to row {r1} only; unmerge and fill the cells")
    for (row, col), length in scan.inline_oversized.items():
        if (key := at(row, col)) is not None:
            notes[key] = _oversized(f"cell {xlsx.column_letters(col)}{row}", length)
    for (row, col), kind in scan.types.items():
        if (key := at(row, col)) is not None:
            kinds[key] = kind
    return Table(where, path, df, first_row, notes, kinds, info.name, min(columns) if columns else 0)


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
