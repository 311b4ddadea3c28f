"""Operations: job files, validate, Excel, progress, metrics, dry-run estimate."""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import openpyxl
import polars as pl
import pytest
from conftest import ROOT, cli, json_lines, prompts, results, submit_args, subprocess_env, write_csv

from batch.errors import ConfigError
from batch.jobfile import load_job
from batch.models import Catalog


def write_job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_job_file_runs_with_mapping_template_params_and_dated_output(fake, tmp_path: Path) -> None:
    write_csv(tmp_path / "sheet.csv", [{"key": "k1", "len": "", "subject": "a fox", "style": "noir"},
                                       {"key": "k2", "len": "", "subject": "a hen", "style": ""},
                                       {"key": "k3", "len": "6", "subject": "a cat", "style": "pop"}])
    job = write_job(tmp_path, f"""
inputs = ["sheet.csv"]
output = "out/{{date}}.parquet"
state = "state.sqlite"
base_url = "{fake.url}"
rate = "0"
id_column = "key"
prompt_template = "{{subject}} in {{style}} style"
[columns]
len = "duration"
[params]
resolution = ["480p", "720p"]
duration = 4
""")
    res = cli(["run", str(job)])
    assert res.exit_code == 1, res.output  # row 2 has an empty style
    out = next((tmp_path / "out").glob("*.parquet"))
    assert out.name == time.strftime("%Y-%m-%d") + ".parquet"
    df = results(out)
    ok = df.filter(pl.col("status") == "submitted")
    got = sorted(zip(ok["prompt"].to_list(), ok["resolution"].to_list(), ok["duration"].to_list(), strict=True))
    assert got == [("a cat in pop style", "480p", 6), ("a cat in pop style", "720p", 6),
                   ("a fox in noir style", "480p", 4), ("a fox in noir style", "720p", 4)]
    assert ok["key"].to_list() == ["k1", "k1", "k3", "k3"]
    bad = df.filter(pl.col("status") == "invalid")
    assert bad.height == 2 and bad["error"].str.contains("column 'style' is empty").all()
    assert len(fake.state.submissions()) == 4
    write_csv(tmp_path / "both.csv", [{"prompt": "p", "duration": "5", "len": "6"}])
    clash = write_job(tmp_path, 'inputs = ["both.csv"]\n[columns]\nlen = "duration"\n')
    res = cli(["run", str(clash), "--dry-run", "-o", str(tmp_path / "x.parquet")])
    assert res.exit_code == 2 and "columns 'duration' and 'len' both name the field 'duration'" in res.stderr


def test_cli_options_override_the_job_file(fake, tmp_path: Path) -> None:
    write_csv(tmp_path / "in.csv", prompts(3))
    job = write_job(tmp_path, f'inputs = ["in.csv"]\noutput = "a.parquet"\nstate = "s.sqlite"\n'
                              f'base_url = "{fake.url}"\ntier = "default"\nrate = "0"\n')
    res = cli(["run", str(job), "--tier", "flex", "-o", str(tmp_path / "b.csv")])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "a.parquet").exists()
    assert {r.body["service_tier"] for r in fake.state.submissions()} == {"flex"}
    assert results(tmp_path / "b.csv")["status"].to_list() == ["submitted"] * 3


@pytest.mark.parametrize(("text", "message"), [
    ('inputs = ["x.csv"]\noutputs = "r.parquet"\n', "outputs: unknown key"),
    ('inputs = ["x.csv"]\nconcurrency = "many"\n', "concurrency: expected an integer"),
    ('inputs = ["x.csv"]\n[params]\ncolour = "red"\n', "params.colour: unknown API field"),
    ('inputs = ["x.csv"]\n[columns]\ntext = "caption"\n', "columns.text: must name an API field, the id column"),
    ('inputs = ["x.csv"]\ntier = "cheap"\n', "tier: expected one of"),
    ('inputs = ["x.csv"\n', "invalid TOML"),
    ('inputs = ["x.csv"]\noutput = "r-{when}.parquet"\n', "output: only {date}"),
])
def test_bad_job_files_name_the_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    job = write_job(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_job(job, known_fields=Catalog().known_fields())
    assert message in str(info.value) and str(job) in str(info.value)
    res = cli(["run", str(job), "--dry-run"])
    assert res.exit_code == 2 and message in res.stderr


def test_shipped_example_job_is_valid_and_runs(tmp_path: Path) -> None:
    job = load_job(ROOT / "jobs" / "example.toml")
    assert job.get("output").name.endswith(".parquet")
    res = cli(["run", str(ROOT / "jobs" / "example.toml"), "--fake-api", "--rate", "0",
               "-o", str(tmp_path / "r.parquet"), "--state", str(tmp_path / "s.sqlite")])
    assert res.exit_code == 1  # the samples' deliberately invalid rows
    df = results(tmp_path / "r.parquet")
    assert df.filter(pl.col("status") == "submitted").height > 30


def test_validate_prints_invalid_rows_and_sends_nothing(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"id": "a", "prompt": "ok"}, {"id": "b", "prompt": "x", "duration": "20"}])
    res = cli(["validate", str(path)])
    assert res.exit_code == 1
    assert "in.csv:3\tb\t" in res.output and "duration='20'" in res.output
    assert "would send: 1 requests (1 flex)" in res.output
    assert f"columns: {path}: prompt -> prompt, duration -> duration, id -> id (label)" in res.output
    assert fake.state.records == []
    good = write_csv(tmp_path / "good.csv", [{"prompt": "ok"}])
    assert cli(["validate", str(good)]).exit_code == 0
    job = write_job(tmp_path, 'inputs = ["in.csv"]\n[params]\nduration = 5\n')
    assert cli(["validate", str(job)]).exit_code == 1


def test_dry_run_estimate_by_tier_and_resolution(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [
        {"prompt": "a", "resolution": "1080p", "duration": "10", "frames": "", "service_tier": ""},
        {"prompt": "b", "resolution": "", "duration": "", "frames": "49", "service_tier": "default"},
        {"prompt": "c", "resolution": "1080p|480p", "duration": "", "frames": "", "service_tier": ""},
    ])
    res = cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--dry-run"])
    assert res.exit_code == 0
    summary = json.loads((tmp_path / "r.parquet.summary.json").read_text())
    assert summary["estimate"] == {
        "would_send": 4, "requests_by_tier": {"default": 1, "flex": 3},
        "video_seconds_by_resolution": {"1080p": 15.0, "480p": 5.0, "720p": round(49 / 24, 1)},
        "edited": 0, "identical": 0, "already_submitted": 0, "unknown": 0,
    }
    assert "would send: 4 requests (1 default, 3 flex)" in res.output


def test_xlsx_input_with_sheet_choice(fake, tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    first = book.active
    first.title = "Notes"
    first.append(["nothing here"])
    sheet = book.create_sheet("Prompts")
    sheet.append(["id", "prompt", "duration", "camera_fixed", "ratio"])
    sheet.append(["x1", "一只猫在屋顶上", 5, True, "16:9|9:16"])
    sheet.append(["x2", "A dog, running", 6.0, "no", None])
    book.save(tmp_path / "in.xlsx")
    res = cli(submit_args(fake, tmp_path, tmp_path / "in.xlsx", extra=["--sheet", "Prompts"]))
    assert res.exit_code == 0, res.output
    df = results(tmp_path / "results.parquet")
    assert df["prompt"].to_list() == ["一只猫在屋顶上", "一只猫在屋顶上", "A dog, running"]
    assert df["ratio"].to_list() == ["16:9", "9:16", None]
    assert df["duration"].to_list() == [5, 5, 6]
    assert df["camera_fixed"].to_list() == [True, True, False]
    missing = cli(submit_args(fake, tmp_path, tmp_path / "in.xlsx", extra=["--sheet", "Nope"]))
    assert missing.exit_code == 2 and "Nope" in missing.stderr
    # Without --sheet, the one visible sheet with a prompt column is read (not "Notes"),
    # and the sheet passed over is named in the summary.
    default = cli(submit_args(fake, tmp_path, tmp_path / "in.xlsx", out="f.parquet"))
    assert default.exit_code == 0, default.output
    assert results(tmp_path / "f.parquet")["status"].to_list() == ["skipped"] * 3
    summary = json.loads((tmp_path / "f.parquet.summary.json").read_text())
    assert summary["skipped_files"] == [{"source": f"{tmp_path / 'in.xlsx'}[Notes]", "reason": "no prompt column"}]


def test_metrics_file_for_node_exporter(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "a"}, {"prompt": "b", "duration": "1"}])
    metrics = tmp_path / "textfile" / "seedance.prom"
    res = cli(submit_args(fake, tmp_path, path, extra=["--metrics-file", str(metrics)]))
    assert res.exit_code == 1
    text = metrics.read_text()
    assert 'seedance_batch_requests{job="submit",status="submitted"} 1' in text
    assert 'seedance_batch_requests{job="submit",status="invalid"} 1' in text
    assert 'seedance_batch_last_run_exit_code{job="submit"} 1' in text
    for line in text.splitlines():  # the exposition format: comments or "name{labels} value"
        assert line.startswith("#") or float(line.rsplit(" ", 1)[1]) >= 0


def _spawn(fake, tmp_path: Path, tty: bool) -> tuple[int, str]:
    path = write_csv(tmp_path / "in.csv", prompts(30))
    args = [sys.executable, "-m", "batch", *submit_args(fake, tmp_path, path, rate="15/s"),
            "--progress-interval", "0.3"]
    env = subprocess_env(COLUMNS="120")
    if not tty:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
        return proc.returncode, proc.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(30)
    os.close(leader)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_off_a_tty_is_structured_events_only(fake, tmp_path: Path) -> None:
    rc, err = _spawn(fake, tmp_path, tty=False)
    assert rc == 0
    events = [e for e in json_lines(err) if e["event"] == "progress"]
    assert len(events) >= 3
    assert {"done", "total_estimate", "rate_per_s", "eta_s", "counts"} <= set(events[-1])
    assert "━" not in err  # no bar


def test_progress_on_a_tty_is_a_bar_only(fake, tmp_path: Path) -> None:
    rc, err = _spawn(fake, tmp_path, tty=True)
    assert rc == 0
    assert "submitting" in err and "━" in err and "submitted=" in err
    assert '"event": "progress"' not in err and '"event"' not in err  # console logs, not JSON
