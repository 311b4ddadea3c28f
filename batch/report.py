"""Human and machine summaries of a run or of an existing results table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

from batch.results import OK_STATUSES, STATUSES, is_results_table, read_results


def render(summary: dict[str, Any]) -> str:
    """A plain-text table: counts by status, top errors, elapsed, achieved rate."""
    counts: dict[str, int] = summary.get("counts", {})
    total = sum(counts.values())
    title = summary.get("title") or f"seedance-batch run {summary.get('run_id', '-')}"
    lines = [f"{title}: {total} requests"]
    fine = {"valid", "would send"}
    order = [s for s in (*STATUSES, *fine) if s in counts] + sorted(set(counts) - {*STATUSES, *fine})
    for status in order:
        mark = "" if status in OK_STATUSES or status in fine else "  <-"
        lines.append(f"  {status:<10} {counts[status]:>8}{mark}")
    errors = summary.get("top_errors") or []
    if errors:
        lines.append("  top errors:")
        for item in errors:
            lines.append(f"    {item['count']:>6} x {item['error'][:110]}")
    if summary.get("elapsed_s") is not None:
        lines.append(f"  elapsed {summary['elapsed_s']:.1f} s, sent {summary.get('sent', 0)} "
                     f"at {summary.get('send_rate_per_s', 0.0):.2f}/s")
    if summary.get("tasks"):
        states = ", ".join(f"{n} {status}" for status, n in sorted(summary["tasks"].items()))
        lines.append(f"  tasks: {states}; downloaded {summary.get('downloaded', 0)}")
        for item in summary.get("failure_reasons") or []:
            lines.append(f"    {item['count']:>6} x failed: {item['reason'][:100]}")
        for item in summary.get("download_errors") or []:
            lines.append(f"    {item['count']:>6} x download: {item['error'][:100]}  <-")
    collected = summary.get("collect")
    if collected:
        states = ", ".join(f"{n} {status}" for status, n in collected["task_status"].items()) or "none"
        lines.append(f"  tasks: {states}; downloaded {collected['downloaded']}, failed {collected['download_failed']}")
        if collected.get("expiring_before_next_collect"):
            lines.append(f"  expiring: {collected['expiring_before_next_collect']} outputs not downloaded expire "
                         "before the next collect (24 h): collect with --download DIR now  <-")
    retried = summary.get("retry_failed")
    if retried:
        sent = f", {retried['sent']} retries sent" if "sent" in retried else ""
        lines.append(f"  retry-failed: {retried['retried']} failed tasks made pending again{sent}; not retried: "
                     f"{retried['content_policy']} content policy, {retried['unclassified']} unclassified, "
                     f"{retried['cap_reached']} at the cap")
    uploads = summary.get("uploads")
    if uploads and uploads.get("files"):
        verb = "would be uploaded" if uploads.get("planned") else "uploaded"
        lines.append(f"  uploads: {uploads['files']} local images, {uploads['bytes']} bytes {verb}")
    estimate = summary.get("estimate")
    if estimate:
        lines.extend(render_estimate(estimate))
    spend = summary.get("spend")
    if spend:
        cap = "" if spend.get("max_usd") is None else \
            f" of --max-spend {spend['max_usd']:g}, {spend['left_usd']:.2f} left"
        lines.append(f"  spend, night of {spend['night']}: {spend['tonight_usd']:.2f} USD estimated "
                     f"({spend['this_run_usd']:.2f} by this run, {spend['earlier_runs_usd']:.2f} by earlier runs){cap}")
    for item in summary.get("unreadable") or []:
        lines.append(f"  unreadable: {item['source']}: {item['error']}  <-")
    if summary.get("edited"):
        lines.append(f"  edited: {summary['edited']} requests whose id was submitted before with other content "
                     f"were sent as new paid videos  <-")
    for item in summary.get("skipped_files") or []:
        lines.append(f"  skipped: {item['source']}: {item['reason']}")
    for line in summary.get("columns") or []:
        lines.append(f"  columns: {line}")
    for source, columns in (summary.get("passthrough_columns") or {}).items():
        lines.append(f"  pass-through (not sent): {source}: {', '.join(columns)}")
    for key in ("stop_reason", "interrupted"):
        if summary.get(key):
            lines.append(f"  {key.replace('_', ' ')}: {summary[key]}")
    if summary.get("aborted"):
        lines.append(f"  aborted: {summary.get('note') or 'results table not written'}  <-")
    if summary.get("results"):
        lines.append(f"  results: {summary['results']}")
    return "\n".join(lines)


def render_estimate(estimate: dict[str, Any]) -> list[str]:
    """What a dry run or ``validate`` found would be sent, and what it would cost."""
    tiers = ", ".join(f"{n} {tier}" for tier, n in estimate["requests_by_tier"].items())
    lines = [f"  would send: {estimate['would_send']} requests ({tiers}); already submitted "
             f"{estimate.get('already_submitted', 0)} (skipped), unknown {estimate.get('unknown', 0)} (not resent)"]
    video = ", ".join(f"{sec:g} s at {res}" for res, sec in estimate["video_seconds_by_resolution"].items())
    lines.append(f"  video: {video}")
    if "cost_usd" in estimate:
        unpriced = sum(estimate.get("unpriced", {}).values())
        lines.append(f"  estimated cost: {estimate['cost_usd']:.2f} USD (flex at {estimate['flex_share']:.0%} of "
                     f"default)" + (f"; {unpriced} requests without a price "
                                    f"({', '.join(sorted(estimate['unpriced']))})  <-" if unpriced else ""))
    if estimate.get("edited"):
        lines.append(f"  edited: {estimate['edited']} requests whose id was submitted before with other content "
                     f"will be new paid videos  <-")
    if estimate.get("identical"):
        lines.append(f"  identical: {estimate['identical']} requests repeat an earlier one of this run; each "
                     f"becomes its own video")
    return lines


def render_collect(summary: dict[str, Any]) -> str:
    lines = [f"seedance-batch collect: {summary['followed']} tasks followed, {summary['polls']} polls"]
    for status, n in summary["task_status"].items():
        mark = "" if status == "success" else "  <-"
        lines.append(f"  {status:<10} {n:>8}{mark}")
    lines.append(f"  downloaded {summary['downloaded']}, already present {summary['download_skipped']}, "
                 f"failed {summary['download_failed']}")
    if summary.get("expiring_before_next_collect"):
        lines.append(f"  expiring: {summary['expiring_before_next_collect']} outputs not downloaded expire before "
                     "the next collect (24 h): collect with --download DIR now  <-")
    if summary.get("stop_reason"):
        lines.append(f"  stop reason: {summary['stop_reason']}")
    lines.append(f"  elapsed {summary['elapsed_s']:.1f} s")
    return "\n".join(lines)


def prometheus(summary: dict[str, Any], job: str) -> str:
    """The summary as a node_exporter textfile (``--metrics-file``)."""
    label = job.replace("\\", "\\\\").replace('"', '\\"')
    lines = [
        "# HELP seedance_batch_requests Requests of the last run, by final status.",
        "# TYPE seedance_batch_requests gauge",
    ]
    counts = summary.get("counts", {})
    for status in sorted(set(STATUSES) | set(counts)):
        lines.append(f'seedance_batch_requests{{job="{label}",status="{status}"}} {counts.get(status, 0)}')
    scalars = [
        ("last_run_timestamp_seconds", "Unix time the last run finished.", summary.get("finished_unix", 0)),
        ("last_run_duration_seconds", "Wall time of the last run.", summary.get("elapsed_s", 0)),
        ("last_run_exit_code", "Exit code of the last run.", summary.get("exit_code", 0)),
        ("last_run_sent", "HTTP submissions made by the last run.", summary.get("sent", 0)),
        ("last_run_send_rate", "Submissions per second achieved by the last run.", summary.get("send_rate_per_s", 0)),
    ]
    if summary.get("edited") is not None:
        scalars.append(("last_run_edited", "Requests the last run sent as new videos although their id had been "
                        "sent before with other content.", summary["edited"]))
    spend = summary.get("spend") or {}
    for key, name, help_text in (
            ("this_run_usd", "last_run_spend_usd", "Estimated USD of what the last run may have had accepted."),
            ("tonight_usd", "night_spend_usd", "Estimated USD the last run's night has spent through its ledger."),
            ("left_usd", "night_spend_left_usd", "USD left under --max-spend for the last run's night."),
            ("max_usd", "max_spend_usd", "The last run's --max-spend, USD per night and ledger.")):
        if spend.get(key) is not None:
            scalars.append((name, help_text, spend[key]))
    for name, help_text, value in scalars:
        lines += [f"# HELP seedance_batch_{name} {help_text}", f"# TYPE seedance_batch_{name} gauge",
                  f'seedance_batch_{name}{{job="{label}"}} {value}']
    lines += ["# HELP seedance_batch_last_run_stop Why the last run stopped early (1), if it did.",
              "# TYPE seedance_batch_last_run_stop gauge"]
    kind = stop_kind(summary.get("stop_reason"))
    if kind:
        lines.append(f'seedance_batch_last_run_stop{{job="{label}",reason="{kind}"}} 1')
    return "\n".join(lines) + "\n"


def stop_kind(reason: str | None) -> str | None:
    """A stop reason as a metric label: max_spend, max_requests, deadline, interrupted,
    circuit_breaker, provider (bad key, no balance, no route), state (a disk fault)."""
    if not reason:
        return None
    for prefix, kind in (("--max-spend", "max_spend"), ("--max-requests", "max_requests"), ("deadline", "deadline"),
                         ("interrupted", "interrupted"), ("aborted", "interrupted"), ("circuit breaker", "circuit_breaker"),
                         ("HTTP ", "provider"), ("state write failed", "state")):
        if reason.startswith(prefix):
            return kind
    return "other"


def summarize_table(path: Path) -> dict[str, Any]:
    """The summary of an existing results table (``seedance-batch report``): requests by
    status and their top errors and, once collected, tasks by state, failure reasons and
    download errors. Raises ``ValueError`` for a file that is not a results table."""
    df = read_results(path)
    if not is_results_table(df):
        raise ValueError("not a results table (no request_id and status columns)")
    counts = dict(Counter(df.get_column("status").to_list()))
    top: list[dict[str, Any]] = []
    if "error" in df.columns:
        bad = df.filter(~pl.col("status").is_in(list(OK_STATUSES)) & pl.col("error").is_not_null())
        for error, n in Counter(bad.get_column("error").to_list()).most_common(5):
            top.append({"error": error, "count": n})
    summary: dict[str, Any] = {"run_id": path.name, "counts": counts, "top_errors": top, "results": str(path)}
    if "task_status" in df.columns and df["task_status"].drop_nulls().len():
        tasks = df.filter(pl.col("task_status").is_not_null())
        summary["tasks"] = dict(Counter(tasks["task_status"].to_list()))
        if "failure_reason" in df.columns:
            summary["failure_reasons"] = [{"reason": r, "count": n} for r, n in Counter(
                tasks.filter(pl.col("task_status") != "success")["failure_reason"].drop_nulls().to_list()).most_common(5)]
        if "download_error" in df.columns:
            summary["download_errors"] = [{"error": e, "count": n} for e, n in Counter(
                df["download_error"].drop_nulls().to_list()).most_common(5)]
        if "local_paths" in df.columns:
            summary["downloaded"] = int(df["local_paths"].drop_nulls().len())
    return summary
