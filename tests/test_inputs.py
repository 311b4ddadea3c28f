"""What is and is not an input: the tool's own outputs, every file a directory holds,
every sheet with prompts, header rows below titles, CSV as Excel exports it."""

from __future__ import annotations

import json
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
