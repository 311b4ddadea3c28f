"""rows → requests: expand each row into validated API requests.

A cell may hold several values (a Parquet list, a JSON array ``[1, 2]`` or a
``|``-separated list in text); a row becomes the cartesian product of its
multi-valued cells. Job-level parameters fill the fields a row leaves empty and
expand the same way. Every request is validated here (:func:`batch.validate.coerce`),
so an invalid one carries its error and is never sent.

Expansion is a generator: requests stream into the submitter and the results
writer without the whole job ever being materialised as Python objects.
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import polars as pl

from batch.api import DEFAULT_MODEL
from batch.errors import ConfigError, InputError
from batch.identity import content_key, with_repeat
from batch.load import Table
from batch.validate import DEFAULT_TIER, FIELD_NAMES, RuleError, coerce

T = TypeVar("T")

# Columns the results table defines itself; an input column of the same name is
# carried through as ``input_<name>`` so that nothing is silently overwritten.
RESULT_COLUMNS = (
    "request_id", "source", "row", "model", "endpoint", "status", "task_id", "error", "error_code",
    "http_status", "attempts", "submitted_at",
    "task_status", "resource_urls", "failure_reason", "completed_at", "local_paths", "download_error",
)


@dataclass(frozen=True)
class ExpandSpec:
    """Job-level expansion settings (CLI ``--param``/``--tier`` or a job file)."""

    params: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    tier: str = DEFAULT_TIER
    columns: Mapping[str, str] = field(default_factory=dict)  # input column -> API field
    prompt_template: str | None = None
    id_column: str = "id"
    model: str = DEFAULT_MODEL


@dataclass(slots=True)
class Request:
    """One expanded request. ``body`` is what would be sent (raw values when invalid).
    ``request_id`` is its content key (:mod:`batch.identity`); ``label`` the row's id."""

    request_id: str
    source: str
    row: int
    body: dict[str, Any]
    extra: dict[str, Any]
    error: str | None = None
    label: str | None = None
    model: str = DEFAULT_MODEL


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (``itertools.batched`` is Python 3.12+)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def parse_param(text: str) -> tuple[str, list[str]]:
    """Parse ``FIELD=V1[,V2...]``; the prompt is never split on commas."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or name not in FIELD_NAMES:
        raise ConfigError(
            f"--param {text!r}: expected FIELD=V1[,V2...] with FIELD one of {', '.join(FIELD_NAMES)}"
        )
    if name == "prompt":
        return name, [values]
    parts = [v.strip() for v in values.split(",")]
    if not all(parts):
        raise ConfigError(f"--param {text!r}: empty value in list")
    return name, parts


def cell_values(name: str, value: Any) -> list[Any]:
    """The values a cell holds: ``[]`` when empty, several when multi-valued."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    if hasattr(value, "to_list"):  # a polars Series from a list column
        return [v for v in value.to_list() if v is not None]
    if not isinstance(value, str):
        return [value]
    text = value.strip()
    if not text:
        return []
    if text[0] == "[" and text[-1] == "]":
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and (
            name != "prompt" or all(isinstance(v, str) for v in parsed)
        ):
            return [v for v in parsed if v is not None and v != ""]
    # A prompt may legitimately contain "|"; only other fields split on it.
    if name != "prompt" and "|" in text:
        return [part.strip() for part in text.split("|") if part.strip()]
    return [text]


def _template_fields(template: str) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"prompt_template: {exc}") from None
    bad = [n for n in names if not n.isidentifier() and not n.replace(" ", "_").isidentifier()]
    if "" in names or bad:
        raise ConfigError("prompt_template: placeholders must name a column, like {subject}")
    return names


def label_of(value: Any) -> str | None:
    """The row's id as a label: text, trimmed; ``None`` when empty."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


class Expander:
    """Iterable of :class:`Request` over the input tables, in input order.

    Iterating twice yields the same requests with the same ids (the occurrence
    counter restarts): a run that stopped early writes its results table that way.
    """

    def __init__(self, tables: Sequence[Table], spec: ExpandSpec) -> None:
        self.tables = list(tables)
        self.spec = spec
        self._template_cols = _template_fields(spec.prompt_template) if spec.prompt_template else []
        self._frames = [(t, self._prepare(t)) for t in self.tables]
        self.total_rows = sum(df.height for _, df in self._frames)
        self.rows_seen = 0  # rows read by the current iteration (for progress)

    def _prepare(self, table: Table) -> pl.DataFrame:
        """Apply the column mapping and check the columns a request needs."""
        df = table.df
        missing = [c for c in self.spec.columns if c not in df.columns]
        if missing:
            raise InputError(f"{table.path}: mapped column {missing[0]!r} not found (columns: {', '.join(df.columns)})")
        clash = [f"{src} -> {dst}" for src, dst in self.spec.columns.items() if dst in df.columns and dst != src]
        if clash:
            raise InputError(f"{table.path}: column mapping {clash[0]}: the file already has a column of that name")
        if self.spec.columns:
            df = df.rename(dict(self.spec.columns))
        for col in self._template_cols:
            if col not in df.columns:
                raise InputError(f"{table.path}: prompt_template uses column {col!r}, which the file lacks")
        if "prompt" not in df.columns and not self._template_cols and "prompt" not in self.spec.params \
                and not self.spec.prompt_template:
            raise InputError(f"{table.path}: no 'prompt' column (columns: {', '.join(df.columns) or 'none'})")
        return df

    @property
    def extra_columns(self) -> list[str]:
        """Pass-through columns of all inputs, in first-seen order, as named in results."""
        return list(self.extra_dtypes)

    @property
    def extra_dtypes(self) -> dict[str, pl.DataType]:
        """Result dtype of each pass-through column; text where inputs disagree."""
        dtypes: dict[str, pl.DataType] = {}
        for _, df in self._frames:
            for name, dtype in df.schema.items():
                if name in FIELD_NAMES:
                    continue
                out = self.extra_name(name)
                if dtype == pl.Null():
                    dtype = pl.String()
                if out in dtypes and dtypes[out] != dtype:
                    dtype = pl.String()
                dtypes[out] = dtype
        return dtypes

    def extra_name(self, column: str) -> str:
        return f"input_{column}" if column in RESULT_COLUMNS else column

    def __iter__(self) -> Iterator[Request]:
        occurrences: dict[str, int] = {}
        self.rows_seen = 0
        for table, df in self._frames:
            yield from self._rows(table.source, df, occurrences)

    def _rows(self, source: str, df: pl.DataFrame, occurrences: dict[str, int]) -> Iterator[Request]:
        columns = df.columns
        field_idx = [(name, columns.index(name)) for name in FIELD_NAMES if name in columns]
        extra_idx = [(self.extra_name(c), i) for i, c in enumerate(columns) if c not in FIELD_NAMES]
        id_pos = columns.index(self.spec.id_column) if self.spec.id_column in columns else None
        tmpl_idx = [(c, columns.index(c)) for c in self._template_cols]
        params = {k: list(v) for k, v in self.spec.params.items()}
        params.setdefault("service_tier", [self.spec.tier])
        template = self.spec.prompt_template
        row_no = -1
        for chunk in df.iter_slices(10_000):
            self.rows_seen += chunk.height
            for cells in chunk.iter_rows():
                row_no += 1
                if all(c is None or c == "" for c in cells):
                    continue  # a blank spreadsheet line is not a row
                choices: dict[str, list[Any]] = {}
                errors: list[str] = []
                for name, i in field_idx:
                    values = cell_values(name, cells[i])
                    if values:
                        choices[name] = values
                if template is not None:
                    try:
                        choices["prompt"] = [self._fill(template, tmpl_idx, cells)]
                    except RuleError as exc:
                        errors.append(str(exc))
                for name, values in params.items():
                    if name not in choices:
                        choices[name] = values
                if "prompt" not in choices and not errors:
                    errors.append("prompt: missing (empty cell)")
                extra = {name: cells[i] for name, i in extra_idx}
                row_id = cells[id_pos] if id_pos is not None else None
                names = list(choices)
                for combo in itertools.product(*(choices[n] for n in names)):
                    yield self._make(dict(zip(names, combo, strict=True)), errors, source, row_no, extra, row_id,
                                     occurrences, self.spec.model)

    @staticmethod
    def _fill(template: str, tmpl_idx: list[tuple[str, int]], cells: tuple[Any, ...]) -> str:
        values = {}
        for col, i in tmpl_idx:
            value = cells[i]
            if value is None or (isinstance(value, str) and not value.strip()):
                raise RuleError("prompt_template", template, f"column {col!r} is empty in this row")
            values[col] = value
        return template.format_map(values)

    @staticmethod
    def _make(
        raw: dict[str, Any],
        row_errors: list[str],
        source: str,
        row_no: int,
        extra: dict[str, Any],
        row_id: Any,
        occurrences: dict[str, int],
        model: str,
    ) -> Request:
        errors = list(row_errors)
        body: dict[str, Any] = {}
        for name, value in raw.items():
            try:
                body[name] = coerce(name, value)
            except RuleError as exc:
                errors.append(str(exc))
        if errors:
            body = raw
        key = content_key(model, body)
        n = occurrences.get(key, 0)
        occurrences[key] = n + 1
        return Request(with_repeat(key, n), source, row_no, body, extra, "; ".join(errors) if errors else None,
                       label_of(row_id), model)
