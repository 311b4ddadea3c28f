"""Issue #18, "wrong video, silently": headers as people name parameters (12), what the
results table records for an invalid row (14), and a real run naming its edited rows (15).
Real CLI runs against the fake API over HTTP, real CSV files and openpyxl workbooks."""

import json
import sqlite3
from pathlib import Path

import openpyxl
import polars as pl
import pytest
from conftest import cli, error_line, results, write_csv

from batch.expand import Request
from batch.ledger import OUTCOME_COLUMNS
from batch.models import Catalog, shipped
from batch.results import Resolution, Tally, request_frame, request_schema, write_results

LITE = "bytedance/seedance-1.0-lite-t2v"
PRO15 = "bytedance/seedance-1.5-pro-t2v"


def submit(url: str, tmp_path: Path, *inputs: Path, out: str = "r.parquet", extra=()):
    return cli(["submit", *map(str, inputs), "-o", str(tmp_path / out), "--base-url", url,
                "--state", str(tmp_path / "s.sqlite"), "--rate", "0", *extra])


def workbook(path: Path, rows: list[list]) -> Path:
    book = openpyxl.Workbook()
    for row in rows:
        book.active.append(row)
    book.save(path)
    return path


def bodies(fake) -> list[dict]:
    return [r.body for r in fake.state.submissions()]


def summary_of(tmp_path: Path, out: str = "r.parquet") -> dict:
    return json.loads((tmp_path / f"{out}.summary.json").read_text())


# -- 12. headers as people name parameters ---------------------------------------------------

@pytest.mark.parametrize(("ratio", "length"), [
    ("Aspect Ratio", "Length (s)"), ("aspect_ratio", "Duration [s]"), ("Ratio (W:H)", "length"),
    ("Aspect-ratio", "Video length (seconds)"),
])
def test_headers_as_people_name_parameters_reach_their_fields(fake, tmp_path: Path, ratio: str,
                                                              length: str) -> None:
    """Reported: these were passed through as unknown columns and the videos were made with
    the API's default ratio and length, exit 0."""
    path = write_csv(tmp_path / "in.csv", [{"prompt": "a fox", ratio: "9:16", length: "7"}])
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 0, res.output
    assert bodies(fake) == [{"prompt": "a fox", "ratio": "9:16", "duration": 7, "service_tier": "flex"}]
    df = results(tmp_path / "r.parquet")
    assert df["ratio"].to_list() == ["9:16"] and df["duration"].to_list() == [7]
    assert ratio not in df.columns and length not in df.columns


def test_synonyms_in_a_workbook_and_two_names_for_one_field(fake, tmp_path: Path) -> None:
    book = workbook(tmp_path / "in.xlsx", [["Prompt", "Aspect ratio", "Length (s)", "Frame count", "Random seed"],
                                           ["a fox", "1:1", 6, 29, 42]])
    res = submit(fake.url, tmp_path, book)
    assert res.exit_code == 0, res.output
    assert bodies(fake) == [{"prompt": "a fox", "ratio": "1:1", "duration": 6, "frames": 29, "seed": 42,
                             "service_tier": "flex"}]
    both = write_csv(tmp_path / "both.csv", [{"prompt": "p", "ratio": "16:9", "Aspect Ratio": "9:16"}])
    res = submit(fake.url, tmp_path, both)
    assert res.exit_code == 2
    assert "columns 'ratio' and 'Aspect Ratio' both name the field 'ratio'" in error_line(res.stderr)
    assert len(fake.state.submissions()) == 1  # only the first run's request


@pytest.mark.parametrize(("header", "values", "field"), [
    ("Format", ["9:16", "16:9", ""], "ratio"), ("Quality", ["1080P", "720p"], "resolution"),
    ("Shape", ["adaptive"], "ratio"),
])
def test_a_column_holding_a_fields_values_under_another_name_is_an_error(fake, tmp_path: Path, header: str,
                                                                         values: list[str], field: str) -> None:
    rows = [{"prompt": f"p{i}", header: v} for i, v in enumerate(values)]
    path = write_csv(tmp_path / "in.csv", rows)
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 2, res.output
    line = error_line(res.stderr)
    assert f"column {header!r}" in line and f"field {field!r}" in line and "--passthrough" in line
    assert "\n" not in line and fake.state.submissions() == []
    res = submit(fake.url, tmp_path, path, extra=["--passthrough", header])  # kept on purpose
    assert res.exit_code == 0, res.output
    assert all(field not in b for b in bodies(fake))


@pytest.mark.parametrize("series", [
    pl.Series("Format", ["9:16", "16:9"], dtype=pl.Categorical),
    pl.Series("Format", [["9:16", "16:9"], ["1:1"]]),
])
def test_a_parquet_column_of_a_fields_values_is_an_error_whatever_its_type(fake, tmp_path: Path,
                                                                           series: pl.Series) -> None:
    path = tmp_path / "in.parquet"
    pl.DataFrame({"prompt": ["a", "b"]}).with_columns(series).write_parquet(path)
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 2 and "field 'ratio'" in error_line(res.stderr)
    assert fake.state.submissions() == []


def test_model_names_under_another_header_are_an_error_not_the_default_model(fake, tmp_path: Path) -> None:
    """Sibling of 12: a 'Model name' column was carried through and every row went to the
    default model."""
    path = write_csv(tmp_path / "in.csv", [{"prompt": "p", "Model name": PRO15}, {"prompt": "q", "Model name": ""}])
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 2
    assert "column 'Model name' holds only values of the model column" in error_line(res.stderr)
    assert fake.state.submissions() == []
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["in.csv"]\noutput = "r.parquet"\nstate = "s.sqlite"\nrate = "0"\n'
                   f'base_url = "{fake.url}"\n[columns]\n"Model name" = "model"\n')
    res = cli(["run", str(job)])
    assert res.exit_code == 0, res.output
    assert [r.model for r in fake.state.submissions()] == [PRO15, LITE]


@pytest.mark.parametrize(("header", "field"), [("Lenght (s)", "duration"), ("Aspect Rato", "ratio"),
                                                ("Random sed", "seed"), ("Durations", "duration")])
def test_a_header_close_to_a_synonym_is_an_error_naming_the_field(fake, tmp_path: Path, header: str,
                                                                  field: str) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "p", header: "7"}])
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 2
    line = error_line(res.stderr)
    assert f"column {header!r} looks like" in line and f"the field {field!r}" in line
    assert fake.state.submissions() == []


def test_a_column_of_ordinary_values_stays_a_pass_through_column(fake, tmp_path: Path) -> None:
    rows = [{"prompt": "p1", "Notes": "9:16 would be nicer", "count": "5", "flag": "yes", "Reference": "A-1",
             "Resolved": "no", "Rest": "x", "Second": "y"},
            {"prompt": "p2", "Notes": "16:9", "count": "10", "flag": "no", "Reference": "A-2", "Resolved": "yes",
             "Rest": "x", "Second": "y"}]
    res = submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", rows))
    assert res.exit_code == 0, res.output
    assert results(tmp_path / "r.parquet")["Notes"].to_list() == ["9:16 would be nicer", "16:9"]


def test_pass_through_columns_are_listed_in_the_real_runs_summary(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"ID": "a", "prompt": "p", "campaign": "x", "Notes": "n"}])
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 0, res.output
    summary = summary_of(tmp_path)
    assert summary["passthrough_columns"] == {str(path): ["campaign", "Notes"]}
    assert f"pass-through (not sent): {path}: campaign, Notes" in res.output
    res = cli(["validate", str(path), "--state", str(tmp_path / "s.sqlite")])
    assert f"pass-through (not sent): {path}: campaign, Notes" in res.output


def test_job_params_and_columns_may_name_a_field_by_its_synonym(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"text": "a fox", "len": "8"}])
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["in.csv"]\noutput = "r.parquet"\nstate = "s.sqlite"\nrate = "0"\n'
                   f'base_url = "{fake.url}"\n[columns]\ntext = "prompt"\nlen = "Length"\n'
                   f'[params]\n"Aspect ratio" = "4:3"\n')
    res = cli(["run", str(job)])
    assert res.exit_code == 0, res.output
    res = submit(fake.url, tmp_path, path, out="cli.parquet",
                 extra=["--param", "aspect_ratio=21:9", "--param", "prompt=x"])
    assert res.exit_code == 0, res.output
    assert bodies(fake)[0] == {"prompt": "a fox", "duration": 8, "ratio": "4:3", "service_tier": "flex"}
    assert bodies(fake)[1] == {"prompt": "x", "ratio": "21:9", "service_tier": "flex"}


def test_synonyms_are_spec_data_unambiguous_across_models() -> None:
    catalog = Catalog()
    aliases = catalog.aliases()
    assert aliases["aspect_ratio"] == "ratio" and aliases["length"] == "duration"
    fields = catalog.known_fields()
    assert not set(aliases) & fields  # a synonym is never another model's field name
    for spec in shipped().values():
        for name, f in spec.fields.items():
            assert all(aliases[a] == name for a in f.aliases), (spec.slug, name)


def test_a_bare_fetched_spec_keeps_the_shipped_synonyms(fake, tmp_path: Path) -> None:
    """A provider document has no synonyms; the shipped spec of the same model supplies them."""
    doc = json.loads((Path(__file__).resolve().parent.parent / "batch" / "specs" /
                      "bytedance__seedance-1.0-lite-t2v.json").read_text())
    del doc["x-seedance-batch"]
    for prop in doc["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"].values():
        prop.pop("x-aliases", None)
    (tmp_path / "bare.json").write_text(json.dumps(doc))
    assert cli(["models", "add", str(tmp_path / "bare.json"), "--slug", LITE]).exit_code == 0
    path = write_csv(tmp_path / "in.csv", [{"prompt": "a fox", "Aspect Ratio": "9:16"}])
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 0, res.output
    assert bodies(fake) == [{"prompt": "a fox", "ratio": "9:16", "service_tier": "flex"}]


def test_an_invalid_row_is_recorded_as_written(fake, tmp_path: Path) -> None:
    """Reported: a model cell Seedance-1.5-Pro-T2V was shown as the default model, seed 3.7
    as 3, an invalid frames as null."""
    book = workbook(tmp_path / "in.xlsx", [
        ["id", "prompt", "model", "seed", "frames", "ratio"],
        ["m", "a fox", "Seedance-1.5-Pro-T2V", 7, None, "9:16"],
        ["s", "a hare", None, 3.7, 33, "1:1"],
        ["f", "a crow", None, 5, "thirty", "16:9"],
        ["ok", "an owl", None, 5, 33, "4:3"],
    ])
    res = submit(fake.url, tmp_path, book)
    assert res.exit_code == 1, res.output
    df = results(tmp_path / "r.parquet")
    assert df.schema["seed"] == pl.Int64 and df.schema["frames"] == pl.Int64  # typed for the valid rows
    assert df["status"].to_list() == ["invalid", "invalid", "invalid", "submitted"]
    assert df["model"].to_list() == ["Seedance-1.5-Pro-T2V", LITE, LITE, LITE]
    assert df["seed"].to_list() == [7, None, 5, 5]  # never 3
    assert df["frames"].to_list() == [None, 33, None, 33]
    written = [json.loads(v) if v else None for v in df["as_written"].to_list()]
    assert written[0]["model"] == "Seedance-1.5-Pro-T2V"
    assert written[1]["seed"] == 3.7 and written[2]["frames"] == "thirty" and written[3] is None
    errors = df["error"].to_list()
    assert "model='Seedance-1.5-Pro-T2V': unknown model" in errors[0] and PRO15 in errors[0]
    assert "seed=3.7: must be an integer" in errors[1] and "frames='thirty': must be an integer" in errors[2]
    # the CSV table says the same
    res = submit(fake.url, tmp_path, book, out="r.csv")
    csv = pl.read_csv(tmp_path / "r.csv", infer_schema=False)
    assert csv["model"][0] == "Seedance-1.5-Pro-T2V" and csv["seed"][1] is None
    assert json.loads(csv["as_written"][1])["seed"] == 3.7


def test_a_value_for_a_field_the_rows_model_lacks_is_kept_as_written(fake, tmp_path: Path) -> None:
    """Sibling of 14: in a sheet that mixes models, a frames cell on a 1.5 row was dropped
    from the record (the typed column empty, the value nowhere)."""
    path = write_csv(tmp_path / "in.csv", [{"prompt": "a", "model": PRO15, "frames": "33"},
                                           {"prompt": "b", "model": LITE, "frames": "33"}])
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 1, res.output
    df = results(tmp_path / "r.parquet")
    assert df["status"].to_list() == ["invalid", "submitted"]
    assert json.loads(df["as_written"][0]) == {"frames": "33", "prompt": "a", "service_tier": "flex"}
    assert f"frames: {PRO15} has no field 'frames'" in df["error"][0]


def test_an_input_column_named_like_the_as_written_column_is_kept(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "p", "as_written": "mine"}])
    assert submit(fake.url, tmp_path, path).exit_code == 0
    df = results(tmp_path / "r.parquet")
    assert df["input_as_written"].to_list() == ["mine"] and df["as_written"].to_list() == [None]


# -- 15. a real run names the rows edited since they were submitted --------------------------------

def test_a_real_run_says_how_many_rows_were_edited_since_submitted(fake, tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"shot {i}"} for i in range(4)]
    path = write_csv(tmp_path / "in.csv", rows)
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 0 and summary_of(tmp_path)["edited"] == 0
    rows[1]["prompt"] = "shot 1, edited"
    rows[2]["prompt"] = "shot 2, edited"
    write_csv(path, [*rows, {"id": "new", "prompt": "brand new"}])
    dry = submit(fake.url, tmp_path, path, out="dry.parquet", extra=["--dry-run"])
    assert summary_of(tmp_path, "dry.parquet")["estimate"]["edited"] == 2
    res = submit(fake.url, tmp_path, path, extra=["--metrics-file", str(tmp_path / "m.prom")])
    assert res.exit_code == 0, res.output
    assert summary_of(tmp_path)["edited"] == 2
    assert "edited: 2 requests whose id was submitted before with other content" in res.output
    assert 'seedance_batch_last_run_edited{job="submit"} 2' in (tmp_path / "m.prom").read_text()
    assert "edited: 2 requests" in dry.output
    res = submit(fake.url, tmp_path, path)  # a rerun sends nothing, so edits nothing
    assert summary_of(tmp_path)["edited"] == 0 and "edited:" not in res.output


def test_a_ledger_failing_while_edits_are_counted_costs_the_count_never_the_table(tmp_path: Path) -> None:
    """The count is read from the ledger after the requests were paid for: a ledger that
    fails then (a closed or broken database) must not stop the table from being written."""
    broken = sqlite3.connect(tmp_path / "l.sqlite")
    broken.close()

    def labels(_: object) -> dict[str, set[str]]:
        broken.execute("SELECT 1")  # sqlite3.ProgrammingError: a closed database
        return {}

    def outcomes(ids: list[str]) -> list[tuple]:
        row = dict.fromkeys(OUTCOME_COLUMNS) | {"status": "submitted", "run_id": "tonight", "task_id": "t1"}
        return [tuple({**row, "request_id": rid}[c] for c in OUTCOME_COLUMNS) for rid in ids]

    schema = request_schema({}, {"prompt": pl.String()})
    frame = request_frame([Request("rid-1", "in.csv", 2, {"prompt": "p"}, {}, label="a")], schema)
    tally, error = write_results(tmp_path / "r.parquet", [frame], schema, outcomes, Resolution("tonight"),
                                 tolerate_io=True, tally=Tally(labels=labels))
    assert error is None and tally.edited is None and tally.counts["submitted"] == 1
    assert results(tmp_path / "r.parquet")["task_id"].to_list() == ["t1"]
