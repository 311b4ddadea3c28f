"""The column path (batch.columns) gives the per-row path's frames exactly: the same
request ids (repeat counts across slices and tables included), values, labels and
validation errors, for a generated mix of valid, invalid, multi-valued and odd rows."""

from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from batch import columns
from batch.expand import Expander, ExpandSpec
from batch.load import Table
from batch.results import request_frame, request_schema_of

# Cells as people and spreadsheets write them: valid, padded, multi-valued, out of range,
# the wrong kind, whitespace only Python strips (\x1c), unicode spaces, JSON-looking text.


def mostly(valid: list[object], odd: list[object]) -> st.SearchStrategy[object]:
    """Usually a valid cell (so that whole rows take the column path), sometimes an odd one."""
    return st.one_of(*[st.sampled_from(valid)] * 6, st.sampled_from(odd))


PROMPTS = mostly(["A paper boat", "  A paper boat ", "a | b", "[Scene 1] a cat", "quote \" and \\ back\nslash\t",
                  "é ü 😀 \u2028", "\u3000wide\u3000", "\x01ctrl", "İstanbul", "A cat"],
                 ['["a cat", "a dog"]', "", " ", None, "\x1ca boat\x1f", "x" * 2001, "[1, 2]", "a \x00 boat"])
DURATIONS = mostly(["5", " 5 ", "5.0", "5.", "+5", "12", "0005", None, ""],
                   ["5_0", "5.5", "13", "1", "x", "[3, 5]", "3|5", "٥", "-0", "1e1"])
RATIOS = mostly(["16:9", " 9:16 ", "ADAPTIVE", None], ["16:9|1:1", "16/9", "", "１:1"])
BOOLS = mostly(["yes", "No", "TRUE", "1", "0", " t ", None], ["2", "ja", "", "yes|no"])
SEEDS = mostly(["7", "-1", None, "2147483647"], ["-2", "2147483648", "3.7", "", "99999999999999999999"])
FRAMES = mostly(["29", "33", "289", None, "29.0"], ["30", "293", ""])
IDS = mostly(["a1", " a2 ", "", None, "7"], ["\x1cid", "x\x00y"])

ODD_ROW = st.fixed_dictionaries({"id": IDS, "prompt": PROMPTS, "duration": DURATIONS, "ratio": RATIOS,
                                 "camera_fixed": BOOLS, "seed": SEEDS, "frames": FRAMES,
                                 "notes": st.sampled_from(["n", "", None, "n\x00"])})
# Rows valid as written (padded, spelt in other cases, empty cells), some of them identical.
PLAIN_ROW = st.fixed_dictionaries({
    "id": st.sampled_from(["a1", " a2 ", None, "7"]),
    "prompt": st.sampled_from(["A paper boat", "  A paper boat ", "a | b", "[Scene 1] a cat", "é 😀 \u2028",
                               "quote \" and \\ back\nslash\t", "\u3000wide\u3000", "\x01ctrl"]),
    "duration": st.sampled_from(["5", " 5 ", "5.0", "5.", "+5", "12", "0005", None, ""]),
    "ratio": st.sampled_from(["16:9", " 9:16 ", "ADAPTIVE", None]),
    "camera_fixed": st.sampled_from(["yes", "No", "TRUE", "1", "0", " t ", None]),
    "seed": st.sampled_from(["7", "-1", None, "2147483647"]),
    "frames": st.sampled_from(["29", "33", "289", None, "29.0"]),
    "notes": st.sampled_from(["n", "", None])})
ROW = st.one_of(PLAIN_ROW, ODD_ROW)
ROW_KEYS = ["id", "prompt", "duration", "ratio", "camera_fixed", "seed", "frames", "notes"]


def _frames_both(tables: list[Table], spec: ExpandSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    expander = Expander(tables, spec)
    schema = request_schema_of(expander)
    by_columns = list(expander.frames(schema))
    by_rows = request_frame(list(expander), schema)
    return (pl.concat(by_columns) if by_columns else by_rows.clear()), by_rows


@pytest.fixture
def column_path_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every table takes the column path, in slices of 7 rows (repeats across slices)."""
    monkeypatch.setattr(columns, "SMALL", 0)
    monkeypatch.setattr(columns, "SLICE", 7)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ROW, min_size=1, max_size=40), st.lists(ROW, min_size=1, max_size=10),
       st.sampled_from([{}, {"params": {"resolution": "720p"}}, {"params": {"seed": "5"}}, {"tier": "default"}]))
def test_column_path_equals_row_path(column_path_everywhere: None, rows: list[dict[str, object]],
                                     more: list[dict[str, object]], spec: dict[str, object]) -> None:
    text = {k: pl.String for k in rows[0]}
    tables = [Table("a.csv", Path("a.csv"), pl.DataFrame(rows, schema=text)),
              Table("b.csv", Path("b.csv"), pl.DataFrame(more, schema=text), first_row=5)]
    fast, slow = _frames_both(tables, ExpandSpec(**spec))  # type: ignore[arg-type]
    assert_frame_equal(fast, slow)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["A boat", "A cat", None, ""]),
                          st.one_of(st.none(), st.integers(-3, 14)),
                          st.one_of(st.none(), st.sampled_from([5.0, 5.5, 1e300, -0.0, 12.0, float("nan")])),
                          st.one_of(st.none(), st.booleans()),
                          st.one_of(st.none(), st.integers(-3, 3))), min_size=1, max_size=40))
def test_typed_columns_equal_row_path(column_path_everywhere: None,
                                      rows: list[tuple[object, object, object, object, object]]) -> None:
    """Parquet-typed cells: integers, floats, booleans, integer ids."""
    df = pl.DataFrame(rows, schema={"prompt": pl.String, "duration": pl.Int64, "seed": pl.Float64,
                                    "camera_fixed": pl.Boolean, "id": pl.Int32}, orient="row")
    fast, slow = _frames_both([Table("p.parquet", Path("p.parquet"), df)], ExpandSpec())
    assert_frame_equal(fast, slow)


def test_marked_cells_and_list_cells_take_the_row_path(column_path_everywhere: None) -> None:
    df = pl.DataFrame({"prompt": ["a", "b", "c"], "ratio": [["16:9", "1:1"], None, ["4:3"]]})
    marked = Table("w.xlsx", Path("w.xlsx"), df, notes={(1, "prompt"): "formula without a saved value"})
    fast, slow = _frames_both([marked], ExpandSpec())
    assert_frame_equal(fast, slow)
    assert fast.height == 4 and fast["__invalid"].null_count() == 3


def test_a_nul_in_any_cell_takes_the_row_path(column_path_everywhere: None) -> None:
    """A NUL makes a row invalid (the per-row rule, for PostgreSQL's sake): the column path
    called such rows valid, in the prompt, the id and a pass-through column alike."""
    n = 20
    df = pl.DataFrame({"id": [f"i{i}" if i != 5 else "i\x005" for i in range(n)],
                       "prompt": [f"a calm lake {i}" if i != 3 else "a \x00 lake" for i in range(n)],
                       "notes": ["n" if i != 9 else "z\x00" for i in range(n)]})
    fast, slow = _frames_both([Table("p.parquet", Path("p.parquet"), df)], ExpandSpec(passthrough=("notes",)))
    assert_frame_equal(fast, slow)
    assert fast["__invalid"].null_count() == n - 3


def test_large_table_takes_the_column_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default thresholds: 5,000 rows, duplicates among them, one in 100 invalid."""
    n = 5_000
    df = pl.DataFrame({"id": [f"r{i}" for i in range(n)], "prompt": [f"boat {i % 1000}" for i in range(n)],
                       "duration": [("5" if i % 100 else "99") for i in range(n)]})
    calls: list[int] = []
    real = Expander.rows_at

    def counted(self: Expander, table: Table, cmap: object, positions: list[int]):  # type: ignore[no-untyped-def]
        calls.append(len(positions))
        return real(self, table, cmap, positions)  # type: ignore[arg-type]

    monkeypatch.setattr(Expander, "rows_at", counted)
    fast, slow = _frames_both([Table("big.csv", Path("big.csv"), df)], ExpandSpec())
    assert_frame_equal(fast, slow)
    assert sum(calls) == n // 100  # only the invalid rows went row by row
    assert fast.filter(pl.col("request_id").str.ends_with("-4")).height == 1000  # each prompt 5 times


def test_workbook_kinds_mark_only_text_fields(column_path_everywhere: None) -> None:
    """A number in ``duration`` or the id column is fine; in ``prompt`` it is the row's error."""
    df = pl.DataFrame({"id": [1, 2, 3], "prompt": ["a", "b", None], "duration": [5, 5, 6]})
    kinds = {(0, "id"): "n", (0, "duration"): "n", (1, "duration"): "n", (2, "prompt"): "n", (2, "duration"): "n"}
    book = Table("w.xlsx", Path("w.xlsx"), df, kinds=kinds, sheet="S")
    expander = Expander([book], ExpandSpec())
    assert columns._marked_rows(expander, book, expander.maps[0]) == [2]
    fast, slow = _frames_both([book], ExpandSpec())
    assert_frame_equal(fast, slow)
    assert "must be text" in fast["__invalid"][2]



# Model cells as sheets hold them: known models of different specs (fields, enums, rules)
# in any case and padding, whitespace only Python strips, names that are no model (a bare
# name, a typo, a dotted-İ lower case that is no ASCII), empty cells (the default model),
# numbers. The per-row path reads a cell as str(cell).strip().lower().
MODELS = st.sampled_from(["bytedance/seedance-1.0-lite-t2v", "BYTEDANCE/Seedance-1.5-Pro-T2V",
                          " bytedance/seedance-2.0-mini-t2v ", "bytedance/seedance-1.0-pro-fast-t2v",
                          "bytedance/seedance-1.5-pro-i2v", "\x1cbytedance/seedance-1.5-pro-t2v\u3000",
                          "seedance-1.5-pro-t2v", "bytedance/seedance-9", "BYTEDANCE/SEEDANCE-1.0-LİTE-T2V",
                          "", " ", None, "5", "1.5"])


# Each row with some cells emptied: a model with fewer fields (2.0-mini: a prompt only)
# has valid rows only where the others are empty.
MODEL_ROW = st.tuples(ROW, MODELS, st.sets(st.sampled_from(ROW_KEYS[2:])))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(MODEL_ROW, min_size=1, max_size=40), st.lists(MODEL_ROW, max_size=10),
       st.sampled_from([{}, {"params": {"resolution": "720p"}}, {"params": {"seed": "5"}}, {"tier": "flex"},
                        {"model": "bytedance/seedance-1.5-pro-t2v"}, {"params": {"duration": "12"}}]))
def test_model_column_equals_row_path(column_path_everywhere: None, rows: list[tuple[dict[str, object], object, set[str]]],
                                      more: list[tuple[dict[str, object], object, set[str]]],
                                      spec: dict[str, object]) -> None:
    """A model column: each row's model decides its fields, converters and rules, an
    unknown or odd one makes the row invalid, an empty cell means the default model."""
    def table(name: str, cells: list[tuple[dict[str, object], object, set[str]]], first_row: int) -> Table:
        records = [{**{k: (None if k in empty else v) for k, v in row.items()}, "Model": model}
                   for row, model, empty in cells]
        df = pl.DataFrame(records, schema={k: pl.String for k in [*ROW_KEYS, "Model"]})
        if spec.get("model") and not df["Model"].is_in(["bytedance/seedance-1.0-lite-t2v",
                                                        "bytedance/seedance-1.0-pro-fast-t2v"]).any():
            df = df.drop("frames")  # no model in use has the field: a usage error for both paths
        return Table(name, Path(name), df, first_row=first_row)

    fast, slow = _frames_both([table("a.csv", rows, 2), table("b.csv", more, 5)], ExpandSpec(**spec))  # type: ignore[arg-type]
    assert_frame_equal(fast, slow)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([pl.Int64, pl.Float64, pl.Boolean, pl.Categorical, pl.Null]), st.data())
def test_typed_model_column_equals_row_path(column_path_everywhere: None, dtype: pl.DataType,
                                            data: st.DataObject) -> None:
    """A model column a DataFrame or Parquet file types: numbers, booleans, categories."""
    values = {pl.Int64: st.integers(-2, 2), pl.Float64: st.sampled_from([1.5, 0.0, float("nan")]),
              pl.Boolean: st.booleans(), pl.Null: st.none(),
              pl.Categorical: st.sampled_from(["bytedance/seedance-1.5-pro-t2v", " BYTEDANCE/seedance-2.0-mini-t2v",
                                               "x", ""])}[dtype]
    cells = data.draw(st.lists(st.one_of(st.none(), values), min_size=1, max_size=25))
    df = pl.DataFrame({"prompt": [f"boat {i % 3}" for i in range(len(cells))],
                       "duration": [str(4 + i % 3) for i in range(len(cells))],
                       "model": pl.Series(cells, dtype=pl.Null if dtype == pl.Null else None).cast(dtype)})
    fast, slow = _frames_both([Table("p.parquet", Path("p.parquet"), df)], ExpandSpec())
    assert_frame_equal(fast, slow)


def test_a_model_column_takes_the_column_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the default thresholds, a sheet mixing three models (of different fields and
    duration ranges), empty model cells and one unknown name: only the rows the per-row
    code must judge (the unknown model, an invalid duration) go row by row."""
    n = 6_000
    models = ["bytedance/seedance-1.0-lite-t2v", " BYTEDANCE/Seedance-1.5-Pro-T2V", "", None,
              "bytedance/seedance-2.0-mini-t2v"]
    df = pl.DataFrame({"id": [f"r{i}" for i in range(n)], "prompt": [f"boat {i % 1000}" for i in range(n)],
                       "model": [("seedance-lite" if i % 1000 == 7 else models[i % 5]) for i in range(n)],
                       "duration": [("3" if i % 5 == 1 else None if i % 5 == 4 else "5") for i in range(n)]})
    per_row: list[int] = []
    real = Expander.rows_at

    def counted(self: Expander, table: Table, cmap: object, positions: list[int]):  # type: ignore[no-untyped-def]
        per_row.extend(positions)
        return real(self, table, cmap, positions)  # type: ignore[arg-type]

    monkeypatch.setattr(Expander, "rows_at", counted)
    fast, slow = _frames_both([Table("mixed.csv", Path("mixed.csv"), df)], ExpandSpec())
    assert_frame_equal(fast, slow)
    # i % 5 == 1: 1.5-pro-t2v with duration 3 (below its 4): invalid; i % 1000 == 7: unknown model.
    assert sorted(per_row) == sorted({i for i in range(n) if i % 5 == 1 or i % 1000 == 7})
    assert set(fast["model"].unique()) == {"bytedance/seedance-1.0-lite-t2v", "bytedance/seedance-1.5-pro-t2v",
                                           "bytedance/seedance-2.0-mini-t2v", "seedance-lite"}


# Image fields: URLs pass the column path; every value that names a local file (or might:
# Base64, data:, file://, a bucket, another scheme, odd case or spaces) must be checked and
# replaced by its content placeholder exactly as the per-row path does (batch.upload).
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))
B64_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"
IMAGES = mostly(["https://cdn.example/a.png", " HTTPS://cdn.example/B.PNG ", "http://x.test/c.jpg", None, ""],
                ["refs/a.png", "./refs/a.png", "refs/copy.png", "refs/notes.png", "refs/missing.png",
                 "../outside.png", "s3://bucket/a.png", "ftp://x.test/a.png", "httpſ://x.test/a.png",
                 "data:image/png;base64," + B64_PNG, B64_PNG, "file://LOCAL", "https://a.test/x|https://b.test/y",
                 "refs/a.png|https://b.test/y", "\x1chttps://a.test/x", "https://a.test/é 😀"])
LISTS = mostly([None, ""], ['["https://a.test/r.png"]', "https://a.test/r.png", "refs/a.png",
                            '["refs/a.png", "https://b.test/s.png"]', "mp3/a.mp3", "https://a.test/a.mp3"])
IMAGE_ROW_KEYS = ["Prompt text", "start image", "last_frame_image", "reference_images", "audio_urls", "Aspect ratio",
                  "status", "notes"]  # synonyms of first_frame_image, prompt, ratio; "status" passes through
IMAGE_ROW = st.fixed_dictionaries({
    "Prompt text": PROMPTS, "start image": IMAGES, "last_frame_image": IMAGES, "reference_images": LISTS,
    "audio_urls": LISTS, "Aspect ratio": RATIOS, "status": st.sampled_from(["kept", None]),
    "notes": st.sampled_from(["n", "", None])})


@pytest.fixture(scope="module")
def sheet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sheet's folder with a real image, a copy of it, a text file named .png, and an
    image outside the folder."""
    root = tmp_path_factory.mktemp("columns")
    (root / "sheet" / "refs").mkdir(parents=True)
    (root / "sheet" / "refs" / "a.png").write_bytes(PNG)
    (root / "sheet" / "refs" / "copy.png").write_bytes(PNG)
    (root / "sheet" / "refs" / "notes.png").write_bytes(b"not a picture at all")
    (root / "outside.png").write_bytes(PNG)
    return root / "sheet"


def _both_with_images(tables: list[Table], spec: ExpandSpec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Both paths on separate expanders, so each one's record of local images is its own."""
    by_columns, by_rows = Expander(tables, spec), Expander(tables, spec)
    schema = request_schema_of(by_rows)
    assert request_schema_of(by_columns) == schema
    fast = list(by_columns.frames(schema))
    slow = request_frame(list(by_rows), schema)
    assert by_columns.images.by_hash == by_rows.images.by_hash  # the same images would be uploaded
    return (pl.concat(fast) if fast else slow.clear()), slow


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(IMAGE_ROW, min_size=1, max_size=30),
       st.sampled_from(["bytedance/seedance-1.5-pro-i2v", "bytedance/seedance-2.0-fast-i2v"]),
       st.sampled_from([{}, {"first_frame_image": "https://cdn.example/p.png"}, {"first_frame_image": "refs/a.png"},
                        {"last_frame_image": "refs/notes.png"}, {"resolution": "720p"}]))
def test_image_fields_equal_row_path(column_path_everywhere: None, sheet_dir: Path, rows: list[dict[str, object]],
                                     model: str, params: dict[str, object]) -> None:
    """Image and URL fields (URLs, local files good and bad, Base64, data: URIs), header
    synonyms, a pass-through column named like a result column, job-level images."""
    local = f"file://{sheet_dir / 'refs' / 'a.png'}"
    rows = [{k: (local if v == "file://LOCAL" else v) for k, v in r.items()} for r in rows]
    df = pl.DataFrame(rows, schema={k: pl.String for k in IMAGE_ROW_KEYS})
    if "2.0" not in model:
        df = df.drop("reference_images", "audio_urls")
    table = Table("sheet.csv", sheet_dir / "sheet.csv", df)
    fast, slow = _both_with_images([table], ExpandSpec(model=model, params=params))
    assert_frame_equal(fast, slow)



@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(IMAGE_ROW, st.sampled_from(["bytedance/seedance-1.5-pro-i2v", "BYTEDANCE/seedance-2.0-fast-i2v",
                                                      "bytedance/seedance-1.5-pro-t2v", "bytedance/seedance-2.0-v2v",
                                                      None, "i2v"])), min_size=1, max_size=30))
def test_image_fields_with_a_model_column_equal_row_path(column_path_everywhere: None, sheet_dir: Path,
                                                         rows: list[tuple[dict[str, object], object]]) -> None:
    """Image and URL columns in a sheet mixing image models with a text-only one (whose
    rows are valid only where those cells are empty) and one that requires video_urls."""
    local = f"file://{sheet_dir / 'refs' / 'a.png'}"
    records = [{**{k: (local if v == "file://LOCAL" else v) for k, v in r.items()}, "model": m} for r, m in rows]
    df = pl.DataFrame(records, schema={k: pl.String for k in [*IMAGE_ROW_KEYS, "model"]})
    if not df["model"].str.contains("2.0", literal=True).any():
        df = df.drop("reference_images", "audio_urls")  # no model in use has them: a usage error for both
    table = Table("sheet.csv", sheet_dir / "sheet.csv", df)
    fast, slow = _both_with_images([table], ExpandSpec(model="bytedance/seedance-1.5-pro-i2v"))
    assert_frame_equal(fast, slow)


def test_local_images_take_the_row_path(column_path_everywhere: None, sheet_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A local image becomes its content placeholder and counts for upload; a bad one makes
    its row invalid naming the cell; URLs stay as written (by the column path)."""
    per_row: list[int] = []
    real = Expander.rows_at

    def counted(self: Expander, table: Table, cmap: object, positions: list[int]):  # type: ignore[no-untyped-def]
        per_row.extend(positions)
        return real(self, table, cmap, positions)  # type: ignore[arg-type]

    monkeypatch.setattr(Expander, "rows_at", counted)
    df = pl.DataFrame({"prompt": ["a", "b", "c", "d"],
                       "first_frame_image": ["https://cdn.example/a.png", "refs/a.png", "refs/notes.png", None],
                       "last_frame_image": [None, None, None, "refs/copy.png"]})
    table = Table("sheet.csv", sheet_dir / "sheet.csv", df)
    fast, slow = _both_with_images([table], ExpandSpec(model="bytedance/seedance-1.5-pro-i2v"))
    assert_frame_equal(fast, slow)
    assert fast["first_frame_image"][0] == "https://cdn.example/a.png"
    assert fast["first_frame_image"][1].startswith("local-image:sha256:")
    assert "refs/notes.png" in fast["__invalid"][2] and "first_frame_image" in fast["__invalid"][2]
    assert fast["last_frame_image"][3] == fast["first_frame_image"][1]  # identity by content
    assert per_row == [1, 2, 3]  # the URL row took the column path


def test_a_large_dry_run_checks_and_counts_its_local_images(tmp_path: Path) -> None:
    """Through the CLI at the default thresholds (the column path on): the rows naming local
    images are checked, their images counted for upload, a bad one is invalid; the URL rows
    are sent as written."""
    from conftest import cli, results, write_csv

    folder = tmp_path / "sheet"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "a.png").write_bytes(PNG)
    (folder / "refs" / "b.png").write_bytes(PNG + b"other bytes")
    (folder / "refs" / "notes.png").write_bytes(b"not a picture")
    n = 3 * columns.SMALL
    local = {10: "refs/a.png", 20: "refs/b.png", 30: "./refs/a.png", 40: "refs/notes.png"}
    rows = [{"prompt": f"boat {i}", "first_frame_image": local.get(i, f"https://cdn.example/{i}.png")}
            for i in range(n)]
    sheet = write_csv(folder / "in.csv", rows)
    out = tmp_path / "r.parquet"
    res = cli(["submit", str(sheet), "-o", str(out), "--dry-run", "--model", "bytedance/seedance-1.5-pro-i2v",
               "--state", str(tmp_path / "s.sqlite")])
    assert f"uploads: 2 local images, {2 * len(PNG) + len(b'other bytes')} bytes would be uploaded" in res.output, \
        res.output
    table = results(out)
    assert table.height == n and table["status"].value_counts().sort("status").rows() == [("dry_run", n - 1),
                                                                                          ("invalid", 1)]
    image = table["first_frame_image"]
    assert image[10].startswith("local-image:sha256:") and image[10] == image[30] != image[20]
    assert "refs/notes.png" in table["error"][40] and image[0] == "https://cdn.example/0.png"


TYPED = {  # the polars types a DataFrame handed to the Python API may hold (batch.load.frame_table)
    "decimal": (pl.Decimal(10, 2), st.sampled_from(["0", "1", "5", "5.50", "-1"])),
    "uint8": (pl.UInt8, st.integers(0, 13)),
    "int8": (pl.Int8, st.integers(-3, 13)),
    "float32": (pl.Float32, st.sampled_from([0.0, 1.0, 5.0, 5.5, 12.0, -1.0])),
    "date": (pl.Date, st.dates()),
    "categorical": (pl.Categorical, st.sampled_from(["5", "yes", "16:9", "A boat", " 9:16 ", "x"])),
    "enum": (pl.Enum(["5", "yes", "16:9", "A boat"]), st.sampled_from(["5", "yes", "16:9", "A boat"])),
    "list": (pl.List(pl.String), st.lists(st.sampled_from(["5", "16:9", "A boat"]), max_size=2)),
}


@pytest.mark.parametrize("field", ["prompt", "duration", "camera_fixed", "ratio", "seed"])
@pytest.mark.parametrize("kind", sorted(TYPED))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_polars_type_equals_row_path(column_path_everywhere: None, data: st.DataObject, kind: str,
                                         field: str) -> None:
    """A field's column of any type a DataFrame may hold (decimals, small and unsigned
    integers, 32-bit floats, dates, categoricals, enums, lists), and a pass-through one."""
    dtype, values = TYPED[kind]
    cells = data.draw(st.lists(st.one_of(st.none(), values), min_size=1, max_size=20))
    df = pl.DataFrame({"prompt": [f"boat {i % 3}" for i in range(len(cells))]})
    typed = pl.Series(field, [str(c) if kind == "decimal" and c is not None else c for c in cells]).cast(dtype)
    df = df.with_columns(typed, typed.alias("kept"))  # "kept": a pass-through column of the same type
    fast, slow = _frames_both([Table("frame", Path("frame"), df)], ExpandSpec(passthrough=("kept",)))
    assert_frame_equal(fast, slow)
