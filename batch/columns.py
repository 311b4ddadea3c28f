"""The column path of the expansion: request frames built from whole columns.

Guarantee: :func:`request_frames` yields exactly the rows that
``results.request_frame(list(expander))`` would (the same request ids, values, errors,
in input order); only chunk boundaries may differ. Most rows of a night hold one value a
cell, valid; those rows are converted, validated and keyed column by column in polars, a
sheet with a model column one model's rows at a time, each against its own spec. Every
other row (a list or ``|`` cell, a template, several job-level values, a model cell that
names no known model or holds no text, a cell a workbook marked, an image that is not an
http(s) URL (a local file must be checked and becomes its content's placeholder,
:mod:`batch.upload`), anything a vectorised check is not sure of, every invalid row)
goes through the per-row code of :class:`batch.expand.Expander`, so every error message
is the per-row code's own. The vectorised checks are conservative by design: a row they
cannot prove valid takes the per-row path, never the other way round.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import polars as pl
import polars_hash as plh

from batch.identity import NON_IDENTITY_FIELDS
from batch.models import FieldSpec
from batch.upload import IMAGE_FIELDS, URL_FIELDS
from batch.validate import _FALSE, _TRUE, RuleError

if TYPE_CHECKING:
    from batch.expand import ColumnMap, Expander, _Model
    from batch.load import Table

# Rows a frame is built from: bounded memory, few Python round trips. Each slice's working
# set (its intermediate columns, the writer's Arrow copy) is held by the allocators after
# use: a 1M-row Parquet dry run peaked at ~410 MiB with 100,000, ~330 with 25,000, for
# ~5% more CPU (3.3 vs 3.5 s).
SLICE = 25_000
# Below this many rows a table takes the per-row path: each column operation costs a
# fixed ~0.1 ms, more than a few hundred rows cost per row (a 37-row CSV: 70 ms vs 7 ms).
SMALL = 2_000
_POS = "__pos"
_KEY = "__key"
# Python's str.strip() also strips these; polars' strip_chars() does not.
_PY_ONLY_SPACE = r"[\x1c-\x1f]"
# Body rules that look only at which fields are present, as column expressions.
_PRESENCE_RULES = {
    "first_or_last_frame_image": lambda p: p("first_frame_image") | p("last_frame_image"),
    "frame_images_not_with_references":
        lambda p: ~((p("first_frame_image") | p("last_frame_image")) & p("reference_images")),
}
_FIELD_RULES = {"frames_25_plus_4n": lambda v: (v - 25) % 4 == 0}


def _same(value: Any, n: int, dtype: pl.DataType | None = None) -> pl.Series:
    """``n`` times ``value``, built in polars (a Python list of a million costs ~25 ms)."""
    return pl.repeat(value, n, dtype=dtype, eager=True)


def _cell(series: pl.Series, name: str, array_field: bool) -> tuple[pl.Series, pl.Series]:
    """A column's single values as :func:`batch.expand.cell_values` reads them (text
    trimmed, empty as null) and where the column path may take the row."""
    dtype = series.dtype
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        series, dtype = series.cast(pl.String), pl.String()
    if dtype == pl.String:
        text = series.str.strip_chars()
        unsure = series.str.contains(_PY_ONLY_SPACE).fill_null(False)
        if array_field:
            unsure |= (text != "").fill_null(False)
        else:
            unsure |= (text.str.starts_with("[") & text.str.ends_with("]")).fill_null(False)
            if name != "prompt":
                unsure |= text.str.contains("|", literal=True).fill_null(False)
        return pl.select(pl.when(text != "").then(text)).to_series(), ~unsure
    if dtype.is_numeric() or dtype == pl.Boolean or dtype == pl.Null:
        return series, _same(True, series.len()) if array_field is False else series.is_null()
    return _same(None, series.len(), pl.Null()), series.is_null()


def _convert(f: FieldSpec, value: pl.Series, extra_rules: list[str]) -> tuple[pl.Series, pl.Series] | None:
    """The field's converter over a column: (converted, ok); ok is false where the per-row
    converter must decide. ``None`` when the field never takes the column path."""
    present = value.is_not_null()
    dtype = value.dtype
    if dtype == pl.Null:
        return value, _same(True, value.len())
    out: pl.Series
    if f.type == "integer":
        if dtype == pl.String:
            digits = value.str.contains(r"^[+-]?[0-9]{1,15}(\.0*)?$").fill_null(False)
            out = pl.select(pl.when(digits).then(value.str.replace(r"\.0*$", ""))).to_series().cast(
                pl.Int64, strict=False)
        elif dtype.is_integer():
            out = value.cast(pl.Int64, strict=False)
        elif dtype.is_float():
            exact = (value.abs() < 2**53) & (value == value.floor())
            out = pl.select(pl.when(exact).then(value)).to_series().cast(pl.Int64, strict=False)
        else:
            return None
        ok = out.is_not_null()
        if f.enum is not None:
            ok &= out.is_in([v for v in f.enum if isinstance(v, int) and not isinstance(v, bool)])
        if f.minimum is not None:
            ok &= out >= f.minimum
        if f.maximum is not None:
            ok &= out <= f.maximum
        for rule in extra_rules:
            ok &= _FIELD_RULES[rule](out)
    elif f.type == "boolean":
        if dtype == pl.Boolean:
            out, ok = value, present
        elif dtype == pl.String:
            low = value.str.to_lowercase()
            ascii_ = value.str.contains(r"^[\x00-\x7f]*$").fill_null(False)
            out = pl.select(pl.when(ascii_ & low.is_in(list(_TRUE))).then(True)
                            .when(ascii_ & low.is_in(list(_FALSE))).then(False)).to_series()
            ok = out.is_not_null()
        elif dtype.is_integer() or dtype.is_float():  # a Decimal goes per-row (to_bool's own reading)
            out = pl.select(pl.when(value == 1).then(True).when(value == 0).then(False)).to_series()
            ok = out.is_not_null()
        else:
            return None
        if extra_rules:
            return None
    elif f.type == "string":
        if dtype != pl.String or extra_rules:
            return None
        if f.enum is not None:
            choices = {str(v).strip().lower(): v for v in f.enum}
            if not all(isinstance(v, str) for v in choices.values()):
                return None
            ascii_ = value.str.contains(r"^[\x00-\x7f]*$").fill_null(False)
            key = pl.select(pl.when(ascii_).then(value.str.strip_chars().str.to_lowercase())).to_series()
            out = key.replace_strict(choices, default=None, return_dtype=pl.String)
            ok = out.is_not_null()
        else:
            length = value.str.len_chars()
            ok = _same(True, value.len())
            if f.min_length is not None:
                ok &= length >= f.min_length
            if f.max_length is not None:
                ok &= length <= f.max_length
            out = value
    else:  # numbers (a float's JSON text differs between Python and polars) and arrays
        return None
    return out, (ok.fill_null(False) | ~present)


def _sent_as_is(value: Any) -> bool:
    """An image or URL field's value the per-row path sends unchanged and without a check
    of its own: an http(s) URL (:func:`batch.upload.local_reference`, ``localize``)."""
    return isinstance(value, str) and value.strip().lower().startswith(("http://", "https://"))


def _urls(value: pl.Series) -> pl.Series:
    """:func:`_sent_as_is` over a column of trimmed cells; a cell that is no text is not."""
    if value.dtype != pl.String:
        return value.is_null()
    low = value.str.slice(0, 8).str.to_lowercase()  # Python's lower(): no case folding
    return (low.str.starts_with("http://") | low.str.starts_with("https://")).fill_null(False)


def _json_pieces(frame: pl.DataFrame, names: list[str]) -> pl.Expr:
    """``"name":value`` of each present identity field, sorted by name and joined by
    commas: the body of :data:`batch.identity._CANONICAL`'s text (compact, sorted,
    UTF-8 as is; polars' JSON writer escapes strings as Python's encoder does)."""
    pieces = []
    for name in sorted(names):
        if frame.schema[name] == pl.Null:
            continue
        encoded = pl.struct(pl.col(name)).struct.json_encode().str.slice(1).str.strip_suffix("}")
        pieces.append(pl.when(pl.col(name).is_not_null()).then(encoded))
    return pl.concat_str(pieces, separator=",", ignore_nulls=True) if pieces else pl.lit("")


class _Plan:
    """What the column path needs to take one model's rows of a table, or why it cannot
    (``ok`` false: all of them go row by row)."""

    def __init__(self, prepared: _Model | None, cmap: ColumnMap) -> None:
        self.ok = False
        if prepared is None or any(len(v) != 1 for v in prepared.params.values()):
            return
        fields = prepared.spec.fields
        # A column of a field this model lacks: fine where its cell is empty (the per-row
        # code sends nothing), the row's error otherwise (per row, for its message).
        self.absent = {c for c, f in cmap.fields.items() if f not in fields}
        rules = prepared.validator.spec.rules
        field_rules: dict[str, list[str]] = {}
        for rule in rules:
            if rule in _FIELD_RULES:
                field_rules.setdefault("frames", []).append(rule)
            elif rule not in _PRESENCE_RULES:
                return
        self.body_rules = [_PRESENCE_RULES[r] for r in rules if r in _PRESENCE_RULES]
        self.field_rules = field_rules
        self.params: dict[str, Any] = {}
        try:
            for name, (raw,) in prepared.params.items():
                self.params[name] = prepared.validator.convert(name, raw)
        except RuleError:
            return
        if any(isinstance(v, (list, float)) for v in self.params.values()):
            return
        if any(not _sent_as_is(v) for n, v in self.params.items() if n in IMAGE_FIELDS | URL_FIELDS):
            return  # a job-level local image: every row checks and localizes it (per row)
        self.prepared: _Model = prepared
        self.ok = True


class _Plans:
    """The column plans of one table: one per model its rows name, made when first named.
    A row's model is the one :meth:`batch.expand.Expander._row` reads from its model
    cell (``str(cell).strip().lower()``, the default model when that is empty); rows of
    an unknown model, or of a cell that is no text, go row by row."""

    def __init__(self, expander: Expander, cmap: ColumnMap) -> None:
        self.expander, self.cmap = expander, cmap
        self.ok = not (cmap.template or expander.spec.prompt_template is not None)
        default = expander.model(expander.spec.model)
        self.default = default.spec.slug if default is not None else None
        self._plans: dict[str, _Plan] = {}

    def plan(self, slug: str) -> _Plan:
        if slug not in self._plans:
            self._plans[slug] = _Plan(self.expander.model(slug), self.cmap)
        return self._plans[slug]

    def _slug(self, value: Any) -> str | None:
        """The model slug of a non-null model cell, as the per-row code resolves it."""
        text = str(value).strip()
        prepared = self.expander.model(text.lower() if text else self.expander.spec.model)
        return prepared.spec.slug if prepared is not None else None

    def slugs(self, column: pl.Series) -> pl.Series:
        """Each row's model slug; null where the row goes row by row. Python's own
        ``str``/``strip``/``lower`` decide, once per distinct cell of the slice."""
        if isinstance(column.dtype, (pl.Categorical, pl.Enum)):
            column = column.cast(pl.String)
        if column.dtype == pl.String:
            found = {v: self._slug(v) for v in column.unique().to_list() if v is not None}
            resolved = column.replace_strict(found, default=None, return_dtype=pl.String)
        else:  # a number or a boolean names no model (slugs are text with a '/'): per row
            resolved = _same(None, column.len(), pl.String())
        return pl.select(pl.when(column.is_null()).then(pl.lit(self.default, pl.String)).otherwise(resolved)).to_series()


def request_frames(expander: Expander, schema: dict[str, pl.DataType]) -> Iterator[pl.DataFrame]:
    """Request frames of the whole expansion, in input order (see the module docstring)."""
    from batch.results import request_frame

    expander.rows_seen = 0
    seen = pl.Series(_KEY, [], dtype=pl.UInt64)  # the content keys of every request so far
    for table, cmap in zip(expander.tables, expander.maps, strict=True):
        plans = _Plans(expander, cmap) if table.df.height >= SMALL else None
        marked = _marked_rows(expander, table, cmap)
        for start in range(0, table.df.height, SLICE):
            chunk = table.df.slice(start, SLICE)
            expander.rows_seen += chunk.height
            fast, slow_rows = _fast_frame(table, cmap, plans, chunk, start, marked, schema)
            slow = list(expander.rows_at(table, cmap, slow_rows)) if slow_rows else []
            parts = [fast] if fast is not None and fast.height else []
            if slow:
                positions = [pos for pos, _ in slow]
                frame = request_frame([req for _, req in slow], schema)
                parts.append(frame.with_columns(pl.Series(_POS, positions, dtype=pl.Int64),
                                                pl.col("request_id").alias(_KEY)))
            if not parts:
                continue
            frame = pl.concat(parts, how="vertical") if len(parts) > 1 else parts[0]
            if len(parts) > 1:
                frame = frame.sort(_POS, maintain_order=True)
            frame, seen = _repeat_ids(frame, seen)
            yield frame.drop(_POS, _KEY)


def _marked_rows(expander: Expander, table: Table, cmap: ColumnMap) -> list[int]:
    """Rows with a cell the per-row code reports (``Expander._cell_error``): a note on a
    cell it checks, or a cell of a text field holding a number, a date, a boolean. A
    workbook marks every number cell's kind; a number in ``duration`` is no error."""
    if not (table.notes or table.kinds):
        return []
    checked = set(cmap.fields) | set(cmap.template.values()) | {cmap.id_column, cmap.model_column}
    # A field is text for the row's model; a sheet with a model column is read as if each
    # field were text where any of its models says so (more rows go per row, never fewer).
    specs = [p.spec for m in {expander.spec.model, *cmap.models} if (p := expander.model(m)) is not None]
    named = [*((f, c) for c, f in cmap.fields.items()), ("id", cmap.id_column), ("model", cmap.model_column)]
    text = {c for f, c in named if any(f in m.fields and m.fields[f].is_text for m in specs)} | \
        set(cmap.template.values())
    rows = {i for i, c in table.notes if c in checked} | {i for i, c in table.kinds if c in text}
    return sorted(rows)


def _repeat_ids(frame: pl.DataFrame, seen: pl.Series) -> tuple[pl.DataFrame, pl.Series]:
    """Request ids with their repeat count (``<key>-1``...) over the whole run, in order.
    ``seen`` holds every earlier key as the 64-bit integer its 16 hex digits spell (8 bytes
    a request, and probed ~3.5x faster than their bytes: each slice probes all of them)."""
    keys = frame[_KEY]
    raw = keys.str.to_integer(base=16, dtype=pl.UInt64).rename(_KEY)
    # The n-th occurrence of a key = its earlier ones in this frame + those in earlier frames.
    within = frame.select(pl.int_range(pl.len()).over(_KEY)).to_series()
    earlier = seen.to_frame().filter(pl.col(_KEY).is_in(raw.unique().implode())).group_by(_KEY).agg(
        pl.len().alias("n"))
    before = raw.to_frame().join(earlier, on=_KEY, how="left", maintain_order="left")["n"].fill_null(0)
    n = within + before.cast(within.dtype)
    ids = pl.select(pl.when(n > 0).then(keys + "-" + n.cast(pl.String)).otherwise(keys)).to_series()
    return frame.with_columns(ids.alias("request_id")), pl.concat([seen, raw])


def _fast_frame(table: Table, cmap: ColumnMap, plans: _Plans | None, chunk: pl.DataFrame, start: int,
                marked: list[int], schema: dict[str, pl.DataType]) -> tuple[pl.DataFrame | None, list[int]]:
    """The frame of the rows the column path takes (in input order), and the positions of
    the others. With a model column each model's rows are taken by that model's plan."""
    height = chunk.height
    if plans is None or not plans.ok:
        return None, list(range(start, start + height))
    blank = _same(True, height)
    nul = _same(False, height)  # a NUL in any text cell makes the row invalid (expand.nul_errors)
    for c in chunk.columns:
        col = chunk[c]
        blank &= col.is_null() | ((col == "").fill_null(False) if col.dtype == pl.String else False)
        if col.dtype == pl.String or isinstance(col.dtype, (pl.Categorical, pl.Enum)):
            nul |= col.cast(pl.String).str.contains("\x00", literal=True).fill_null(False)
    pos = pl.Series(_POS, range(start, start + height), dtype=pl.Int64)
    ok = ~blank & ~nul
    if marked:
        ok &= ~pos.is_in(marked)
    parts: list[pl.DataFrame] = []
    if cmap.model_column is None:
        plan = plans.plan(plans.default) if plans.default is not None else None
        if plan is not None and plan.ok:
            parts.append(_model_frame(table, cmap, plan, chunk, pos, ok, schema))
    else:
        slugs = plans.slugs(chunk[cmap.model_column])
        for slug in slugs.filter(ok).drop_nulls().unique().sort().to_list():
            plan = plans.plan(slug)
            if plan.ok:
                rows = ok & (slugs == slug).fill_null(False)
                parts.append(_model_frame(table, cmap, plan, chunk.filter(rows), pos.filter(rows), ok.filter(rows),
                                          schema))
    parts = [p for p in parts if p.height]
    if not parts:
        return None, pos.filter(~blank).to_list()
    frame = pl.concat(parts, how="vertical").sort(_POS) if len(parts) > 1 else parts[0]
    slow = pos.filter(~blank & ~pos.is_in(frame[_POS].implode())).to_list()
    return frame, slow


def _model_frame(table: Table, cmap: ColumnMap, plan: _Plan, chunk: pl.DataFrame, pos: pl.Series, ok: pl.Series,
                 schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """The rows of ``chunk`` (of one model, at positions ``pos``) that ``ok`` allows and
    the column checks of ``plan`` prove valid, as request rows with ``_POS`` and ``_KEY``."""
    height = chunk.height
    prepared = plan.prepared
    fields = prepared.spec.fields
    values: dict[str, pl.Series] = {}
    for column, name in cmap.fields.items():
        value, sure = _cell(chunk[column], name, name in prepared.arrays)
        if column in plan.absent:  # not this model's field: only an empty cell is no error
            ok &= sure & value.is_null()
            continue
        if name in IMAGE_FIELDS | URL_FIELDS:  # anything but a URL may be a local file: per row
            sure &= value.is_null() | _urls(value)
        converted = _convert(fields[name], value, plan.field_rules.get(name, []))
        if converted is None:
            sure &= value.is_null()
            converted = (_same(None, height, pl.Null()), _same(True, height))
        ok &= sure & converted[1]
        values[name] = converted[0]
    for name, param in plan.params.items():
        if name in values and values[name].dtype != pl.Null:
            values[name] = values[name].fill_null(param)
        else:
            values[name] = _same(param, height)
    def present(name: str) -> pl.Series:
        return values[name].is_not_null() if name in values else _same(False, height)

    for name in prepared.validator.required:
        ok &= present(name)
    for rule in plan.body_rules:
        ok &= rule(present)
    ok = ok.fill_null(False)
    frame = pl.DataFrame({name: v.rename(name) for name, v in values.items()}).with_columns(pos).filter(ok)
    if not frame.height:
        return frame
    src = chunk.filter(ok)
    slug = prepared.spec.slug
    identity = [n for n in values if n not in NON_IDENTITY_FIELDS]
    text = pl.lit(slug + "\n{") + _json_pieces(frame, identity) + pl.lit("}")
    frame = frame.with_columns(text.alias(_KEY)).with_columns(plh.col(_KEY).chash.sha2_256().str.slice(0, 16))
    columns: dict[str, Any] = {"request_id": frame[_KEY], "source": pl.repeat(table.source, frame.height, eager=True),
                               "row": frame[_POS] + table.first_row, "model": pl.repeat(slug, frame.height, eager=True)}
    from batch.results import AS_WRITTEN, INVALID, LABEL

    extra = {out: c for c, out in cmap.extra.items()}
    for name, dtype in schema.items():
        if name in columns:
            continue
        if name in values:
            series = frame[name]
        elif name in extra:
            series = src[extra[name]]
        else:
            series = _same(None, frame.height, pl.Null())
        columns[name] = series.cast(dtype, strict=False) if name not in (AS_WRITTEN, INVALID, LABEL) else None
    columns[AS_WRITTEN] = _same(None, frame.height, pl.String())
    columns[INVALID] = _same(None, frame.height, pl.String())
    columns[LABEL] = _labels(src[cmap.id_column]) if cmap.id_column else columns[INVALID]
    out = pl.DataFrame({k: (v.rename(k) if isinstance(v, pl.Series) else v) for k, v in columns.items()})
    out = out.cast(schema, strict=False) if out.schema != pl.Schema(schema) else out  # type: ignore[arg-type]
    return out.with_columns(frame[_POS], frame[_KEY])


def _labels(ids: pl.Series) -> pl.Series:
    """:func:`batch.expand.label_of` over a column."""
    if ids.dtype == pl.String:
        text = ids.str.strip_chars()
        unsure = ids.str.contains(_PY_ONLY_SPACE).fill_null(False)
        if not unsure.any():
            return pl.select(pl.when(text != "").then(text)).to_series()
    elif ids.dtype.is_integer():
        return ids.cast(pl.String)
    from batch.expand import label_of
    return pl.Series([label_of(v) for v in ids.to_list()], dtype=pl.String)
