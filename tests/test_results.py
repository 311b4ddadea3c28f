"""The results table's request columns, spooled during the run or expanded again."""

from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal

from batch.expand import Expander, ExpandSpec
from batch.load import Table
from batch.results import INVALID, RequestSpool, Resolution, request_frames, request_schema, write_results


def expander(tmp_path: Path) -> Expander:
    df = pl.DataFrame({
        "id": [f"r{i}" for i in range(11)],
        "prompt": [f"a fox, take {i}" if i != 4 else "" for i in range(11)],
        "duration": ["5", "6|7", "99", "5", "5", "5", "5.0", None, "5", "5", "12"],
        "shot": [i * 1.5 for i in range(11)],
        "note": [None] * 11,
    })
    return Expander([Table("in.csv", tmp_path / "in.csv", df)], ExpandSpec())


def test_spooled_frames_equal_a_second_expansion(tmp_path: Path) -> None:
    ex = expander(tmp_path)
    schema = request_schema(ex.extra_dtypes)
    spool = RequestSpool(tmp_path, schema, chunk_size=3)  # chunk boundaries inside rows' expansions
    seen = [r.request_id for r in spool.tee(ex)]
    assert spool.complete
    spooled = pl.concat(list(spool.frames(chunk_size=4)))
    expanded = pl.concat(list(request_frames(ex, schema)))
    assert spooled["request_id"].to_list() == seen
    assert_frame_equal(spooled, expanded)
    # Invalid requests are spooled too, with the rule they broke.
    assert spooled.filter(pl.col(INVALID).is_not_null())[INVALID].to_list() == [
        "duration='99': must be an integer in [2, 12]", "prompt: missing (empty cell)"]
    spool.close()
    assert list(tmp_path.iterdir()) == []  # anonymous: nothing left in the output directory


def test_spool_of_a_stopped_run_is_not_complete(tmp_path: Path) -> None:
    ex = expander(tmp_path)
    spool = RequestSpool(tmp_path, request_schema(ex.extra_dtypes), chunk_size=2)
    it = spool.tee(ex)
    for _ in range(5):
        next(it)
    assert not spool.complete  # the caller must expand again


def test_a_spool_that_cannot_write_turns_itself_off(tmp_path: Path) -> None:
    ex = expander(tmp_path)
    spool = RequestSpool(tmp_path, request_schema(ex.extra_dtypes), chunk_size=2)
    spool._file.close()  # as if the disk had gone away
    assert len(list(spool.tee(ex))) == 12  # every request still reaches the workers
    assert not spool.complete


def test_table_from_spool_has_outcomes_in_input_order(tmp_path: Path) -> None:
    ex = expander(tmp_path)
    schema = request_schema(ex.extra_dtypes)
    spool = RequestSpool(tmp_path, schema, chunk_size=5)
    list(spool.tee(ex))
    out = tmp_path / "results.parquet"
    tally = write_results(out, spool.frames(chunk_size=4), ex.extra_dtypes, lambda ids: {}, Resolution("run"))
    df = pl.read_parquet(out)
    assert df["row"].to_list() == [0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert INVALID not in df.columns
    assert df.schema["duration"] == pl.Int64 and df.schema["shot"] == pl.Float64
    assert df["status"].to_list().count("invalid") == 2
    assert tally.counts == {"pending": 10, "invalid": 2}
