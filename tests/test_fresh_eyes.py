"""Defects a fresh-eyes reviewer (a new data-team user) reproduced against the fake
(issue #18 follow-up): each test below reproduces one report, then its siblings."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import cli, error_line, json_lines, prompts, run_cli_process, subprocess_env, write_csv

from batch.models import Catalog, normalize_name

# Two time zones 26 hours apart: their local dates always differ (night 1 and night 2).
EARLY, LATE = "Etc/GMT-14", "Etc/GMT+12"


# -- 1. {date} in -o / --results on the command line ----------------------------------------

def test_cli_output_date_template_is_expanded_and_collect_follows_every_night(fake, tmp_path: Path) -> None:
    """Reported: `-o 'in/{date}.parquet'` on the command line was written literally, so
    night 2 overwrote night 1's table and collect never followed night 1's tasks."""
    write_csv(tmp_path / "n1.csv", prompts(3, "night one"))
    write_csv(tmp_path / "n2.csv", prompts(2, "night two"))
    template = str(tmp_path / "results" / "{date}.parquet")
    common = ["--state", str(tmp_path / "s.sqlite"), "--base-url", fake.url, "--rate", "0"]
    for tz, inputs in ((EARLY, "n1.csv"), (LATE, "n2.csv")):
        res = run_cli_process(["submit", str(tmp_path / inputs), "-o", template, *common],
                              env=subprocess_env(TZ=tz))
        assert res.returncode == 0, res.stderr
    tables = sorted((tmp_path / "results").glob("*.parquet"))
    assert len(tables) == 2, tables
    assert not (tmp_path / "results" / "{date}.parquet").exists()
    assert sorted(pl.read_parquet(t).height for t in tables) == [2, 3]
    morning = run_cli_process(["collect", "--results", template, "--download", str(tmp_path / "v"),
                               "--state", str(tmp_path / "s.sqlite"), "--base-url", fake.url, "--rate", "0"],
                              env=subprocess_env(TZ=LATE))
    assert morning.returncode == 0, morning.stderr
    for table in tables:
        assert pl.read_parquet(table)["task_status"].to_list() == ["success"] * pl.read_parquet(table).height, \
            morning.stderr
        # 2. the page is written beside each table collect rewrote
        assert table.with_suffix(".html").exists(), morning.stderr
    assert len(list((tmp_path / "v").glob("*.mp4"))) == 5
    assert "page_not_written" not in morning.stderr


def test_collect_job_after_midnight_writes_the_page_beside_last_nights_table(fake, tmp_path: Path) -> None:
    """Reported: collect JOB --download after midnight rewrote last night's {date} table
    but tried to write the page for tonight's (missing) table: page_not_written."""
    write_csv(tmp_path / "in.csv", prompts(2))
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["in.csv"]\noutput = "results/{{date}}.parquet"\nstate = "s.sqlite"\n'
                   f'rate = "0"\nbase_url = "{fake.url}"\ndownload = "videos/"\n')
    assert run_cli_process(["run", str(job)], env=subprocess_env(TZ=EARLY)).returncode == 0
    (table,) = (tmp_path / "results").glob("*.parquet")
    morning = run_cli_process(["collect", str(job)], env=subprocess_env(TZ=LATE))
    assert morning.returncode == 0, morning.stderr
    assert "page_not_written" not in morning.stderr
    assert table.with_suffix(".html").exists()
    assert [p.name for p in (tmp_path / "results").glob("*.html")] == [table.with_suffix(".html").name]


def test_a_bad_placeholder_in_cli_output_is_one_line(tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", prompts(1))
    res = cli(["submit", str(tmp_path / "in.csv"), "-o", str(tmp_path / "{night}.parquet"), "--dry-run"])
    assert res.exit_code == 2
    assert "{date}" in res.output


def test_a_table_replaced_by_another_nights_requests_warns(fake, tmp_path: Path) -> None:
    """Sibling: a fixed -o whose table holds task ids of requests not in tonight's input
    lost them from the table silently. They stay in the ledger; the run says so."""
    out = tmp_path / "r.parquet"
    common = ["-o", str(out), "--state", str(tmp_path / "s.sqlite"), "--base-url", fake.url, "--rate", "0"]
    write_csv(tmp_path / "a.csv", prompts(3, "first"))
    write_csv(tmp_path / "b.csv", prompts(1, "second"))
    # In-process (a warning, not a process's behaviour): three start-ups of the CLI saved.
    assert cli(["submit", str(tmp_path / "a.csv"), *common]).exit_code == 0
    res = cli(["submit", str(tmp_path / "b.csv"), *common])
    assert res.exit_code == 0, res.stderr
    (event,) = [e for e in json_lines(res.stderr) if e.get("event") == "table_replaced"]
    assert event["task_ids_dropped"] == 3
    assert "ledger" in event["note"]
    # Rerunning the same input replaces nothing: no warning.
    again = cli(["submit", str(tmp_path / "b.csv"), *common])
    assert not [e for e in json_lines(again.stderr) if e.get("event") == "table_replaced"]


# -- 3. headers that clearly name a field in a form the matcher missed ----------------------

PRO15 = "bytedance/seedance-1.5-pro-t2v"


def _submit(fake, tmp_path: Path, path: Path, *extra: str):
    return cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url,
                "--state", str(tmp_path / "s.sqlite"), "--rate", "0", *extra])


@pytest.mark.parametrize(("header", "value", "field", "sent"), [
    ("Clip duration", "7", "duration", 7), ("Audio", "yes", "generate_audio", True),
    ("Sound", "FALSE", "generate_audio", False), ("With sound", "TRUE", "generate_audio", True),
    ("Static shot", "yes", "camera_fixed", True), ("Fixed cam", "no", "camera_fixed", False),
])
def test_synonyms_people_write_reach_their_fields(fake, tmp_path: Path, header: str, value: str, field: str,
                                                  sent) -> None:
    """Reported: these headers passed through silently; the video got the API's default."""
    path = write_csv(tmp_path / "in.csv", [{"prompt": "a fox", header: value}])
    res = _submit(fake, tmp_path, path, "--model", PRO15)
    assert res.exit_code == 0, res.output
    (request,) = fake.state.submissions()
    assert request.body[field] == sent


@pytest.mark.parametrize(("header", "field"), [
    ("Dur.", "duration"), ("Res.", "resolution"), ("Video duration (sec)", "duration"),
    ("Camera fixed?", "camera_fixed"), ("Target resolution", "resolution"), ("Fixed camera yes/no", "camera_fixed"),
])
def test_a_header_holding_a_fields_name_is_an_error_naming_it(fake, tmp_path: Path, header: str, field: str) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "a fox", header: "5"}])
    res = _submit(fake, tmp_path, path)
    if normalize_name(header) in Catalog().aliases() or normalize_name(header) in Catalog().known_fields():
        return  # a plain synonym (Res.) maps to its field: not this test's case
    assert res.exit_code == 2, res.output
    line = error_line(res.stderr)
    assert f"'{field}'" in line and repr(header) in line
    assert fake.state.submissions() == []
    # --passthrough keeps it as it is
    res = _submit(fake, tmp_path, path, "--passthrough", header)
    assert res.exit_code == 0, res.output


def test_ordinary_headers_stay_pass_through(fake, tmp_path: Path) -> None:
    rows = [{"prompt": "p", "Notes": "n", "campaign": "c", "Video title": "t", "Prompt notes": "x",
             "No.": "1", "Doc.": "d", "Sound designer": "Ann", "Shot": "A", "Customer tier": "gold"}]
    res = _submit(fake, tmp_path, write_csv(tmp_path / "in.csv", rows))
    assert res.exit_code == 0, res.output
    (request,) = fake.state.submissions()
    assert request.body == {"prompt": "p", "service_tier": "flex"}


# -- 4. xlsxwriter's formula cells hold a placeholder 0, not a value -------------------------

def test_formulas_in_a_workbook_that_asks_to_be_recalculated_are_not_sent(fake, tmp_path: Path) -> None:
    """Reported: xlsxwriter writes `<f>1=1</f><v>0</v>` and marks the workbook
    fullCalcOnLoad; the tool sent 0/False as the formula's value."""
    import xlsxwriter

    path = tmp_path / "in.xlsx"
    book = xlsxwriter.Workbook(str(path))
    sheet = book.add_worksheet("Night")
    sheet.write_row(0, 0, ["prompt", "duration", "camera_fixed", "note"])
    sheet.write_row(1, 0, ["a fox", 5, True, "plain"])
    sheet.write_formula(2, 0, '="a cat "&"at dusk"')
    sheet.write_formula(2, 1, "=2+3")
    sheet.write(2, 3, "x")
    sheet.write(3, 0, "a dog")
    sheet.write_formula(3, 2, "=1=1")
    sheet.write_formula(3, 3, "=1+1")  # a pass-through column: not a request field, the row stays valid
    sheet.write_row(4, 0, ["an owl", 6])
    book.close()
    res = _submit(fake, tmp_path, path, "--model", "bytedance/seedance-1.0-lite-t2v")
    assert res.exit_code == 1, res.output
    table = pl.read_parquet(tmp_path / "r.parquet")
    assert table["status"].to_list() == ["submitted", "invalid", "invalid", "submitted"]
    errors = table["error"].to_list()
    assert "A3" in errors[1] and "formula" in errors[1]
    assert "C4" in errors[2] and "formula" in errors[2]
    assert sorted(r.body["prompt"] for r in fake.state.submissions()) == ["a fox", "an owl"]


def test_cached_formula_values_excel_saved_are_still_read(fake, tmp_path: Path) -> None:
    """The other side: a workbook saved by a calculating program (no fullCalcOnLoad) keeps
    its cached values, which are trusted as before."""
    import zipfile

    import openpyxl

    path = tmp_path / "in.xlsx"
    book = openpyxl.Workbook()
    book.active.append(["prompt", "duration"])
    book.active.append(["a fox", "=2+3"])
    book.save(path)
    # Put the value Excel would have saved into the formula cell (openpyxl writes none).
    with zipfile.ZipFile(path) as zf:
        parts = {n: zf.read(n) for n in zf.namelist()}
    sheet = "xl/worksheets/sheet1.xml"
    parts[sheet] = parts[sheet].replace(b"<f>2+3</f><v></v>", b"<f>2+3</f><v>5</v>").replace(
        b"<f>2+3</f><v />", b"<f>2+3</f><v>5</v>")
    assert b"<v>5</v>" in parts[sheet], parts[sheet]
    parts["xl/workbook.xml"] = parts["xl/workbook.xml"].replace(b' fullCalcOnLoad="1"', b"")  # as Excel saves
    assert b"fullCalcOnLoad" not in parts["xl/workbook.xml"]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in parts.items():
            zf.writestr(name, data)
    res = _submit(fake, tmp_path, path)
    assert res.exit_code == 0, res.output
    (request,) = fake.state.submissions()
    assert request.body["duration"] == 5


# -- 5. hidden sheets are named, never silently unread ---------------------------------------

def _hidden_book(path: Path) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    book.active.title = "Main"
    book.active.append(["prompt"])
    book.active.append(["a fox"])
    extra = book.create_sheet("Extra")
    extra.append(["prompt"])
    extra.append(["a hidden cat"])
    extra.sheet_state = "hidden"
    book.save(path)
    return path


def test_a_hidden_sheet_with_prompts_is_named_in_skipped_files(fake, tmp_path: Path) -> None:
    path = _hidden_book(tmp_path / "in.xlsx")
    for extra in ((), ("--sheet", "all")):
        res = _submit(fake, tmp_path, path, *extra)
        assert res.exit_code == 0, res.output
        summary = json.loads((tmp_path / "r.parquet.summary.json").read_text())
        assert {"source": f"{path}[Extra]", "reason": "hidden sheet, not read; --sheet Extra reads it"} in \
            summary["skipped_files"], summary["skipped_files"]
        assert "Extra" in res.output
    assert [r.body["prompt"] for r in fake.state.submissions()] == ["a fox"]
    res = _submit(fake, tmp_path, path, "--sheet", "Extra")
    assert res.exit_code == 0, res.output
    assert sorted(r.body["prompt"] for r in fake.state.submissions()) == ["a fox", "a hidden cat"]


# -- 6. --max-spend for models whose spec has no default resolution --------------------------

I2V = "bytedance/seedance-1.5-pro-i2v"
I2V_PRICES = f'["{I2V}"]\n"480p" = 0.02\n"720p" = 0.04\n"1080p" = 0.08\n'


def _i2v_rows(n: int, resolution: str = "") -> list[dict]:
    return [{"prompt": f"frame {i}", "model": I2V, "first_frame_image": f"https://img.example/{i}.png",
             **({"resolution": resolution} if resolution else {})} for i in range(n)]


def test_max_spend_prices_an_api_default_resolution_at_the_models_dearest(fake, tmp_path: Path) -> None:
    """Reported: an i2v model (no default resolution in its spec) under --max-spend left all
    rows pending, exit 6 and a message about task ids in a rescue file, with 0 sent; the
    price check also demanded the default model's prices although no row used it."""
    prices = tmp_path / "prices.toml"
    prices.write_text(I2V_PRICES)
    path = write_csv(tmp_path / "in.csv", _i2v_rows(5))
    res = _submit(fake, tmp_path, path, "--prices", str(prices), "--max-spend", "1.0", "--no-preflight")
    # 5 s at the dearest priced resolution (1080p, 0.08/s): 0.40 a request, so 2 fit under 1.00.
    assert res.exit_code == 1, res.output
    assert len(fake.state.submissions()) == 2
    table = pl.read_parquet(tmp_path / "r.parquet")
    assert table["status"].to_list() == ["submitted"] * 2 + ["pending"] * 3
    assert "rescue" not in res.output
    summary = json.loads((tmp_path / "r.parquet.summary.json").read_text())
    assert summary["spend"]["this_run_usd"] == pytest.approx(0.8)


def test_max_spend_with_a_named_resolution_uses_its_price(fake, tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(I2V_PRICES)
    path = write_csv(tmp_path / "in.csv", _i2v_rows(6, "480p"))  # 0.10 a request
    res = _submit(fake, tmp_path, path, "--prices", str(prices), "--max-spend", "0.5", "--no-preflight")
    assert res.exit_code == 1, res.output
    assert len(fake.state.submissions()) == 5


# -- 7. non-finite and negative numbers; a --passthrough naming no column --------------------

@pytest.mark.parametrize("option", ["--max-spend", "--timeout", "--grace", "--progress-interval"])
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e309"])
def test_non_finite_float_options_are_refused(tmp_path: Path, option: str, value: str) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(1))
    res = cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--dry-run", "--fake-api", option, value])
    assert res.exit_code == 2, res.output
    assert not (tmp_path / "r.parquet").exists()


def test_max_spend_from_the_environment_must_be_finite(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(1))
    res = cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--dry-run", "--fake-api"],
              env={"SEEDANCE_BATCH_MAX_SPEND": "NaN"})
    assert res.exit_code == 2, res.output
    assert "--max-spend" in res.output


@pytest.mark.parametrize(("key", "value"), [("max_spend", "nan"), ("max_spend", "-1"), ("max_spend", "inf"),
                                            ("timeout", "nan"), ("grace", "-inf"), ("grace", "-3")])
def test_non_finite_or_negative_job_numbers_are_refused(tmp_path: Path, key: str, value: str) -> None:
    write_csv(tmp_path / "in.csv", prompts(1))
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["in.csv"]\noutput = "r.parquet"\n{key} = {value}\n')
    res = cli(["run", str(job), "--dry-run", "--fake-api"])
    assert res.exit_code == 2, res.output
    assert key in res.output


def test_a_passthrough_naming_no_column_warns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "p", "Aspect ratio note": "wide"}])
    res = cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--dry-run", "--fake-api",
               "--passthrough", "Aspect Ratoi", "--passthrough", "aspect ratio note"])
    assert res.exit_code == 0, res.stderr
    events = [e for e in json_lines(res.stderr) if e.get("event") == "passthrough_unused"]
    assert [e["column"] for e in events] == ["Aspect Ratoi"]


# -- 8. a trimmed copy of a results table is the tool's own output ---------------------------

def test_a_trimmed_results_table_in_the_inbox_is_not_paid_again(fake, tmp_path: Path) -> None:
    """Reported: `id,prompt,duration,status,task_id` (Excel users delete columns) in the
    inbox was read as prompts and paid again."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    write_csv(inbox / "tonight.csv", prompts(2, "tonight"))
    out = tmp_path / "first.parquet"
    assert cli(["submit", str(inbox), "-o", str(out), "--base-url", fake.url, "--state",
                str(tmp_path / "s.sqlite"), "--rate", "0"]).exit_code == 0
    trimmed = pl.read_parquet(out).select("id", "prompt", "status", "task_id")
    trimmed = trimmed.with_columns(pl.Series("prompt", ["an edited prompt 0", "an edited prompt 1"]))
    trimmed.write_csv(inbox / "copy of results.csv")
    res = cli(["submit", str(inbox), "-o", str(tmp_path / "second.parquet"), "--base-url", fake.url,
               "--state", str(tmp_path / "s.sqlite"), "--rate", "0"])
    assert res.exit_code == 0, res.stderr
    assert len(fake.state.submissions()) == 2
    (event,) = [e for e in json_lines(res.stderr) if e.get("event") == "input_skipped"]
    assert event["source"].endswith("copy of results.csv") and "results table" in event["reason"]
    res = cli(["submit", str(inbox / "copy of results.csv"), "-o", str(tmp_path / "third.parquet"),
               "--base-url", fake.url, "--state", str(tmp_path / "s.sqlite"), "--rate", "0"])
    assert res.exit_code == 2
    assert len(fake.state.submissions()) == 2


def test_a_users_own_status_column_is_still_read(fake, tmp_path: Path) -> None:
    rows = [{"prompt": "a fox", "status": "approved", "task_id": ""},
            {"prompt": "an owl", "status": "todo", "task_id": "JIRA-12"}]
    res = _submit(fake, tmp_path, write_csv(tmp_path / "in.csv", rows))
    assert res.exit_code == 0, res.output
    assert len(fake.state.submissions()) == 2
    rows = [{"prompt": "a cat", "status": "pending", "task_id": ""}]  # the tool's words, but no task id
    res = _submit(fake, tmp_path, write_csv(tmp_path / "in2.csv", rows))
    assert res.exit_code == 0, res.output
    assert len(fake.state.submissions()) == 3


# -- 9. smaller: summary path, results line, resend hint, `Prompt:` title rows --------------

def test_a_directory_at_the_summary_path_stops_the_run_before_sending(fake, tmp_path: Path) -> None:
    (tmp_path / "r.parquet.summary.json").mkdir()
    res = _submit(fake, tmp_path, write_csv(tmp_path / "in.csv", prompts(2)))
    assert res.exit_code == 2, res.output
    assert "summary.json" in error_line(res.stderr) and "nothing sent" in error_line(res.stderr)
    assert fake.state.submissions() == []


def test_a_title_row_labelled_prompt_colon_is_not_the_header(fake, tmp_path: Path) -> None:
    """Reported: a title row holding `Prompt:` was taken as the header."""
    import openpyxl

    book = openpyxl.Workbook()
    for row in (["Prompt:", "December campaign"], [], ["prompt", "duration"], ["a fox", 7], ["an owl", 8]):
        book.active.append(row)
    book.save(tmp_path / "in.xlsx")
    res = _submit(fake, tmp_path, tmp_path / "in.xlsx")
    assert res.exit_code == 0, res.output
    assert sorted((r.body["prompt"], r.body["duration"]) for r in fake.state.submissions()) == [
        ("a fox", 7), ("an owl", 8)]
    (tmp_path / "in.csv").write_text("Prompt:,December campaign\nprompt,duration\na cat,6\n")
    res = _submit(fake, tmp_path, tmp_path / "in.csv")
    assert res.exit_code == 0, res.output
    assert ("a cat", 6) in [(r.body["prompt"], r.body.get("duration")) for r in fake.state.submissions()]


def test_a_prompt_colon_header_alone_is_still_the_header(fake, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("Prompt:,Duration:\na cat,6\n")
    res = _submit(fake, tmp_path, tmp_path / "in.csv")
    assert res.exit_code == 0, res.output
    assert [r.body for r in fake.state.submissions()] == [{"prompt": "a cat", "duration": 6, "service_tier": "flex"}]


def test_unknowns_the_spend_cap_stopped_say_so_not_use_resend_unknown(start_fake, tmp_path: Path) -> None:
    """Reported: with --resend-unknown and the cap reached, leftover unknowns said "not
    resent (use --resend-unknown)", the option the operator had given."""
    fake = start_fake(faults=["500,match=MAYBE"])
    rows = [{"prompt": "sure 0"}, {"prompt": "MAYBE 1"}, {"prompt": "MAYBE 2"}]
    path = write_csv(tmp_path / "in.csv", rows)
    prices = tmp_path / "prices.toml"
    prices.write_text('["bytedance/seedance-1.0-lite-t2v"]\n"480p" = 0.02\n"720p" = 0.08\n"1080p" = 0.16\n'
                      'flex = { "720p" = 0.04 }\n')  # 0.20 a request
    args = ["--prices", str(prices), "--no-preflight"]
    assert _submit(fake, tmp_path, path, *args).exit_code == 1  # two unknown
    res = _submit(fake, tmp_path, path, *args, "--resend-unknown", "--max-spend", "0.85")  # 0.60 + 0.20 fits
    table = pl.read_parquet(tmp_path / "r.parquet")
    assert len(fake.state.submissions()) == 4  # one of the two unknowns was resent (and failed again)
    errors = table.filter(pl.col("status") == "unknown")["error"].to_list()
    assert len(errors) == 2 and not any("use --resend-unknown" in e for e in errors), errors
    assert any("not resent this run: --max-spend" in e for e in errors), errors
    assert res.exit_code == 1


@pytest.mark.parametrize(("text", "prompts_read"), [
    # ';'-separated; one header names a column with commas in it
    ("prompt;duration;Notes, remarks, misc\nA fox, running, jumping;5;x\nAn owl;6;y, z\n",
     ["A fox, running, jumping", "An owl"]),
    # ','-separated; prompts with ';' inside, quoted and not
    ('prompt,duration\n"a; b; c",5\nd; e,6\n', ["a; b; c", "d; e"]),
    # ';' file whose header has more commas than semicolons, and a title row above it
    ("Night of 7 Dec, final, v2\nprompt;Campaign, region, owner\nOne, two, three;EU, x, y\n",
     ["One, two, three"]),
])
def test_the_delimiter_is_the_one_every_line_agrees_on(fake, tmp_path: Path, text: str,
                                                       prompts_read: list[str]) -> None:
    """Reported: a ';'-separated file whose header has commas inside one column name was
    split on commas. A prompt is never changed by the choice."""
    (tmp_path / "in.csv").write_text(text)
    res = _submit(fake, tmp_path, tmp_path / "in.csv", "--passthrough", "Notes, remarks, misc",
                  "--passthrough", "Campaign, region, owner")
    assert res.exit_code == 0, res.output
    assert sorted(r.body["prompt"] for r in fake.state.submissions()) == sorted(prompts_read)
