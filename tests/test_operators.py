"""Real spreadsheets, real operators (issue #11): each test is one everyday path that gave
a wrong video, a lost table or a second payment, over files written the way people make
them (openpyxl workbooks, CSV in each dialect) and the fake API over HTTP."""

import datetime as dt
import json
import sqlite3
import time
from pathlib import Path

import openpyxl
import polars as pl
import pytest
from conftest import KEY, SAMPLES, cli, error_line, json_lines, prompts, results, write_csv

from batch.download import file_stem
from batch.identity import content_key
from batch.ledger import APPLICATION_ID

LITE = "bytedance/seedance-1.0-lite-t2v"


def run(args: list[str], **env: str):
    return cli(args, env=env or None)


def submit(url: str, tmp_path: Path, *inputs: Path, out: str = "r.parquet", state: str = "s.sqlite", extra=()):
    return cli(["submit", *map(str, inputs), "-o", str(tmp_path / out), "--base-url", url,
                "--state", str(tmp_path / state), "--rate", "0", *extra])


def workbook(path: Path, rows: list[list], sheets: dict[str, list[list]] | None = None, title: str = "Prompts") -> Path:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = title
    for row in rows:
        sheet.append(row)
    for name, other in (sheets or {}).items():
        extra = book.create_sheet(name)
        for row in other:
            extra.append(row)
    book.save(path)
    return path


def bodies(fake) -> list[dict]:
    return [r.body for r in fake.state.submissions()]


# -- 1. a trial run never stands in for a real one ----------------------------------------

def test_a_fake_run_never_stands_in_for_a_real_submission(start_fake, tmp_path: Path) -> None:
    """Reported: a job with state = "..." run once with --fake-api, then for real, reported
    the rows skipped with the fake's task ids; the real videos were never made."""
    write_csv(tmp_path / "in.csv", prompts(6))
    job = tmp_path / "job.toml"
    job.write_text('inputs = ["in.csv"]\noutput = "r.parquet"\nstate = "state.sqlite"\nrate = "0"\n')
    assert run(["run", str(job), "--fake-api"]).exit_code == 0
    assert run(["run", str(job), "--fake-api"]).exit_code == 0  # the demo's rerun skips: one fake, any port
    assert results(tmp_path / "r.parquet")["status"].to_list() == ["skipped"] * 6
    real = start_fake()
    res = run(["run", str(job), "--base-url", real.url])
    assert res.exit_code == 0, res.output
    assert len(real.state.submissions()) == 6
    df = results(tmp_path / "r.parquet")
    assert df["status"].to_list() == ["submitted"] * 6
    assert set(df["task_id"]) == {r.task_id for r in real.state.submissions()}
    assert df["endpoint"].str.starts_with(real.url).all() and df["model"].unique().to_list() == [LITE]


def test_a_ledger_of_another_api_is_refused_unless_moved_on_purpose(start_fake, tmp_path: Path) -> None:
    old, new = start_fake(), start_fake()
    path = write_csv(tmp_path / "in.csv", prompts(5))
    assert submit(old.url, tmp_path, path).exit_code == 0
    res = submit(new.url, tmp_path, path)
    assert res.exit_code == 2
    assert f"--moved-from {old.url}" in error_line(res.stderr) and new.state.records == []
    res = submit(new.url, tmp_path, path, extra=["--moved-from", old.url])
    assert res.exit_code == 0, res.output
    assert new.state.submissions() == [] and results(tmp_path / "r.parquet")["status"].to_list() == ["skipped"] * 5


def test_collect_polls_each_task_at_the_api_that_issued_it(start_fake, tmp_path: Path) -> None:
    issuer, elsewhere = start_fake(), start_fake()
    path = write_csv(tmp_path / "in.csv", prompts(3))
    assert submit(issuer.url, tmp_path, path).exit_code == 0
    res = cli(["collect", "--state", str(tmp_path / "s.sqlite"), "--base-url", elsewhere.url, "--rate", "0"])
    assert res.exit_code == 0, res.output
    assert len(issuer.state.polls()) == 3 and elsewhere.state.records == []


# -- 2. a dry run never destroys a real results table ---------------------------------------

def test_a_dry_run_writes_beside_a_table_that_holds_task_ids(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(4))
    assert submit(fake.url, tmp_path, path).exit_code == 0
    before = (tmp_path / "r.parquet").read_bytes()
    res = cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--dry-run", "--state", str(tmp_path / "s.sqlite"),
               "--base-url", fake.url])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.parquet").read_bytes() == before
    assert f"results: {tmp_path / 'r.dry-run.parquet'}" in res.output
    assert results(tmp_path / "r.dry-run.parquet")["status"].to_list() == ["skipped"] * 4


def test_collect_results_rebuilds_the_submit_columns_from_the_ledger(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(4))
    assert submit(fake.url, tmp_path, path).exit_code == 0
    good = results(tmp_path / "r.parquet")
    # What an older version's dry run left: statuses dry_run, every submit column empty.
    wiped = good.with_columns(pl.lit("dry_run").alias("status"),
                              *[pl.lit(None, good.schema[c]).alias(c) for c in
                                ("task_id", "endpoint", "http_status", "attempts", "submitted_at")])
    wiped.write_parquet(tmp_path / "r.parquet")
    res = cli(["collect", "--state", str(tmp_path / "s.sqlite"), "--base-url", fake.url, "--rate", "0",
               "--results", str(tmp_path / "r.parquet")])
    assert res.exit_code == 0, res.output
    back = results(tmp_path / "r.parquet")
    assert back["task_id"].to_list() == good["task_id"].to_list()
    assert back["status"].to_list() == ["submitted"] * 4 and back["task_status"].to_list() == ["success"] * 4
    assert back["submitted_at"].to_list() == good["submitted_at"].to_list()
    assert back["endpoint"].to_list() == good["endpoint"].to_list()


# -- 3. headers as people type them ---------------------------------------------------------

def test_headers_as_people_type_them_reach_their_fields(fake, tmp_path: Path) -> None:
    """Reported: Ratio, Duration, Camera fixed, Prompt, ID were carried as pass-through
    columns and the request went out with the API's defaults."""
    book = workbook(tmp_path / "in.xlsx", [
        [" ID ", "Prompt", "Ratio", "Duration", "Camera fixed", "return-last-frame", "Notes"],
        ["a1", "a fox", "9:16", 6, True, "yes", "keep"],
    ])
    res = submit(fake.url, tmp_path, book)
    assert res.exit_code == 0, res.output
    assert bodies(fake) == [{"prompt": "a fox", "ratio": "9:16", "duration": 6, "camera_fixed": True,
                             "return_last_frame": True, "service_tier": "flex"}]
    df = results(tmp_path / "r.parquet")
    assert df[" ID " if " ID " in df.columns else "ID"].to_list() == ["a1"] and df["Notes"].to_list() == ["keep"]


@pytest.mark.parametrize(("header", "field"), [("resoluton", "resolution"), ("camera_fix", "camera_fixed"),
                                                ("Durations", "duration"), ("frame", "frames")])
def test_a_header_close_to_a_field_is_an_error_naming_it(fake, tmp_path: Path, header: str, field: str) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "p", header: "x"}])
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 2
    assert f"looks like the field {field!r}" in error_line(res.stderr) and fake.state.records == []
    res = submit(fake.url, tmp_path, path, extra=["--passthrough", header])  # kept on purpose
    assert res.exit_code == 0 and bodies(fake) == [{"prompt": "p", "service_tier": "flex"}]


def test_two_headers_for_one_field_is_an_error(fake, tmp_path: Path) -> None:
    book = workbook(tmp_path / "in.xlsx", [["prompt", "Ratio", "ratio"], ["p", "16:9", "9:16"]])
    res = submit(fake.url, tmp_path, book)
    assert res.exit_code == 2 and "both name the field 'ratio'" in error_line(res.stderr)
    (tmp_path / "dup.csv").write_text("prompt,ratio,ratio\np,16:9,9:16\n")
    res = submit(fake.url, tmp_path, tmp_path / "dup.csv")
    assert res.exit_code == 2 and "'ratio' appears more than once" in error_line(res.stderr)
    assert fake.state.records == []


# -- 4. estimates that know what was already sent ----------------------------------------------

def test_estimates_count_only_what_would_be_sent(start_fake, tmp_path: Path) -> None:
    fake = start_fake(faults=["drop_accepted,match=MAYBE"])
    first = [{"id": f"r{i}", "prompt": f"shot {i}", "duration": "4"} for i in range(4)] + \
        [{"id": "m", "prompt": "MAYBE", "duration": "4"}]
    path = write_csv(tmp_path / "in.csv", first)
    assert submit(fake.url, tmp_path, path).exit_code == 1  # MAYBE is unknown
    tonight = [{**r, "prompt": "shot 0, edited"} if r["id"] == "r0" else r for r in first] + \
        [{"id": "n1", "prompt": "new one", "duration": "10"}, {"id": "n2", "prompt": "new one", "duration": "10"}]
    write_csv(path, tonight)
    prices = tmp_path / "prices.toml"
    prices.write_text(f'["{LITE}"]\n"720p" = 0.02\n')
    res = cli(["validate", str(path), "--state", str(tmp_path / "s.sqlite"), "--base-url", fake.url,
               "--prices", str(prices)])
    assert res.exit_code == 0, res.output
    assert "would send: 3 requests (3 flex); already submitted 3 (skipped), unknown 1 (not resent)" in res.output
    assert "video: 24 s at 720p" in res.output  # 4 + 10 + 10: only what would be sent
    assert "estimated cost: 0.24 USD" in res.output  # 24 s x 0.02 x 50% for flex
    assert "edited: 1 requests whose id was submitted before with other content" in res.output
    assert "identical: 1 requests repeat an earlier one" in res.output
    sent = len(fake.state.submissions())
    res = cli(["submit", str(path), "-o", str(tmp_path / "dry.parquet"), "--dry-run", "--state",
               str(tmp_path / "s.sqlite"), "--base-url", fake.url, "--prices", str(prices)])
    estimate = json.loads((tmp_path / "dry.parquet.summary.json").read_text())["estimate"]
    assert (estimate["would_send"], estimate["already_submitted"], estimate["unknown"]) == (3, 3, 1)
    assert (estimate["edited"], estimate["identical"], estimate["cost_usd"]) == (1, 1, 0.24)
    assert len(fake.state.submissions()) == sent  # nothing sent by either


# -- 5. identity that survives re-exports -------------------------------------------------------

def test_renamed_ids_another_id_column_or_xlsx_instead_of_csv_resubmit_nothing(fake, tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "sku": f"S-{i}", "prompt": f"p {i}", "ratio": "16:9"} for i in range(5)]
    assert submit(fake.url, tmp_path, write_csv(tmp_path / "in.csv", rows)).exit_code == 0
    workbook(tmp_path / "in.xlsx", [["ID", "SKU", "Prompt", "Ratio"],
                                           *[[f"renamed-{i}", f"S-{i}", f"p {i}", "16:9"] for i in range(5)]])
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["in.xlsx"]\noutput = "x.parquet"\nstate = "s.sqlite"\nrate = "0"\n'
                   f'id_column = "SKU"\nbase_url = "{fake.url}"\n')
    res = run(["run", str(job)])
    assert res.exit_code == 0, res.output
    assert results(tmp_path / "x.parquet")["status"].to_list() == ["skipped"] * 5
    assert len(fake.state.submissions()) == 5
    job.write_text(job.read_text().replace('"SKU"', '"article"'))
    res = run(["run", str(job)])
    assert res.exit_code == 2 and "id_column 'article' names no column" in error_line(res.stderr)


def test_a_version_1_state_file_is_migrated_and_nothing_is_resent(fake, tmp_path: Path) -> None:
    state = tmp_path / "s.sqlite"
    db = sqlite3.connect(state)
    db.executescript("""
        CREATE TABLE requests (request_id TEXT PRIMARY KEY, status TEXT NOT NULL, run_id TEXT NOT NULL, source TEXT,
            row INTEGER, body TEXT, task_id TEXT, error TEXT, error_code INTEGER, http_status INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0, submitted_at TEXT, updated_at TEXT NOT NULL, task_status TEXT,
            resource_urls TEXT, resources TEXT, failure_reason TEXT, completed_at TEXT, local_paths TEXT,
            download_error TEXT, polls INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
        CREATE INDEX requests_open_tasks ON requests(task_status) WHERE task_id IS NOT NULL;
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT, command TEXT,
            summary TEXT);
        PRAGMA user_version=1;
    """)
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
    for i in range(3):
        body = {"prompt": f"p {i}", "service_tier": "flex"}
        digest = content_key(LITE, body)  # any 16 hex digits: the migration recomputes the key from the body
        db.execute("INSERT INTO requests(request_id, status, run_id, source, row, body, task_id, attempts, "
                   "submitted_at, updated_at) VALUES (?, 'submitted', 'old', 'in.csv', ?, ?, ?, 1, ?, ?)",
                   (f"r{i}:{digest}", i, json.dumps(body), f"task-old-{i}", "2026-11-20T01:00:00+00:00",
                    "2026-11-20T01:00:00+00:00"))
    db.commit()
    db.close()
    path = write_csv(tmp_path / "in.csv", [{"id": f"r{i}", "prompt": f"p {i}"} for i in range(4)])
    res = submit(fake.url, tmp_path, path)
    assert res.exit_code == 0, res.output
    df = results(tmp_path / "r.parquet")
    assert df["status"].to_list() == ["skipped"] * 3 + ["submitted"]
    assert df["task_id"].to_list()[:3] == ["task-old-0", "task-old-1", "task-old-2"]
    assert [b["prompt"] for b in bodies(fake)] == ["p 3"]
    assert (tmp_path / "s.sqlite.v1-backup").exists()


# -- 6. workbooks and CSV exports as they come -----------------------------------------------

def test_sheet_choice_errors_list_the_sheets_and_hidden_sheets_are_skipped(fake, tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    hidden = book.active
    hidden.title = "Lookup"
    hidden.append(["prompt"])
    hidden.append(["from the hidden sheet"])
    hidden.sheet_state = "hidden"
    shown = book.create_sheet("Prompts")
    shown.append(["prompt"])
    shown.append(["from the visible sheet"])
    book.save(tmp_path / "in.xlsx")
    for sheet in ("0", "nope"):
        res = submit(fake.url, tmp_path, tmp_path / "in.xlsx", extra=["--sheet", sheet])
        assert res.exit_code == 2
        assert "1: Lookup (hidden), 2: Prompts" in error_line(res.stderr)
    assert submit(fake.url, tmp_path, tmp_path / "in.xlsx").exit_code == 0
    assert bodies(fake) == [{"prompt": "from the visible sheet", "service_tier": "flex"}]
    assert results(tmp_path / "r.parquet")["source"].to_list() == [f"{tmp_path / 'in.xlsx'}[Prompts]"]


def test_cells_that_only_look_empty_or_like_text_make_their_row_invalid(fake, tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Prompts"
    sheet.append(["id", "prompt", "ratio", "duration"])
    sheet.append(["f", "a fox", "9:16", "=2+3"])  # openpyxl saves no cached value
    sheet.append(["m", "merged ratio", "9:16", 5])
    sheet.append(["m2", "under the merge", None, 5])
    sheet.append(["n", 12345, "1:1", 5])
    sheet.append(["d", dt.date(2026, 1, 2), "1:1", 5])
    sheet.append(["b", True, "1:1", 5])
    sheet.append(["ok", "fine", "1:1", 5])
    sheet.merge_cells("C3:C4")
    book.save(tmp_path / "in.xlsx")
    res = submit(fake.url, tmp_path, tmp_path / "in.xlsx")
    assert res.exit_code == 1
    df = results(tmp_path / "r.parquet")
    errors = dict(zip(df["id"].to_list(), df["error"].to_list(), strict=True))
    assert errors["f"].startswith("duration: cell D2 is a formula without a saved value")
    assert errors["m2"].startswith("ratio: cell C4 is inside merged cells C3:C4: its value belongs to row 3 only")
    assert "prompt: must be text, but cell B5 holds a number" in errors["n"]
    assert "prompt: must be text, but cell B6 holds a date" in errors["d"]
    assert "prompt: must be text, but cell B7 holds a boolean" in errors["b"]
    assert errors["m"] is None and errors["ok"] is None
    assert df.filter(pl.col("id") == "m2")["row"].to_list() == [4]  # the row the sheet shows
    assert sorted(b["prompt"] for b in bodies(fake)) == ["fine", "merged ratio"]


@pytest.mark.parametrize(("name", "data"), [
    ("semicolon.csv", b"id;prompt;ratio\r\na;un renard, la nuit;9:16\r\n"),
    ("tab.csv", b"id\tprompt\tratio\na\tun renard, la nuit\t9:16\n"),
    ("unicode.txt.csv", "id\tprompt\tratio\r\na\tun renard, la nuit\t9:16\r\n".encode("utf-16")),
])
def test_csv_exports_in_each_dialect(fake, tmp_path: Path, name: str, data: bytes) -> None:
    (tmp_path / name).write_bytes(data)
    res = submit(fake.url, tmp_path, tmp_path / name)
    assert res.exit_code == 0, res.output
    assert bodies(fake) == [{"prompt": "un renard, la nuit", "ratio": "9:16", "service_tier": "flex"}]


def test_one_unreadable_file_is_reported_and_the_others_go_out(fake, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    write_csv(tmp_path / "in" / "good.csv", prompts(2))
    (tmp_path / "in" / "ragged.csv").write_text("id,prompt\na,one\nb,two,three\nc,four\n")
    (tmp_path / "in" / "broken.xlsx").write_bytes(b"PK\x03\x04 not a workbook")
    res = submit(fake.url, tmp_path, tmp_path / "in")
    assert res.exit_code == 1
    assert len(fake.state.submissions()) == 2
    assert "ragged.csv: line 3 has 3 fields, the header has 2" in res.output
    assert "broken.xlsx: not an .xlsx workbook" in res.output
    summary = json.loads((tmp_path / "r.parquet.summary.json").read_text())
    assert {u["source"] for u in summary["unreadable"]} == {str(tmp_path / "in" / "ragged.csv"),
                                                           str(tmp_path / "in" / "broken.xlsx")}
    res = submit(fake.url, tmp_path, tmp_path / "in" / "ragged.csv")
    assert res.exit_code == 2 and "nothing could be loaded" in error_line(res.stderr)


def test_two_files_of_one_name_stay_apart_and_enums_are_forgiving(fake, tmp_path: Path) -> None:
    for folder in ("monday", "tuesday"):
        (tmp_path / folder).mkdir()
        write_csv(tmp_path / folder / "p.csv", [{"prompt": f"from {folder}", "resolution": " 720P ", "ratio": "ADAPTIVE"}])
    res = submit(fake.url, tmp_path, tmp_path / "monday" / "p.csv", tmp_path / "tuesday" / "p.csv")
    assert res.exit_code == 0, res.output
    df = results(tmp_path / "r.parquet")
    assert df["source"].to_list() == [str(tmp_path / "monday" / "p.csv"), str(tmp_path / "tuesday" / "p.csv")]
    assert {(b["resolution"], b["ratio"]) for b in bodies(fake)} == {("720p", "adaptive")}


# -- 7. cron-facing edges ------------------------------------------------------------------------

def test_a_rate_without_unit_is_an_error_not_sixty_times_the_spend(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(1))
    res = cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url, "--rate", "100"])
    assert res.exit_code == 2 and "no unit: write 100/min or 100/s" in error_line(res.stderr)
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["in.csv"]\noutput = "r.parquet"\nrate = 100\nbase_url = "{fake.url}"\n')
    res = run(["run", str(job)])
    assert res.exit_code == 2 and "no unit" in error_line(res.stderr) and fake.state.records == []


def test_library_warnings_and_logs_are_json_events_off_a_tty() -> None:
    import subprocess
    import sys

    code = ("import logging, warnings\nfrom batch import logs\nlogs.command = True\nlogs.configure('info')\n"
            "warnings.warn('a library says so', DeprecationWarning, stacklevel=1)\n"
            "logging.getLogger('aiohttp.client').warning('Unclosed client session')\n"
            "logs.report_error('one line', 2)\n")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=30)
    lines = proc.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("{") for line in lines), proc.stderr
    events = [json.loads(line) for line in lines]
    assert "a library says so" in events[0]["event"] and events[1]["event"] == "Unclosed client session"
    assert events[2] == {**events[2], "event": "error", "error": "one line", "exit_code": 2}


def test_the_resolved_deadline_is_logged_and_tomorrow_is_said(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", prompts(1))
    past = (dt.datetime.now() - dt.timedelta(minutes=5)).strftime("%H:%M")
    res = cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url, "--rate", "0",
               "--state", str(tmp_path / "s.sqlite"), "--deadline", past])
    event = next(e for e in json_lines(res.stderr) if e["event"] == "deadline_tomorrow")
    assert event["tomorrow"] is True and 86000 < event["in_s"] < 86400
    res = cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url, "--rate", "0",
               "--state", str(tmp_path / "s.sqlite"), "--deadline", "90m"])
    event = next(e for e in json_lines(res.stderr) if e["event"] == "deadline")
    assert event["tomorrow"] in (True, False) and 5390 < event["in_s"] <= 5400


def test_the_demo_continues_from_submit_to_collect_to_report(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["{SAMPLES / "prompts.csv"}"]\noutput = "out/r.csv"\nrate = "0"\ndownload = "videos"\n')
    res = run(["run", str(job), "--fake-api"])
    assert res.exit_code == 1  # the samples hold broken rows on purpose
    res = run(["collect", str(job), "--fake-api"])
    assert res.exit_code == 0, res.output
    table = results(tmp_path / "out" / "r.csv")
    ok = table.filter(pl.col("status") == "submitted")
    assert ok["task_status"].unique().to_list() == ["success"]
    for row in ok.iter_rows(named=True):
        video = tmp_path / "videos" / f"{file_stem(row['request_id'], row['id'])}.mp4"
        assert video.exists() and str(video) in json.loads(row["local_paths"])
    res = run(["report", str(tmp_path / "out" / "r.csv")])
    assert res.exit_code == 0 and f"tasks: {ok.height} success; downloaded {ok.height}" in res.output
    res = run(["report", str(SAMPLES / "prompts.csv")])
    assert res.exit_code == 2 and "not a results table" in error_line(res.stderr)


def test_csv_results_open_in_excel_and_parquet_keeps_types(fake, tmp_path: Path) -> None:
    book = workbook(tmp_path / "in.xlsx", [["prompt", "shoot on", "Notes"],
                                           ["熊猫 in the rain", dt.datetime(2026, 12, 1, 9, 30), "ünïcödé"]])
    assert submit(fake.url, tmp_path, book, out="r.csv").exit_code == 0
    raw = (tmp_path / "r.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # a BOM: Excel reads UTF-8
    table = results(tmp_path / "r.csv")
    assert table["submitted_at"][0].endswith("Z") and "T" in table["submitted_at"][0]
    assert submit(fake.url, tmp_path, book, out="r.parquet").exit_code == 0
    df = results(tmp_path / "r.parquet")
    assert df.schema["shoot on"] == pl.Datetime("ms") and df["shoot on"][0] == dt.datetime(2026, 12, 1, 9, 30)
    assert df.schema["submitted_at"] == pl.Datetime("ms", "UTC")
    assert KEY not in raw.decode("utf-8-sig")
    time.sleep(0)
