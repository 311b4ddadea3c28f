"""The block scan of a sheet's XML (polars regexes) says exactly what the streaming expat
scan says, on workbooks as Excel users' programs write them and on hand-written XML that
bends the format (attribute order, entities, CDATA, inline strings, formulas, merged
ranges, rows out of order), in every block size."""

from __future__ import annotations

import datetime as dt
import zipfile
from pathlib import Path

import openpyxl
import pytest
import xlsxwriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch import xlsx

CAP = 300  # small, so that an oversized inline string is cheap to write


def _scans(path: Path, monkeypatch: pytest.MonkeyPatch, block: int) -> list[tuple[xlsx.SheetScan, xlsx.SheetScan]]:
    monkeypatch.setattr(xlsx, "BLOCK", block)
    monkeypatch.setattr(xlsx, "FIRST_BLOCK", block)
    out = []
    with zipfile.ZipFile(path) as zf:
        styles = xlsx.date_styles(zf)
        for sheet in xlsx.list_sheets(zf):
            for trusted in (True, False):
                out.append((xlsx.scan_sheet(zf, sheet.part, styles, CAP, trusted),
                            xlsx.scan_sheet_streaming(zf, sheet.part, styles, CAP, trusted)))
    return out


def _assert_same(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for block in (64, 700, 1 << 20):  # rows cut into many blocks, a few, one
        for fast, reference in _scans(path, monkeypatch, block):
            assert fast == reference, block


def test_openpyxl_workbook_with_formulas_merges_dates_and_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Prompts"
    sheet.append(["Spring campaign"])
    sheet.append([])
    sheet.append(["prompt", "model", "duration", "ratio", "when", "ok"])
    for i in range(60):
        sheet.append([f"a boat & a cat <{i}>", "bytedance/seedance-1.0-lite-t2v", 5 if i % 7 else "5", "16:9",
                      dt.datetime(2026, 1, 1, 16, 9) if i % 5 == 0 else None, i % 3 == 0])
    sheet["A20"] = '="a cat "&"at dusk"'  # a formula without a cached value
    sheet["C30"] = "=2+3"
    sheet["D40"] = dt.time(16, 9)
    sheet.merge_cells("B50:B53")
    sheet["F55"] = "x" * (CAP + 5)  # over the cap
    book.create_sheet("Old").append(["prompt", "=1+1"])
    book["Old"].sheet_state = "hidden"
    path = tmp_path / "book.xlsx"
    book.save(path)
    _assert_same(path, monkeypatch)
    book2 = openpyxl.Workbook(write_only=True)  # inline strings, as openpyxl's write-only mode stores them
    ws = book2.create_sheet("P")
    ws.append(["prompt", "duration"])
    for i in range(80):
        ws.append([f"take {i} &amp; more" if i % 9 else "y" * (CAP + 1), i])
    path2 = tmp_path / "inline.xlsx"
    book2.save(path2)
    _assert_same(path2, monkeypatch)


def test_xlsxwriter_workbook_recalculated_on_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "xw.xlsx"
    book = xlsxwriter.Workbook(path)
    sheet = book.add_worksheet("Prompts")
    sheet.write_row(0, 0, ["prompt", "duration", "when"])
    date = book.add_format({"num_format": "hh:mm"})
    for i in range(1, 90):
        sheet.write_string(i, 0, f"prompt {i}")
        sheet.write_number(i, 1, 5)
        if i % 10 == 0:
            sheet.write_number(i, 2, 0.67, date)
        if i % 13 == 0:
            sheet.write_formula(i, 1, "=2+3")
        if i % 17 == 0:
            sheet.write_boolean(i, 2, True)
    sheet.merge_range("C70:C72", "merged")
    book.close()
    _assert_same(path, monkeypatch)


_TEMPLATES = [
    '<c r="{ref}" t="s"><v>{i}</v></c>',
    '<c r="{ref}"><v>{i}</v></c>',
    '<c r="{ref}" s="1"><v>4{i}.5</v></c>',  # a date style
    '<c r="{ref}" t="n"><v> </v></c>',  # blank: no value
    '<c r="{ref}" t="b"><v>1</v></c>',
    '<c r="{ref}" t="e"><v>#N/A</v></c>',
    '<c r="{ref}" t="d"><v>2026-01-01</v></c>',
    '<c r="{ref}" t="str"><f>A1&amp;B1</f><v>ab</v></c>',
    '<c r="{ref}"><f t="shared" si="0"/></c>',
    '<c r="{ref}"><f>1+1</f><v></v></c>',
    '<c r="{ref}" t="inlineStr"><is><t>x &amp; y</t></is></c>',
    '<c r="{ref}" t="inlineStr"><is><r><t>rich </t></r><r><t>text</t></r></is></c>',
    '<c r="{ref}" t="inlineStr"><is><t>' + "z" * (CAP + 3) + "</t></is></c>",
    '<c r="{ref}" t="inlineStr"><is><t>' + "&amp;" * (CAP // 2) + "</t></is></c>",  # short once decoded
    '<c r="{ref}" t="inlineStr"><is><t></t></is></c>',
    '<c t="n" s="1" r="{ref}"><v>7</v></c>',  # another attribute order
    '<c r="{ref}" s="0" t="n" cm="1"><v>8</v></c>',  # another attribute
    '<c r="{ref}"><v>&#32;</v></c>',  # an entity that is blank
    '<c r="{ref}"><v><![CDATA[9]]></v></c>',
    '<c r="{ref}" t="inlineStr"><is><t><![CDATA[' + "<a>" * CAP + "]]></t></is></c>",  # '<' in the text
    '<c r="{ref}" t="inlineStr"><is>' + "<r><t>q</t></r>" * (CAP + 1) + "</is></c>",  # over the cap in runs
    '<c r="{ref}" t="sx"><v>1</v></c>',  # an unknown kind
    '<c r="{ref}" s="1"/>',
    '<c r="{ref}" t="s"/>',
]
_CELLS = st.sampled_from(_TEMPLATES)


def _sheet(tmp_path: Path, rows: list[tuple[int, list[tuple[int, str]]]], merges: list[tuple[int, int, int]]) -> Path:
    body = []
    for n, (row, cells) in enumerate(rows):
        cols = "".join(template.format(ref=f"{xlsx.column_letters(col)}{row}", i=n) for col, template in cells)
        body.append(f'<row r="{row}">{cols}</row>')
    merged = "".join(f'<mergeCell ref="{xlsx.column_letters(c)}{r}:{xlsx.column_letters(c + w)}{r + 2}"/>'
                     for r, c, w in merges)
    sheet = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
             '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><cols><col min="1" '
             f'max="2" width="9"/></cols><sheetData>{"".join(body)}</sheetData>'
             + (f'<mergeCells count="{len(merges)}">{merged}</mergeCells>' if merges else "")
             + '<headerFooter><firstFooter>f</firstFooter></headerFooter></worksheet>')
    path = tmp_path / "hand.xlsx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("xl/worksheets/sheet1.xml", sheet)
    return path


def _assert_same_hand(path: Path, monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    monkeypatch.setattr(xlsx, "HEAD_ROWS", 3)  # so that blocks after the head are read the typed-only way
    monkeypatch.setattr(xlsx, "BLOCK", block)
    monkeypatch.setattr(xlsx, "FIRST_BLOCK", block)
    with zipfile.ZipFile(path) as zf:
        for trusted in (True, False):
            fast = xlsx.scan_sheet(zf, "xl/worksheets/sheet1.xml", {1}, CAP, trusted)
            assert fast == xlsx.scan_sheet_streaming(zf, "xl/worksheets/sheet1.xml", {1}, CAP, trusted)


@pytest.mark.parametrize("template", _TEMPLATES)
@pytest.mark.parametrize("block", [64, 5000])
def test_every_cell_kind_after_the_head_and_out_of_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         template: str, block: int) -> None:
    text = [(0, '<c r="{ref}" t="s"><v>{i}</v></c>')]
    rows = [(r, text) for r in range(3, 20)]  # the head, then blocks read the typed-only way
    path = _sheet(tmp_path, [*rows, (40, [(1, template)]), *rows[-3:], (4, [(2, template)]), (1, [(3, template)])], [])
    _assert_same_hand(path, monkeypatch, block)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.integers(1, 60), st.lists(st.tuples(st.integers(0, 30), _CELLS), max_size=5)),
                     max_size=40),
       merges=st.lists(st.tuples(st.integers(1, 60), st.integers(0, 5), st.integers(0, 3)), max_size=3),
       block=st.sampled_from([64, 300, 5000]))
def test_hand_written_sheets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: list, merges: list,
                             block: int) -> None:
    """Rows in any order (some out of order), cells of every kind; the head then the rest."""
    _assert_same_hand(_sheet(tmp_path, rows, merges), monkeypatch, block)


def test_single_quoted_attributes_are_read_by_the_streaming_scan(tmp_path: Path) -> None:
    """Valid XML no common program writes: the regexes would miss it, so expat reads it."""
    sheet = ("<worksheet xmlns='http://schemas.openxmlformats.org/spreadsheetml/2006/main'><sheetData>"
             "<row r='1'><c r='A1' t='inlineStr'><is><t>prompt</t></is></c></row>"
             "<row r='2'><c r='A2'><v>5</v></c></row></sheetData></worksheet>")
    path = tmp_path / "q.xlsx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("xl/worksheets/sheet1.xml", sheet)
    with zipfile.ZipFile(path) as zf:
        scan = xlsx.scan_sheet(zf, "xl/worksheets/sheet1.xml", set(), CAP)
    assert scan.types == {(2, 0): "n"} and scan.head[1] == {0: ("inlineStr", "prompt")}


def _strings_reference(zf: zipfile.ZipFile, cap: int, wanted: set[int]) -> tuple[dict[int, int], dict[int, str]]:
    """Every shared string walked, as before the early stop."""
    found: dict[int, int] = {}
    texts: dict[int, str] = {}

    def on_string(index: int, length: int, text: str | None) -> None:
        if length > cap:
            found[index] = length
        elif text is not None:
            texts[index] = text

    with zf.open("xl/sharedStrings.xml") as stream:
        xlsx._walk_strings(stream, wanted.__contains__, cap, on_string)
    return found, texts


@pytest.mark.parametrize("odd", [
    "",
    "<si><t>" + "w" * (CAP + 1) + "</t></si>",  # over the cap
    "<si>" + "<r><t>q</t></r>" * (CAP + 1) + "</si>",  # over the cap in short runs
    "<si><t><![CDATA[" + "<si>" * CAP + "]]></t></si>",  # '<si' inside a CDATA section
    "<si><t>" + "&amp;" * (CAP // 2) + "</t></si>",  # long in bytes, short in characters
])
@pytest.mark.parametrize("wanted", [set(), {0, 3}, {41}, {999}])
def test_shared_strings_stop_early_only_when_none_can_be_oversized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   odd: str, wanted: set[int]) -> None:
    strings = [f"<si><t>prompt {i} &amp; more</t></si>" for i in range(40)] + [odd] * bool(odd) + ["<si><t>x</t></si>"]
    path = tmp_path / "s.xlsx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("xl/sharedStrings.xml", '<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
                    + "".join(strings) + "</sst>")
    monkeypatch.setattr(xlsx, "BLOCK", 100)
    with zipfile.ZipFile(path) as zf:
        assert xlsx.shared_strings(zf, CAP, wanted) == _strings_reference(zf, CAP, wanted)


def test_a_big_plain_sheet_costs_no_python_call_per_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed of issue #21 as structure: on 3,000 rows of text and numbers, expat reads
    only the head cells (20 rows), the streaming scan is never used, and blocks after the
    head read their number cells only."""
    path = tmp_path / "big.xlsx"
    book = xlsxwriter.Workbook(path)
    sheet = book.add_worksheet("Prompts")
    sheet.write_row(0, 0, ["prompt", "duration", "ratio"])
    for i in range(1, 3001):
        sheet.write_row(i, 0, [f"take {i} & more", 5, "16:9"])
    book.close()
    calls = {"cell": 0, "typed": 0}
    cell_text, scan_block = xlsx._cell_text, xlsx._scan_block

    def counted(cell: str) -> tuple[str, bool, int]:
        calls["cell"] += 1
        return cell_text(cell)

    def block(*args: object) -> None:
        calls["typed"] += bool(args[-1])
        scan_block(*args)  # type: ignore[arg-type]

    def never(*_args: object) -> xlsx.SheetScan:
        raise AssertionError("the streaming scan read a plain sheet")

    monkeypatch.setattr(xlsx, "_cell_text", counted)
    monkeypatch.setattr(xlsx, "_scan_block", block)
    monkeypatch.setattr(xlsx, "scan_sheet_streaming", never)
    monkeypatch.setattr(xlsx, "FIRST_BLOCK", 4096)
    monkeypatch.setattr(xlsx, "BLOCK", 16384)
    with zipfile.ZipFile(path) as zf:
        scan = xlsx.scan_sheet(zf, "xl/worksheets/sheet1.xml", xlsx.date_styles(zf), CAP)
    assert len(scan.types) == 3000 and len(scan.head) == xlsx.HEAD_ROWS
    assert calls["cell"] == 3 * xlsx.HEAD_ROWS
    assert calls["typed"] >= 5


# XML a program may write, or an attacker hand-edit, that the regexes must read as expat
# does or leave to it: comments, processing instructions, CDATA, entities, prefixed names,
# attributes in any order and quoting, blanks, cells and rows placed by position (no r).
_ODD_CELLS = [
    '<c r="{ref}" t="s"><!-- <c r="E30"><f>1</f></c> --><v>{i}</v></c>',
    '<c r="{ref}"><?pi <c r="E30"><f>1</f></c> ?><f>1</f></c>',
    "<c r='{ref}' t='n'><v>3</v></c>",
    '<c  s="1"\n r="{ref}" ><v >4</v ></c >',
    '<c\tr="{ref}"\tt="b"><v>1</v></c>',
    '<x:c xmlns:x="http://schemas.openxmlformats.org/spreadsheetml/2006/main" r="{ref}"><x:f>1</x:f></x:c>',
    '<c r="{ref}"><v>&#x35;</v></c>',
    '<c r="{ref}" t="str"><f>"a"&amp;"b"</f><v><![CDATA[<c r="E30"><f>1</f></c>]]></v></c>',
    '<c r="{ref}" t="&#115;"><v>{i}</v></c>',
    '<c t="s" r="{ref}" foo="a>b"><v>{i}</v></c>',
    "<c><f>2+3</f></c>",  # no r: the column after the previous cell
    '<c t="s"><v>{i}</v></c>',
    "<c/>",
    '<c r="{ref}"/>',
]
_BETWEEN = ["", "", "", '<!-- <c r="C12"><f>1</f></c> -->', '<?pi <row r="9"><c r="B9"><f>1</f></c></row> ?>', "\n  "]


def _odd_sheet(tmp_path: Path, rows: list[tuple[int | None, list[tuple[int, str, str]]]], tail: str) -> Path:
    body = []
    for n, (row, cells) in enumerate(rows):
        shown = row if row is not None else n + 1
        cols = "".join(between + template.format(ref=f"{xlsx.column_letters(col)}{shown}", i=n)
                       for col, template, between in cells)
        body.append(f'<row r="{row}">{cols}</row>' if row is not None else f"<row>{cols}</row>")
    sheet = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
             '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'
             f'{"".join(body)}</sheetData>{tail}</worksheet>')
    path = tmp_path / "odd.xlsx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("xl/worksheets/sheet1.xml", sheet)
    return path


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.one_of(st.none(), st.integers(1, 60)),
                               st.lists(st.tuples(st.integers(0, 30), st.sampled_from(_TEMPLATES + _ODD_CELLS),
                                                  st.sampled_from(_BETWEEN)), max_size=5)), max_size=30),
       tail=st.sampled_from(["", '<!-- <c r="C12"><f>1</f></c> -->', '<?pi <c r="C12"><f>1</f></c> ?>',
                             '<mergeCells count="1"><mergeCell ref="A2:B3"/></mergeCells>']),
       block=st.sampled_from([64, 300, 5000]), max_cells=st.sampled_from([200, 8_388_608]))
def test_odd_xml_reads_as_expat_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: list, tail: str,
                                         block: int, max_cells: int) -> None:
    monkeypatch.setattr(xlsx, "MAX_CELLS", max_cells)  # small: the farthest cell is measured and noted
    _assert_same_hand(_odd_sheet(tmp_path, rows, tail), monkeypatch, block)


def test_a_cell_without_r_is_placed_after_the_previous_one(tmp_path: Path) -> None:
    path = _odd_sheet(tmp_path, [(None, [(0, '<c r="{ref}" t="s"><v>0</v></c>', "")]),
                                 (5, [(2, '<c r="{ref}"><v>1</v></c>', ""), (0, "<c><f>2+3</f></c>", "")]),
                                 (None, [(0, "<c><f>1</f></c>", ""), (0, "<c><f>1</f></c>", "")])], "")
    with zipfile.ZipFile(path) as zf:
        for scan in (xlsx.scan_sheet(zf, "xl/worksheets/sheet1.xml", set(), CAP),
                     xlsx.scan_sheet_streaming(zf, "xl/worksheets/sheet1.xml", set(), CAP)):
            assert scan.formulas == [(5, 3), (6, 0), (6, 1)] and scan.cells == 5


def test_prefixed_shared_strings_are_counted_as_calamine_counts_them(tmp_path: Path) -> None:
    """A prefixed <x:si> is a shared string to calamine: the count and the indices include it
    (and a prompt that merely says ':si' costs no slower walk)."""
    path = tmp_path / "s.xlsx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("xl/sharedStrings.xml", '<x:sst xmlns:x="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
                    "<x:si><x:t>prompt</x:t></x:si><x:si><x:t>photo:silhouette</x:t></x:si></x:sst>")
    with zipfile.ZipFile(path) as zf:
        assert xlsx.shared_strings(zf, CAP, {0, 1}) == ({}, {0: "prompt", 1: "photo:silhouette"})
    assert not xlsx._PREFIXED_SI.search("<si><t>photo:silhouette</t></si>")


@pytest.mark.parametrize("block", [64, 5000])
def test_the_farthest_cell_is_measured_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     block: int) -> None:
    """Past row 299,999 or column Z the range is measured exactly, in blocks cut at rows
    (a block with no row end is carried whole to the next)."""
    monkeypatch.setattr(xlsx, "BLOCK", block)
    monkeypatch.setattr(xlsx, "FIRST_BLOCK", block)
    long_row = "".join(f'<c r="{xlsx.column_letters(c)}7"><v>{c}</v></c>' for c in range(40))  # > 64 bytes
    path = _odd_sheet(tmp_path, [(7, [(0, long_row, "")]), (8, [(1, '<c r="B400000"><v>1</v></c>', "")])], "")
    with zipfile.ZipFile(path) as zf:
        for scan in (xlsx.scan_sheet(zf, "xl/worksheets/sheet1.xml", set(), CAP),
                     xlsx.scan_sheet_streaming(zf, "xl/worksheets/sheet1.xml", set(), CAP)):
            assert scan.far == (400_000, 39) and scan.cells == 41
