"""Hostile workbooks against the sheet scans (review of issue #21): XML the regexes must not
misread (comments, processing instructions, cells without ``r``), and workbooks whose extent,
cell count or shared strings would make fastexcel (calamine) take gigabytes or abort."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import xlsxwriter

from batch import load, xlsx
from batch.errors import InputError

SHEET = "xl/worksheets/sheet1.xml"


def _book(tmp_path: Path, rows: int, patch: dict[str, str] | None = None, *, name: str = "book.xlsx",
          strings: str | None = None) -> Path:
    """An xlsxwriter sheet (prompt, duration, resolution; ``rows`` rows), its sheet XML then
    patched (old -> new) the way an attacker edits the zip."""
    plain = tmp_path / f"plain-{name}"
    book = xlsxwriter.Workbook(plain)
    sheet = book.add_worksheet("Prompts")
    sheet.write_row(0, 0, ["prompt", "duration", "resolution"])
    for i in range(1, rows + 1):
        sheet.write_row(i, 0, [f"xlsx prompt {i}", 10, "1080p"])
    book.close()
    out = tmp_path / name
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == SHEET:
                text = data.decode()
                for old, new in (patch or {}).items():  # "re:" marks a pattern
                    text, n = re.subn(old[3:] if old.startswith("re:") else re.escape(old), new, text)
                    assert n, old
                data = text.encode()
            elif info.filename == "xl/sharedStrings.xml" and strings is not None:
                data = strings.encode()
            dst.writestr(info.filename, data)
    plain.unlink()
    return out


def _table(path: Path) -> load.Table:
    tables, _ = load.load_tables(path, load.ReadOptions())
    assert len(tables) == 1
    return tables[0]


@pytest.mark.parametrize("rows", [40, 3000])  # the head path and the block (column) path
@pytest.mark.parametrize("where", ["before", "after"])
def test_a_comment_does_not_move_a_formula_without_a_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           rows: int, where: str) -> None:
    monkeypatch.setattr(xlsx, "FIRST_BLOCK", 4096)
    monkeypatch.setattr(xlsx, "BLOCK", 16384)
    comment = '<!-- <c r="E30"> -->'
    hostile = '<c r="B30"><f>2+3</f></c>'
    cell = comment + hostile if where == "before" else hostile + comment
    table = _table(_book(tmp_path, rows, {'<c r="B30"><v>10</v></c>': cell}))
    index = 30 - table.first_row
    assert "B30 is a formula without a saved value" in table.notes[(index, "duration")]


def test_a_comment_does_not_hide_a_number_in_the_prompt_column(tmp_path: Path) -> None:
    table = _table(_book(tmp_path, 3000, {r're:<c r="A30" t="s"><v>\d+</v></c>': '<!-- <c r="E30"> --><c r="A30"><v>42</v></c>'}))
    assert table.kinds[(30 - table.first_row, "prompt")] == "n"


@pytest.mark.parametrize("junk", ['<!-- <c r="C12"><f>1</f></c> -->', '<?pi <c r="C12"><f>1</f></c> ?>'])
def test_markup_in_a_comment_or_instruction_after_the_rows_is_not_a_cell(tmp_path: Path, junk: str) -> None:
    table = _table(_book(tmp_path, 40, {"</sheetData>": "</sheetData>" + junk}))
    assert table.notes == {}


def test_a_formula_cell_without_a_reference_is_placed_after_the_previous_cell(tmp_path: Path) -> None:
    """``r`` is optional in OOXML: a cell without it is the column after the previous cell of
    its row, as calamine places it (and a row without ``r`` the row after the previous one)."""
    table = _table(_book(tmp_path, 40, {'<c r="B30"><v>10</v></c>': "<c><f>2+3</f></c>",
                                        r're:<row r="31" spans="1:3"><c r="A31" t="s"><v>(\d+)</v></c><c r="B31"><v>10</v></c>':
                                        r'<row spans="1:3"><c t="s"><v>\1</v></c><c><f>1+1</f></c>'}))
    assert "B30 is a formula without a saved value" in table.notes[(30 - table.first_row, "duration")]
    assert "B31 is a formula without a saved value" in table.notes[(31 - table.first_row, "duration")]
    assert table.df["prompt"][31 - table.first_row] == "xlsx prompt 30"  # fastexcel places the row so too


def _load_in_child(path: Path) -> subprocess.CompletedProcess[str]:
    code = ("import sys; from pathlib import Path; from batch import load; from batch.errors import InputError\n"
            "try:\n    load.load_tables(Path(sys.argv[1]), load.ReadOptions())\n"
            "except InputError as exc:\n    print(exc); sys.exit(2)\nprint('read')")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.parametrize("ref", ["XFD1048576", "ZZ200000"])
def test_a_far_cell_is_refused_before_fastexcel_allocates_the_range(tmp_path: Path, ref: str) -> None:
    """One cell at XFD1048576 made calamine allocate 512 GiB and abort the process (exit 134)."""
    row = ref.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    path = _book(tmp_path, 5, {"</sheetData>": f'<row r="{row}"><c r="{ref}"><v>1</v></c></row></sheetData>'})
    done = _load_in_child(path)
    assert done.returncode == 2, (done.returncode, done.stderr[-500:])
    assert "[Prompts]" in done.stdout and ref in done.stdout and "cells" in done.stdout


def test_a_far_dimension_alone_is_read(tmp_path: Path) -> None:
    """Only cells count: a ``<dimension>`` that overstates the sheet costs nothing."""
    path = _book(tmp_path, 5, {'<dimension ref="A1:C6"/>': '<dimension ref="A1:XFD1048576"/>'})
    done = _load_in_child(path)
    assert done.returncode == 0 and done.stdout.strip() == "read", done.stdout + done.stderr[-500:]


def test_too_many_cells_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same cell repeated is one place but one allocation each in calamine."""
    monkeypatch.setattr(xlsx, "MAX_CELLS", 100, raising=False)
    many = '<c r="B3"><v>1</v></c>' * 200
    path = _book(tmp_path, 5, {'<c r="B3"><v>10</v></c>': many})
    with pytest.raises(InputError, match=r"\[Prompts\].*cells"):
        load.load_tables(path, load.ReadOptions())


def test_too_many_shared_strings_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xlsx, "MAX_SHARED_STRINGS", 1000, raising=False)
    strings = ('<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
               + "".join(f"<si><t>s{i}</t></si>" for i in range(1001)) + "</sst>")
    path = _book(tmp_path, 5, strings=strings)
    with pytest.raises(InputError, match="shared strings"):
        load.load_tables(path, load.ReadOptions())


def test_a_huge_styles_part_is_refused_not_built_as_a_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """styles.xml, workbook.xml and its relations are parsed whole (ElementTree: ~10 times the
    XML in memory), so they have their own cap, below the 512 MiB of a sheet read in a stream."""
    monkeypatch.setattr(xlsx, "MAX_SMALL_PART_BYTES", 4096, raising=False)
    path = _book(tmp_path, 5)
    padded = tmp_path / "padded.xlsx"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(padded, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "xl/styles.xml":
                data = data.replace(b"</styleSheet>", b"<!--" + b"x" * 8192 + b"--></styleSheet>")
            dst.writestr(info.filename, data)
    with pytest.raises(InputError, match=r"xl/styles.xml.*MiB"):
        load.load_tables(padded, load.ReadOptions())


def test_a_prefixed_formula_cell_is_a_formula_cell(tmp_path: Path) -> None:
    """calamine reads <x:c> (the main namespace under a prefix) as a cell; so do the scans."""
    ns = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    table = _table(_book(tmp_path, 40, {'<c r="B30"><v>10</v></c>': f'<x:c xmlns:x="{ns}" r="B30"><x:f>2+3</x:f></x:c>'}))
    assert "B30 is a formula without a saved value" in table.notes[(30 - table.first_row, "duration")]
