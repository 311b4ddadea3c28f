"""Exit codes, one-line errors and the main commands, in-process and as real processes."""

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import KEY, SAMPLES, cli, error_line, json_lines, results, run_cli_process, submit_args, subprocess_env, write_csv


def one_line_error(res) -> str:
    return error_line(res.stderr)


@pytest.mark.parametrize(("args", "message"), [
    (["submit", "missing.csv", "-o", "r.parquet"], "missing.csv: no such file"),
    (["submit", "{dir}/noprompt.csv", "-o", "r.parquet"], "no 'prompt' column"),
    (["submit", "{dir}/ok.csv", "-o", "r.json"], "use a .parquet or .csv"),
    (["submit", "{dir}/ok.csv", "-o", "r.csv", "--rate", "fast"], "invalid rate 'fast'"),
    (["submit", "{dir}/ok.csv", "-o", "r.csv", "--param", "colour=red"], "--param/params colour: unknown API field"),
    (["submit", "{dir}/ok.csv", "-o", "r.csv", "--deadline", "tomorrowish"], "--deadline"),
    (["submit", "{dir}/ok.csv", "-o", "r.csv", "--base-url", "http://api.example.com"], "plain http"),
    (["submit", "{dir}/ok.csv", "-o", "r.csv", "--api-key-file", "{dir}/nokey"], "--api-key-file"),
    (["submit", "{dir}/ok.csv", "-o", "{dir}/ok.csv", "--dry-run"], "is also an input"),
    (["submit", "{dir}/gbk.csv", "-o", "r.csv", "--dry-run"], "save it as UTF-8"),
])
def test_user_mistakes_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "noprompt.csv").write_text("id,text\n1,x\n")
    (tmp_path / "ok.csv").write_text("prompt\nx\n")
    (tmp_path / "gbk.csv").write_bytes("prompt\n中文\n".encode("gbk"))
    args = [a.format(dir=tmp_path) for a in args]
    res = cli([*args, "--state", str(tmp_path / "s.sqlite")])
    assert res.exit_code == 2
    assert message in one_line_error(res)
    assert not (tmp_path / "r.csv").exists()
    assert (tmp_path / "ok.csv").read_text() == "prompt\nx\n"


def test_missing_key_is_exit_2_before_anything_is_sent(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "x"}])
    res = cli(submit_args(fake, tmp_path, path), env={"SEEDANCE_API_KEY": ""})
    assert res.exit_code == 2
    assert "no API key" in one_line_error(res)
    assert fake.state.records == []


def test_key_from_file(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "x"}])
    (tmp_path / "key").write_text(KEY + "\n")
    res = cli(submit_args(fake, tmp_path, path, extra=["--api-key-file", str(tmp_path / "key")]),
              env={"SEEDANCE_API_KEY": ""})
    assert res.exit_code == 0, res.output


def test_dry_run_sends_nothing_and_writes_the_table(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "x", "ratio": "1:1|4:3"}, {"prompt": "y", "ratio": "5:4"}])
    res = cli(submit_args(fake, tmp_path, path, out="r.csv", extra=["--dry-run"]), env={"SEEDANCE_API_KEY": ""})
    assert res.exit_code == 1  # one invalid request
    df = results(tmp_path / "r.csv")
    assert df["status"].to_list() == ["dry_run", "dry_run", "invalid"]
    assert fake.state.records == []
    assert not (tmp_path / "state.sqlite").exists()


def test_csv_results_escape_formulas(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "=HYPERLINK(\"http://x\")", "note": "@SUM(A1)"},
                                           {"prompt": "+1 plain", "note": "-2"}])
    res = cli(submit_args(fake, tmp_path, path, out="r.csv"))
    assert res.exit_code == 0
    df = results(tmp_path / "r.csv")
    assert df["prompt"].to_list() == ["'=HYPERLINK(\"http://x\")", "'+1 plain"]
    assert df["note"].to_list() == ["'@SUM(A1)", "'-2"]
    # What was sent is the real prompt, not the escaped one.
    assert {r.body["prompt"] for r in fake.state.submissions()} == {"=HYPERLINK(\"http://x\")", "+1 plain"}


def test_every_option_has_help_text() -> None:
    from batch.cli import main

    for name, command in main.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{name} {param.name} has no help"


def test_report_command(fake, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "in.csv", [{"prompt": "x"}, {"prompt": "y", "duration": "99"}])
    cli(submit_args(fake, tmp_path, path))
    res = cli(["report", str(tmp_path / "results.parquet"), "--json"])
    assert res.exit_code == 0
    summary = json.loads(res.output)
    assert summary["counts"] == {"submitted": 1, "invalid": 1}
    assert "duration='99'" in summary["top_errors"][0]["error"]


def test_readme_demo_as_a_real_process(tmp_path: Path) -> None:
    """README's first command: the samples against the bundled fake API, no key."""
    env = subprocess_env(SEEDANCE_API_KEY="", XDG_STATE_HOME=str(tmp_path / "xdg"))
    proc = run_cli_process(["submit", str(SAMPLES / "prompts.csv"), str(SAMPLES / "prompts.parquet"),
                            "--fake-api", "-o", str(tmp_path / "results.parquet"), "--rate", "0"], env=env)
    assert proc.returncode == 1, proc.stderr  # the samples hold deliberately invalid rows
    assert "submitted" in proc.stdout and "invalid" in proc.stdout
    events = json_lines(proc.stderr)  # not a TTY: JSON lines
    summary = [e for e in events if e["event"] == "summary"]
    assert len(summary) == 1 and summary[0]["counts"]["submitted"] > 30
    df = pl.read_parquet(tmp_path / "results.parquet")
    valid = df.filter(pl.col("status") != "invalid")
    assert valid.height > 30
    assert valid["status"].unique().to_list() == ["submitted"]
    assert valid["task_id"].str.starts_with("task-video-").all()
    assert df.filter(pl.col("status") == "invalid")["error"].null_count() == 0
    assert (tmp_path / "xdg" / "seedance-batch" / "fake-api-state.sqlite").exists()
    assert not (tmp_path / "xdg" / "seedance-batch" / "state.sqlite").exists()


def test_subprocess_exit_codes_and_one_line_errors(fake, tmp_path: Path) -> None:
    proc = run_cli_process(["submit", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "r.csv")])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
    path = write_csv(tmp_path / "in.csv", [{"prompt": "x"}])
    proc = run_cli_process(submit_args(fake, tmp_path, path))
    assert proc.returncode == 0, proc.stderr
    assert KEY not in proc.stderr + proc.stdout


def test_transport_check() -> None:
    from batch.cli import check_transport
    from batch.errors import ConfigError

    for ok in ("https://api.example.com", "http://127.0.0.1:8787", "http://localhost:1", "http://[::1]:80"):
        check_transport(ok, allow_insecure=False)
    with pytest.raises(ConfigError, match="plain http"):
        check_transport("http://10.0.0.5", allow_insecure=False)
    check_transport("http://10.0.0.5", allow_insecure=True)  # the operator's explicit choice
    with pytest.raises(ConfigError, match="expected http"):
        check_transport("ftp://x", allow_insecure=True)


def test_deadline_forms() -> None:
    from datetime import datetime, timedelta

    from batch.cli import parse_deadline

    now = datetime(2026, 11, 25, 23, 0).astimezone()
    assert parse_deadline("90m", now) == (now + timedelta(minutes=90)).timestamp()
    assert parse_deadline("1h30m", now) == (now + timedelta(minutes=90)).timestamp()
    assert parse_deadline("06:00", now) == now.replace(hour=6, minute=0).timestamp() + 86400  # tomorrow
    assert parse_deadline("2026-11-26T05:00", now) == datetime(2026, 11, 26, 5, 0).astimezone().timestamp()


def test_installed_console_script_runs(tmp_path: Path) -> None:
    """The script pip generates (what cron calls) reaches the same CLI as ``python -m batch``."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "seedance-batch"
    assert script.exists(), "install the project (pip install -e .) to get the console script"
    path = write_csv(tmp_path / "in.csv", [{"prompt": "a fox"}, {"prompt": "b", "duration": "99"}])
    done = subprocess.run([str(script), "validate", str(path)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=60)
    assert done.returncode == 1, done.stderr  # one invalid row
    assert "duration='99'" in done.stdout
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "seedance-batch" in version.stdout
