"""file → rows: read CSV, Parquet and Excel inputs into polars DataFrames.

CSV is read with every column as text: spreadsheets export integers as ``5.0``,
booleans as ``yes`` and lists as ``16:9|9:16``, and :mod:`batch.validate` interprets
those per field, so type inference here could only lose information (leading zeros in
an ``id``, say). Parquet and Excel keep their own types.
"""

from __future__ import annotations

import glob as globmod
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from batch.errors import InputError

SUFFIXES = (".csv", ".parquet", ".xlsx")


@dataclass(frozen=True)
class Table:
    """The rows of one input file. ``source`` is the file name shown in results."""

    source: str
    path: Path
    df: pl.DataFrame


def resolve_inputs(specs: Iterable[str]) -> list[Path]:
    """Expand directories and globs into input files, in a stable (sorted) order."""
    paths: list[Path] = []
    for spec in specs:
        if any(ch in spec for ch in "*?["):
            matches = sorted(Path(p) for p in globmod.glob(spec, recursive=True))
            found = [p for p in matches if p.suffix.lower() in SUFFIXES and p.is_file()]
            if not found:
                raise InputError(f"{spec}: no .csv, .parquet or .xlsx file matches")
            paths.extend(found)
        elif os.path.isdir(spec):
            found = sorted(
                p for p in Path(spec).iterdir() if p.suffix.lower() in SUFFIXES and p.is_file()
            )
            if not found:
                raise InputError(f"{spec}: directory holds no .csv, .parquet or .xlsx file")
            paths.extend(found)
        else:
            paths.append(Path(spec))
    seen: set[Path] = set()
    unique = []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def load_table(path: Path, sheet: str | None = None) -> Table:
    """Read one input file; any failure is an :class:`InputError` naming the file."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv, .parquet or .xlsx")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        if suffix == ".csv":
            df = pl.read_csv(path, infer_schema=False, raise_if_empty=False)
        elif suffix == ".parquet":
            df = pl.read_parquet(path)
        else:
            df = _read_excel(path, sheet)
    except InputError:
        raise
    except Exception as exc:  # polars/pyarrow/fastexcel raise many unrelated types
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "utf-8" in detail.lower() or "utf8" in detail.lower():
            detail += " (save it as UTF-8: in Excel, 'CSV UTF-8')"
        raise InputError(f"{path}: cannot read {suffix[1:]} file: {detail[:200]}") from None
    df = df.rename({c: c.strip() for c in df.columns if c != c.strip()})
    return Table(source=path.name, path=path, df=df)


def _read_excel(path: Path, sheet: str | None) -> pl.DataFrame:
    if sheet is None:
        return pl.read_excel(path, sheet_id=1, drop_empty_rows=False)
    if sheet.isdigit():
        return pl.read_excel(path, sheet_id=int(sheet), drop_empty_rows=False)
    try:
        return pl.read_excel(path, sheet_name=sheet, drop_empty_rows=False)
    except Exception as exc:
        if "not found" in str(exc).lower() or "sheet" in str(exc).lower():
            raise InputError(f"{path}: no sheet named {sheet!r}") from None
        raise


def load_inputs(specs: Iterable[str], sheet: str | None = None) -> list[Table]:
    paths = resolve_inputs(specs)
    if not paths:
        raise InputError("no input files given")
    return [load_table(p, sheet) for p in paths]
