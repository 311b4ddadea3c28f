"""The results table's request columns, spooled during the run or expanded again."""

from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal

from batch.expand import Expander, ExpandSpec
from batch.load import Table
from batch.results import INVALID, RequestSpool, Resolution, request_frames, request_schema_of, write_results


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
    schema = request_schema_of(ex)
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
    spool = RequestSpool(tmp_path, request_schema_of(ex), chunk_size=2)
    it = spool.tee(ex)
    for _ in range(5):
        next(it)
    assert not spool.complete  # the caller must expand again


def test_a_spool_that_cannot_write_turns_itself_off(tmp_path: Path) -> None:
    ex = expander(tmp_path)
    spool = RequestSpool(tmp_path, request_schema_of(ex), chunk_size=2)
    spool._file.close()  # as if the disk had gone away
    assert len(list(spool.tee(ex))) == 12  # every request still reaches the workers
    assert not spool.complete


def test_table_from_spool_has_outcomes_in_input_order(tmp_path: Path) -> None:
    ex = expander(tmp_path)
    schema = request_schema_of(ex)
    spool = RequestSpool(tmp_path, schema, chunk_size=5)
    list(spool.tee(ex))
    out = tmp_path / "results.parquet"
    tally, error = write_results(out, spool.frames(chunk_size=4), schema, lambda ids: [], Resolution("run"))
    assert error is None
    df = pl.read_parquet(out)
    assert df["row"].to_list() == [2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert INVALID not in df.columns
    assert df.schema["duration"] == pl.Int64 and df.schema["shot"] == pl.Float64
    assert df["status"].to_list().count("invalid") == 2
    assert tally.counts == {"pending": 10, "invalid": 2}


def test_status_of_every_ledger_state_as_tonight_sees_it() -> None:
    """Each branch of the resolution: the ledger's status, whose run wrote it, its error."""
    from datetime import UTC, datetime

    from batch.results import entries_frame, resolve_frame

    cases = {  # id: (ledger status, run, error, attempts) -> (status, error, attempts)
        "none": (None, ("pending", "not sent: deadline reached", None)),
        "sub_now": (("submitted", "tonight", None, 1), ("submitted", None, 1)),
        "sub_old": (("submitted", "monday", None, 2), ("skipped", None, 0)),
        "send_now": (("sending", "tonight", None, 1),
                     ("unknown", "interrupted after sending; the provider may have accepted it", 1)),
        "send_old": (("sending", "monday", None, 1), ("unknown", "an earlier run stopped after sending it; "
                                                      "outcome unknown, not resent (use --resend-unknown)", 1)),
        "unk_now": (("unknown", "tonight", "timeout", 1), ("unknown", "timeout", 1)),
        "unk_old": (("unknown", "monday", "timeout", 1),
                    ("unknown", "earlier run: timeout; not resent (use --resend-unknown)", 1)),
        "fail_now": (("failed", "tonight", "bad prompt", 1), ("failed", "bad prompt", 1)),
        "fail_old": (("failed", "monday", "bad prompt", 1),
                     ("pending", "not sent this run: deadline reached; last error: bad prompt", 0)),
        "pend_now": (("pending", "tonight", "HTTP 429", 3),
                     ("pending", "not sent this run: deadline reached; last error: HTTP 429", 3)),
        "pend_old": (("pending", "monday", "", 2), ("pending", "not sent this run: deadline reached", 0)),
    }
    ids = [*cases, "bad"]
    frame = pl.DataFrame({"request_id": ids, INVALID: [None] * len(cases) + ["duration=99: must be ..."]})
    stamp = "2026-11-25T23:22:44.123+00:00"
    rows = [(rid, st, run, "https://api.example/route", f"task-{rid}", err, None, 200, attempts, stamp if rid != "sub_old" else
             "2026-11-24 22:00:00.500000+00:00", None, None, None, None, None, None, 1, None)
            for rid, (entry, _) in cases.items() if entry is not None for st, run, err, attempts in [entry]]
    out = resolve_frame(frame, entries_frame(rows), Resolution("tonight", stop_reason="deadline reached"))
    got = {r["request_id"]: (r["status"], r["error"], r["attempts"]) for r in out.iter_rows(named=True)}
    assert got == {**{rid: want for rid, (_, want) in cases.items()}, "bad": ("invalid", "duration=99: must be ...", None)}
    assert out["request_id"].to_list() == ids  # input order
    by_id = {r["request_id"]: r for r in out.iter_rows(named=True)}
    assert by_id["sub_now"]["task_id"] == "task-sub_now" and by_id["none"]["task_id"] is None
    assert by_id["sub_now"]["submitted_at"] == datetime(2026, 11, 25, 23, 22, 44, 123000, tzinfo=UTC)
    assert by_id["sub_old"]["submitted_at"] == datetime(2026, 11, 24, 22, 0, 0, 500000, tzinfo=UTC)
    # Without a stop reason the wording loses its suffix.
    quiet = resolve_frame(frame, entries_frame(rows), Resolution("tonight"))
    errors = dict(zip(quiet["request_id"], quiet["error"], strict=True))
    assert errors["none"] == "not sent" and errors["pend_old"] == "not sent this run"
    from batch.results import Tally

    tally = Tally()
    tally.add(out)
    assert tally.counts == {"pending": 4, "submitted": 1, "skipped": 1, "unknown": 4, "failed": 1, "invalid": 1}
    assert sum(tally.errors.values()) == 10  # every row not OK carries its reason; OK rows never count
    assert tally.errors["not sent: deadline reached"] == 1 and tally.estimate() is None


def test_top_errors_rank_ties_in_input_order_every_run(tmp_path: Path) -> None:
    frame = pl.DataFrame({"request_id": [f"r{i}" for i in range(6)],
                          INVALID: ["z rule", "a rule", "m rule", "a rule", "z rule", "m rule"]})
    from batch.results import Tally, resolve_frame

    for _ in range(5):
        tally = Tally()
        tally.add(resolve_frame(frame, None, Resolution("run")))
        assert [e for e, _ in tally.errors.most_common(3)] == ["z rule", "a rule", "m rule"]
