"""What is and is not an input: the tool's own outputs, every file a directory holds,
every sheet with prompts, header rows below titles, CSV as Excel exports it."""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from pathlib import Path

import openpyxl
import polars as pl
import pytest
from conftest import cli, error_line, json_lines, prompts, run_cli_process, subprocess_env, write_csv

from batch.fake_api import FakeServer


def _night(server: FakeServer, tmp: Path, inbox: Path, name: str) -> tuple[int, str]:
    args = ["submit", str(inbox), "-o", str(inbox / f"{name}.parquet"), "--base-url", server.url,
            "--state", str(tmp / "state.sqlite"), "--rate", "0", "--no-preflight"]
    result = cli(args)
    return result.exit_code, result.output


def test_results_tables_in_the_input_directory_are_not_paid_for_again(fake: FakeServer, tmp_path: Path) -> None:
    """The cron job of the report: `submit in/ -o in/<date>.parquet` three nights running,
    4 new prompts a night: the fake accepts 4, 4, 4 (not 4, 8, 16)."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    accepted = []
    for night in range(3):
        write_csv(inbox / f"prompts-{night}.csv", prompts(4, prefix=f"night {night} shot"))
        code, out = _night(fake, tmp_path, inbox, f"2026-12-0{night + 5}")
        assert code == 0, out
        accepted.append(len(fake.state.accepted_bodies()))
    assert accepted == [4, 8, 12]
    summary = json.loads((inbox / "2026-12-07.parquet.summary.json").read_text())
    assert sorted(Path(s["source"]).name for s in summary["skipped_files"]) == [
        "2026-12-05.parquet", "2026-12-05.parquet.summary.json", "2026-12-06.parquet",
        "2026-12-06.parquet.summary.json"]


def _submit(server: FakeServer, tmp: Path, *inputs: object, out: Path, extra: tuple[str, ...] = ()) -> object:
    return cli(["submit", *map(str, inputs), "-o", str(out), "--base-url", server.url, "--state",
                str(tmp / "state.sqlite"), "--rate", "0", "--no-preflight", *extra])


def test_every_own_output_is_skipped_from_a_directory_and_named(fake: FakeServer, tmp_path: Path) -> None:
    """Siblings: a CSV results table, a renamed Parquet one, a dry-run table, one saved
    as .xlsx from Excel, the summaries, a metrics file and a rescue file: none is read,
    each is named in the summary's skipped_files and warned about; a user's own
    `status` column does not make a prompt file look like a results table."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    write_csv(inbox / "a.csv", prompts(3, prefix="first"))
    first = _submit(fake, tmp_path, inbox / "a.csv", out=inbox / "night1.csv",
                    extra=("--metrics-file", str(inbox / "seedance.prom")))
    assert first.exit_code == 0, first.output
    assert _submit(fake, tmp_path, inbox / "a.csv", out=tmp_path / "p.parquet").exit_code == 0
    (tmp_path / "p.parquet").rename(inbox / "old-prompts.parquet")  # a results table renamed
    assert _submit(fake, tmp_path, inbox / "a.csv", out=inbox / "plan.parquet", extra=("--dry-run",)).exit_code == 0
    book = openpyxl.Workbook()
    table = pl.read_csv(inbox / "night1.csv", infer_schema=False)
    book.active.append(table.columns)
    for row in table.iter_rows():
        book.active.append(list(row))
    book.save(inbox / "night1-from-excel.xlsx")
    (inbox / "state.sqlite.rescue.jsonl").write_text('{"request_id": "x"}\n')
    write_csv(inbox / "b.csv", [{"prompt": "second batch 1", "status": "approved"},
                                {"prompt": "second batch 2", "status": "approved"}])
    sent = len(fake.state.accepted_bodies())
    result = _submit(fake, tmp_path, inbox, out=tmp_path / "tonight.parquet")
    assert result.exit_code == 0, result.output
    assert len(fake.state.accepted_bodies()) - sent == 2  # b.csv only; a.csv's rows are skipped
    summary = json.loads((tmp_path / "tonight.parquet.summary.json").read_text())
    assert summary["counts"] == {"skipped": 3, "submitted": 2}
    reasons = {Path(s["source"]).name: s["reason"] for s in summary["skipped_files"]}
    assert reasons == {
        "night1.csv": "a results table (its request_id, status and task_id... columns) of seedance-batch",
        "night1.csv.summary.json": "a run summary of seedance-batch",
        "old-prompts.parquet": "a results table (marked in its Parquet metadata) of seedance-batch",
        "plan.parquet": "a dry-run results table (marked in its Parquet metadata) of seedance-batch",
        "plan.parquet.summary.json": "a run summary of seedance-batch",
        "night1-from-excel.xlsx": "a results table (its request_id, status and task_id... columns) of seedance-batch",
        "seedance.prom": "a metrics file of seedance-batch",
        "state.sqlite.rescue.jsonl": "a ledger rescue file of seedance-batch",
    }
    warned = {Path(e["source"]).name for e in json_lines(result.stderr) if e.get("event") == "input_skipped"}
    assert warned == set(reasons)


@pytest.mark.parametrize("name", ["night.parquet", "night.csv", "night.parquet.summary.json", "metrics.prom"])
def test_an_own_output_named_explicitly_is_refused_with_exit_2(fake: FakeServer, tmp_path: Path, name: str) -> None:
    """Given as an input by name, a file the tool wrote stops the run before anything is
    sent (a real process: one line, exit 2)."""
    source = write_csv(tmp_path / "p.csv", prompts(2))
    out = tmp_path / ("night.parquet" if name.endswith((".json", ".prom")) else name)
    first = _submit(fake, tmp_path, source, out=out, extra=("--metrics-file", str(tmp_path / "metrics.prom")))
    assert first.exit_code == 0, first.output
    sent = len(fake.state.submissions())
    proc = run_cli_process(["submit", str(tmp_path / name), str(source), "-o", str(tmp_path / "again.parquet"),
                            "--base-url", fake.url, "--state", str(tmp_path / "state.sqlite"), "--rate", "0"],
                           env=subprocess_env())
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert str(tmp_path / name) in line and "seedance-batch wrote, not a prompt file" in line
    assert len(fake.state.submissions()) == sent


def test_results_tables_matched_by_a_glob_are_skipped(fake: FakeServer, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    write_csv(inbox / "a.csv", prompts(2))
    assert _submit(fake, tmp_path, inbox / "a.csv", out=inbox / "n1.parquet").exit_code == 0
    write_csv(tmp_path / "more.csv", prompts(1, prefix="more"))
    result = _submit(fake, tmp_path, str(inbox / "*.parquet"), tmp_path / "more.csv", out=tmp_path / "n2.parquet")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "n2.parquet.summary.json").read_text())
    assert summary["counts"] == {"submitted": 1}
    assert [Path(s["source"]).name for s in summary["skipped_files"]] == ["n1.parquet"]


# -- item 13: no rows silently left out ------------------------------------------------------

def _macro_workbook(book: openpyxl.Workbook, path: Path) -> Path:
    """An .xlsm as Excel saves one: the macro-enabled main content type and a VBA part."""
    plain = path.with_suffix(".tmp.xlsx")
    book.save(plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "[Content_Types].xml":
                data = data.replace(b"spreadsheetml.sheet.main+xml", b"ms-excel.sheet.macroEnabled.main+xml").replace(
                    b"<Default ", b'<Default Extension="bin" ContentType="application/vnd.ms-office.vbaProject"/>'
                                  b"<Default ", 1)
            dst.writestr(info, data)
        dst.writestr("xl/vbaProject.bin", b"\xd0\xcf\x11\xe0" + bytes(508))
    plain.unlink()
    return path


def _two_prompt_sheets(path: Path) -> Path:
    book = openpyxl.Workbook()
    book.active.title = "December"
    book.active.append(["prompt", "duration"])
    book.active.append(["december waves", 5])
    other = book.create_sheet("January")
    other.append(["prompt"])
    other.append(["january snow"])
    other.append(["january fog"])
    book.create_sheet("Notes").append(["read me first"])
    book.save(path)
    return path


def test_a_workbook_with_two_prompt_sheets_is_refused_unless_sheets_are_named(fake: FakeServer,
                                                                              tmp_path: Path) -> None:
    """The report: only the first visible sheet was read, January's rows silently not."""
    book = _two_prompt_sheets(tmp_path / "plan.xlsx")
    refused = run_cli_process(["submit", str(book), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url,
                               "--state", str(tmp_path / "state.sqlite"), "--rate", "0"], env=subprocess_env())
    assert refused.returncode == 2, refused.stderr
    line = error_line(refused.stderr)
    assert "'December', 'January' each have a prompt column" in line and "--sheet all" in line
    assert fake.state.submissions() == []
    every = _submit(fake, tmp_path, book, out=tmp_path / "all.parquet", extra=("--sheet", "all"))
    assert every.exit_code == 0, every.output
    df = pl.read_parquet(tmp_path / "all.parquet")
    assert df.select("source", "row", "prompt").rows() == [
        (f"{book}[December]", 2, "december waves"), (f"{book}[January]", 2, "january snow"),
        (f"{book}[January]", 3, "january fog")]
    summary = json.loads((tmp_path / "all.parquet.summary.json").read_text())
    assert summary["skipped_files"] == [{"source": f"{book}[Notes]", "reason": "no prompt column"}]
    named = _submit(fake, tmp_path, book, out=tmp_path / "named.parquet", extra=("--sheet", "January,December"))
    assert named.exit_code == 0, named.output
    assert pl.read_parquet(tmp_path / "named.parquet")["status"].to_list() == ["skipped"] * 3
    one = _submit(fake, tmp_path, book, out=tmp_path / "one.parquet", extra=("--sheet", "January"))
    assert pl.read_parquet(tmp_path / "one.parquet")["prompt"].to_list() == ["january snow", "january fog"], one.output


def test_tsv_and_xlsm_files_in_a_directory_are_read_and_others_named(fake: FakeServer, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "export.tsv").write_text("prompt\tduration\ntab, separated prompt\t5\n", encoding="utf-8")
    book = openpyxl.Workbook()
    book.active.append(["prompt"])
    book.active.append(["from a macro workbook"])
    _macro_workbook(book, inbox / "macros.xlsm")
    (inbox / "README.txt").write_text("how to fill the sheet")
    (inbox / "~$macros.xlsm").write_bytes(b"lock")
    result = _submit(fake, tmp_path, inbox, out=tmp_path / "r.parquet")
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(tmp_path / "r.parquet")
    assert df.select("prompt", "duration").rows() == [("tab, separated prompt", 5), ("from a macro workbook", None)]
    summary = json.loads((tmp_path / "r.parquet.summary.json").read_text())
    assert summary["skipped_files"] == [
        {"source": str(inbox / "README.txt"), "reason": "not a .csv, .tsv, .parquet, .xlsx or .xlsm file"},
        {"source": str(inbox / "~$macros.xlsm"), "reason": "Excel lock file"}]
    assert "skipped: " + str(inbox / "README.txt") in result.output


@pytest.mark.parametrize("given", ["csv", "dir"])
def test_sheet_for_a_csv_is_an_error(tmp_path: Path, given: str) -> None:
    source = write_csv(tmp_path / "p.csv", prompts(1))
    result = cli(["submit", str(source if given == "csv" else tmp_path), "-o", str(tmp_path / "out" / "r.parquet"),
                  "--sheet", "Prompts", "--dry-run", "--state", str(tmp_path / "s.sqlite")])
    assert result.exit_code == 2
    assert "--sheet Prompts: " in result.stderr and "not a workbook" in result.stderr


# -- item 16: header rows below titles ------------------------------------------------------

def _titled_workbook(path: Path) -> Path:
    """As people make them: a merged title, a subtitle, a blank row, then the header in
    row 4 starting at column B; a merged prompt cell, an uncached formula, and a ratio
    typed as 16:9 that Excel stored as a time."""
    book = openpyxl.Workbook()
    ws = book.active
    ws.title = "Campaign"
    ws["B1"] = "December campaign: video prompts"
    ws.merge_cells("B1:E1")
    ws["B2"] = "owner: marketing"
    ws.append([])
    for col, name in zip("BCD", ["Prompt", "Ratio", "Duration"], strict=True):
        ws[f"{col}4"] = name
    ws["B5"], ws["C5"], ws["D5"] = "a lighthouse in a storm", "9:16", 5
    ws["B6"], ws["C6"], ws["D6"] = "a fox in the snow", dt.time(16, 9), 5  # Excel's reading of 16:9
    ws["C6"].number_format = "h:mm"
    ws["B7"], ws["D7"] = "a quiet harbour", 5
    ws.merge_cells("B7:B8")  # row 8's prompt is "inside merged cells"
    ws["D8"] = 6
    ws["B9"], ws["D9"] = '=CONCAT("a ", "kite")', 5  # openpyxl saves no cached value
    book.create_sheet("Instructions").append(["fill in the Campaign sheet"])
    book.save(path)
    return path


def test_a_title_above_the_header_is_not_the_header(tmp_path: Path) -> None:
    """The report: 'no prompt column'. Now the header row is found (row 4), rows keep the
    spreadsheet's numbers, and the cells that cannot be sent name themselves."""
    book = _titled_workbook(tmp_path / "campaign.xlsx")
    result = cli(["submit", str(book), "-o", str(tmp_path / "r.parquet"), "--dry-run",
                  "--state", str(tmp_path / "s.sqlite")])
    assert result.exit_code == 1, result.output  # invalid rows, nothing unreadable
    df = pl.read_parquet(tmp_path / "r.parquet")
    rows = {r: (s, e) for r, s, e in df.select("row", "status", "error").rows()}
    assert rows[5] == ("dry_run", None)
    assert rows[7] == ("dry_run", None)
    assert rows[6][0] == "invalid" and "cell C6 holds the time 16:09" in rows[6][1] and "Text" in rows[6][1]
    assert rows[8][0] == "invalid" and "cell B8 is inside merged cells B7:B8" in rows[8][1]
    assert rows[9][0] == "invalid" and "cell B9 is a formula without a saved value" in rows[9][1]
    assert set(df["source"].to_list()) == {f"{book}[Campaign]"}


def test_header_row_option_and_the_sheets_looked_at(tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    book.active.title = "Shots"
    book.active.append(["Shot list"])
    book.active.append(["text", "seconds"])
    book.active.append(["a red balloon", "5"])
    book.create_sheet("Hidden one").sheet_state = "hidden"
    book.create_sheet("Notes").append(["nothing"])
    book.save(tmp_path / "shots.xlsx")
    args = ["submit", str(tmp_path / "shots.xlsx"), "--dry-run", "--state", str(tmp_path / "s.sqlite")]
    none = cli([*args, "-o", str(tmp_path / "a.parquet")])
    assert none.exit_code == 2
    assert "no sheet has a 'prompt' column in its first 20 rows (looked at 'Shots', 'Notes'; hidden, not read: " \
           "'Hidden one')" in none.stderr
    # The job's [columns] say which header is the prompt: the header row is found by it.
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["{tmp_path / "shots.xlsx"}"]\noutput = "b.parquet"\nsheet = "Shots"\n'
                   '[columns]\ntext = "prompt"\nseconds = "duration"\n')
    mapped = cli(["run", str(job), "--dry-run", "--state", str(tmp_path / "s.sqlite")])
    assert mapped.exit_code == 0, mapped.output
    assert pl.read_parquet(tmp_path / "b.parquet").select("row", "prompt", "duration").rows() == [
        (3, "a red balloon", 5)]
    # --header-row names it outright (the title row otherwise would be the header).
    csv_file = tmp_path / "titled.csv"
    csv_file.write_text("Shot list,\nprompt,duration\na red balloon,5\n")
    explicit = cli([*args[:1], str(csv_file), *args[2:], "-o", str(tmp_path / "c.parquet"), "--header-row", "2"])
    assert explicit.exit_code == 0, explicit.output
    assert pl.read_parquet(tmp_path / "c.parquet").select("row", "prompt").rows() == [(3, "a red balloon")]
    found = cli([*args[:1], str(csv_file), *args[2:], "-o", str(tmp_path / "d.parquet")])
    assert found.exit_code == 0, found.output
    assert pl.read_parquet(tmp_path / "d.parquet").select("row", "prompt").rows() == [(3, "a red balloon")]


# -- item 17: CSV as Excel exports it ------------------------------------------------------

def test_sep_line_and_decimal_commas(fake: FakeServer, tmp_path: Path) -> None:
    """A German Excel export: `sep=;` first, `;` between cells, `5,0` for five; a prompt
    with a comma in it stays as written."""
    source = tmp_path / "de.csv"
    source.write_bytes("sep=;\r\nprompt;duration;seed\r\n\"Regen, 3,5 Sekunden lang\";5,0;42\r\nNebel;6;7\r\n"
                       .encode("utf-8-sig"))
    result = _submit(fake, tmp_path, source, out=tmp_path / "r.parquet")
    assert result.exit_code == 0, result.output
    sent = sorted((b["prompt"], b["duration"], b["seed"]) for b in fake.state.accepted_bodies())
    assert sent == [("Nebel", 6, 7), ("Regen, 3,5 Sekunden lang", 5, 42)]
    assert pl.read_parquet(tmp_path / "r.parquet")["row"].to_list() == [2, 3]


def test_a_windows_csv_needs_its_encoding_named(fake: FakeServer, tmp_path: Path) -> None:
    """Excel's 'CSV' on Windows writes cp1252: refused with the option to use, never
    guessed; with --encoding the prompt is sent exactly as written."""
    source = tmp_path / "win.csv"
    source.write_bytes("prompt\r\nCafé crème at dawn – “soft light”\r\n".encode("cp1252"))
    refused = run_cli_process(["submit", str(source), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url,
                               "--state", str(tmp_path / "state.sqlite"), "--rate", "0"], env=subprocess_env())
    assert refused.returncode == 2
    line = error_line(refused.stderr)
    assert "line 2 is not UTF-8 (byte 0xe9)" in line and "--encoding cp1252" in line
    assert fake.state.submissions() == []
    read = _submit(fake, tmp_path, source, out=tmp_path / "r.parquet", extra=("--encoding", "cp1252"))
    assert read.exit_code == 0, read.output
    assert [b["prompt"] for b in fake.state.accepted_bodies()] == ["Café crème at dawn – “soft light”"]
    wrong = cli(["submit", str(source), "-o", str(tmp_path / "x.parquet"), "--dry-run", "--encoding", "utf-7x",
                 "--state", str(tmp_path / "s2.sqlite")])
    assert wrong.exit_code == 2 and "--encoding utf-7x: unknown encoding" in wrong.stderr


def test_job_file_sheets_header_row_and_encoding(tmp_path: Path) -> None:
    """The new reading options in a job file: a list of sheets, header_row, encoding;
    a ragged line below a sep= line and a title row is named by its own line number."""
    _two_prompt_sheets(tmp_path / "plan.xlsx")
    (tmp_path / "win.csv").write_bytes("Liste\r\nprompt\r\nCrème brûlée\r\n".encode("cp1252"))
    job = tmp_path / "job.toml"
    job.write_text('inputs = ["plan.xlsx"]\noutput = "r.parquet"\nsheet = ["January", 1]\n')
    assert cli(["run", str(job), "--dry-run", "--state", str(tmp_path / "s.sqlite")]).exit_code == 0
    assert pl.read_parquet(tmp_path / "r.parquet")["prompt"].to_list() == [
        "january snow", "january fog", "december waves"]
    job.write_text('inputs = ["win.csv"]\noutput = "w.parquet"\nencoding = "cp1252"\nheader_row = 2\n')
    ran = cli(["run", str(job), "--dry-run", "--state", str(tmp_path / "s.sqlite")])
    assert ran.exit_code == 0, ran.output
    assert pl.read_parquet(tmp_path / "w.parquet").select("row", "prompt").rows() == [(3, "Crème brûlée")]
    job.write_text('inputs = ["win.csv"]\noutput = "w.parquet"\nheader_row = 0\n')
    bad = cli(["run", str(job), "--dry-run", "--state", str(tmp_path / "s.sqlite")])
    assert bad.exit_code == 2 and "header_row" in bad.stderr
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("sep=;\nTitle;\nprompt;duration\na;5\nb;5;extra\n")
    res = cli(["submit", str(ragged), "-o", str(tmp_path / "g.parquet"), "--dry-run", "--header-row", "2",
               "--state", str(tmp_path / "s.sqlite")])
    assert res.exit_code == 2 and "line 5 has 3 fields, the header has 2" in res.stderr


def test_a_single_sheet_without_a_prompt_column_is_left_to_the_column_mapping(tmp_path: Path) -> None:
    """One visible sheet: read from its first row as before, and the mapping's error names
    the sheet and its columns (a header mapped to prompt is the mapping's to find)."""
    book = openpyxl.Workbook()
    book.active.title = "Shots"
    book.active.append(["text", "seconds"])
    book.active.append(["a red balloon", "5"])
    book.save(tmp_path / "shots.xlsx")
    res = cli(["submit", str(tmp_path / "shots.xlsx"), "-o", str(tmp_path / "r.parquet"), "--dry-run",
               "--state", str(tmp_path / "s.sqlite")])
    assert res.exit_code == 2
    assert f"{tmp_path / 'shots.xlsx'}[Shots]: no 'prompt' column (columns: text, seconds)" in res.stderr


def test_a_sheet_whose_prompt_header_is_a_synonym_is_the_prompt_sheet(fake: FakeServer, tmp_path: Path) -> None:
    """The loader picks the sheet by its prompt column before any row is mapped: a header
    the spec reads as the prompt (`Video Prompt`) must count there too, or the one sheet
    with prompts is refused as having none."""
    book = openpyxl.Workbook()
    notes = book.active
    notes.title = "Notes"
    notes.append(["how to fill this workbook"])
    shots = book.create_sheet("Shots")
    shots.append(["Video Prompt", "Length (s)"])
    shots.append(["a lighthouse in fog", 5])
    book.save(tmp_path / "plan.xlsx")
    result = _submit(fake, tmp_path, tmp_path / "plan.xlsx", out=tmp_path / "r.parquet")
    assert result.exit_code == 0, result.output
    assert [b["prompt"] for b in fake.state.accepted_bodies()] == ["a lighthouse in fog"]
    assert [b.get("duration") for b in fake.state.accepted_bodies()] == [5]


@pytest.mark.parametrize("command", ["submit", "validate"])
def test_a_nul_in_a_header_is_one_line_exit_2(fake: FakeServer, tmp_path: Path, command: str) -> None:
    """Found on the second review of #23: a NUL in a column's name passed `validate` and
    crashed `submit` with a polars panic (exit 1, no table, a leftover .runmark)."""
    path = tmp_path / "hdr.csv"
    path.write_bytes(b"id,prompt,no\x00te\nh1,a calm lake,n1\n")
    args = [command, str(path), "--base-url", fake.url, "--rate", "0", "--no-preflight",
            "--state", str(tmp_path / "s.sqlite")] + (["-o", str(tmp_path / "r.csv")] if command == "submit" else [])
    proc = run_cli_process(args)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert "hdr.csv" in line and "NUL" in line, line
    assert fake.state.submissions() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hdr.csv"]
