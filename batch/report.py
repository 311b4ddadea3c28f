"""Human and machine summaries of a run or of an existing results table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

from batch.results import OK_STATUSES, STATUSES, read_results


def render(summary: dict[str, Any]) -> str:
    """A plain-text table: counts by status, top errors, elapsed, achieved rate."""
    counts: dict[str, int] = summary.get("counts", {})
    total = sum(counts.values())
    lines = [f"seedance-batch run {summary.get('run_id', '-')}: {total} requests"]
    order = [s for s in STATUSES if s in counts] + sorted(set(counts) - set(STATUSES))
    for status in order:
        mark = "" if status in OK_STATUSES else "  <-"
        lines.append(f"  {status:<10} {counts[status]:>8}{mark}")
    errors = summary.get("top_errors") or []
    if errors:
        lines.append("  top errors:")
        for item in errors:
            lines.append(f"    {item['count']:>6} x {item['error'][:110]}")
    if summary.get("elapsed_s") is not None:
        lines.append(f"  elapsed {summary['elapsed_s']:.1f} s, sent {summary.get('sent', 0)} "
                     f"at {summary.get('send_rate_per_s', 0.0):.2f}/s")
    for key in ("stop_reason", "interrupted"):
        if summary.get(key):
            lines.append(f"  {key.replace('_', ' ')}: {summary[key]}")
    if summary.get("results"):
        lines.append(f"  results: {summary['results']}")
    return "\n".join(lines)


def summarize_table(path: Path) -> dict[str, Any]:
    """The summary of an existing results table (``seedance-batch report``)."""
    df = read_results(path)
    counts = dict(Counter(df.get_column("status").to_list())) if "status" in df.columns else {}
    top: list[dict[str, Any]] = []
    if "error" in df.columns and "status" in df.columns:
        bad = df.filter(~pl.col("status").is_in(list(OK_STATUSES)) & pl.col("error").is_not_null())
        for error, n in Counter(bad.get_column("error").to_list()).most_common(5):
            top.append({"error": error, "count": n})
    return {"run_id": path.name, "counts": counts, "top_errors": top, "results": str(path)}
