"""rows → requests: expand each row into validated API requests.

A cell may hold several values (a Parquet list, a JSON array ``[1, 2]`` or a
``|``-separated list in text); a row becomes the cartesian product of its
multi-valued cells. For array-typed fields (``reference_images``...) a list is the
value itself, never an expansion. Job-level parameters fill the fields a row leaves
empty and expand the same way. Every request is validated here against its model's
specification (:class:`batch.validate.Validator`), so an invalid one carries its error
and is never sent.

Guarantees:

* **Headers as people type them** (:func:`map_columns`): ``Ratio``, ``Camera fixed``,
  ``camera-fixed`` and ``ID`` are the fields and the id column; a header *close* to a
  field name (``resoluton``) or two headers naming one field are errors before anything
  is sent, never a silent pass-through that sends the API's default.
* **A column a model does not have** is an error naming the model (or, in a sheet that
  mixes models, an invalid row), never silently dropped.
* **Cells that only look empty or only look like text** (formula without a saved value,
  merged cells, a number in a prompt column) make their row invalid, naming the cell.

Expansion is a generator: requests stream into the submitter and the results
writer without the whole job ever being materialised as Python objects.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import polars as pl
import structlog

from batch.api import DEFAULT_MODEL, whole_json
from batch.errors import ConfigError, InputError
from batch.identity import content_key, with_repeat
from batch.load import Table
from batch.models import Catalog, FieldSpec, ModelSpec, normalize_name
from batch.storage import is_remote
from batch.upload import IMAGE_FIELDS, URL_FIELDS, LocalImages
from batch.validate import DEFAULT_TIER, RuleError, Validator, to_bool, to_int

T = TypeVar("T")

# Columns the results table defines itself; an input column of the same name is
# carried through as ``input_<name>`` so that nothing is silently overwritten.
RESULT_COLUMNS = (
    "request_id", "source", "row", "model", "endpoint", "status", "task_id", "error", "error_code",
    "http_status", "attempts", "submitted_at", "as_written",
    "task_status", "resource_urls", "failure_reason", "completed_at", "local_paths", "download_error",
    "task_attempt", "earlier_task_ids",
)
MODEL_COLUMN = "model"
_KIND_WORDS = {"n": "a number", "b": "a boolean", "d": "a date", "date": "a date", "e": "an error value"}


log = structlog.get_logger("batch")
normalize = normalize_name  # how a header is matched: lower case, spaces and hyphens as underscores


@dataclass(frozen=True)
class ExpandSpec:
    """Job-level expansion settings (CLI ``--param``/``--tier`` or a job file)."""

    params: Mapping[str, Any] = field(default_factory=dict)  # field -> value(s) as written (--param text, TOML)
    tier: str = DEFAULT_TIER
    columns: Mapping[str, str] = field(default_factory=dict)  # input column -> API field (or the id column)
    prompt_template: str | None = None
    id_column: str | None = None  # None: a column named like "id", if there is one
    model: str = DEFAULT_MODEL
    passthrough: tuple[str, ...] = ()  # columns kept as they are although they resemble a field


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
    model: str = DEFAULT_MODEL  # as the user wrote it when it names no known model (the request is invalid)
    written: dict[str, Any] | None = None  # an invalid request's values as written (the ``as_written`` column)


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (``itertools.batched`` is Python 3.12+)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def split_list(text: str, name: str, array_field: bool = False) -> list[Any]:
    """The values a text holds: a JSON array, a ``|`` list (never for a prompt or an
    array field: a prompt may contain ``|``, an array field's value is the list)."""
    text = text.strip()
    if not text:
        return []
    if text[0] == "[" and text[-1] == "]":
        try:
            parsed = whole_json(json.loads(text))  # "\\ud800" is valid JSON, not text
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            if array_field:
                return [parsed]
            if name != "prompt" or all(isinstance(v, str) for v in parsed):
                return [v for v in parsed if v is not None and v != ""]
    if name != "prompt" and not array_field and "|" in text:
        return [part.strip() for part in text.split("|") if part.strip()]
    return [text]


def cell_values(name: str, value: Any, array_field: bool = False) -> list[Any]:
    """The values a cell holds: ``[]`` when empty, several when multi-valued."""
    if value is None:
        return []
    if hasattr(value, "to_list"):  # a polars Series from a list column
        value = value.to_list()
    if isinstance(value, (list, tuple)):
        items = [v for v in value if v is not None]
        if array_field:
            return [items] if items else []
        return items
    if not isinstance(value, str):
        return [value]
    return split_list(value, name, array_field)


def parse_param(text: str) -> tuple[str, str]:
    """``FIELD=VALUE`` of ``--param``; the value is read like a cell of that field later
    (:func:`param_values`), when the model says what the field is."""
    name, sep, value = text.partition("=")
    name = normalize(name)
    if not sep or not name:
        raise ConfigError(f"--param {text!r}: expected FIELD=V1[,V2...]")
    return name, value


def param_values(name: str, raw: Any, array_field: bool) -> list[Any]:
    """The values of a job-level parameter, each one request's: ``--param`` text takes the
    cell syntax (JSON array, ``|`` list) and also commas; a TOML list is a grid, except
    for an array field, whose value a flat list is (a list of lists is its grid)."""
    if isinstance(raw, str):
        text = raw.strip()
        if name == "prompt":
            return split_list(raw, name) or [raw]
        if array_field or text.startswith("[") or "|" in text:
            values = split_list(text, name, array_field)
        else:
            values = [v.strip() for v in text.split(",")]
        if not values or any(v == "" for v in values):
            raise ConfigError(f"--param {name}={raw!r}: empty value in list")
        return values
    if isinstance(raw, (list, tuple)):
        if array_field and not any(isinstance(v, (list, tuple)) for v in raw):
            return [list(raw)]
        return list(raw)
    return [raw]


def _template_fields(template: str) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"prompt_template: {exc}") from None
    bad = [n for n in names if not n.isidentifier() and not n.replace(" ", "_").isidentifier()]
    if "" in names or bad:
        raise ConfigError("prompt_template: placeholders must name a column, like {subject}")
    return names


def as_typed(spec: FieldSpec | None, value: Any) -> Any:
    """A value that broke its field's rule, in the field's JSON type if that type holds it
    exactly (``30`` frames, ``"15"`` seconds), else ``None``: never rounded or guessed."""
    if spec is None:
        return None
    try:
        if spec.type == "integer":
            return to_int(spec.name, "", value)
        if spec.type == "number":
            number = float(value.strip() if isinstance(value, str) else value)
            return number if not isinstance(value, bool) and math.isfinite(number) else None
        if spec.type == "boolean":
            return to_bool(spec.name, "", value)
    except (RuleError, TypeError, ValueError):
        return None
    if spec.type == "array":
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None
    return value if isinstance(value, str) else None


NUL_RULE = ("contains a NUL character (\\x00): no prompt, label or ledger can hold one (PostgreSQL refuses "
            "it in text); remove it")


def nul_errors(cells: tuple[Any, ...], named: list[tuple[int, str]]) -> list[str]:
    """A NUL in any cell the tool sends or stores makes the row invalid, in every store alike
    (SQLite would keep it, PostgreSQL refuses the whole write)."""
    if not any(isinstance(c, str) and "\x00" in c for c in cells):
        return []
    return [str(RuleError(name, cells[i], NUL_RULE)) for i, name in named
            if isinstance(cells[i], str) and "\x00" in cells[i]]


def label_of(value: Any) -> str | None:
    """The row's id as a label: text, trimmed; ``None`` when empty."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


@dataclass(frozen=True)
class ColumnMap:
    """How one table's columns are read."""

    fields: dict[str, str]  # column -> API field
    extra: dict[str, str]  # column -> its name in the results table
    id_column: str | None
    model_column: str | None
    template: dict[str, str]  # placeholder -> column
    models: tuple[str, ...]  # the models this table's columns are checked against (the default among them)
    named: tuple[str, ...] = ()  # the models its rows send to: the default only where a model cell is empty

    def describe(self) -> str:
        parts = [f"{c} -> {f}" for c, f in self.fields.items()]
        if self.id_column:
            parts.append(f"{self.id_column} -> id (label)")
        if self.model_column:
            parts.append(f"{self.model_column} -> model")
        parts += [f"{c} -> pass-through" for c in self.extra if c not in (self.id_column, self.model_column)]
        return ", ".join(parts)


def map_columns(table: Table, spec: ExpandSpec, catalog: Catalog) -> ColumnMap:
    """Match a table's headers to fields, the id column and the model column (see the
    module docstring); raise :class:`InputError` for a near miss or a duplicate."""
    where = table.source
    columns = list(table.df.columns)
    by_norm: dict[str, list[str]] = {}
    for c in columns:
        by_norm.setdefault(normalize(c), []).append(c)
    known = catalog.known_fields()
    aliases = catalog.aliases()
    explicit = {}
    for src, dst in spec.columns.items():
        matches = [src] if src in columns else by_norm.get(normalize(src), [])
        if not matches:
            raise InputError(f"{where}: mapped column {src!r} not found (columns: {', '.join(columns)})")
        explicit[matches[0]] = aliases.get(normalize(dst), normalize(dst))
    passthrough = {normalize(p) for p in spec.passthrough}
    id_norm = normalize(spec.id_column) if spec.id_column else "id"
    fields: dict[str, str] = {}
    id_column = model_column = None
    for c in columns:
        norm = explicit.get(c, normalize(c))
        if norm not in known and norm not in (id_norm, MODEL_COLUMN):
            norm = aliases.get(norm, norm)  # "Aspect Ratio", "Length (s)": the spec's synonyms
        if c in explicit and norm not in known and norm not in (id_norm, MODEL_COLUMN):
            raise InputError(f"{where}: [columns] maps {c!r} to {norm!r}, which is no API field, id or model")
        if normalize(c) in passthrough and c not in explicit:
            continue
        if norm == id_norm:
            if id_column is not None:
                raise InputError(f"{where}: columns {id_column!r} and {c!r} both name the id column")
            id_column = c
        elif norm == MODEL_COLUMN:
            if model_column is not None:
                raise InputError(f"{where}: columns {model_column!r} and {c!r} both name the model column")
            model_column = c
        elif norm in known:
            other = next((o for o, f in fields.items() if f == norm), None)
            if other is not None:
                raise InputError(f"{where}: columns {other!r} and {c!r} both name the field {norm!r}")
            fields[c] = norm
    if spec.id_column and id_column is None:
        raise InputError(f"{where}: id_column {spec.id_column!r} names no column (columns: {', '.join(columns)})")
    mapped = set(fields.values())
    taken = mapped | ({MODEL_COLUMN} if model_column else set()) | ({id_norm} if id_column else set())
    # A misspelt synonym ("Lenght (s)") is as silent as a misspelt field. Field names are
    # tried first; a synonym only if it is not a mere prefix or extension of the header
    # ("Second" is no misspelt "seconds") and not short ("res", "secs": ordinary words).
    names = sorted(known | {MODEL_COLUMN, id_norm})
    meaning = {a: f for a, f in aliases.items() if len(a) >= 6} | {n: n for n in names}
    for c in columns:
        norm = normalize(c)
        if c in fields or c in (id_column, model_column) or norm in passthrough:
            continue
        # A field's name in whole words wins over a spelling guess ("Video duration" is no
        # misspelt "video_ratio").
        name = field_named_within(c, known, aliases)
        if name is not None and name not in taken:
            raise InputError(
                f"{where}: column {c!r} names the field {name!r} in a form that is not its header, so its "
                f"values would not be sent: rename the header to {name!r}, or keep it as a pass-through "
                f"column with passthrough = [{c!r}] in the job file (or --passthrough {c!r})")
        close = [] if name is not None else difflib.get_close_matches(norm, names, n=1, cutoff=0.8) or [
            a for a in difflib.get_close_matches(norm, sorted(set(meaning) - set(names)), n=1, cutoff=0.8)
            if not (a.startswith(norm) or norm.startswith(a))]
        if close and meaning[close[0]] not in taken:
            name = meaning[close[0]]
            like = f"the field {name!r}" if close[0] == name else f"{close[0]!r}, a name of the field {name!r},"
            raise InputError(
                f"{where}: column {c!r} looks like {like} but is not it: rename the header to "
                f"{name!r}, or keep it as a pass-through column with passthrough = [{c!r}] in the job file "
                f"(or --passthrough {c!r})")
    models = {spec.model}
    sent = {spec.model}
    if model_column is not None:
        cells = [str(v).strip() for v in table.df[model_column].unique().to_list() if v is not None]
        models |= {v.lower() for v in cells if v}
        sent = {v.lower() for v in cells if v}
        if table.df[model_column].null_count() or "" in cells or not sent:
            sent.add(spec.model)  # a row without a model cell uses the default model
    usable = [m for m in models if catalog.find(m) is not None]
    for c, f in fields.items():
        if not catalog.with_field(f, usable) and usable:
            names = ", ".join(sorted(usable))
            raise InputError(f"{where}: column {c!r}: {names} {'has' if len(usable) == 1 else 'have'} no field {f!r}")
    template = {}
    for placeholder in _template_fields(spec.prompt_template) if spec.prompt_template else []:
        found = placeholder if placeholder in columns else next(iter(by_norm.get(normalize(placeholder), [])), None)
        if found is None:
            raise InputError(f"{where}: prompt_template uses column {placeholder!r}, which the file lacks")
        template[placeholder] = found
    _refuse_values_of_unnamed_fields(table, catalog, usable, taken, passthrough,
                                     set(fields) | {id_column, model_column, *template.values()})
    if "prompt" not in mapped and not template and "prompt" not in spec.params:
        raise InputError(f"{where}: no 'prompt' column (columns: {', '.join(columns) or 'none'})")
    extra = {c: (f"input_{c}" if c in RESULT_COLUMNS or c in known else c) for c in columns if c not in fields}
    return ColumnMap(fields, extra, id_column, model_column, template, tuple(sorted(models)), tuple(sorted(sent)))


def field_named_within(header: str, known: Iterable[str], aliases: Mapping[str, str]) -> str | None:
    """The one field a header names in a longer form (``Video duration (sec)``, ``Target
    resolution``, ``Fixed camera yes/no``: a field's name, or a synonym of several words,
    as whole words of it) or as an abbreviation (``Dur.``: a dotted prefix of at least 3
    letters of exactly one field's name); ``None`` when it names none, or several. One-word
    synonyms (``tier``, ``sound``) count only as the whole header: inside one they are
    ordinary words (``Customer tier``, ``Sound designer``)."""
    norm = normalize(header)
    words = norm.split("_")
    found = set()
    for name, target in [(f, f) for f in known] + [(a, f) for a, f in aliases.items() if "_" in a]:
        part = name.split("_")
        if len(part) < len(words) and any(words[i:i + len(part)] == part for i in range(len(words) - len(part) + 1)):
            found.add(target)
    if str(header).strip().endswith(".") and len(norm) >= 3 and norm.isalpha():
        found |= set(prefixed) if len(prefixed := [f for f in known if f.startswith(norm)]) == 1 else set()
    return found.pop() if len(found) == 1 else None


def _enum_values(catalog: Catalog, slugs: Sequence[str]) -> dict[str, set[str]]:
    """Each text field with a closed set of values (``ratio``, ``resolution``...) → its
    values as a cell may spell them (trimmed, lower case), over the given models."""
    found: dict[str, set[str]] = {}
    for slug in slugs:
        for name, f in catalog.get(slug).fields.items():
            if f.type == "string" and f.enum:
                found.setdefault(name, set()).update(str(v).strip().lower() for v in f.enum)
    return found


def _values(column: pl.Series) -> set[str]:
    """A text column's distinct values as a cell may spell a field's: trimmed, lower case,
    a ``|`` list split into its values (see :func:`split_list`)."""
    return {part.strip() for v in column.unique().to_list() for part in v.lower().split("|") if part.strip()}


def _fields_fitting(column: pl.Series, enums: dict[str, set[str]]) -> dict[str, set[str]]:
    """The fields whose values include every value of ``column`` (none for an empty one)."""
    values = _values(column) if column.n_unique() <= 1000 else None
    if not values:
        return {}
    return {f: allowed for f, allowed in enums.items() if values <= allowed}


def _refuse_values_of_unnamed_fields(table: Table, catalog: Catalog, slugs: Sequence[str], taken: set[str],
                                     passthrough: set[str], used: set[str | None]) -> None:
    """A column whose header names no field but whose every value is one of a field's
    values (``Format`` holding ``9:16``) was meant for that field: carried through, the
    video would silently get the API's default. An error naming the field, unless the
    field has its column already or the column is declared ``--passthrough``. The same
    for model names under another header (``Model name``): every row would silently use
    the default model."""
    enums = {f: v for f, v in _enum_values(catalog, slugs).items() if f not in taken}
    if MODEL_COLUMN not in taken:
        enums[MODEL_COLUMN] = {slug.lower() for slug in catalog.models}
    if not enums:
        return
    for c in table.df.columns:
        if c in used or normalize(c) in passthrough:
            continue
        column = table.df[c]
        if isinstance(column.dtype, pl.List) and column.dtype.inner in (pl.String, pl.Categorical):
            column = column.explode()  # a Parquet list cell: several values of one field
        if isinstance(column.dtype, (pl.Categorical, pl.Enum)):
            column = column.cast(pl.String)
        if column.dtype != pl.String:
            continue
        column = column.drop_nulls()
        # The first rows rule out nearly every column; only a column they fit is read whole.
        meant = _fields_fitting(column.head(500), enums)
        if meant:
            meant = _fields_fitting(column, meant)
        if meant:
            name = next(iter(meant))
            shown = ", ".join(sorted(_values(column.unique().head(20)))[:5])
            what = "the model column" if name == MODEL_COLUMN else f"the field {name!r}"
            raise InputError(
                f"{table.source}: column {c!r} holds only values of {what} ({shown}) but its header names no "
                f"field, so they would not be sent: rename the header to {name!r}, or keep it as a "
                f"pass-through column with passthrough = [{c!r}] in the job file (or --passthrough {c!r})")


@dataclass
class _Model:
    """What the expansion needs of one model, prepared once."""

    spec: ModelSpec
    validator: Validator
    params: dict[str, list[Any]]  # job-level values for the fields this model has
    arrays: frozenset[str]


@dataclass(frozen=True)
class _Layout:
    """Where one table's cells are, by position in a row tuple."""

    field_idx: list[tuple[str, int, str]]
    extra_idx: list[tuple[str, int]]
    id_pos: int | None
    model_pos: int | None
    tmpl_idx: list[tuple[str, int, str]]
    checked: list[tuple[str, str]]
    cell_checks: bool
    column_of: dict[str, str]  # field -> its column (where a local image's cell is)
    named: list[tuple[int, str]]  # what each column is called in an invalid row's error

    @classmethod
    def of(cls, table: Table, cmap: ColumnMap) -> _Layout:
        columns = table.df.columns
        field_idx = [(f, columns.index(c), c) for c, f in cmap.fields.items()]
        tmpl_idx = [(p, columns.index(c), c) for p, c in cmap.template.items()]
        checked = [(f, c) for f, _, c in field_idx] + [("prompt_template", c) for _, _, c in tmpl_idx] + \
            [(n, c) for n, c in (("id", cmap.id_column), ("model", cmap.model_column)) if c]
        names = {**{c: c for c in columns}, **cmap.extra, **cmap.fields,
                 **({cmap.id_column: "id"} if cmap.id_column else {}),
                 **({cmap.model_column: "model"} if cmap.model_column else {})}
        return cls(field_idx, [(out, columns.index(c)) for c, out in cmap.extra.items()],
                   columns.index(cmap.id_column) if cmap.id_column else None,
                   columns.index(cmap.model_column) if cmap.model_column else None,
                   tmpl_idx, checked, bool(table.notes or table.kinds), {f: c for f, _, c in field_idx},
                   [(i, names.get(c, c)) for i, c in enumerate(columns)])


class Expander:
    """Iterable of :class:`Request` over the input tables, in input order.

    Iterating twice yields the same requests with the same ids (the occurrence
    counter restarts): a run that stopped early writes its results table that way.
    """

    def __init__(self, tables: Sequence[Table], spec: ExpandSpec, catalog: Catalog | None = None) -> None:
        self.tables = list(tables)
        self.catalog = catalog or Catalog()
        self.spec = spec = replace(spec, params=self._resolve_params(spec.params))
        default = self.catalog.get(spec.model)
        self.maps = [map_columns(t, spec, self.catalog) for t in self.tables]
        headers = {normalize(c) for t in self.tables for c in t.df.columns}
        for name in dict.fromkeys(spec.passthrough):
            if self.tables and normalize(name) not in headers:  # a typo keeps nothing: say so
                log.warning("passthrough_unused", column=name, reason="no input has a column of that name")
        self._models: dict[str, _Model | None] = {}
        self._in_use: list[str] | None = None
        self._check_params(default)
        self.total_rows = sum(t.df.height for t in self.tables)
        self.rows_seen = 0  # rows read by the current iteration (for progress)
        self.images = LocalImages()  # local reference images, checked as rows expand (batch.upload)

    def _resolve_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Job-level values keyed by field, a synonym (``aspect_ratio``) read as its field."""
        resolved: dict[str, Any] = {}
        given: dict[str, str] = {}
        for name, value in params.items():
            field_name = self.catalog.resolve(name) or name
            if field_name in resolved:
                raise ConfigError(f"--param/params {given[field_name]} and {name} both name the field {field_name!r}")
            resolved[field_name] = value
            given[field_name] = name
        return resolved

    def _check_params(self, default: ModelSpec) -> None:
        """Every job-level value is valid for a model in use that has its field: a usage
        error before anything is sent, not a night of invalid rows."""
        for name, values in self.spec.params.items():
            if name not in self.catalog.known_fields():
                raise ConfigError(f"--param/params {name}: unknown API field (known: "
                                  f"{', '.join(sorted(self.catalog.known_fields()))})")
            having = self.catalog.with_field(name, [default.slug, *self.models_named])
            if not having:
                raise ConfigError(f"--param/params {name}: {default.slug} has no field {name!r}")
            prepared = self.model(having[0])
            assert prepared is not None
            for value in param_values(name, values, name in prepared.arrays):
                try:
                    prepared.validator.convert(name, value)
                except RuleError as exc:
                    raise ConfigError(f"--param/params {exc}") from None

    def model(self, slug: str) -> _Model | None:
        """The prepared model of a slug, or ``None`` for an unknown one."""
        if slug in self._models:
            return self._models[slug]
        spec = self.catalog.find(slug)
        prepared = None
        if spec is not None:
            arrays = frozenset(n for n, f in spec.fields.items() if f.type == "array")
            params = {k: param_values(k, v, k in arrays) for k, v in self.spec.params.items() if k in spec.fields}
            if "service_tier" in spec.fields:
                params.setdefault("service_tier", [self.spec.tier])
            prepared = _Model(spec, Validator(spec), params, arrays)
        self._models[slug] = prepared
        return prepared

    @property
    def models_named(self) -> list[str]:
        """Every known model the inputs may use: the default and each model cell's value
        (what a column or a job-level value must fit)."""
        return sorted({m for cmap in self.maps for m in cmap.models if self.catalog.find(m) is not None})

    @property
    def models_in_use(self) -> list[str]:
        """The models of the rows that will be sent (valid rows): what preflight, ``check``,
        the routes and ``--max-spend``'s prices are about. The default is not in use when
        every row names another model, nor a model only invalid rows name. One model named
        needs no pass over the rows; more take one expansion (cached)."""
        named = self.models_named
        if len(named) <= 1:
            return named
        if self._in_use is None:
            found = {r.model.strip().lower() for r in self if r.error is None}
            self._in_use = sorted(m for m in found if self.catalog.find(m) is not None)
        return self._in_use

    def field_types(self) -> dict[str, str]:
        """Each field of the models named and its JSON type; the default model's first."""
        types: dict[str, str] = {}
        for slug in [self.spec.model, *self.models_named]:
            for name, f in self.catalog.get(slug).fields.items():
                kind = f.type if f.type != "array" else f"array:{f.item.type if f.item else 'string'}"
                types[name] = kind if types.get(name, kind) == kind else "string"
        return types

    def passthrough_columns(self) -> dict[str, list[str]]:
        """Each input's columns carried into the results table but never sent (not the id
        or model column): a header that was meant for a field shows up here."""
        found: dict[str, list[str]] = {}
        for table, cmap in zip(self.tables, self.maps, strict=True):
            kept = [c for c in cmap.extra if c not in (cmap.id_column, cmap.model_column)]
            if kept:
                found.setdefault(table.source, []).extend(kept)
        return found

    def mapping_lines(self) -> list[str]:
        return [f"{t.source}: {m.describe()}" for t, m in zip(self.tables, self.maps, strict=True)]

    @property
    def extra_columns(self) -> list[str]:
        """Pass-through columns of all inputs, in first-seen order, as named in results."""
        return list(self.extra_dtypes)

    @property
    def extra_dtypes(self) -> dict[str, pl.DataType]:
        """Result dtype of each pass-through column; text where inputs disagree."""
        dtypes: dict[str, pl.DataType] = {}
        for table, cmap in zip(self.tables, self.maps, strict=True):
            for column, out in cmap.extra.items():
                dtype = table.df.schema[column]
                if dtype == pl.Null():
                    dtype = pl.String()
                if out in dtypes and dtypes[out] != dtype:
                    dtype = pl.String()
                dtypes[out] = dtype
        return dtypes

    def frames(self, schema: dict[str, pl.DataType]) -> Iterator[pl.DataFrame]:
        """The request frames of the expansion, built column-wise where rows allow
        (:mod:`batch.columns`): the same rows as ``request_frame(list(self))``."""
        from batch.columns import request_frames

        return request_frames(self, schema)

    def __iter__(self) -> Iterator[Request]:
        occurrences: dict[str, int] = {}
        self.rows_seen = 0
        for table, cmap in zip(self.tables, self.maps, strict=True):
            yield from self._rows(table, cmap, occurrences)

    def _cell_error(self, table: Table, index: int, column: str, name: str, text_field: bool) -> str | None:
        note = table.notes.get((index, column))
        if note is not None:
            return f"{name}: {note}"
        if text_field:
            kind = table.kinds.get((index, column))
            if kind is not None:
                return (f"{name}: must be text, but cell {table.cell(index, column)} holds "
                        f"{_KIND_WORDS.get(kind, 'no text')} (format the cell as text)")
        return None

    def _rows(self, table: Table, cmap: ColumnMap, occurrences: dict[str, int]) -> Iterator[Request]:
        at = _Layout.of(table, cmap)
        index = -1
        sheet = self._sheet(table)
        for chunk in table.df.iter_slices(10_000):
            for cells in chunk.iter_rows():
                index += 1
                # Per row, not per slice: progress scales what was queued by the share of rows
                # read, and a slice counted ahead made that share 1 while the queue was filling.
                self.rows_seen += 1
                yield from self._row(table, at, sheet, index, cells, occurrences)

    def rows_at(self, table: Table, cmap: ColumnMap, positions: list[int]) -> Iterator[tuple[int, Request]]:
        """The requests of the rows at ``positions`` (ascending), each with its row's
        position; request ids without their repeat count (the caller counts them in order,
        :mod:`batch.columns`)."""
        at = _Layout.of(table, cmap)
        sheet = self._sheet(table)
        for start in range(0, len(positions), 10_000):
            part = positions[start:start + 10_000]
            for index, cells in zip(part, table.df[part].iter_rows(), strict=True):
                for req in self._row(table, at, sheet, index, cells, None):
                    yield index, req

    @staticmethod
    def _sheet(table: Table) -> Any:
        """The folder a table's local image names are relative to (``None``: a bucket's)."""
        return None if table.location and is_remote(table.location) else table.path.parent

    def _row(self, table: Table, at: _Layout, sheet: Any, index: int, cells: tuple[Any, ...],
             occurrences: dict[str, int] | None) -> Iterator[Request]:
        field_idx, extra_idx, id_pos, model_pos, tmpl_idx = at.field_idx, at.extra_idx, at.id_pos, at.model_pos, \
            at.tmpl_idx
        template = self.spec.prompt_template
        default = self.spec.model
        if all(c is None or c == "" for c in cells):
            return  # a blank spreadsheet line is not a row
        slug, written_model, unsent = default, None, {}
        if model_pos is not None and cells[model_pos] is not None and str(cells[model_pos]).strip():
            slug = str(cells[model_pos]).strip().lower()
        prepared = self.model(slug)
        errors: list[str] = []
        if prepared is None:
            written_model = str(cells[model_pos]).strip()
            unsent["model"] = written_model
            errors.append(self._unknown_model(written_model))
            prepared = self.model(default)
            assert prepared is not None
        fields = prepared.spec.fields
        errors += nul_errors(cells, at.named)
        if at.cell_checks:
            for name, column in at.checked:
                spec_field = fields.get(name)
                problem = self._cell_error(table, index, column, name,
                                           name == "prompt_template" or bool(spec_field and spec_field.is_text))
                if problem is not None:
                    errors.append(problem)
        choices: dict[str, list[Any]] = {}
        for name, i, _ in field_idx:
            values = cell_values(name, cells[i], name in prepared.arrays)
            if values:
                if name not in fields:
                    errors.append(f"{name}: {prepared.spec.slug} has no field {name!r}")
                    unsent[name] = cells[i]
                    continue
                choices[name] = values
        if template is not None:
            try:
                choices["prompt"] = [self._fill(template, tmpl_idx, cells)]
            except RuleError as exc:
                errors.append(str(exc))
        for name, values in prepared.params.items():
            if name not in choices:
                choices[name] = values
        if "prompt" not in choices and "prompt" in fields and fields["prompt"].required and not errors:
            errors.append("prompt: missing (empty cell)")
        extra = {name: cells[i] for name, i in extra_idx}
        label = label_of(cells[id_pos]) if id_pos is not None else None
        names = list(choices)
        localize = self._localizer(table, sheet, at.column_of, index) \
            if (IMAGE_FIELDS | URL_FIELDS) & fields.keys() else None
        for combo in itertools.product(*(choices[n] for n in names)):
            yield self._make(dict(zip(names, combo, strict=True)), errors, table.source,
                             table.first_row + index, extra, label, occurrences, prepared, written_model,
                             unsent, localize)

    def _localizer(self, table: Table, sheet: Any, column_of: dict[str, str],
                   index: int) -> Callable[[dict[str, Any]], list[str]]:
        def where(field_name: str) -> str:
            return table.cell(index, column_of[field_name]) if field_name in column_of else "--param"
        return lambda body: self.images.localize(body, sheet, where)

    def _unknown_model(self, written: str) -> str:
        """The error of a model cell naming no known model, with the model it most likely
        means (``Seedance-1.5-Pro-T2V`` is ``bytedance/seedance-1.5-pro-t2v``)."""
        known = sorted(self.catalog.models)
        text = written.lower()
        meant = [s for s in known if s.partition("/")[2] == text] or \
            difflib.get_close_matches(text, known, n=1, cutoff=0.75)
        hint = f"did you mean {meant[0]!r}? " if meant else ""
        return f"model={written!r}: unknown model ({hint}known: {', '.join(known)})"

    @staticmethod
    def _fill(template: str, tmpl_idx: list[tuple[str, int, str]], cells: tuple[Any, ...]) -> str:
        values = {}
        for placeholder, i, column in tmpl_idx:
            value = cells[i]
            if value is None or (isinstance(value, str) and not value.strip()):
                raise RuleError("prompt_template", template, f"column {column!r} is empty in this row")
            values[placeholder] = value
        return template.format_map(values)

    @staticmethod
    def _make(
        raw: dict[str, Any],
        row_errors: list[str],
        source: str,
        row_no: int,
        extra: dict[str, Any],
        label: str | None,
        occurrences: dict[str, int] | None,
        model: _Model,
        written_model: str | None = None,
        unsent: dict[str, Any] | None = None,
        localize: Callable[[dict[str, Any]], list[str]] | None = None,
    ) -> Request:
        errors = list(row_errors)
        body: dict[str, Any] = {}
        convert = model.validator.converters
        for name, value in raw.items():
            try:
                body[name] = convert[name](value)
            except RuleError as exc:
                errors.append(str(exc))
        if not errors:
            errors = model.validator.check_body(body)
        if not errors and localize is not None:  # local images: checked now, identified by content
            errors = localize(body)
        written = None
        if errors:
            key = content_key(model.spec.slug, {name: body.get(name, value) for name, value in raw.items()})
            # The typed columns show a value only where the type holds it as written (a
            # seed of 3.7 is never shown as 3); ``written`` keeps every value as the user
            # wrote it, and an unknown model's name as typed.
            fields = model.spec.fields
            body = {name: v for name, value in raw.items()
                    if (v := body[name] if name in body else as_typed(fields.get(name), value)) is not None}
            written = {**(unsent or {}), **raw}  # with what could not even be tried: a model, a field
        else:
            key = content_key(model.spec.slug, body)
        n = 0
        if occurrences is not None:
            n = occurrences.get(key, 0)
            occurrences[key] = n + 1
        return Request(with_repeat(key, n), source, row_no, body, extra, "; ".join(errors) if errors else None,
                       label, written_model or model.spec.slug, written)
