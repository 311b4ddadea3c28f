from pathlib import Path

import polars as pl
import pytest

from batch.errors import InputError
from batch.expand import Expander, ExpandSpec
from batch.load import load_inputs, load_table


def test_csv_spreadsheet_export_edge_cases(tmp_path: Path) -> None:
    text = (
        "\ufeffid,prompt,duration,camera_fixed,return_last_frame,note\r\n"
        '1,"A cat, a hat, and a bat",5.0,true,no,plain\r\n'
        '2,"Line one\r\nline two",6,0,YES,"quoted ""note"""\r\n'
        "3,一只熊猫在竹林里吃竹子,7.0,yes,1,中文\r\n"
        "4,Sunset,8,False,false,\r\n"
    )
    path = tmp_path / "export.csv"
    path.write_bytes(text.encode("utf-8"))
    table = load_table(path)
    assert table.df.columns[0] == "id"  # BOM stripped
    reqs = list(Expander([table], ExpandSpec()))
    assert [r.error for r in reqs] == [None] * 4
    assert reqs[0].body["prompt"] == "A cat, a hat, and a bat"
    assert reqs[1].body["prompt"] == "Line one\r\nline two"
    assert reqs[2].body["prompt"] == "一只熊猫在竹林里吃竹子"
    assert [r.body["duration"] for r in reqs] == [5, 6, 7, 8]
    assert [r.body["camera_fixed"] for r in reqs] == [True, False, True, False]
    assert [r.body["return_last_frame"] for r in reqs] == [False, True, True, False]
    assert reqs[1].extra["note"] == 'quoted "note"'
    assert reqs[0].extra["id"] == "1"  # ids stay text: no "1.0", no lost leading zeros


def test_parquet_list_columns_and_types(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pl.DataFrame({
        "prompt": ["a", "b"], "ratio": [["16:9", "9:16"], None], "duration": [5, None], "seed": [1, 2],
        "camera_fixed": [True, None], "score": [0.5, 1.5],
    }).write_parquet(path)
    reqs = list(Expander(load_inputs([str(path)])[0], ExpandSpec()))
    assert [(r.body["prompt"], r.body.get("ratio")) for r in reqs] == [("a", "16:9"), ("a", "9:16"), ("b", None)]
    assert reqs[0].body["duration"] == 5 and reqs[0].body["camera_fixed"] is True
    assert "duration" not in reqs[2].body
    assert reqs[0].extra["score"] == 0.5


@pytest.mark.parametrize("content", [b"\x00\x01garbage\xff", b"PAR1 not really"])
def test_unreadable_parquet_is_input_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"bad\.parquet: cannot read parquet"):
        load_table(path)


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_table(tmp_path / "nope.csv")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InputError, match=r"unsupported file type \.json"):
        load_table(tmp_path / "x.json")


def test_missing_prompt_column_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "noprompt.csv"
    path.write_text("id,text\n1,hello\n")
    with pytest.raises(InputError, match="no 'prompt' column"):
        Expander(load_inputs([str(path)])[0], ExpandSpec())


def test_directory_and_glob_inputs(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("prompt\nx\n")
    (tmp_path / "b.csv").write_text("prompt\ny\n")
    (tmp_path / "ignore.txt").write_text("nothing")
    (tmp_path / "~$a.xlsx").write_bytes(b"lock")  # Excel's lock file while a.xlsx is open
    (tmp_path / ".hidden.csv").write_text("prompt\nz\n")
    names = [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
    assert [t.source for t in load_inputs([str(tmp_path)])[0]] == names
    assert [t.source for t in load_inputs([str(tmp_path / "*.csv")])[0]] == names
    with pytest.raises(InputError, match=r"no \.csv"):
        load_inputs([str(tmp_path / "*.parquet")])
