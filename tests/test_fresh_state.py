"""A fresh state directory (a new container each night) never pays again for what the
results table already records: its task ids are imported into the ledger before sending."""

from pathlib import Path

import polars as pl
import pytest
from conftest import accepted_twice, cli, error_line, prompts, results, run_cli_process, write_csv


def fresh_state_args(fake, tmp: Path, night: str, sheet: Path, out: Path, extra: list[str] | None = None) -> list[str]:
    return ["submit", str(sheet), "-o", str(out), "--base-url", fake.url, "--rate", "0",
            "--state", str(tmp / night / "state.sqlite"), *(extra or [])]


def test_a_fresh_state_dir_sends_nothing_the_table_holds(fake, tmp_path: Path) -> None:
    sheet = write_csv(tmp_path / "in.csv", prompts(6))
    out = tmp_path / "results.parquet"
    assert cli(fresh_state_args(fake, tmp_path, "night1", sheet, out)).exit_code == 0
    first = results(out)
    res = cli(fresh_state_args(fake, tmp_path, "night2", sheet, out))
    assert res.exit_code == 0, res.output
    second = results(out)
    assert len(fake.state.submissions()) == 6
    assert accepted_twice(fake) == []
    assert second["status"].to_list() == ["skipped"] * 6
    assert second["task_id"].to_list() == first["task_id"].to_list()


def test_results_from_names_the_table_of_an_earlier_night(fake, tmp_path: Path) -> None:
    sheet = write_csv(tmp_path / "in.csv", prompts(4))
    cli(fresh_state_args(fake, tmp_path, "night1", sheet, tmp_path / "monday.parquet"))
    write_csv(sheet, [*prompts(4), {"id": "new", "prompt": "a new row"}])
    res = cli(fresh_state_args(fake, tmp_path, "night2", sheet, tmp_path / "tuesday.csv",
                               ["--results-from", str(tmp_path / "monday.parquet")]))
    assert res.exit_code == 0, res.output
    assert len(fake.state.submissions()) == 5
    assert results(tmp_path / "tuesday.csv")["status"].to_list() == ["skipped"] * 4 + ["submitted"]


def test_an_unknown_row_in_the_table_stays_unknown(fake, tmp_path: Path) -> None:
    """A row the table calls ``unknown`` (the provider may have it, no task id) is not
    resent from a fresh ledger either, unless --resend-unknown says so."""
    sheet = write_csv(tmp_path / "in.csv", prompts(3))
    out = tmp_path / "results.parquet"
    cli(fresh_state_args(fake, tmp_path, "night1", sheet, out))
    table = results(out).with_columns(
        pl.when(pl.col("request_id") == pl.col("request_id").first()).then(pl.lit("unknown"))
        .otherwise(pl.col("status")).alias("status"),
        pl.when(pl.col("request_id") == pl.col("request_id").first()).then(pl.lit(None, pl.String))
        .otherwise(pl.col("task_id")).alias("task_id"))
    table.write_parquet(out)
    res = cli(fresh_state_args(fake, tmp_path, "night2", sheet, out))
    assert len(fake.state.submissions()) == 3
    assert sorted(results(out)["status"].to_list()) == ["skipped", "skipped", "unknown"]
    assert res.exit_code == 1


def test_an_unreadable_output_table_refuses_before_sending(fake, tmp_path: Path) -> None:
    sheet = write_csv(tmp_path / "in.csv", prompts(2))
    out = tmp_path / "results.parquet"
    out.write_bytes(b"PAR1 not really")
    proc = run_cli_process(fresh_state_args(fake, tmp_path, "n", sheet, out))
    assert proc.returncode == 2, proc.stderr
    message = error_line(proc.stderr)
    assert str(out) in message and "--results-from" in message
    assert fake.state.submissions() == []


def test_results_from_a_missing_table_is_a_usage_error(fake, tmp_path: Path) -> None:
    sheet = write_csv(tmp_path / "in.csv", prompts(2))
    proc = run_cli_process(fresh_state_args(fake, tmp_path, "n", sheet, tmp_path / "o.parquet",
                                            ["--results-from", str(tmp_path / "nope.parquet")]))
    assert proc.returncode == 2, proc.stderr
    assert "nope.parquet" in error_line(proc.stderr)
    assert fake.state.submissions() == []


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_new_ledger_in_either_store_sends_nothing_the_table_holds(kind: str, fake, tmp_path: Path,
                                                                    request: pytest.FixtureRequest) -> None:
    def fresh(night: str) -> str:
        if kind == "sqlite":
            return str(tmp_path / night / "state.sqlite")
        return request.getfixturevalue("pg_server").url()  # a ledger name never used before

    sheet = write_csv(tmp_path / "in.csv", prompts(4))
    out = tmp_path / "results.parquet"
    for night in ("n1", "n2"):
        res = cli(["submit", str(sheet), "-o", str(out), "--base-url", fake.url, "--rate", "0",
                   "--state", fresh(night)])
        assert res.exit_code == 0, res.output
    assert len(fake.state.submissions()) == 4
    assert results(out)["status"].to_list() == ["skipped"] * 4
