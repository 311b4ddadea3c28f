"""The Python API (``batch.submit``, ``batch.collect``) in-process against the fake over
real HTTP: a DataFrame in, a DataFrame out; the CLI's guarantees; exceptions, never
SystemExit."""

from __future__ import annotations

import importlib
import inspect
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest
from conftest import KEY, cli, results, submit_args, write_csv
from test_notify import Receiver

import batch
from batch import cli as cli_module
from batch.errors import EXIT_PROVIDER, BatchError, ConfigError, InputError, LockedError, ProviderError, StateError
from batch.ledger import locked_ledger


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEEDANCE_API_KEY", KEY)


def frame(n: int, prefix: str = "A red kite over the dunes") -> pl.DataFrame:
    return pl.DataFrame({"id": [f"k{i}" for i in range(n)], "prompt": [f"{prefix} {i}" for i in range(n)],
                         "duration": [5] * n})


def night(fake, tmp_path: Path, inputs, **kw) -> batch.Night:
    kw = {"output": tmp_path / "out.parquet", "base_url": fake.url, "state": tmp_path / "state.sqlite",
          "rate": "0", "log_level": "warning", **kw}
    return batch.submit(inputs, **kw)


def test_the_names_are_functions_not_modules() -> None:
    assert inspect.isfunction(batch.submit) and inspect.isfunction(batch.collect)
    following = importlib.import_module("batch.following")
    sending = importlib.import_module("batch.sending")  # importing the stages must not shadow the functions
    assert inspect.isfunction(batch.submit) and inspect.isfunction(batch.collect)
    assert sending.Submitter and following.Collector


def test_every_keyword_is_a_cli_option_of_the_same_name() -> None:
    """The API is the CLI's options as keywords: a keyword the CLI lacks (or a CLI option
    the API lacks) is drift that this test names."""
    for fn, command, own in ((batch.submit, cli_module.submit, {"inputs", "source"}),
                             (batch.collect, cli_module.collect, {"job"})):
        keywords = set(inspect.signature(fn).parameters) - own
        options = {max(p.opts, key=len).lstrip("-").replace("-", "_") for p in command.params
                   if p.name not in ("inputs", "job", "as_json")}
        assert keywords == options, (fn.__name__, keywords ^ options)


def test_a_dataframe_in_a_dataframe_out_with_task_ids(fake, tmp_path: Path) -> None:
    done = night(fake, tmp_path, frame(4), source="notebook")
    assert isinstance(done, batch.Night) and done.exit_code == 0 and done.ok
    table = done.results
    assert table.height == 4 and set(table["status"]) == {"submitted"}
    assert table["task_id"].null_count() == 0 and table["task_id"].n_unique() == 4
    assert sorted(table["id"]) == ["k0", "k1", "k2", "k3"]
    assert set(table["source"]) == {"notebook"}
    assert done.summary["counts"] == {"submitted": 4} and done.summary["results"] == str(tmp_path / "out.parquet")
    assert results(tmp_path / "out.parquet")["task_id"].to_list() == table["task_id"].to_list()
    assert len(fake.state.submissions()) == 4


def test_a_rerun_sends_nothing_twice(fake, tmp_path: Path) -> None:
    first = night(fake, tmp_path, frame(3))
    again = night(fake, tmp_path, [frame(3), frame(2, "A blue heron")])
    assert len(fake.state.submissions()) == 5  # the three are already in the ledger
    assert again.results.height == 5
    assert again.results.filter(pl.col("id").is_in(["k0", "k1", "k2"]) & pl.col("prompt").str.contains("kite"))[
        "task_id"].sort().to_list() == first.results["task_id"].sort().to_list()
    assert set(again.results["source"]) == {"dataframe[1]", "dataframe[2]"}


def test_a_dataframe_is_validated_as_a_file_is(fake, tmp_path: Path) -> None:
    """Same rows as a CSV file and as a DataFrame: the same invalid rows, field and rule."""
    rows = [{"prompt": "A quiet harbour", "duration": "5"}, {"prompt": "", "duration": "5"},
            {"prompt": "A slow train", "duration": "99"}]
    csv = write_csv(tmp_path / "in.csv", rows)
    res = cli(submit_args(fake, tmp_path, csv, out="cli.parquet", extra=["--dry-run"]))
    assert res.exit_code == 1, res.output
    from_file = results(tmp_path / "cli.parquet")
    done = night(fake, tmp_path, pl.DataFrame(rows), dry_run=True)
    assert done.exit_code == 1
    assert done.results["status"].to_list() == from_file["status"].to_list()
    assert done.results["error"].to_list() == from_file["error"].to_list()
    assert done.results.filter(pl.col("status") == "invalid").height == 2
    assert fake.state.submissions() == []


def test_bad_input_raises_input_and_config_errors_not_system_exit(fake, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        night(fake, tmp_path, tmp_path / "missing.csv")
    with pytest.raises(InputError, match="neither a path"):
        night(fake, tmp_path, [42])
    with pytest.raises(InputError, match="neither a path"):
        night(fake, tmp_path, 42)
    with pytest.raises(InputError, match="no header but holds values"):  # as a CSV column without a header
        night(fake, tmp_path, pl.DataFrame({"prompt": ["A red kite"], " ": ["stray"]}))
    with pytest.raises(ConfigError, match="rate"):
        night(fake, tmp_path, frame(1), rate="fast")
    with pytest.raises(ConfigError, match="concurrency"):  # the CLI option's own range: 1..4096
        night(fake, tmp_path, frame(1), concurrency=0)
    with pytest.raises(ConfigError, match="tier"):
        night(fake, tmp_path, frame(1), tier="gold")
    with pytest.raises(ConfigError, match="state"):
        night(fake, tmp_path, frame(1), state="s3://bucket/ledger.sqlite")
    with pytest.raises(ConfigError, match="NUL"):
        night(fake, tmp_path, frame(1), model="bytedance/x\x00y")
    with pytest.raises(TypeError):
        batch.submit(frame(1))  # output is required, as -o is
    assert fake.state.submissions() == []


def test_a_locked_ledger_raises_locked_error(fake, tmp_path: Path) -> None:
    from batch.api import api_identity

    with locked_ledger(tmp_path / "state.sqlite", api_identity(fake.url, False)), \
            pytest.raises(LockedError) as caught:
        night(fake, tmp_path, frame(2))
    assert caught.value.exit_code == 3 and fake.state.submissions() == []


def test_a_provider_refusal_raises_provider_error_with_the_summary(start_fake, serve, tmp_path: Path) -> None:
    fake = start_fake(faults=["402"])
    rec = Receiver()
    hook = serve(rec.app).replace("http://", "json://") + "/hook"
    with pytest.raises(ProviderError) as caught:
        night(fake, tmp_path, frame(5), no_preflight=True, notify=[hook])
    exc = caught.value
    assert exc.exit_code == EXIT_PROVIDER and isinstance(exc, BatchError)
    assert exc.summary is not None and exc.summary["exit_code"] == EXIT_PROVIDER
    assert exc.summary["results"] == str(tmp_path / "out.parquet")
    assert "402" in json.dumps(exc.summary["top_errors"]) or "402" in str(exc)
    assert exc.results is not None and exc.results.height == 5
    assert KEY not in str(exc) and KEY not in json.dumps(exc.summary)
    assert len(rec.messages) == 1 and rec.messages[0]["title"].startswith("seedance-batch submit (Python API): exit 5")


def test_collect_with_download_returns_the_table_with_local_paths(start_fake, tmp_path: Path) -> None:
    fake = start_fake(task_delay=0.0)
    sent = night(fake, tmp_path, frame(3))
    videos = tmp_path / "videos"
    got = batch.collect(results=tmp_path / "out.parquet", state=tmp_path / "state.sqlite", base_url=fake.url,
                        download=videos, wait=True, timeout="60s", poll_interval=0.1, rate="0",
                        log_level="warning")
    assert got.exit_code == 0, got.summary
    table = got.results
    assert table.height == 3 and set(table["task_status"]) == {"success"}
    assert table["task_id"].sort().to_list() == sent.results["task_id"].sort().to_list()
    for paths in table["local_paths"].to_list():
        assert len(paths) == 1 and Path(paths[0]).parent == videos, paths
        assert Path(paths[0]).is_file() and Path(paths[0]).stat().st_size > 0
    assert got.results.equals(results(tmp_path / "out.parquet"))  # the table as rewritten on disk
    assert got.summary["page"] and Path(got.summary["page"]).is_file()


def test_collect_without_a_ledger_raises_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no state file"):
        batch.collect(state=tmp_path / "none.sqlite", fake_api=True, log_level="warning")


def test_param_as_a_mapping_expands_a_grid_like_a_job_file(fake, tmp_path: Path) -> None:
    done = night(fake, tmp_path, frame(2).drop("duration"), param={"duration": [5, 10]})
    assert done.results.height == 4 and sorted(done.results["duration"].to_list()) == [5, 5, 10, 10]
    assert len(fake.state.submissions()) == 4


def test_a_worker_thread_can_call_it(fake, tmp_path: Path) -> None:
    """Orchestrators and notebooks' executors run tasks in threads, where no signal
    handler can be installed: the run goes on without them."""
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(night, fake, tmp_path, frame(3)).result(timeout=120)
    assert done.ok and done.results["task_id"].null_count() == 0
    assert len(fake.state.submissions()) == 3
    with ThreadPoolExecutor(1) as pool:
        got = pool.submit(batch.collect, results=tmp_path / "out.parquet", state=tmp_path / "state.sqlite",
                          base_url=fake.url, wait=True, timeout="60s", poll_interval=0.1, rate="0",
                          log_level="warning").result(timeout=120)
    assert got.ok and set(got.results["task_status"]) == {"success"}


def test_a_results_table_handed_back_as_input_is_refused(fake, tmp_path: Path) -> None:
    """Its rows are last night's requests: reading it as prompts would pay again for them."""
    done = night(fake, tmp_path, frame(2))
    with pytest.raises(InputError, match="not a prompt file"):
        night(fake, tmp_path, done.results, output=tmp_path / "again.parquet")
    assert len(fake.state.submissions()) == 2


def test_a_lazy_frame_is_an_input_too(fake, tmp_path: Path) -> None:
    done = night(fake, tmp_path, frame(2).lazy().filter(pl.col("id") == "k1"))
    assert done.results["id"].to_list() == ["k1"] and len(fake.state.submissions()) == 1


def test_collect_takes_a_job_file_whose_values_are_the_defaults(fake, tmp_path: Path) -> None:
    """As `collect JOB.toml`: the job's state, output (as results), download and base_url;
    a keyword wins over the job's value."""
    night(fake, tmp_path, frame(2))
    job = tmp_path / "nightly.toml"
    job.write_text(f'inputs = ["unused.csv"]\noutput = "{tmp_path / "out.parquet"}"\n'
                   f'state = "{tmp_path / "state.sqlite"}"\nbase_url = "http://127.0.0.1:1"\n'
                   f'download = "{tmp_path / "clips"}"\nrate = "0"\n')
    got = batch.collect(job, base_url=fake.url, wait=True, timeout="60s", poll_interval=0.1, log_level="warning")
    assert got.ok, got.summary
    assert got.summary["results"] == str(tmp_path / "out.parquet") and got.summary["downloaded"] == 2
    assert all(Path(p[0]).parent == tmp_path / "clips" for p in got.results["local_paths"].to_list())
    with pytest.raises(ConfigError):
        batch.collect(tmp_path, log_level="warning")  # a directory, not a job file


def test_collect_takes_prices_as_the_cli_does(fake, tmp_path: Path) -> None:
    night(fake, tmp_path, frame(3))
    prices = tmp_path / "prices.toml"
    prices.write_text('["bytedance/seedance-1.0-lite-t2v"]\n"720p" = 0.08\n')
    got = batch.collect(results=tmp_path / "out.parquet", state=tmp_path / "state.sqlite", base_url=fake.url,
                        download=tmp_path / "videos", rate="0", prices=prices, log_level="warning")
    assert got.exit_code == 0, got.summary
    assert got.summary["spend"] == "0.60 USD (15.0 s of video)"  # 3 x 5 s at 720p, flex: half of 0.08 USD/s


def test_a_dict_or_a_list_of_prompts_is_a_clear_input_error(fake, tmp_path: Path) -> None:
    """They gave "unsupported file type (none)": the dict's keys and the prompts were taken for paths."""
    with pytest.raises(InputError, match=r"^inputs: a dict is not a table; pass polars.DataFrame\(\.\.\.\)"):
        night(fake, tmp_path, {"prompt": ["A red kite", "A blue kite"]})
    with pytest.raises(InputError, match=r"^inputs: 'A red kite over the dunes' is not a path, a URL or a "
                                         r"DataFrame.*polars.DataFrame\(\{'prompt': \[\.\.\.\]\}\)"):
        night(fake, tmp_path, ["A red kite over the dunes", "A blue kite"])
    with pytest.raises(InputError, match="a dict is not a table"):
        night(fake, tmp_path, [frame(1), {"prompt": "x"}])
    assert fake.state.submissions() == []


def test_a_library_call_leaves_the_callers_root_logger_alone(fake, tmp_path: Path) -> None:
    import logging
    import warnings

    root = logging.getLogger()
    handlers, level, show = list(root.handlers), root.level, warnings.showwarning
    done = night(fake, tmp_path, frame(1))
    assert done.exit_code == 0
    assert root.handlers == handlers and root.level == level  # the notebook's own logging as it was
    assert warnings.showwarning is show
    assert logging.getLogger("batch").handlers  # the tool's own loggers are configured instead
