"""What fastexcel does not say about a workbook, read from its XML in streaming passes.

fastexcel (calamine) reads the values, fast; but a formula cell without a cached value,
the lower cells of a merged range and an empty cell all come back as ``null``, and a
number, date or boolean in a text column comes back as text. Each of those would send
the API's defaults or a wrong prompt without a word. So, besides fastexcel:

* :func:`list_sheets` reads sheet names and visibility (hidden sheets are never the
  default);
* :func:`scan_sheet` finds formula cells without a cached value (every formula cell of a
  workbook that asks to be recalculated on load: its cached values are placeholders), merged ranges and the
  type of every cell, keeping only the cells that are not plain text or plain numbers. It takes
  whole rows apart with polars' regexes (no Python call per cell); after the head rows, a block
  with no formula reads only its cells that are not text. :func:`scan_sheet_streaming` (expat)
  is the reference it is tested against and its fallback for XML the regexes do not read;
* :func:`shared_strings` measures shared strings without holding them, and
  :func:`sanitized_copy` replaces those over the cell cap with a marker, so a workbook
  whose XML expands to gigabytes is read in bounded memory (a 926 KB file of 5 MiB
  cells took 6.4 GB and 16 s before; now it is refused or marked in well under a second
  of work per 100 MB of XML);
* the scans note the cells a sheet has and its farthest cell when calamine's range up to it
  would pass :data:`MAX_CELLS`, and :func:`shared_strings` refuses more than
  :data:`MAX_SHARED_STRINGS`: fastexcel is never handed a sheet that takes more memory than
  those caps (a cell at XFD1048576 made it ask for 512 GiB and abort the process).

Measured on a 100,000-row, 4-column sheet (16 MB of XML, xlsxwriter), CPU: fastexcel 0.2 s,
the streaming scan 1.4-1.9 s, the block scan 0.4 s.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import string
import tempfile
import xml.parsers.expat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import polars as pl

from batch.errors import InputError

HEAD_ROWS = 20  # rows searched for the header below a workbook's title rows
BLOCK = 8 << 20  # bytes of a sheet's XML taken apart at once (whole rows)
FIRST_BLOCK = 64 << 10  # the head is usually in it; the blocks after it need their typed cells only
MAX_ROW_BYTES = 16 << 20  # a longer row (or shared string) is read by expat, streaming: bounded memory
MAX_PART_BYTES = 512 << 20  # uncompressed XML of one part; a 100k-row prompt sheet is ~25 MB
# Parts parsed whole into a tree (~10 times their size in memory); Excel's limit of
# 64,000 cell styles is ~10 MB of styles.xml.
MAX_SMALL_PART_BYTES = 32 << 20
_SMALL_PARTS = frozenset({"xl/workbook.xml", "xl/_rels/workbook.xml.rels", "xl/styles.xml"})
# calamine holds a sheet as a dense range of ~32-byte values, rows x columns from A1 to its
# farthest cell (one cell at XFD1048576 asked for 512 GiB and aborted the process), and each
# <c> element once more while reading: both are capped at a full-height sheet of 8 columns
# (~256 MiB of range), 80 times a 100,000-row sheet of 4 columns.
MAX_CELLS = 1_048_576 * 8
# Each shared string costs calamine ~60 bytes besides its text (20,000,000 one-letter
# strings, 340 MB of XML, took 1.2 GB): at most ~125 MiB of that.
MAX_SHARED_STRINGS = 1 << 21
_NEAR_ROWS = 299_999  # the largest row a cell may be at without the scan measuring the range
MARKER = "\ue000seedance-batch: oversized cell of "  # private-use char: never in real text
_NS = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_REL_NS = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}"
_REF = re.compile(r"([A-Z]{1,3})(\d+)")


@dataclass(frozen=True)
class SheetInfo:
    name: str
    state: str  # visible, hidden, veryHidden
    part: str  # zip member of its XML


def column_index(letters: str) -> int:
    """``A`` → 0, ``Z`` → 25, ``AA`` → 26."""
    n = 0
    for ch in letters:
        n = n * 26 + ord(ch) - 64
    return n - 1


def column_letters(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(65 + rem) + letters
    return letters


def open_workbook(path: Path) -> zipfile.ZipFile:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not an .xlsx workbook ({exc})") from None
    for info in zf.infolist():
        if info.filename in _SMALL_PARTS and info.file_size > MAX_SMALL_PART_BYTES:
            zf.close()
            raise InputError(f"{path}: {info.filename} expands to {info.file_size / (1 << 20):.1f} MiB of XML, more "
                             f"than the {MAX_SMALL_PART_BYTES >> 20} MiB read as a whole; save the workbook again "
                             "from Excel or export it as CSV")
        if info.filename.endswith(".xml") and info.file_size > MAX_PART_BYTES:
            zf.close()
            raise InputError(f"{path}: {info.filename} expands to {info.file_size >> 20} MiB of XML, more than the "
                             f"{MAX_PART_BYTES >> 20} MiB read from one part; split the workbook or export it as CSV")
    return zf


def _small_xml(zf: zipfile.ZipFile, name: str) -> ElementTree.Element | None:
    try:
        data = zf.read(name)
    except KeyError:
        return None
    return ElementTree.fromstring(data)


def list_sheets(zf: zipfile.ZipFile) -> list[SheetInfo]:
    """Sheets in workbook order, with their visibility and XML part."""
    book = _small_xml(zf, "xl/workbook.xml")
    rels = _small_xml(zf, "xl/_rels/workbook.xml.rels")
    if book is None:
        return []
    targets = {}
    if rels is not None:
        for rel in rels:
            target = rel.get("Target", "")
            part = target.lstrip("/") if target.startswith("/") else str(PurePosixPath("xl") / target)
            targets[rel.get("Id")] = part
    sheets = []
    for sheet in book.iter(f"{_NS}sheet"):
        sheets.append(SheetInfo(sheet.get("name", ""), sheet.get("state", "visible"),
                                targets.get(sheet.get(f"{_REL_NS}id"), "")))
    return sheets


def _walk_strings(stream: Any, keep: Callable[[int], bool], cap: int | None,
                  on_string: Callable[[int, int, str | None], None]) -> None:
    """One expat pass over ``sharedStrings.xml``: for each ``<si>``, ``on_string(index,
    length, text)``, where ``text`` is held only for the strings ``keep`` names and only up
    to ``cap`` characters (``None`` otherwise): a multi-gigabyte string is measured, never held."""
    index, length, depth_t = -1, 0, 0
    pieces: list[str] = []

    def start(name: str, _attrs: dict[str, str]) -> None:
        nonlocal index, length, depth_t
        name = name.rpartition(":")[2]  # a prefixed name is the same element to calamine
        if name == "si":
            index += 1
            length = 0
            pieces.clear()
        elif name == "t":
            depth_t += 1

    def end(name: str) -> None:
        nonlocal depth_t
        name = name.rpartition(":")[2]
        if name == "t":
            depth_t -= 1
        elif name == "si":
            held = keep(index) and (cap is None or length <= cap)
            on_string(index, length, "".join(pieces) if held else None)

    def text(data: str) -> None:
        nonlocal length
        if depth_t:
            length += len(data)
            if keep(index) and (cap is None or length <= cap):
                pieces.append(data)

    parser = xml.parsers.expat.ParserCreate()
    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    parser.ParseFile(stream)


class _Enough(Exception):
    """Raised from an expat handler to stop a walk once it has what it needs."""


def shared_strings(zf: zipfile.ZipFile, cap: int, wanted: set[int]) -> tuple[dict[int, int], dict[int, str]]:
    """(index → length of the shared strings longer than ``cap`` characters, measured
    without holding any of them; index → text of the ``wanted`` ones). When no string can
    be that long (:func:`_strings_may_exceed`), only the strings up to the last wanted one
    are walked."""
    if "xl/sharedStrings.xml" not in zf.NameToInfo:
        return {}, {}
    found: dict[int, int] = {}
    texts: dict[int, str] = {}
    whole, count = _strings_may_exceed(zf, cap)
    last = max(wanted, default=-1)
    if not whole:
        _check_string_count(count)

    def on_string(index: int, length: int, text: str | None) -> None:
        if whole:
            _check_string_count(index + 1)
        if length > cap:
            found[index] = length
        elif text is not None:
            texts[index] = text
        if not whole and index >= last:
            raise _Enough

    if whole or wanted:
        with zf.open("xl/sharedStrings.xml") as stream, contextlib.suppress(_Enough):
            _walk_strings(stream, wanted.__contains__, cap, on_string)
    return found, texts


def _check_string_count(count: int) -> None:
    if count > MAX_SHARED_STRINGS:
        raise InputError(f"xl/sharedStrings.xml holds more than {MAX_SHARED_STRINGS:,} shared strings, more than "
                         "are read from one workbook; split it or export it as CSV")


_PREFIXED_SI = re.compile(r"<[\w.-]+:si[\s/>]")


def _strings_may_exceed(zf: zipfile.ZipFile, cap: int) -> tuple[bool, int]:
    """Whether a shared string may be longer than ``cap`` characters: one runs from its
    ``<si`` to the next, so the longest such run in bytes bounds them all (a CDATA section,
    whose text may hold '<si', a prefixed name, or XML not in UTF-8 leave the question
    open); and, when it is answered, how many strings there may be (every '<si': at
    least as many as there are)."""
    count = 0
    with zf.open("xl/sharedStrings.xml") as stream:
        carry = b""
        while True:
            block = stream.read(BLOCK)
            data = carry + block
            end = len(data) if not block else data.rfind(b"</si>") + len(b"</si>")
            if end < len(b"</si>"):
                if len(data) > MAX_ROW_BYTES:
                    return True, count
                carry = data
                continue
            try:
                text = data[:end].decode()
            except UnicodeDecodeError:
                return True, count
            if "<![CDATA[" in text or _PREFIXED_SI.search(text) or _longest(text, r"(?:[^<]|<[^s]|<s[^i])", cap) > cap:
                return True, count
            count += text.count("<si")
            carry = data[end:]
            if not block:
                return False, count


def sanitized_copy(zf: zipfile.ZipFile, oversized: dict[int, int]) -> Path:
    """A copy of the workbook whose oversized shared strings are :data:`MARKER` plus their
    length (other strings kept as plain text), in a temporary file the caller removes."""
    fd, name = tempfile.mkstemp(suffix=".xlsx", prefix=".seedance-sanitized-")
    out_path = Path(name)
    with open(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as out:
        for info in zf.infolist():
            if info.filename != "xl/sharedStrings.xml":
                with zf.open(info) as src, out.open(info.filename, "w") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                continue
            with zf.open(info) as src, out.open(info.filename, "w") as dst:
                _rewrite_strings(src, dst, oversized)
    return out_path


def _rewrite_strings(src: Any, dst: Any, oversized: dict[int, int]) -> None:
    dst.write(b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
              b'<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">')

    def on_string(index: int, _length: int, text: str | None) -> None:
        value = f"{MARKER}{oversized[index]}" if index in oversized else text or ""
        dst.write(f'<si><t xml:space="preserve">{escape(value)}</t></si>'.encode())

    _walk_strings(src, lambda i: i not in oversized, None, on_string)  # an oversized string is never held
    dst.write(b"</sst>")


@dataclass
class SheetScan:
    """What the sheet's XML says about cells fastexcel flattens."""

    first_row: int | None = None  # the sheet row of the first cell with a value
    formulas: list[tuple[int, int]] = field(default_factory=list)  # (row, col) with a formula and no cached value
    merged: list[tuple[int, int, int, int, str]] = field(default_factory=list)  # r1, c1, r2, c2, "A2:A4"
    types: dict[tuple[int, int], str] = field(default_factory=dict)  # (row, col) -> n (number), b, d, e, date
    inline_oversized: dict[tuple[int, int], int] = field(default_factory=dict)
    cells: int = 0  # <c> elements
    # The farthest row and column (0-based) of the cells, when the range from A1 to it holds
    # more than MAX_CELLS cells: calamine would allocate all of them.
    far: tuple[int, int] | None = None
    # The first HEAD_ROWS rows holding values: row -> col -> (t, raw value); the header is one of them.
    head: dict[int, dict[int, tuple[str, str]]] = field(default_factory=dict)

    def header_strings(self) -> set[int]:
        """Shared-string indices the head rows use."""
        return {int(raw) for cells in self.head.values() for kind, raw in cells.values()
                if kind == "s" and raw.strip().isdigit()}

    def row_texts(self, row: int, shared: dict[int, str]) -> dict[int, str]:
        """A head row's cells as text (col -> text), shared strings resolved."""
        return {col: shared.get(int(raw), "") if kind == "s" and raw.strip().isdigit() else raw
                for col, (kind, raw) in sorted(self.head.get(row, {}).items())}


def values_are_placeholders(zf: zipfile.ZipFile) -> bool:
    """Whether the workbook asks to be recalculated when opened (``<calcPr
    fullCalcOnLoad="1"/>``): xlsxwriter and other writers that do not calculate set it and
    save 0 as every formula's value, so no cached formula value in it can be trusted."""
    root = _small_xml(zf, "xl/workbook.xml")
    calc = root.find(f"{_NS}calcPr") if root is not None else None
    return calc is not None and calc.get("fullCalcOnLoad", "").strip().lower() in ("1", "true")


def scan_sheet(zf: zipfile.ZipFile, part: str, date_styles: set[int], cap: int,
               trust_cached: bool = True) -> SheetScan:
    """What the sheet's XML says (see the module docstring), read in row-aligned blocks of
    :data:`BLOCK` bytes whose cells are taken apart by polars' regexes: no Python call per
    cell but for the rare ones an entity, a CDATA section or an oversized inline string
    makes uncertain. Without ``trust_cached`` every formula cell counts as one without a
    saved value. A row longer than :data:`MAX_ROW_BYTES` or a part that is not UTF-8 is read
    by :func:`scan_sheet_streaming` instead, so memory stays bounded on any workbook."""
    scan = SheetScan()
    maybe_far = False
    with zf.open(part) as stream:
        carry, size = b"", FIRST_BLOCK
        while True:
            block = stream.read(size)
            size = BLOCK
            data = carry + block
            end = len(data) if not block else data.rfind(b"</row>") + len(b"</row>")
            if end < len(b"</row>"):  # no row ends in this block
                if len(data) > MAX_ROW_BYTES:
                    return scan_sheet_streaming(zf, part, date_styles, cap, trust_cached)
                carry = data
                continue
            try:
                text = data[:end].decode()
            except UnicodeDecodeError:  # another encoding declared: expat reads it
                return scan_sheet_streaming(zf, part, date_styles, cap, trust_cached)
            facts = _block_facts(text, cap)
            if (facts["unusual"] or facts["c_tags"] != facts["c_refs"] or facts["row_tags"] != facts["row_refs"]):
                # XML the regexes do not read (or would misread), or a cell or row placed
                # by its position (no r): expat reads the whole sheet.
                return scan_sheet_streaming(zf, part, date_styles, cap, trust_cached)
            scan.cells += facts["c_tags"]
            maybe_far = maybe_far or facts["far"]
            _scan_block(scan, text, facts, date_styles, cap, trust_cached, _typed_only(scan, facts, cap))
            carry = data[end:]
            if not block:
                if maybe_far or _NEAR_ROWS * 26 > MAX_CELLS:
                    _far(scan, *_far_cell(zf, part))
                return scan


def _block_facts(text: str, cap: int) -> dict[str, Any]:
    """What decides how a block is read, found by polars' regexes in one pass each."""
    t = pl.col("t")
    facts = pl.DataFrame({"t": [text]}).select(
        # Valid XML written by no common program, which the regexes would misread: single
        # quotes or blanks around '=', comments, CDATA, DOCTYPE (<!), processing
        # instructions, a blank before an end tag's '>', an entity or '>' in an attribute, a
        # prefixed name of the elements read, a reference too long for an integer. (Each may
        # also be in a cell's text, which then costs the slower scan only.)
        t.str.contains(r"""\s=|=\s|='|<!|<\?(?:[^x]|x[^m]|xm[^l]|xml[^\s])|</[^>\s]*\s|<[^>]*&|="[^"<]*>"""
                       r"""|</?[\w.-]+:(?:c|row|f|v|is|t|r|sheetData|mergeCell)[\s/>]|\sr="[A-Z]*\d{10}""")
        .alias("unusual"),
        t.str.contains(r"<f[\s/>]").alias("formula"),
        *(t.str.contains(mark, literal=True).alias(name) for name, mark in (
            ("cdata", "<![CDATA["), ("merge", "<mergeCell"), ("inline", "<is"), ("entity", "&"))),
        t.str.extract_all(r'<row\s[^>]*?\br="\d+"').list.eval(pl.element().str.extract(r'(\d+)"$').cast(pl.Int64))
        .alias("rows"),
        # Tags as every common program writes them ("<c r="): others are counted below.
        t.str.count_matches("<row ", literal=True).alias("row_tags"),
        t.str.count_matches("<c ", literal=True).alias("c_tags"),
        # A cell or row whose first attribute is not r (_ODD_REF), or a cell past Z or past
        # row _NEAR_ROWS (_FAR): one pass for both, as most sheets have neither.
        t.str.contains(_ODD_REF + "|" + _FAR).alias("odd_or_far"),
        t.str.count_matches(r' t="[si]').alias("si_kinds"),
        t.str.count_matches(r' t="(?:s|str|inlineStr)"').alias("text_kinds"),
    ).row(0, named=True)
    # A cell runs from one '<c' to the next: the longest such run bounds every inline
    # string in the block (each one or rich-text run of it).
    facts["longest"] = _longest(text, r"(?:[^<]|<[^c])", cap) if facts["inline"] else 0
    facts["c_refs"], facts["row_refs"], facts["far"] = facts["c_tags"], facts["row_tags"], False
    if facts["odd_or_far"]:  # rare: which one, and count the cells and rows with an r
        facts["far"], facts["c_tags"], facts["row_tags"], facts["c_refs"], facts["row_refs"] = pl.DataFrame(
                {"t": [text]}).select(
            t.str.contains(_FAR), t.str.count_matches(r"<c[\s/>]").alias("ct"),
            t.str.count_matches(r"<row[\s/>]").alias("rt"),
            t.str.count_matches(r'<c\s(?:[^>]*?\s)?r="').alias("c"),
            t.str.count_matches(r'<row\s(?:[^>]*?\s)?r="').alias("r"),
        ).row(0)
    facts["cells"] = facts["c_tags"] > 0
    return facts


# A cell or row whose first attribute is not r (as no common program writes it): it may
# have none, and then is placed by its position.
_ODD_REF = r"<(?:c|row)(?:[/>\t\r\n]| +[^ r]| +r[^=])"
# A cell past Z or past row _NEAR_ROWS: the range up to it may be over MAX_CELLS
# (_NEAR_ROWS x 26 is not), so _far_cell measures it exactly.
_FAR = r'r="(?:[A-Z]{2}|[A-Z]{1,3}(?:[3-9]\d{5}|\d{7}))'
_FAR_REF = r'<c\s(?:[^>]*?\s)?r="[A-Z]{1,3}\d+"'


def _far_cell(zf: zipfile.ZipFile, part: str) -> tuple[int, int]:
    """The largest row number and column index of the cells of a sheet the regexes read."""
    last_row, last_col = 0, -1
    with zf.open(part) as stream:
        carry = b""
        while True:
            block = stream.read(BLOCK)
            data = carry + block
            cut = data.rfind(b"</row>")
            end = len(data) if not block else cut + len(b"</row>") if cut >= 0 else 0
            refs = (pl.Series([data[:end].decode()]).str.extract_all(_FAR_REF).explode().drop_nulls()
                    .str.extract(r'"([A-Z]+\d+)"$'))
            rows = refs.str.strip_chars_start(string.ascii_uppercase).cast(pl.Int64).max()
            last_row = max(last_row, int(rows or 0))  # type: ignore[arg-type]
            last_col = max([last_col, *map(column_index, refs.str.strip_chars_end(string.digits).unique())])
            carry = data[end:]
            if not block:
                return last_row, last_col


def _far(scan: SheetScan, last_row: int, last_col: int) -> None:
    """Note the farthest cell when the range up to it is over :data:`MAX_CELLS` cells."""
    if last_row * (last_col + 1) > MAX_CELLS:
        scan.far = (last_row, last_col)


def _longest(text: str, unit: str, cap: int) -> int:
    """Bytes of the longest run of ``unit`` (a regex matching one character or two)
    in ``text``; 0 when none is as long as ``cap`` (or 256)."""
    runs = pl.Series([text]).str.extract_all(f"{unit}{{{min(cap, 256)}}}{unit}*")
    return int(runs.list.eval(pl.element().str.len_bytes()).list.max()[0] or 0)


def _typed_only(scan: SheetScan, facts: dict[str, Any], cap: int) -> bool:
    """Whether only the block's cells that are not text need reading: the head is complete
    and the block's rows come after it, and no cell in it is a formula, a CDATA section, an
    inline string over ``cap`` or of a kind the non-text regex cannot tell from text."""
    if len(scan.head) < HEAD_ROWS or facts["formula"] or facts["cdata"] or facts["longest"] > cap:
        return False
    rows = facts["rows"]
    return (facts["si_kinds"] == facts["text_kinds"] and len(rows) == facts["row_tags"]
            and (not rows or min(rows) > max(scan.head)))


_CELL = r"<c(?:\s[^>]*?)?(?:/>|>(?s:.*?)</c>)"  # a cell element, empty or not
# The opening tag as Excel, openpyxl and xlsxwriter write it (r, then s, then t);
# another order or another attribute takes the slower per-attribute regexes.
_TAG = r'^<c\s+r="(?<letters>[A-Z]{1,3})(?<row>\d+)"(?:\s+s="(?<s>\d+)")?(?:\s+t="(?<t>[^"]*)")?\s*/?>'
_ATTR = r'^<c[^>]*?\s{}="([^"]*)"'
_MERGE = re.compile(r'<mergeCell\s[^>]*?ref="([^"]*)"')
_TEXT_KINDS = ("s", "str", "inlineStr")
# A cell whose t is absent or does not start with s or i: not text (``_typed_only`` makes
# sure no other kind starts so).
_TYPED_CELL = (r'<c(?:\s+[^\s=/>t][^\s=/>]*="[^"]*"|\s+t[^\s=/>]+="[^"]*")*'
               r'(?:\s+t="(?:[^"si][^"]*)?"(?:\s+[^\s=/>]+="[^"]*")*)?\s*(?:/>|>(?s:.*?)</c>)')


def _scan_block(scan: SheetScan, text: str, facts: dict[str, Any], date_styles: set[int], cap: int,
                trust_cached: bool, typed_only: bool) -> None:
    """Add the cells and merged ranges of ``text`` (whole rows, or the sheet's tail) to
    ``scan``; with ``typed_only``, its cells that are not text only."""
    for ref in _MERGE.findall(text) if facts["merge"] else ():
        a, _, b = ref.partition(":")
        ma, mb = _REF.fullmatch(a), _REF.fullmatch(b or a)
        if ma and mb:
            scan.merged.append((int(ma.group(2)), column_index(ma.group(1)), int(mb.group(2)),
                                column_index(mb.group(1)), ref))
    if not facts["cells"]:
        return
    texts = pl.Series("c", [text]).str.extract_all(_TYPED_CELL if typed_only else _CELL).explode().drop_nulls()
    if texts.is_empty():
        return
    c = pl.col("c")
    # Each test below runs only when its mark is in the block (most sheets have no
    # formula, no inline string, no entity).
    none = pl.lit(None, dtype=pl.String)
    inline = (c.str.extract(r"(?s)<is(?:\s[^>]*)?>(.*?)</is>").str.replace_all(r"<[^>]*>", "")
              if facts["inline"] else none)
    v = c.str.extract(r"<v(?:\s[^>]*)?>([^<]*)</v>")
    unsure = pl.lit(False)
    if facts["cdata"]:
        unsure = unsure | c.str.contains("<![CDATA[", literal=True)
    if facts["entity"]:
        unsure = unsure | v.str.contains("&", literal=True).fill_null(False)
    frame = texts.to_frame().lazy().select(
        c.str.extract_groups(_TAG).alias("g"),
        (c.str.contains(r"<f[\s/>]") if facts["formula"] else pl.lit(False)).alias("has_f"),
        (v.str.strip_chars().str.len_bytes().fill_null(0) > 0).alias("has_v"),
        inline.str.len_chars().fill_null(0).cast(pl.Int64).alias("inline_len"),
        (unsure | (inline.str.len_bytes().fill_null(0) > cap)).alias("unsure"),
    ).unnest("g").with_row_index("i").collect()
    if frame["letters"].null_count():  # attributes in another order: each one by its own regex
        odd = pl.col("letters").is_null()
        ref = c.str.extract(_ATTR.format("r")).str.extract_groups(r"^(?<letters>[A-Z]{1,3})(?<row>\d+)$")
        frame = frame.with_columns(texts).with_columns(
            *(pl.when(odd).then(ref.struct.field(name)).otherwise(name).alias(name) for name in ("letters", "row")),
            *(pl.when(odd).then(c.str.extract(_ATTR.format(name))).otherwise(name).alias(name) for name in "st"),
        ).drop("c")
    frame = frame.with_columns(pl.col("has_v") | (pl.col("inline_len") > 0))
    if frame["unsure"].any():  # rare: expat says what the text is
        unsure_at = frame["i"].filter(frame["unsure"]).to_list()
        exact = [_cell_text(texts[i]) for i in unsure_at]
        has_v, inline_len = frame["has_v"].to_list(), frame["inline_len"].to_list()
        for i, (_, value, length) in zip(unsure_at, exact, strict=True):
            has_v[i], inline_len[i] = value, length
        frame = frame.with_columns(pl.Series("has_v", has_v), pl.Series("inline_len", inline_len, dtype=pl.Int64))
    frame = frame.filter(pl.col("row").is_not_null())
    letters = frame["letters"].unique().to_list()
    styles = pl.lit(pl.Series(sorted(date_styles), dtype=pl.Int64)).implode()
    t = pl.col("t").fill_null("n")
    frame = frame.select(
        "i", "has_f", "has_v", "inline_len",
        pl.col("row").cast(pl.Int64, strict=False),
        pl.col("letters").replace_strict(letters, [column_index(x) for x in letters], return_dtype=pl.Int64)
        .alias("col"),
        pl.when((t == "n") & pl.col("s").cast(pl.Int64, strict=False).is_in(styles)).then(pl.lit("date"))
        .otherwise(t).alias("kind"),
    ).filter(pl.col("row").is_not_null())
    _add_cells(scan, frame, texts, cap, trust_cached)


def _cell_text(cell: str) -> tuple[str, bool, int]:
    """A cell's value text (at most 4,096 characters), whether it has a value, and the
    length of its inline string, as the streaming scan reads them."""
    in_v = in_is = False
    has_v, length = False, 0
    pieces: list[str] = []

    def start(name: str, _attrs: dict[str, str]) -> None:
        nonlocal in_v, in_is
        in_v, in_is = in_v or name == "v", in_is or name == "is"

    def end(name: str) -> None:
        nonlocal in_v, in_is
        in_v, in_is = in_v and name != "v", in_is and name != "is"

    def chars(data: str) -> None:
        nonlocal has_v, length
        if in_v and data.strip():
            has_v = True
        elif in_is:
            has_v = True
            length += len(data)
        if (in_v or in_is) and len(pieces) < 64:
            pieces.append(data)

    parser = xml.parsers.expat.ParserCreate()
    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, chars
    parser.buffer_text = True
    try:
        parser.Parse(cell, True)
    except xml.parsers.expat.ExpatError:
        return "", False, 0
    return "".join(pieces)[:4096], has_v, length


def _add_cells(scan: SheetScan, cells: pl.DataFrame, texts: pl.Series, cap: int, trust_cached: bool) -> None:
    """Add a block's cells (one row each: i, row, col, kind, has_f, has_v, inline_len) to ``scan``."""
    valued = cells.filter(pl.col("has_v") | pl.col("has_f"))
    if not valued.is_empty():
        first_row = int(valued["row"].min())  # type: ignore[arg-type]
        scan.first_row = first_row if scan.first_row is None else min(scan.first_row, first_row)
    formulas = cells.filter(pl.col("has_f") & (~pl.col("has_v") if trust_cached else pl.lit(True)))
    scan.formulas.extend(zip(formulas["row"].to_list(), formulas["col"].to_list(), strict=True))
    typed = cells.filter(pl.col("has_v") & ~pl.col("kind").is_in(_TEXT_KINDS))
    scan.types.update(zip(zip(typed["row"].to_list(), typed["col"].to_list(), strict=True), typed["kind"].to_list(),
                          strict=True))
    big = cells.filter(pl.col("inline_len") > cap)
    scan.inline_oversized.update(zip(zip(big["row"].to_list(), big["col"].to_list(), strict=True),
                                     big["inline_len"].to_list(), strict=True))
    # The head: the rows already in it, and the first rows with values until it holds
    # HEAD_ROWS (in the file's order, as the streaming scan takes them).
    wanted = HEAD_ROWS - len(scan.head)
    valued_rows = valued.filter("has_v")["row"].unique(maintain_order=True).head(wanted + len(scan.head)).to_list()
    rows = [*scan.head, *[row for row in valued_rows if row not in scan.head][:max(wanted, 0)]]
    for i, row, col, kind in cells.filter(pl.col("has_v") & pl.col("row").is_in(rows)).select(
            "i", "row", "col", "kind").iter_rows():
        scan.head.setdefault(row, {})[col] = (kind, _cell_text(texts[i])[0])


def scan_sheet_streaming(zf: zipfile.ZipFile, part: str, date_styles: set[int], cap: int,
                         trust_cached: bool = True) -> SheetScan:
    """The reference scan: one expat pass, a Python call per element (~1.9 s per 100,000
    four-column rows). :func:`scan_sheet` falls back to it for a sheet it cannot cut into
    rows or decode, and the tests hold the two equal."""
    scan = SheetScan()
    cell: list[object] = [None, None, None, False, False, 0]  # row, col, t, has_f, has_v, inline length
    in_v = in_is = False
    value: list[str] = []  # text of the current cell, kept for the head rows only
    place = [0, -1]  # the current row and the previous cell's column: where a cell without r goes
    far = [0, -1]  # the largest row and column of the cells

    def in_head(row: object) -> bool:
        return isinstance(row, int) and (row in scan.head or len(scan.head) < HEAD_ROWS)

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal in_v, in_is
        name = name.rpartition(":")[2]  # a prefixed name is the same element to calamine
        if name == "row":
            # r is optional (ECMA-376 18.3.1.73): without it, the row after the previous one.
            r = attrs.get("r")
            place[:] = [int(r) if r is not None and r.strip().isdigit() else place[0] + 1, -1]
        elif name == "c":
            scan.cells += 1
            r = attrs.get("r")
            match = _REF.fullmatch(r) if r is not None else None
            # r is optional (18.3.1.4): without it, the column after the previous cell's.
            row, col = ((int(match.group(2)), column_index(match.group(1))) if match
                        else (place[0], place[1] + 1) if r is None else (None, None))
            if col is not None:
                place[1] = col
                far[:] = [max(far[0], int(row)), max(far[1], col)]  # type: ignore[arg-type]
            style = attrs.get("s")
            kind = attrs.get("t", "n")
            if kind == "n" and style is not None and style.isdigit() and int(style) in date_styles:
                kind = "date"
            cell[:] = [row, col, kind, False, False, 0]
            value.clear()
        elif name == "f":
            cell[3] = True
        elif name == "v":
            in_v = True
        elif name == "is":
            in_is = True
        elif name == "mergeCell":
            ref = attrs.get("ref", "")
            a, _, b = ref.partition(":")
            ma, mb = _REF.fullmatch(a), _REF.fullmatch(b or a)
            if ma and mb:
                scan.merged.append((int(ma.group(2)), column_index(ma.group(1)), int(mb.group(2)),
                                    column_index(mb.group(1)), ref))

    def chars(data: str) -> None:
        if in_v and data.strip():
            cell[4] = True
        elif in_is:
            cell[4] = True
            cell[5] = int(cell[5]) + len(data)  # type: ignore[call-overload]
        if (in_v or in_is) and in_head(cell[0]) and len(value) < 64:
            value.append(data)

    def end(name: str) -> None:
        nonlocal in_v, in_is
        name = name.rpartition(":")[2]
        if name == "v":
            in_v = False
        elif name == "is":
            in_is = False
        elif name == "c":
            row, col, kind, has_f, has_v, inline = cell
            if row is None or col is None:
                return
            key = (int(row), int(col))  # type: ignore[call-overload]
            if has_f and (not has_v or not trust_cached):
                scan.formulas.append(key)
            if has_v and in_head(key[0]):
                scan.head.setdefault(key[0], {})[key[1]] = (str(kind), "".join(value)[:4096])
            if (has_v or has_f) and (scan.first_row is None or key[0] < scan.first_row):
                scan.first_row = key[0]
            if has_v and kind not in ("s", "str", "inlineStr"):
                scan.types[key] = str(kind)
            if int(inline) > cap:  # type: ignore[call-overload]
                scan.inline_oversized[key] = int(inline)  # type: ignore[call-overload]

    parser = xml.parsers.expat.ParserCreate()
    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, chars
    parser.buffer_text = True
    with zf.open(part) as stream:
        parser.ParseFile(stream)
    _far(scan, *far)
    return scan


# Built-in number formats that are dates or times (ECMA-376 18.8.30), and custom
# formats made of date letters.
_DATE_FORMAT_IDS = frozenset({*range(14, 23), *range(45, 48)})
_DATE_CODE = re.compile(r"^(?:\[[^\]]*\]|\"[^\"]*\"|[^\"\[])*[dmyhs]", re.IGNORECASE)


def date_styles(zf: zipfile.ZipFile) -> set[int]:
    """Indices of the cell styles (``s=``) that show a number as a date or time."""
    styles = _small_xml(zf, "xl/styles.xml")
    if styles is None:
        return set()
    custom = {}
    for fmt in styles.iter(f"{_NS}numFmt"):
        code = fmt.get("formatCode", "")
        if fmt.get("numFmtId", "").isdigit():
            custom[int(fmt.get("numFmtId", "0"))] = bool(_DATE_CODE.search(code.replace("\\", "")))
    found = set()
    xfs = styles.find(f"{_NS}cellXfs")
    for i, xf in enumerate(xfs if xfs is not None else []):
        num = xf.get("numFmtId", "0")
        if num.isdigit() and (int(num) in _DATE_FORMAT_IDS or custom.get(int(num))):
            found.add(i)
    return found
