"""A results table as one static HTML page: the night at a glance and a card per request.

Guarantees:

* **Self-contained and offline.** One file: styles, script and data inline; images are
  poster files beside the videos (or data URIs for small nights) and videos are relative
  links, so the page opens from disk or from a bucket next to the videos. A
  Content-Security-Policy forbids every network request the page itself could make.
* **Text stays text.** The summary is rendered by Jinja2 with autoescaping; the cards'
  data is embedded as JSON through Jinja's ``tojson`` (``<``, ``>``, ``&``, ``'`` escaped) and
  put into the page by the script with ``textContent``, never as markup: a prompt
  containing ``<script>`` is shown, not run.
* **A broken video costs its card only.** Posters come from :func:`batch.poster.extract_poster`,
  which answers a reason instead of raising; the card says the video cannot be decoded.
* **Scale.** 10,000 requests: the rows are parsed once and cards are drawn a page at a
  time, images ``loading="lazy"`` (README, "A page for the night", for the measured time).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
import polars as pl
import structlog

from batch.estimate import NO_TIER, Estimator
from batch.models import Catalog
from batch.poster import extract_poster
from batch.prices import Pricing
from batch.results import OK_STATUSES, is_results_table, read_results
from batch.storage import Target, exclusive_temp, is_remote

log = structlog.get_logger("batch.page")

INLINE_POSTERS = 200  # up to this many posters go into the page as data URIs (it then travels alone)
POSTER_SUFFIX = ".poster.jpg"
FAILED_SUFFIX = ".poster.failed"  # why a video (by size and mtime) gave no poster
JPEG_MAGIC = b"\xff\xd8\xff"
MAX_POSTER_BYTES = 1 << 20  # ours are ~2 KB; a bigger file at the name is not ours
PAGE_SIZE = 60  # cards drawn at a time
_RESULT_COLUMNS = frozenset({
    "request_id", "source", "row", "model", "status", "endpoint", "task_id", "error", "error_code", "http_status",
    "attempts", "submitted_at", "task_status", "resource_urls", "failure_reason", "completed_at", "local_paths",
    "download_error",
})
# Task states that are not a failure (waiting or done); the rest of a followed task's are.
TASK_OK = frozenset({"success", "pending", "processing"})
PAID = ("submitted", "skipped")  # a task was created: it costs, whatever its fate


@dataclass
class PageResult:
    """What was written, for the log and the notification."""

    path: str
    requests: int
    bytes: int
    posters: int = 0
    poster_errors: int = 0
    poster_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    spend: str | None = None  # "12.34 USD" or "250.0 s of video (no prices)": for the notification


def page_beside(results: Target | str) -> Target:
    """Where ``collect --download`` writes the page: the results table's name, ``.html``."""
    target = results if isinstance(results, Target) else Target(str(results))
    stem = target.name.rsplit(".", 1)[0] if "." in target.name else target.name
    return target.sibling(f"{stem}.html")


def source_label(source: Any, row: Any) -> str:
    """``file:sheet!row`` (workbooks) or ``file!row``, file names without their directory."""
    text = str(source or "")
    sheet = ""
    if text.endswith("]") and "[" in text:
        text, _, sheet = text[:-1].rpartition("[")
    name = posixpath.basename(text.replace("\\", "/")) or text
    where = f"{name}:{sheet}" if sheet else name
    return f"{where}!{row}" if row not in (None, "") else where


def _source_group(source: Any) -> str:
    return source_label(source, None)


def _as_list(value: Any) -> list[str]:
    """A list cell of a Parquet table, or its JSON text in a CSV table."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _href(location: str, page_dir: str | None, page_remote: str | None) -> str | None:
    """A relative URL from the page to ``location`` (a local path or an object URL), or
    None when there is no relative way (a bucket video, a page on disk)."""
    if is_remote(location):
        if page_remote is None:
            return None
        page, other = urlsplit(page_remote), urlsplit(location)
        if (page.scheme, page.netloc) != (other.scheme, other.netloc):
            return None
        rel = posixpath.relpath(other.path, posixpath.dirname(page.path) or "/")
        return quote(rel)
    if page_dir is None:
        return None
    rel = os.path.relpath(os.path.abspath(location), page_dir)
    return quote(Path(rel).as_posix())


class Posters:
    """Poster thumbnails beside local videos, reused while newer than their video."""

    def __init__(self) -> None:
        self.made = 0
        self.errors = 0
        self.seconds = 0.0

    def of(self, video: str) -> tuple[Path | None, str | None]:
        """(poster path, None) or (None, why there is none)."""
        path, _, why = self.take(video)
        return path, why

    def take(self, video: str) -> tuple[Path | None, bytes | None, str | None]:
        """(poster path, its JPEG bytes, None) or (None, None, why there is none). The bytes
        are the ones checked: a page inlines them, never a re-read of a name that may since
        have become a link to the key file."""
        if is_remote(video):
            return None, None, "no poster: the video is in a bucket"
        path = Path(video)
        poster = path.with_name(path.name + POSTER_SUFFIX)
        try:
            video_mtime = os.lstat(path).st_mtime
        except OSError:
            return None, None, "video file missing"
        reused = _own_jpeg(poster, video_mtime)
        if reused is not None:
            return poster, reused, None
        failed = path.with_name(path.name + FAILED_SUFFIX)
        key = _video_key(path)
        remembered = _remembered_failure(failed, key)
        if remembered is not None:  # a video that failed before is not decoded again every pass
            self.errors += 1
            return None, None, f"video cannot be decoded ({remembered})"
        started = time.perf_counter()
        found = extract_poster(path)
        self.seconds += time.perf_counter() - started
        if found.jpeg is None:
            self.errors += 1
            if key is not None and not found.error.startswith("cannot open video"):
                _write_own(failed, f"{key}\n{found.error}".encode())
            return None, None, f"video cannot be decoded ({found.error})"
        try:
            tmp = exclusive_temp(poster)  # never a planted name: nothing written through a link
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "wb") as f:
                f.write(found.jpeg)
            os.replace(tmp, poster)  # replaces a planted name itself, never its target
        except OSError as exc:
            return None, None, f"poster not written ({exc.strerror})"
        self.made += 1
        return poster, found.jpeg, None


def _video_key(path: Path) -> str | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return f"{st.st_size} {st.st_mtime_ns}"


def _read_own(path: Path, limit: int, newer_than: float | None = None) -> bytes | None:
    """A small non-empty regular file of its own, or None: opened without following a link
    and checked on the open descriptor (one link, at most ``limit`` bytes, and not older
    than ``newer_than`` when given), so a name someone planted is never read through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and 0 < st.st_size <= limit
                and (newer_than is None or st.st_mtime >= newer_than)):
            return None
        data = f.read(limit + 1)
    return data if len(data) <= limit else None


def _remembered_failure(failed: Path, key: str | None) -> str | None:
    """Why this very video (same size and mtime) could not be decoded last time, or None."""
    data = _read_own(failed, 4096)
    if key is None or data is None:
        return None
    first, _, why = data.decode("utf-8", "replace").partition("\n")
    return (why.strip()[:200] or None) if first == key else None


def _write_own(final: Path, data: bytes) -> None:
    """``data`` at ``final`` through a fresh exclusive temp file renamed over it: a link
    planted at either name is replaced, never written through. Best effort."""
    try:
        tmp = exclusive_temp(final)
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, final)
    except OSError:
        pass


def _own_jpeg(poster: Path, video_mtime: float) -> bytes | None:
    """A poster we made earlier, or None. Only a file of its own counts (a symlink or hard link
    planted at this predictable name is someone else's file, the key perhaps), newer than its
    video, small, and a JPEG by its magic bytes: anything else is regenerated over the
    planted name."""
    data = _read_own(poster, MAX_POSTER_BYTES, newer_than=video_mtime)
    return data if data is not None and data.startswith(JPEG_MAGIC) else None


def _fields(catalog: Catalog) -> set[str]:
    return catalog.known_fields()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def card_rows(df: pl.DataFrame, page: Target, catalog: Catalog, posters: Posters | None,
              inline: bool) -> list[dict[str, Any]]:
    """One compact dict per request (short keys: they are repeated 10,000 times)."""
    page_remote = page.text if page.remote else None
    page_dir = None if page.remote else os.path.dirname(os.path.abspath(page.text))
    fields = _fields(catalog)
    params = [c for c in df.columns if c in fields and c not in ("prompt", "service_tier")]
    # The sheet's own columns (its id, notes, campaign): what its author searches by.
    extras = [c for c in df.columns if c not in fields and c not in _RESULT_COLUMNS]
    out: list[dict[str, Any]] = []
    for r in df.iter_rows(named=True):
        status = r.get("status") or ""
        task = r.get("task_status")
        # A card's state: the task's once the request became one, else the request's status.
        state = "download_error" if r.get("download_error") else (task if task and status in PAID else status)
        problem = status not in OK_STATUSES or bool(r.get("download_error")) or (bool(task) and task not in TASK_OK)
        error = r.get("download_error") or r.get("failure_reason") or r.get("error")
        card: dict[str, Any] = {
            "id": r.get("request_id"), "p": r.get("prompt"), "m": r.get("model"), "t": r.get("service_tier"),
            "s": status, "k": task, "st": state, "x": 1 if problem else None, "tid": r.get("task_id"), "e": error,
            "src": source_label(r.get("source"), r.get("row")), "sg": _source_group(r.get("source")),
            "a": {c: _plain(r[c]) for c in params if r.get(c) not in (None, "")},
            "c": {c: _plain(r[c]) for c in extras if r.get(c) not in (None, "")},
        }
        videos = [p for p in _as_list(r.get("local_paths")) if p.lower().endswith((".mp4", ".webm", ".mov"))]
        if videos:
            card["v"] = _href(videos[0], page_dir, page_remote)
            if posters is not None:
                poster, jpeg, why = posters.take(videos[0])
                if poster is not None and jpeg is not None:
                    card["po"] = ("data:image/jpeg;base64," + base64.b64encode(jpeg).decode()) \
                        if inline else _href(str(poster), page_dir, page_remote)
                else:
                    card["pe"] = why
        out.append({k: v for k, v in card.items() if v not in (None, "", {})})
    return out


def _spend(df: pl.DataFrame, catalog: Catalog, pricing: Pricing) -> list[dict[str, Any]]:
    """Video seconds and estimated USD of the tasks created (``submitted``/``skipped``),
    per model and tier, by the same estimator as a dry run."""
    paid = df.filter(pl.col("status").is_in(PAID))
    if paid.height == 0:
        return []
    tier = pl.col("service_tier").cast(pl.String) if "service_tier" in paid.columns else pl.lit(None, pl.String)
    paid = paid.with_columns(__tier=tier.fill_null(NO_TIER))
    rows = []
    for (model, tier_name), group in paid.group_by(["model", "__tier"], maintain_order=True):
        est = Estimator(catalog, pricing)
        est.add(group.drop("__tier"))
        rows.append({"model": model, "tier": tier_name, "requests": est.requests,
                     "seconds": round(sum(est.seconds_by_resolution.values()), 1),
                     "usd": round(est.cost_usd, 2) if pricing and not est.unpriced else None})
    return rows


def _elapsed(df: pl.DataFrame) -> float | None:
    """From the first submission to the last completion (or submission) in the table."""
    def times(name: str) -> list[datetime]:
        if name not in df.columns:
            return []
        col = df[name]
        if col.dtype == pl.String:
            col = col.str.to_datetime(strict=False, time_zone="UTC")
        return [t for t in col.drop_nulls().to_list() if isinstance(t, datetime)]
    start, end = times("submitted_at"), times("completed_at") + times("submitted_at")
    return (max(end) - min(start)).total_seconds() if start and end else None


def _summary_json(results: Target) -> dict[str, Any]:
    """The submit run's ``<results>.summary.json``, when it is there and readable."""
    try:
        data = results.sibling(results.name + ".summary.json").read_bytes()
        parsed = json.loads(data) if data else {}
        return parsed if isinstance(parsed, dict) else {}
    except Exception:  # a summary we cannot read (a bucket error, bad JSON) only costs its lines
        return {}


def glance(df: pl.DataFrame, cards: list[dict[str, Any]], catalog: Catalog, pricing: Pricing,
           run: dict[str, Any]) -> dict[str, Any]:
    """The night at a glance: counts, spend, elapsed, top errors, what was skipped and why."""
    states = Counter(c.get("st", "") for c in cards)
    statuses = Counter(df["status"].to_list())
    errors = Counter(c["e"] for c in cards if c.get("e") and c.get("x"))
    skipped: Counter[str] = Counter()
    for c in cards:
        if c.get("s") == "skipped":
            skipped["submitted by an earlier run; not sent again"] += 1
        elif c.get("s") in ("pending", "unknown") and c.get("e"):
            skipped[c["e"]] += 1
        elif c.get("s") == "pending":
            skipped["not sent (pending): the next run sends them"] += 1
        elif c.get("s") == "dry_run":
            skipped["not sent: a dry run"] += 1
    # Input files the run found but did not read (the submit run's summary): no row says so.
    files = [f for f in run.get("skipped_files") or [] if isinstance(f, dict)]
    spend = _spend(df, catalog, pricing)
    priced = [s["usd"] for s in spend if s["usd"] is not None]
    return {
        "total": len(cards),
        "statuses": sorted(statuses.items(), key=lambda kv: -kv[1]),
        "states": sorted(states.items(), key=lambda kv: -kv[1]),
        "problems": sum(1 for c in cards if c.get("x")),
        "spend": spend,
        "spend_usd": round(sum(priced), 2) if priced and len(priced) == len(spend) else None,
        "priced": bool(pricing),
        "unknown": statuses.get("unknown", 0),
        "elapsed_s": _elapsed(df),
        "run_elapsed_s": run.get("elapsed_s"),
        "stop_reason": run.get("stop_reason"),
        "unreadable": [u for u in run.get("unreadable") or [] if isinstance(u, dict)],
        "top_errors": errors.most_common(8),
        "skipped": skipped.most_common(8),
        "skipped_files": [{"source": str(f.get("source", "")), "reason": str(f.get("reason", ""))}
                          for f in files[:50]],
        "skipped_files_more": max(0, len(files) - 50),
        "downloaded": sum(1 for c in cards if c.get("v")),
    }


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("batch", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "separators": (",", ":")}
    return env


def _asset(name: str) -> str:
    return resources.files("batch").joinpath("templates", name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    """The CSP source hash of an inline script or style: only our own may run."""
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def render_page(results: Target | str, page: Target | str, *, pricing: Pricing | None = None,
                catalog: Catalog | None = None, posters: bool = True, title: str | None = None,
                run: dict[str, Any] | None = None) -> tuple[str, PageResult]:
    """The page's HTML for a results table (posters extracted on the way)."""
    results = results if isinstance(results, Target) else Target(str(results))
    page = page if isinstance(page, Target) else Target(str(page))
    df = read_results(results)
    if not is_results_table(df):
        raise ValueError("not a results table (no request_id and status columns)")
    catalog = catalog or Catalog()
    pricing = pricing or Pricing()
    run = {**_summary_json(results), **(run or {})}
    maker = Posters() if posters else None
    videos = df["local_paths"].drop_nulls().len() if "local_paths" in df.columns else 0
    cards = card_rows(df, page, catalog, maker, inline=videos <= INLINE_POSTERS)
    facts = glance(df, cards, catalog, pricing, run)
    script, style = _asset("night.js"), _asset("night.css")
    html = _environment().get_template("night.html.j2").render(
        title=title or f"seedance-batch: {results.name}", results=str(results), facts=facts, cards=cards,
        script=script, script_hash=_sha256(script), style=style, style_hash=_sha256(style), page_size=PAGE_SIZE,
        generated=datetime.now().astimezone().isoformat(timespec="seconds"))
    seconds = sum(s["seconds"] for s in facts["spend"])
    info = PageResult(str(page), len(cards), len(html.encode()), counts=dict(facts["states"]),
                      spend=f"{facts['spend_usd']:.2f} USD ({seconds:.1f} s of video)" if facts["spend_usd"] is not None
                      else f"{seconds:.1f} s of video (no price table)" if facts["spend"] else None)
    if maker is not None:
        info.posters, info.poster_errors, info.poster_s = maker.made, maker.errors, round(maker.seconds, 3)
    return html, info


def write_page_after(results: Target | str, **kw: Any) -> PageResult | None:
    """The page beside a results table after ``collect --download``: a page that cannot be
    written is logged and never changes the run's outcome (the table is what counts)."""
    page = page_beside(results)
    try:
        return write_page(results, page, **kw)
    except Exception as exc:  # the night's results are written; a page is a convenience
        log.error("page_not_written", path=str(page), error=f"{type(exc).__name__}: {exc}"[:300])
        return None


def write_page(results: Target | str, page: Target | str, **kw: Any) -> PageResult:
    """Render and write the page atomically (a reader sees the old page or the new)."""
    page = page if isinstance(page, Target) else Target(str(page))
    html, info = render_page(results, page, **kw)
    page.write_text(html)
    log.info("page_written", path=info.path, requests=info.requests, bytes=info.bytes, posters=info.posters,
             poster_errors=info.poster_errors, poster_s=info.poster_s)
    return info
