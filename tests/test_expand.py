import re
from pathlib import Path

import polars as pl
import pytest

from batch.errors import ConfigError, InputError
from batch.expand import Expander, ExpandSpec, cell_values, parse_param
from batch.load import Table, load_table


def table(rows: list[dict[str, object]], name: str = "t.csv") -> Table:
    df = pl.DataFrame(rows, schema={k: pl.String for k in rows[0]})
    return Table(name, Path(name), df)


def expand(rows: list[dict[str, object]], **spec: object) -> list:
    return list(Expander([table(rows)], ExpandSpec(**spec)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "cell", "values"), [
    ("ratio", "16:9|9:16", ["16:9", "9:16"]), ("ratio", " 16:9 | 1:1 ", ["16:9", "1:1"]),
    ("duration", "[3, 5]", [3, 5]), ("resolution", '["480p","720p"]', ["480p", "720p"]),
    ("duration", "5", ["5"]), ("duration", "", []), ("duration", None, []), ("duration", "  ", []),
    ("prompt", "a | b", ["a | b"]), ("prompt", "[Scene 1] a cat", ["[Scene 1] a cat"]),
    ("prompt", '["a cat", "a dog"]', ["a cat", "a dog"]), ("prompt", "[1, 2]", ["[1, 2]"]),
    ("ratio", ["16:9", None, "4:3"], ["16:9", "4:3"]), ("seed", 7, [7]),
])
def test_cell_values(name: str, cell: object, values: list[object]) -> None:
    assert cell_values(name, cell) == values


def test_row_expands_to_cartesian_product_of_multi_valued_cells() -> None:
    reqs = expand([{"prompt": "p", "ratio": "16:9|9:16|1:1", "duration": "[3, 5]"}])
    assert len(reqs) == 6
    assert {(r.body["ratio"], r.body["duration"]) for r in reqs} == {
        (ratio, d) for ratio in ("16:9", "9:16", "1:1") for d in (3, 5)
    }
    assert all(r.row == 2 for r in reqs)  # the row a spreadsheet shows: header = 1
    assert len({r.request_id for r in reqs}) == 6


def test_param_fills_empty_cells_and_expands_as_grid_but_row_wins() -> None:
    params = dict([parse_param("resolution=480p,720p"), parse_param("duration=4")])
    reqs = expand([{"prompt": "a", "duration": "", "resolution": ""},
                   {"prompt": "b", "duration": "9", "resolution": "1080p"}], params=params)
    got = [(r.body["prompt"], r.body["resolution"], r.body["duration"]) for r in reqs]
    assert got == [("a", "480p", 4), ("a", "720p", 4), ("b", "1080p", 9)]


def test_service_tier_defaults_to_flex_and_is_always_sent() -> None:
    reqs = expand([{"prompt": "a", "service_tier": ""}, {"prompt": "b", "service_tier": "default"}])
    assert [r.body["service_tier"] for r in reqs] == ["flex", "default"]
    assert expand([{"prompt": "a"}], tier="default")[0].body == {"prompt": "a", "service_tier": "default"}


def test_body_holds_only_fields_the_request_sets() -> None:
    (req,) = expand([{"prompt": "a", "ratio": "", "seed": "", "camera_fixed": "", "frames": "29"}])
    assert req.body == {"prompt": "a", "frames": 29, "service_tier": "flex"}


def test_invalid_request_keeps_going_and_names_every_broken_field() -> None:
    reqs = expand([{"prompt": "ok", "duration": "15", "ratio": "2:1"}, {"prompt": "fine", "duration": "5", "ratio": ""}])
    assert reqs[0].error is not None
    assert "duration='15': must be an integer in [2, 12]" in reqs[0].error
    assert "ratio='2:1'" in reqs[0].error
    assert reqs[1].error is None


def test_empty_prompt_cell_is_invalid_not_dropped() -> None:
    reqs = expand([{"id": "a", "prompt": ""}, {"id": "b", "prompt": "x"}])
    assert [r.error for r in reqs] == ["prompt: missing (empty cell)", None]


def test_blank_lines_are_not_rows_but_keep_row_numbers() -> None:
    reqs = expand([{"prompt": "a", "x": "1"}, {"prompt": None, "x": None}, {"prompt": "c", "x": "3"}])
    assert [r.row for r in reqs] == [2, 4]


def test_request_id_stable_under_reorder_and_added_columns(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"p{i}", "ratio": "16:9|9:16"} for i in range(5)]
    ids = {r.request_id for r in expand(rows)}
    shuffled = list(reversed(rows))
    assert {r.request_id for r in expand(shuffled)} == ids
    wider = [{**r, "campaign": "new", "owner": "me"} for r in rows]
    assert {r.request_id for r in expand(wider)} == ids
    # A tier change does not make a new video, so it is not a new request.
    assert {r.request_id for r in expand(rows, tier="default")} == ids


def test_request_id_is_content_and_repeat_count() -> None:
    reqs = expand([{"prompt": "same"}, {"prompt": "other"}, {"prompt": "same"}])
    assert reqs[0].request_id != reqs[1].request_id
    assert reqs[2].request_id == reqs[0].request_id + "-1"  # identical requests: each its own video
    # "5" and "5.0" and 5 are the same request.
    a = expand([{"prompt": "x", "duration": "5"}])[0].request_id
    b = expand([{"prompt": "x", "duration": "5.0"}])[0].request_id
    assert a == b


def test_result_column_names_in_input_are_renamed_not_overwritten() -> None:
    exp = Expander([table([{"prompt": "a", "status": "draft", "task_id": "mine"}])], ExpandSpec())
    req = next(iter(exp))
    assert req.extra == {"input_status": "draft", "input_task_id": "mine"}
    assert exp.extra_columns == ["input_status", "input_task_id"]


def test_prompt_template_and_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "sheet.csv"
    path.write_text("text,style,subject\nhello,noir,cat\nbye,,dog\n")
    exp = Expander([load_table(path)], ExpandSpec(prompt_template="{subject} in {style} style"))
    reqs = list(exp)
    assert reqs[0].body["prompt"] == "cat in noir style"
    assert reqs[1].error is not None and "column 'style' is empty" in reqs[1].error
    with pytest.raises(InputError, match="prompt_template uses column 'mood'"):
        Expander([load_table(path)], ExpandSpec(prompt_template="{mood}"))
    with pytest.raises(InputError, match="mapped column 'nope' not found"):
        Expander([load_table(path)], ExpandSpec(columns={"nope": "prompt"}))
    with pytest.raises(InputError, match="maps 'text' to 'note', which is no API field"):
        Expander([load_table(path)], ExpandSpec(columns={"text": "note"}, prompt_template="{subject}"))


def test_param_without_value_is_config_error() -> None:
    with pytest.raises(ConfigError, match="expected FIELD=V1"):
        parse_param("duration")


@pytest.mark.parametrize(("text", "message"), [
    ("durations=5", "unknown API field"), ("ratio=16:9,,4:3", "empty value"),
    ("duration=15", "duration='15': must be an integer in [2, 12]"), ("ratio=2:1", "must be one of"),
    ("generate_audio=true", "has no field 'generate_audio'"),  # a field of another model
])
def test_bad_param_is_a_usage_error_before_anything_is_sent(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        expand([{"prompt": "a"}], params=dict([parse_param(text)]))


def test_param_takes_the_cell_list_syntax_and_commas() -> None:
    for text in ("ratio=16:9|9:16", 'ratio=["16:9", "9:16"]', "ratio=16:9,9:16", "Ratio = 16:9, 9:16"):
        assert [r.body["ratio"] for r in expand([{"prompt": "a"}], params=dict([parse_param(text)]))] == \
            ["16:9", "9:16"], text


def test_prompt_param_is_not_split_on_commas() -> None:
    reqs = expand([{"id": "x"}], params=dict([parse_param("prompt=a cat, a dog")]))
    assert [r.body["prompt"] for r in reqs] == ["a cat, a dog"]


def test_labels_never_change_identity() -> None:
    """Renaming ids, another id column, no id column: the same videos, the same ids."""
    rows = [{"id": f"r{i}", "sku": f"S-{i}", "prompt": f"p{i}", "duration": "5"} for i in range(4)]
    base = [r.request_id for r in expand(rows)]
    assert [r.request_id for r in expand([{**r, "id": f"renamed-{r['id']}"} for r in rows])] == base
    assert [r.request_id for r in expand(rows, id_column="sku")] == base
    assert [r.request_id for r in expand([{k: v for k, v in r.items() if k != "id"} for r in rows])] == base
    assert [r.label for r in expand(rows, id_column="sku")] == ["S-0", "S-1", "S-2", "S-3"]


def test_identical_rows_with_different_ids_are_repeats_not_one_video() -> None:
    reqs = expand([{"id": "a", "prompt": "same"}, {"id": "b", "prompt": "same"}])
    assert reqs[1].request_id == reqs[0].request_id + "-1"
    assert [r.label for r in reqs] == ["a", "b"]


def test_the_model_is_part_of_identity() -> None:
    one = expand([{"prompt": "p"}])[0].request_id
    other = expand([{"prompt": "p"}], model="bytedance/seedance-1.0-pro-fast-t2v")[0].request_id
    assert one != other
