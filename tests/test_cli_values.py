"""No option value and no job-file value produces a traceback: each bad one is one line
and a documented exit code (2 for usage). The options are read from click's command tree,
so an option added later is covered without touching this file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from batch.cli import main
from batch.fake_api import FakeServer
from tests.conftest import KEY, error_line, subprocess_env

EXIT_CODES = {0, 1, 2, 3, 4, 5, 6}  # README, "Exit codes"


# Hypothesis keeps its example database and constant caches in ./.hypothesis, from the
# first @given on (before any fixture runs): in the temp directory, not in the checkout.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "seedance-batch-hypothesis")

ODD = ["", " ", "\x00", "a\x00b", "25:00", "24:00", "23:60", "99:99:99", "-1:00", "00:00", "06:00", "1:2:3:4",
       "-1", "0", "-0", "0.0", "1e309", "-1e309", "nan", "NaN", "inf", "-inf", "1_000", "0x10", "9" * 40,
       "99999999999h", "1e308h", "9" * 400 + "s", "1h1h", "90m", "h", "m", "s", "1/0min", "0/s", "-5/s", "1/s",
       "nan/s", "1e309/min", "100", "s3://b/x", "s3://", "gs://b/", "http://[::1", "http://127.0.0.1:1",
       "https://", "/", "/dev/null", "/proc/self/mem", ".", "..", "💥", "ä/ö", "\u202e", "a=b", "=", "prompt=",
       "duration=[", "{date}", "{", "%s", "\\", "x" * 5000, "\n", "\t1", "2026-13-40T99:99", "2026-12-07T06:00"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*prefix, name))


def options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden
            and p.name not in ("help", "version")]


def base_args(path: tuple[str, ...], tmp: Path, url: str, fake_url: str = "") -> list[str]:
    """Arguments under which each command finishes quickly, sends nothing anywhere but a
    closed loopback port (``check``: the fake, whose quick answers spare its retries),
    and writes only under ``tmp``."""
    csv = tmp / "in.csv"
    state = ["--state", str(tmp / "s.sqlite")]
    net = ["--base-url", url, "--rate", "0"]
    return {
        ("submit",): ["submit", str(csv), "-o", str(tmp / "r.parquet"), "--dry-run", *state, *net],
        ("run",): ["run", str(tmp / "job.toml"), "--dry-run", *state, *net],
        ("validate",): ["validate", str(csv), *state, *net],
        ("check",): ["check", "--base-url", fake_url or url, "--rate", "0"],
        ("collect",): ["collect", *state, *net, "--results", str(tmp / "none.parquet")],
        ("report",): ["report", str(tmp / "none.parquet")],
        ("models",): ["models"],
        ("models", "list"): ["models", "list"],
        ("models", "fetch"): ["models", "fetch", "bytedance/x", "--schema-base", url],
        ("models", "add"): ["models", "add", str(tmp / "none.json")],
        ("state",): ["state"],
        ("state", "backup"): ["state", "backup", str(tmp / "copy.sqlite"), *state],
        ("state", "copy"): ["state", "copy", str(tmp / "s.sqlite"), str(tmp / "copy2.sqlite")],
    }[path]


IN_PROCESS = [(path, opt) for path, cmd in commands(main) if path != ("fake-api",) for opt in options(cmd)]


def values(opt: click.Option) -> st.SearchStrategy[list[str]]:
    """What a user (or a cat on the keyboard) may type as the option's value(s)."""
    one = st.one_of(
        st.sampled_from(ODD),
        st.text(max_size=12),
        st.integers(-(2**70), 2**70).map(str),
        st.floats().map(str),
        st.sampled_from(list(opt.type.choices)) if isinstance(opt.type, click.Choice) else st.nothing(),
    )
    return st.lists(one, min_size=1, max_size=2 if opt.multiple else 1)


def as_args(opt: click.Option, given: list[str], by_env: bool) -> tuple[list[str], dict[str, str]]:
    name = max(opt.opts, key=len)
    if opt.is_flag:
        return [name], {}
    if by_env and opt.envvar and "\x00" not in given[0]:
        return [], {str(opt.envvar): given[0]}
    return [f"{name}={v}" for v in given], {}


@contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh directory per example, also the working directory: a value that names a
    relative path writes there, never into the checkout."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "in.csv").write_text("id,prompt\nr1,A calm lake at dawn\n", encoding="utf-8")
        (tmp / "job.toml").write_text('inputs = ["in.csv"]\noutput = "r.parquet"\n', encoding="utf-8")
        os.chdir(tmp)
        try:
            yield tmp
        finally:
            os.chdir(cwd)


def assert_clean_exit(args: list[str], env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=True)
    shown = f"{args!r} env={env!r}\n{result.output}\n{result.stderr}"
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        shown + "".join(__import__("traceback").format_exception(result.exception))
    assert result.exit_code in EXIT_CODES, shown
    assert "Traceback" not in result.output + result.stderr, shown
    if result.exit_code == 2:
        error_line(result.stderr)  # exactly one error, and nothing else that is not a JSON event


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_no_option_value_gives_a_traceback(fake: FakeServer, data: st.DataObject) -> None:
    path, opt = data.draw(st.sampled_from(IN_PROCESS), label="option")
    given_values = data.draw(values(opt), label="values")
    by_env = data.draw(st.booleans(), label="by_env")
    with sandbox() as tmp:
        extra, env = as_args(opt, given_values, by_env)
        env = {"SEEDANCE_API_KEY": KEY, "XDG_STATE_HOME": str(tmp / "xdg"), **env}
        assert_clean_exit([*base_args(path, tmp, f"http://127.0.0.1:{closed_port()}", fake.url), *extra], env)


def test_every_command_is_fuzzed() -> None:
    """A new command needs its base arguments above (base_args raises KeyError otherwise)."""
    with sandbox() as tmp:
        for path, _ in commands(main):
            if path != ("fake-api",):
                assert base_args(path, tmp, "http://127.0.0.1:1")[: len(path)] == list(path)
    assert len(IN_PROCESS) > 60


FAKE_API = options(main.commands["fake-api"])


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_no_fake_api_value_gives_a_traceback(data: st.DataObject) -> None:
    """``fake-api`` serves until a signal, so it runs as a real process, stopped by SIGINT."""
    opt = data.draw(st.sampled_from(FAKE_API), label="option")
    given_values = [v for v in data.draw(values(opt), label="values") if "\x00" not in v] or ["x"]
    extra, _ = as_args(opt, given_values, False)
    args = ["fake-api", "--port", "0", *extra]
    with sandbox() as tmp:
        proc = subprocess.Popen([sys.executable, "-m", "batch", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=tmp, env=subprocess_env())
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "listening", or nothing when it refused the value
        if first:
            proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    shown = f"{args!r}\n{first}{out}\n{err}"
    assert "Traceback" not in out + err, shown
    assert proc.returncode in EXIT_CODES, shown
    if proc.returncode == 2:
        error_line(err)


TOML_VALUES = ['""', '"\\u0000"', '"25:00"', '"24:00"', '"nan"', "nan", "inf", "-inf", "-1", "0", "1e309",
               "99999999999999999", "-99999999999999999", "true", "[]", '["a", 1]', "{}", '{a = 1}',
               '"s3://b/x"', '"/"', '"/dev/null"', '"{date"', '"{0}"', '"{x}"', '"x/y"', '"💥"', '"100"',
               "1979-05-27T07:32:00Z", "07:32:00", "[[1]]", '"a=b"']


def job_keys() -> list[str]:
    from batch import jobfile

    return sorted(jobfile._TOP)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(key=st.sampled_from(job_keys()), raw=st.sampled_from(TOML_VALUES),
       command=st.sampled_from(["run", "validate", "collect", "check"]))
def test_no_job_file_value_gives_a_traceback(key: str, raw: str, command: str) -> None:
    with sandbox() as tmp:
        url = f"http://127.0.0.1:{closed_port()}"
        body = {"inputs": '["in.csv"]', "output": '"r.parquet"', "state": '"s.sqlite"', "base_url": json.dumps(url),
                "rate": '"0"', key: raw}
        (tmp / "job.toml").write_text("".join(f"{k} = {v}\n" for k, v in body.items()
                                              if k not in ("params", "columns", "prices")
                                              or v.startswith("{"))
                                      + (f"[{key}]\nx = {raw}\n" if key in ("params", "columns", "prices") else ""),
                                      encoding="utf-8")
        args = {"run": ["run", "job.toml", "--dry-run"], "validate": ["validate", "job.toml"],
                "collect": ["collect", "job.toml"], "check": ["check", "job.toml", "--max-attempts", "1"]}[command]
        assert_clean_exit(args, {"SEEDANCE_API_KEY": KEY, "XDG_STATE_HOME": str(tmp / "xdg")})


@pytest.mark.parametrize("value", ["25:00", "24:00", "23:60", "99:99", "1e309h", "9" * 400 + "s"])
def test_a_bad_deadline_is_one_line(tmp_path: Path, value: str) -> None:
    """The report: --deadline 25:00 printed a ValueError traceback and exited 1."""
    (tmp_path / "in.csv").write_text("id,prompt\nr1,A calm lake\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["submit", str(tmp_path / "in.csv"), "-o", str(tmp_path / "r.parquet"),
                                       "--dry-run", "--state", str(tmp_path / "s.sqlite"), "--deadline", value],
                                env={"SEEDANCE_API_KEY": KEY}, catch_exceptions=True)
    assert result.exit_code == 2 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert "--deadline" in error_line(result.stderr)
    assert not (tmp_path / "r.parquet").exists()



@pytest.mark.parametrize(("option", "value"), [
    ("--metrics-file", ""), ("--api-key-file", "\x00"), ("--proxy", "\x85"), ("--base-url", "http://[::1"),
    ("--state", "9" * 300), ("--state", "http://[::1"), ("--proxy", "http://u:p@[::1"), ("--metrics-file", "/"),
])
def test_what_the_property_test_found(tmp_path: Path, option: str, value: str) -> None:
    """Each a traceback (or a line split in two) before; now one line and exit 2."""
    (tmp_path / "in.csv").write_text("id,prompt\nr1,A calm lake\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "in.csv"), "--state", str(tmp_path / "s.sqlite"),
                                       f"{option}={value}"], env={"SEEDANCE_API_KEY": KEY}, catch_exceptions=True)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    error = error_line(result.stderr)
    assert "u:p@" not in error  # a proxy's credentials stay out of the message


def test_a_nul_in_a_job_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("id,prompt\nr1,A calm lake\n", encoding="utf-8")
    (tmp_path / "job.toml").write_text('inputs = ["in.csv"]\noutput = "r.parquet"\nca_bundle = "\\u0000"\n')
    result = CliRunner().invoke(main, ["run", str(tmp_path / "job.toml"), "--dry-run"],
                                env={"SEEDANCE_API_KEY": KEY, "XDG_STATE_HOME": str(tmp_path)}, catch_exceptions=True)
    assert result.exit_code == 2 and "ca_bundle: contains a NUL character" in error_line(result.stderr)
