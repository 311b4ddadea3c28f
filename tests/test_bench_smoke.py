"""A small run of every benchmark phase: it asserts correctness (all submitted, no window
over the limit, cooldown effective, flat memory), never speed."""

from pathlib import Path

from benchmarks import bench


def test_overhead_phase_submits_everything(tmp_path: Path) -> None:
    row = bench.overhead(tmp_path, 300, concurrency=16, repeats=1)
    assert row["ok"], row
    assert row["ours_rps"] > 0 and row["bare_rps"] > 0


def test_postgres_overhead_phase_submits_everything(tmp_path: Path) -> None:
    row = bench.overhead_postgres(tmp_path, 200, concurrency=16)
    assert row["ok"], row
    assert row["rps bare/sqlite/postgres"].count("/") == 2


def test_rate_phase_never_exceeds_the_window(tmp_path: Path) -> None:
    row = bench.rate_precision(tmp_path, 40, 1.0, strict=False)
    assert row["ok"] and row["max_1s_window"] <= 40, row  # the hard guarantee, unlike the achieved rate
    strict = bench.rate_precision(tmp_path, 40, 1.0, strict=True)
    assert strict["ok"] and strict["429_share"] <= 0.01, strict


def test_latency_and_backpressure_phases(tmp_path: Path) -> None:
    row = bench.latency_hiding(tmp_path, 40, 0.3, 1.0)
    assert row["ok"] and row["max_1s_window"] <= 40, row
    bp = bench.backpressure(tmp_path, 20, 10)
    assert bp["ok"] and bp["statuses"] == {"submitted": 10}, bp


def test_scale_phase(tmp_path: Path) -> None:
    rows = bench.scale(tmp_path, 3_000, (500, 2_000))
    assert rows[0]["ok"] and rows[1]["ok"], rows
    assert rows[1]["ratio"] < 1.5, rows


def test_window_and_rate_helpers() -> None:
    assert bench.max_in_window([0.0, 0.5, 0.99, 1.0, 1.5]) == 3
    assert bench.achieved_rate([0.0, 1.0, 2.0]) == 1.0


def test_validator_and_bucket_phases(tmp_path: Path) -> None:
    row = bench.validator(2_000, 10.0)
    assert row["ok"] and row["s per 1M ours/fastjsonschema/jsonschema"].count("/") == 2, row
    bucket = bench.bucket_read(tmp_path, 2_000)
    assert bucket["ok"], bucket


def test_memory_is_the_commands_own() -> None:
    """A bench holding 300 MiB measures ``python -c pass`` at its own size, not the bench's
    (ru_maxrss of a child forked from a big parent includes the parent's memory)."""
    held = bytearray(300 * 2**20)
    held[:: 4096] = b"1" * len(held[:: 4096])
    small = bench.run_measured([bench.PY, "-c", "pass"])
    big = bench.run_measured([bench.PY, "-c", "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096])"])
    assert small.rc == 0 and small.rss_mib < 60, small
    assert 200 <= big.rss_mib < 300, big
    assert bench.runner_floor_mib() < 30


def test_target_rows_compare_two_checkouts(tmp_path: Path) -> None:
    rows = bench.targets(tmp_path, bench.ROOT, rows=2_000, xlsx_rows=300, submit_n=200, rss_sizes=(100, 300))
    assert [r["ok"] for r in rows] == [True] * 6, rows
    assert "wall_s before" in rows[0] and "wall_s after" in rows[0] and "rss before" in rows[-1], rows
    floor = next(r for r in rows if r["phase"].startswith("floor"))  # the ablations ran and sent everything
    assert len(floor["us"].split("/")) == 2 and len(floor["p99_ms"].split("/")) == 2, floor


def test_submit_only_measures_the_submit_rows_alone(tmp_path: Path) -> None:
    rows = bench.targets(tmp_path, None, rows=0, xlsx_rows=0, submit_n=100, rss_sizes=(50, 100))
    assert [r["phase"].split(" ")[0] for r in rows] == ["submit", "mark-to-wire", "floor", "submit"], rows
    assert all(r["ok"] for r in rows), rows


def test_target_rows_of_the_dry_run_alone(tmp_path: Path) -> None:
    rows = bench.targets(tmp_path, None, rows=500, xlsx_rows=50, submit=False)
    assert [r["phase"] for r in rows] == ["dry run, 500 Parquet rows", "dry run, 50 .xlsx rows"], rows
    assert all(r["ok"] and "peak_rss_mib after" in r for r in rows), rows
    floor = [float(v) for v in rows[1]["cpu_s after: imports/+load/+expand"].split("/")]
    assert len(floor) == 3 and all(v > 0 for v in floor), rows  # each stage ran (a failing one raises)


def test_a_variant_runs_its_own_checkout(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``python -m batch`` started from inside a checkout imports that checkout's batch
    before PYTHONPATH's: the before/after rows would both measure "after"."""
    other = tmp_path / "base"
    (other / "batch").mkdir(parents=True)
    (other / "batch" / "__main__.py").write_text("import sys; sys.exit(0 if __file__.startswith(sys.argv[1]) else 3)")
    (other / "batch" / "__init__.py").write_text("")
    monkeypatch.chdir(bench.ROOT)
    m = bench.run_measured([bench.PY, "-m", "batch", str(other)], {**bench.env(), "PYTHONPATH": str(other)})
    assert m.rc == 0, m
