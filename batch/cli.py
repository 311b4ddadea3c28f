"""The ``seedance-batch`` command line (click).

Every user mistake is a :class:`~batch.errors.BatchError`: one line on stderr and its
exit code (2 for usage/config/input, 3 when another run holds the state lock).
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import click
import polars as pl
import structlog
from click.core import ParameterSource

from batch import __version__, logs, notify, retry
from batch.api import DEFAULT_BASE_URL, DEFAULT_MODEL, check_endpoint, check_slug, is_loopback
from batch.client import Secret, TooLarge, Transport, describe, make_session, read_capped, redact_url
from batch.download import DownloadPolicy
from batch.errors import EXIT_INTERRUPTED, EXIT_PROVIDER, BatchError, ConfigError, StateError
from batch.expand import ExpandSpec, normalize, parse_param
from batch.following import CollectConfig
from batch.jobfile import JobFile, fill_output, load_job
from batch.ledger import PgLocation, State, default_state_path, fake_state_path, is_database_url, state_home
from batch.ledger import backup as ledger_backup
from batch.models import MAX_SPEC_BYTES, Catalog, names_only, save_spec
from batch.pipeline import (
    CollectOptions,
    Interrupted,
    RunOptions,
    Summary,
    add_fault,
    load_and_expand,
    plan,
    planned_cost,
    record_summary,
    run_check,
    run_collect,
    run_submit,
    where_ids,
)
from batch.preflight import fatal
from batch.prices import Pricing
from batch.ratelimit import Rate, parse_rate
from batch.report import prometheus, render, render_collect, summarize_table
from batch.results import (
    LABEL,
    write_text_atomically,
)
from batch.sending import SubmitConfig
from batch.storage import Target, is_remote
from batch.validate import TIERS

MAX_DEADLINE_S = 366 * 86400
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


class FiniteFloatRange(click.FloatRange):
    """A float option's value that is a number: ``nan`` passes every range comparison and
    ``inf``/``1e309`` every lower bound, so either would turn a cap or a timeout into none."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if isinstance(number, float) and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def parse_deadline(text: str, now: datetime | None = None) -> float:
    """A duration (``90m``, ``1h30m``, ``45s``), a clock time (``06:00``, next occurrence)
    or an ISO date-time; returns epoch seconds."""
    now = now or datetime.now().astimezone()
    raw = text.strip().lower()
    usage = ConfigError(f"--deadline {text!r}: use a duration (90m, 1h30m), a clock time (06:00) "
                        "or an ISO date-time")
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", raw):
        parts = [int(p) for p in raw.split(":")] + [0]
        try:
            when = now.replace(hour=parts[0], minute=parts[1], second=parts[2], microsecond=0)
        except ValueError:
            raise ConfigError(f"--deadline {text!r}: not a clock time (00:00 to 23:59)") from None
        if when <= now:
            when += timedelta(days=1)
        return when.timestamp()
    seconds = _duration_seconds(raw)
    if seconds is not None:
        # Beyond a year no night is meant; past it the number breaks datetime arithmetic.
        if seconds > MAX_DEADLINE_S:
            raise ConfigError(f"--deadline {text!r}: longer than a year")
        return now.timestamp() + seconds
    try:
        when = datetime.fromisoformat(text.strip())
        if when.tzinfo is None:
            when = when.astimezone()
        return when.timestamp()
    except (ValueError, OverflowError, OSError):
        raise usage from None


def log_deadline(text: str, when: float, now: datetime | None = None) -> float:
    """Say when the run will stop starting requests: a clock time already past today
    means tomorrow, which a cron line written for the night may not have meant."""
    now = now or datetime.now().astimezone()
    at = datetime.fromtimestamp(when).astimezone()
    tomorrow = at.date() > now.date()
    log = structlog.get_logger("batch")
    fields = {"deadline": text, "at": at.isoformat(timespec="seconds"), "in_s": round(when - now.timestamp()),
              "tomorrow": tomorrow}
    if tomorrow and re.fullmatch(r"\s*\d{1,2}:\d{2}(:\d{2})?\s*", text):
        log.warning("deadline_tomorrow", **fields,
                    note=f"{text.strip()} has passed today ({now:%H:%M}); the run stops tomorrow at {at:%H:%M}")
    else:
        log.info("deadline", **fields)
    return when


def resolve_key(key_file: Path | None) -> Secret:
    if key_file is not None:
        try:
            value = key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--api-key-file {key_file}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"--api-key-file {key_file}: file is empty")
        return Secret(value)
    value = os.environ.get("SEEDANCE_API_KEY", "").strip()
    if not value:
        raise ConfigError("no API key: set SEEDANCE_API_KEY or give --api-key-file (or use --fake-api / --dry-run)")
    return Secret(value)


def connection(key_file: Path | None, base_url: str, allow_insecure: bool, log_level: str,
               needs_key: bool = True) -> Secret:
    """The key (when one is needed), logging that scrubs it, and a transport safe to send it over."""
    key = resolve_key(key_file) if needs_key else Secret("")
    logs.configure(log_level, secrets=[key.reveal()])
    http_url("--base-url", base_url)  # also a dry run names its ledger's API by it
    if needs_key:
        check_transport(base_url, allow_insecure)
    return key


def http_url(option: str, url: str, shown: str | None = None) -> None:
    """An http(s)://host[:port] URL that every later split of it will accept."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != -1
    except ValueError:  # "http://[::1", a port out of range or not a number
        ok = False
    if not ok:
        raise ConfigError(f"{option} {shown or url!r}: expected http(s)://host[:port]")


def rate_option(text: str) -> Rate | None:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise ConfigError(f"--rate: {exc}") from None


def check_transport(base_url: str, allow_insecure: bool, option: str = "--base-url") -> None:
    http_url(option, base_url)
    parts = urlsplit(base_url)
    if parts.scheme == "http" and not is_loopback(base_url) and not allow_insecure:
        raise ConfigError(f"--base-url {base_url}: refusing to send the API key over plain http to a "
                          "non-loopback host (use https, or --allow-insecure)")


class ExitCodeGroup(click.Group):
    """Every failure ends as one line on stderr (a JSON event off a TTY) and its exit code."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        # The command owns the process's logging while it runs; the Python API never does.
        previous, logs.command = logs.command, True
        try:
            return self._main(args, prog_name, complete_var, standalone_mode, **extra)
        finally:
            logs.command = previous

    def _main(self, args: Any, prog_name: str | None, complete_var: str | None, standalone_mode: bool,
              **extra: Any) -> Any:
        try:
            # No argv can hold a NUL, but an in-process caller's list can; every path and
            # URL function would raise on it, so it is refused here once.
            if args is not None and any("\x00" in str(a) for a in args):
                raise click.UsageError("an argument contains a NUL character")
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:  # usage errors: click's own text on a TTY
            if logs.json_stderr():
                logs.report_error(exc.format_message(), exc.exit_code)
            else:
                exc.show()
            if not standalone_mode:
                raise
            sys.exit(exc.exit_code)
        except click.Abort as exc:
            if isinstance(exc.__context__, KeyboardInterrupt):
                # A Ctrl-C that fell between the tool's own handlers: an interruption like any other.
                logs.report_error("interrupted by SIGINT", EXIT_INTERRUPTED)
                sys.exit(EXIT_INTERRUPTED)
            logs.report_error("aborted", 1)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv

    def invoke(self, ctx: click.Context) -> Any:
        notify.arm(None, "")  # each command arms its own --notify (an in-process caller runs several)
        try:
            return super().invoke(ctx)
        except BatchError as exc:
            logs.report_error(str(exc), exc.exit_code)
            notify.fatal(exc.exit_code, str(exc))
            ctx.exit(exc.exit_code)
        except Interrupted as exc:
            logs.report_error(f"interrupted by {exc}", EXIT_INTERRUPTED)
            notify.fatal(EXIT_INTERRUPTED, f"interrupted by {exc}")
            ctx.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug: its traceback stays, and --notify still tells
            notify.fatal(1, f"internal error ({type(exc).__name__})")
            raise


@click.group(cls=ExitCodeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="seedance-batch")
def main() -> None:
    """Turn prompt spreadsheets into Seedance video tasks (text-to-video, image-to-video,
    video-to-video), nightly and safely."""


def entry() -> None:
    """The console script: :func:`main`, with the garbage collector tuned for a batch process.

    Measured on 20k unpaced requests (benchmarks/bench.py): the cyclic collector took
    ~0.3 s of a 3.7 CPU-s run, mostly full collections walking every object that polars,
    pyarrow and aiohttp created at import. ``gc.freeze()`` leaves those out of every
    later collection, and a young-generation threshold of 10,000 (CPython's default is
    700) lets short-lived request objects die by reference counting before a collection
    looks at them: ~0.04 s, same peak RSS. Only here, not for in-process callers such as
    tests through CliRunner, whose objects it would pin.
    """
    global _PROCESS
    _PROCESS = True
    notify.exit_when_abandoned = True
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    main()


_PROCESS = False  # set by entry(): this is the command's own process, not an in-process caller (tests)


def base_url_option() -> Any:
    return click.option("--base-url", default=DEFAULT_BASE_URL, show_default=True, envvar="SEEDANCE_BASE_URL",
                        help="API base URL. [env SEEDANCE_BASE_URL]")


def api_key_file_option() -> Any:
    return click.option("--api-key-file", type=click.Path(path_type=Path), envvar="SEEDANCE_API_KEY_FILE",
                        help="Read the API key from this file instead of SEEDANCE_API_KEY. [env SEEDANCE_API_KEY_FILE]")


def allow_insecure_option() -> Any:
    return click.option("--allow-insecure", is_flag=True,
                        help="Allow sending the key over plain http to a non-loopback host.")


def transport_options(fn: Any) -> Any:
    """How requests leave the machine: shared by every command that talks to the provider."""
    fn = click.option("--ca-bundle", type=click.Path(path_type=Path, dir_okay=False), envvar="SEEDANCE_BATCH_CA_BUNDLE",
                      help="Also trust these certificate authorities (PEM), e.g. a TLS-inspecting proxy's; "
                           "SSL_CERT_FILE works too. [env SEEDANCE_BATCH_CA_BUNDLE]")(fn)
    return click.option("--proxy", envvar="SEEDANCE_BATCH_PROXY", metavar="URL",
                        help="Send API calls and downloads through this proxy (http://[user:pass@]host:port); without "
                             "it HTTPS_PROXY/HTTP_PROXY apply. NO_PROXY is honoured. [env SEEDANCE_BATCH_PROXY]")(fn)


def transport_of(proxy: str | None, ca_bundle: Path | None) -> Transport:
    """The transport, checked now: a bad proxy URL or CA file is a usage error, not a night of retries."""
    if proxy:
        try:
            http_url("--proxy", proxy, redact_url(proxy))
        except ConfigError:
            raise ConfigError(f"--proxy {redact_url(proxy)}: expected http://[user:password@]host:port") from None
    transport = Transport(proxy or None, str(ca_bundle) if ca_bundle else None)
    try:
        transport.ssl_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca-bundle {ca_bundle or os.environ.get('SSL_CERT_FILE')}: not a readable PEM bundle "
                          f"({getattr(exc, 'strerror', None) or exc})") from None
    if transport.proxy or ca_bundle:
        structlog.get_logger("batch").info("transport", proxy=redact_url(transport.proxy),
                                           ca_bundle=transport.ca_bundle)
    return transport


def common_options(fn: Any) -> Any:
    """Options shared by ``submit`` and ``run`` (where they override the job file)."""
    options = [
        base_url_option(),
        click.option("--model", default=DEFAULT_MODEL, show_default=True, envvar="SEEDANCE_BATCH_MODEL",
                     help="Model slug provider/model for rows that do not name one. [env SEEDANCE_BATCH_MODEL]"),
        click.option("--endpoint", default="documented", show_default=True, envvar="SEEDANCE_BATCH_ENDPOINT",
                     help="Submit route: documented (each model's own, from its spec), seed "
                          "({base}/api/v1/text-to-video/{provider}/{model}/async), async "
                          "({base}/api/v1/{provider}/{model}/async), v1 ({base}/api/v1/{provider}/{model}), or a "
                          "template with those placeholders. [env SEEDANCE_BATCH_ENDPOINT]"),
        api_key_file_option(),
        click.option("--rate", default="100/min", show_default=True, envvar="SEEDANCE_BATCH_RATE",
                     help="Max request starts with a unit: 2/s, 100/min, 5000/h (a bare number is refused); 0 = unpaced. "
                          "[env SEEDANCE_BATCH_RATE]"),
        click.option("--concurrency", type=click.IntRange(1, 4096), envvar="SEEDANCE_BATCH_CONCURRENCY",
                     help="Max requests in flight (default: adapts to rate x observed latency). "
                          "[env SEEDANCE_BATCH_CONCURRENCY]"),
        click.option("--tier", type=click.Choice(TIERS), default="flex", show_default=True,
                     envvar="SEEDANCE_BATCH_TIER", help="service_tier for rows that do not set one. [env SEEDANCE_BATCH_TIER]"),
        click.option("--param", "params", multiple=True, metavar="FIELD=V1[,V2...]",
                     help="Job-level value(s) for a field rows leave empty; a list expands into a grid. Repeatable."),
        click.option("--passthrough", multiple=True, metavar="COLUMN",
                     help="Keep COLUMN as a pass-through column although its name resembles an API field. Repeatable."),
        click.option("--dry-run", is_flag=True, help="Validate and expand, send nothing, still write the table."),
        click.option("--fake-api", is_flag=True, help="Start the bundled fake API on 127.0.0.1 and submit to it (no key)."),
        click.option("--state", envvar="SEEDANCE_BATCH_STATE",
                     help="Ledger of what was sent: a SQLite file or postgresql://...?ledger=NAME. "
                          f"[env SEEDANCE_BATCH_STATE; default {default_state_path()}]"),
        click.option("--results-from", "results_from", multiple=True, metavar="FILE|s3://...",
                     help="An earlier results table whose task ids the ledger must know before sending (the run's "
                          "own -o table is always read): a fresh state directory then pays nothing twice."),
        click.option("--resend-unknown", is_flag=True,
                     help="Resend requests whose earlier outcome is unknown (may pay twice for one video)."),
        click.option("--moved-from", "moved_from", multiple=True, metavar="OLD_BASE_URL",
                     help="The ledger's requests sent to OLD_BASE_URL count as sent to --base-url (the same provider "
                          "at another host): nothing is resubmitted. Repeatable."),
        click.option("--max-attempts", type=click.IntRange(1, 50), default=5, show_default=True,
                     envvar="SEEDANCE_BATCH_MAX_ATTEMPTS", help="Attempts per request for 429/503/connect errors."),
        click.option("--timeout", type=FiniteFloatRange(1, 3600), default=60.0, show_default=True,
                     envvar="SEEDANCE_BATCH_TIMEOUT", help="Seconds one HTTP attempt may take."),
        click.option("--retry-failed", is_flag=True,
                     help="Send again the requests whose task failed for a reason on the provider's side (internal, "
                          "timeout, expired, cancelled); never content policy. Each is a new paid task."),
        click.option("--retry-cap", type=click.IntRange(1, 20), default=2, show_default=True,
                     help="With --retry-failed: tasks per request in all, across nights (the first included)."),
        click.option("--max-requests", type=click.IntRange(0), envvar="SEEDANCE_BATCH_MAX_REQUESTS",
                     help="Send at most N new requests tonight through this ledger (earlier runs of the same local "
                          "date included); the rest stay pending. [env SEEDANCE_BATCH_MAX_REQUESTS]"),
        click.option("--deadline", envvar="SEEDANCE_BATCH_DEADLINE",
                     help="Stop starting requests at a duration (90m) or clock time (06:00). [env SEEDANCE_BATCH_DEADLINE]"),
        click.option("--grace", type=FiniteFloatRange(0, 3600), default=30.0, show_default=True,
                     help="On SIGINT/SIGTERM/deadline, seconds to wait for requests in flight."),
        click.option("--sheet", help="Workbook sheet name or 1-based number, a comma list, or 'all' (default: the "
                     "visible sheet with a prompt column)."),
        click.option("--header-row", type=click.IntRange(1, 20),
                     help="1-based row of the header (default: the first row with a prompt column)."),
        click.option("--encoding", help="Encoding of CSV/TSV files that are not UTF-8/UTF-16 (e.g. cp1252)."),
        allow_insecure_option(),
        transport_options,
        click.option("--metrics-file", type=click.Path(path_type=Path), envvar="SEEDANCE_BATCH_METRICS_FILE",
                     help="Write a Prometheus textfile (node_exporter) with the run's counts. [env SEEDANCE_BATCH_METRICS_FILE]"),
        click.option("--progress-interval", type=FiniteFloatRange(0.05), default=10.0, show_default=True,
                     envvar="SEEDANCE_BATCH_PROGRESS_INTERVAL",
                     help="Seconds between progress events when stderr is not a TTY. [env SEEDANCE_BATCH_PROGRESS_INTERVAL]"),
        click.option("--prices", "prices_file", type=click.Path(path_type=Path, dir_okay=False),
                     envvar="SEEDANCE_BATCH_PRICES",
                     help="TOML price table (USD per second of video by model and resolution) for estimates and "
                          "--max-spend. [env SEEDANCE_BATCH_PRICES]"),
        click.option("--max-spend", type=FiniteFloatRange(0), envvar="SEEDANCE_BATCH_MAX_SPEND", metavar="USD",
                     help="Stop starting requests before the night's estimated cost through this ledger (this run's "
                          "and earlier runs' of the same local date) would pass USD (needs prices). "
                          "[env SEEDANCE_BATCH_MAX_SPEND]"),
        click.option("--no-preflight", "no_preflight", is_flag=True,
                     help="Skip the checks of the key, the models and the balance before sending."),
        click.option("--wait", is_flag=True,
                     help="After submitting, follow this run's tasks to completion (collect --wait) in the same process."),
        click.option("--wait-timeout", default="6h", show_default=True, help="With --wait: give up polling after this long."),
        click.option("--download", "download_dir", metavar="DIR|s3://BUCKET/PREFIX/",
                     envvar="SEEDANCE_BATCH_DOWNLOAD_DIR",
                     help="With --wait: download outputs here. [env SEEDANCE_BATCH_DOWNLOAD_DIR]"),
        click.option("--no-html", is_flag=True, help="With --wait --download: do not write the page beside the table."),
        notify_option(),
        log_option(),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def notify_option(dest: str = "notify") -> Any:
    return click.option("--notify", dest, multiple=True, metavar="URL",
                        help="At the end (and on a fatal exit) send one message to this Apprise URL (json://host/path, "
                             "slack://..., mailto://..., ntfys://...). Repeatable.")


def log_option() -> Any:
    return click.option("--log-level", type=click.Choice(logs.LEVELS), default="info", show_default=True,
                        envvar="SEEDANCE_LOG_LEVEL", help="Log level (JSON on stderr off a TTY). [env SEEDANCE_LOG_LEVEL]")


def _duration_seconds(text: str) -> float | None:
    """``90``, ``90s``, ``15m``, ``6h``, ``1h30m`` → seconds; ``None`` if not a duration."""
    raw = text.strip().lower()
    match = _DURATION.match(raw)
    if not raw or not match or not any(match.groups()):
        return None
    h, m, sec = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + sec


def parse_duration(text: str, option: str) -> float:
    seconds = _duration_seconds(text)
    if seconds is None:
        raise ConfigError(f"{option} {text!r}: use a duration such as 90s, 15m or 6h")
    return seconds


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--output", required=True, envvar="SEEDANCE_BATCH_OUTPUT", metavar="FILE|s3://...",
              help="Results table (.parquet or .csv). [env SEEDANCE_BATCH_OUTPUT]")
@common_options
def submit(**kw: Any) -> None:
    """Validate, expand and submit INPUT files (.csv, .parquet, .xlsx, dirs, globs)."""
    notify.arm(kw["notify"], "submit", notify.url_secrets(kw.get("proxy")))
    kw["output"] = dated("--output", kw["output"])
    finish(build_options(kw, command="submit"), kw.get("metrics_file"), "submit", page=not kw["no_html"])


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("-o", "--output", envvar="SEEDANCE_BATCH_OUTPUT", metavar="FILE|s3://...",
              help="Results table; overrides the job's output. [env SEEDANCE_BATCH_OUTPUT]")
@common_options
@click.pass_context
def run(ctx: click.Context, job: Path, **kw: Any) -> None:
    """Run a declarative job file (TOML, see jobs/example.toml); options override the file."""
    notify.arm(kw["notify"], f"run {job}", notify.url_secrets(kw.get("proxy")))
    spec = read_job(job)
    if kw.get("output"):  # from the command line or env: the job's own output is filled in already
        kw["output"] = dated("--output", kw["output"])
    merged = merge_job(ctx, spec, kw)
    notify.arm(merged.get("notify"), f"run {job}", notify.url_secrets(merged.get("proxy")))
    finish(build_options(merged, command=f"run {job}", job=spec), merged.get("metrics_file"), job.stem,
           page=not merged["no_html"])


def dated(option: str, text: str) -> str:
    """``{date}``/``{datetime}`` in a results path given on the command line, filled in as a
    job file's ``output`` is (:func:`batch.jobfile.fill_output`): the night's own table."""
    try:
        return fill_output(str(text))
    except ValueError as exc:
        raise ConfigError(f"{option} {text}: {exc}") from None


def table_template(text: str) -> str:
    """A dated ``--results`` as the ledger records outputs (a local path made absolute), so
    collect finds the tables earlier nights' runs wrote under it."""
    return text if is_remote(text) else os.path.abspath(text)


def models_dir() -> Path:
    """Fetched and added model specs: they win over the shipped ones."""
    return state_home() / "models"


def read_job(path: Path) -> JobFile:
    """A job file, its ``[params]`` and ``[columns]`` checked against every known model's fields."""
    catalog = Catalog(models_dir())
    return load_job(path, known_fields=catalog.known_fields(), aliases=catalog.aliases())


def job_or_inputs(ctx: click.Context, targets: tuple[str, ...], kw: dict[str, Any]) -> tuple[JobFile | None, dict]:
    """``validate`` and ``check`` take a job file (then more inputs after it) or inputs."""
    if targets and targets[0].endswith(".toml"):
        job = read_job(Path(targets[0]))
        return job, merge_job(ctx, job, {**kw, "inputs": tuple(job.get("inputs", [])) + targets[1:]},
                              need_output=False)
    return None, {**kw, "inputs": targets}


def merge_job(ctx: click.Context, spec: JobFile, kw: dict[str, Any], need_output: bool = True) -> dict[str, Any]:
    """Job-file values where the option was left at its default; CLI and env win."""
    merged = dict(kw)
    for key, value in spec.values.items():
        if key in ("params", "columns", "prompt_template", "id_column", "passthrough", "prices"):
            continue
        key = {"download": "download_dir"}.get(key, key)
        source = ctx.get_parameter_source(key) if key in kw else None
        if key not in kw or source in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            merged[key] = str(value) if key in ("rate", "deadline") else value
    if not merged.get("inputs"):
        raise ConfigError(f"{spec.path}: inputs: the job names no input files")
    if need_output and not merged.get("output"):
        raise ConfigError(f"{spec.path}: output: no results path (set output in the job or give -o)")
    return merged


def finish(opts: RunOptions, metrics_file: Path | None, job_name: str, page: bool = True) -> None:
    summary, data = submit_night(opts, metrics_file, job_name, page)
    click.echo(render(data) + (f"\n  page: {data['page']}" if data.get("page") else ""))
    if summary.local_fault:
        logs.report_error(summary.local_fault, summary.exit_code)
    notify.finish(summary.exit_code, data, data.get("page"))
    sys.exit(summary.exit_code)


def submit_night(opts: RunOptions, metrics_file: Path | None, job_name: str,
                 page: bool = True) -> tuple[Summary, dict[str, Any]]:
    """The run ``submit``/``run`` and :func:`batch.submit` share: send, then the metrics
    file and (after ``--wait --download``) the page; the summary, printed by neither."""
    summary = run_submit(opts)
    if _PROCESS:  # the exit code is decided: a late Ctrl-C must not turn it into click's "Aborted!" (exit 1)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    if metrics_file is not None:
        try:
            write_metrics(metrics_file, {**summary.as_dict(), "finished_unix": time.time()}, job_name)
        except Exception as exc:  # after sending: a local fault that says where the task ids are
            structlog.get_logger("batch").error("metrics_not_written", path=str(metrics_file), error=str(exc))
            if summary.sent and not opts.dry_run:
                add_fault(summary, f"cannot write metrics file {metrics_file} "
                                   f"({getattr(exc, 'strerror', None) or exc}); "
                                   f"{where_ids(opts, summary.table_written)}")
                record_summary(opts.output, summary, opts)
    data = summary.as_dict()
    if page and opts.collect is not None and opts.collect.download_dir is not None and not summary.local_fault:
        from batch.page import write_page_after  # jinja2 and PyAV: only when a page is made

        written = write_page_after(opts.output, pricing=opts.pricing, catalog=Catalog(opts.models_dir))
        data["page"] = written.path if written else None
    structlog.get_logger("batch").info("summary", **data)
    return summary, data


def write_metrics(path: Path, summary: dict[str, Any], job_name: str) -> None:
    """Atomically, as node_exporter's textfile collector asks (it may read at any time)."""
    write_text_atomically(path, prometheus(summary, job_name))


def expand_spec(job: JobFile | None, cli_params: Iterable[str], tier: str, model: str,
                passthrough: Iterable[str] = ()) -> ExpandSpec:
    """The job's expansion settings, with each ``--param`` replacing the job's value for its field."""
    params: dict[str, Any] = {normalize(k): v for k, v in job.get("params", {}).items()} if job else {}
    for text in cli_params:
        name, value = parse_param(text)
        params[name] = value
    try:
        slug = check_slug(model)
    except ValueError as exc:
        raise ConfigError(f"--{exc}") from None
    return ExpandSpec(
        params=params, tier=tier,
        columns=job.get("columns", {}) if job else {},
        prompt_template=job.get("prompt_template") if job else None,
        id_column=job.get("id_column") if job else None,
        model=slug,
        passthrough=tuple(job.get("passthrough", [])) + tuple(passthrough) if job else tuple(passthrough),
    )


def build_options(kw: dict[str, Any], command: str, job: JobFile | None = None) -> RunOptions:
    key = connection(kw.get("api_key_file"), kw["base_url"], kw["allow_insecure"], kw["log_level"],
                     needs_key=not kw["dry_run"] and not kw["fake_api"])
    rate = rate_option(str(kw["rate"]))
    try:
        check_endpoint(kw["endpoint"], kw["base_url"])
    except ValueError as exc:
        raise ConfigError(f"--{exc}") from None
    transport = transport_of(kw.get("proxy"), kw.get("ca_bundle"))
    metrics_location(kw.get("metrics_file"))
    submit_cfg = SubmitConfig(
        base_url=kw["base_url"], api_key=key, endpoint=kw["endpoint"], rate=rate, concurrency=kw["concurrency"],
        transport=transport,
        max_attempts=kw["max_attempts"], timeout=kw["timeout"], resend_unknown=kw["resend_unknown"],
        max_requests=kw["max_requests"],
    )
    return RunOptions(
        inputs=tuple(kw["inputs"]),
        output=Target(no_url("--output", str(kw["output"]))),
        expand=expand_spec(job, kw["params"], kw["tier"], kw["model"], kw.get("passthrough") or ()),
        submit=submit_cfg,
        # The fake API's task ids must never land in the real ledger (they would make
        # tomorrow's real run skip those requests), so a fake run has its own default.
        state=state_location(kw["state"]) or (fake_state_path() if kw["fake_api"] else default_state_path()),
        dry_run=kw["dry_run"],
        fake_api=kw["fake_api"],
        deadline=log_deadline(kw["deadline"], parse_deadline(kw["deadline"])) if kw["deadline"] else None,
        grace=kw["grace"],
        sheet=kw["sheet"],
        header_row=kw.get("header_row"),
        encoding=kw.get("encoding"),
        command=command,
        progress_interval=kw["progress_interval"],
        collect=CollectConfig(
            base_url=kw["base_url"], api_key=key, rate=rate, wait=True,
            wait_timeout=parse_duration(kw["wait_timeout"], "--wait-timeout"),
            download_dir=download_location(kw["download_dir"]), http_timeout=kw["timeout"],
            poll_min=2.0 if kw["fake_api"] else 10.0, transport=transport,
            download=DownloadPolicy(allow_local=kw["fake_api"] or is_loopback(kw["base_url"])),
        ) if kw["wait"] else None,
        moved_from=tuple(kw.get("moved_from") or ()),
        budget_dir=state_home(),
        models_dir=models_dir(),
        pricing=pricing_of(kw.get("prices_file"), job),
        max_spend=kw.get("max_spend"),
        preflight=not kw.get("no_preflight") and bool(job.get("preflight", True) if job else True),
        metrics_file=kw.get("metrics_file"),
        results_from=tuple(Target(str(t)) for t in kw.get("results_from") or ()),
        retry_failed=bool(kw.get("retry_failed")), retry_cap=int(kw.get("retry_cap") or retry.DEFAULT_CAP),
    )


def state_location(state: str | Path | None) -> State | None:
    """The ledger: a local SQLite file, or ``postgresql://...[?ledger=NAME]``. SQLite's
    locking and its WAL need a local file system (a bucket has neither locks nor partial
    writes), so any other URL is a usage error."""
    if state is None or state == "":
        return None
    if is_database_url(str(state)):
        return PgLocation(str(state))
    if is_remote(str(state)):
        raise ConfigError(f"--state {state}: the ledger must be on local disk (SQLite locks it and writes its "
                          "journal beside it; object storage offers neither): give a local path, or a "
                          "postgresql:// URL")
    return local_file("--state", state)


def local_file(option: str, value: str | Path) -> Path:
    """A local file name the OS will accept, checked once here so that a bad one is a
    usage error and not an OSError deep in a stage (or a file named after a URL)."""
    text = str(value)
    path = Path(text)
    if not text.strip() or "\x00" in text or text.endswith(("/", os.sep)) or path.name in ("", ".", ".."):
        raise ConfigError(f"{option} {text!r}: not a file name")
    if re.match(r"[a-z][a-z0-9+.-]*:/", text, re.IGNORECASE):  # else "s3:/b/x" appears in the cwd
        raise ConfigError(f"{option} {text}: a URL; this file must be on local disk: give a local path")
    try:
        if path.is_dir():
            raise ConfigError(f"{option} {text}: is a directory, not a file")
    except OSError as exc:  # a name too long, a parent that is a file, a loop of links
        raise ConfigError(f"{option} {text}: {exc.strerror or exc}") from None
    return path


def metrics_location(value: str | Path | None) -> Path | None:
    """The Prometheus textfile: a local file (node_exporter reads a directory on this
    machine), checked before the run, not after the night was paid for."""
    if value is None:
        return None
    text = str(value)
    if is_remote(text):
        raise ConfigError(f"--metrics-file {text}: node_exporter reads a local file; give a local path")
    return local_file("--metrics-file", text)


def no_url(option: str, text: str, hint: str = "give a local path or an s3://, gs:// or az:// URL") -> str:
    """A URL that is not a bucket's would become a local path ("http:/host/x" in the
    working directory), a file named after a URL: refused before anything is written."""
    if not is_remote(text) and re.match(r"[a-z][a-z0-9+.-]*:/", text, re.IGNORECASE):
        raise ConfigError(f"{option} {text}: not a place this tool writes to; {hint}")
    return text


def download_location(value: str | Path | None) -> str | Path | None:
    """Where collect puts videos: a local directory, or a bucket prefix (streamed there)."""
    if value is None or value == "":
        return None
    return str(value) if is_remote(no_url("--download", str(value))) else Path(value)


def pricing_of(path: Path | None, job: JobFile | None) -> Pricing:
    """``--prices FILE`` wins over a job's ``[prices]``."""
    if path is not None:
        return Pricing.load(Path(path))
    if job is not None and job.get("prices"):
        return Pricing.parse(job.get("prices"), f"{job.path}: [prices]")
    return Pricing()


@main.command()
@click.argument("targets", nargs=-1, required=True, metavar="JOB.toml|INPUT...")
@click.option("--show", type=click.IntRange(0), default=50, show_default=True, help="Print at most N invalid requests.")
@common_options
@click.pass_context
def validate(ctx: click.Context, targets: tuple[str, ...], show: int, **kw: Any) -> None:
    """Check a job file or input files as a run would see them, sending nothing: the
    column mapping, every invalid request with its reason, and what would be sent
    (the ledger consulted read-only), with its estimated cost when prices are given."""
    if ctx.get_parameter_source("log_level") in (ParameterSource.DEFAULT, None):
        kw["log_level"] = "warning"  # the report is the output; warnings still say what was skipped
    job, kw = job_or_inputs(ctx, targets, kw)
    opts = build_options({**kw, "dry_run": True, "output": os.devnull}, command="validate", job=job)
    expander, unreadable, skipped = load_and_expand(opts, "validate")
    for line in expander.mapping_lines():
        click.echo(f"columns: {line}")
    shown = 0

    def show_invalid(rows: pl.DataFrame) -> None:
        nonlocal shown
        bad = rows.filter(pl.col("status") == "invalid").head(max(0, show - shown))
        for source, row, label, error in bad.select("source", "row", LABEL, "error").iter_rows():
            click.echo(f"{source}:{row}\t{label or '-'}\t{error}")
        shown += bad.height

    tally = plan(opts, expander, None, show_invalid)
    invalid = tally.counts.get("invalid", 0)
    if invalid > shown:
        click.echo(f"... and {invalid - shown} more invalid requests")
    counts = {("would send" if k == "dry_run" else k): v for k, v in tally.counts.items()}
    summary = {"title": "seedance-batch validate", "counts": counts, "estimate": tally.estimate(),
               "unreadable": [{"source": u.source, "error": u.error} for u in unreadable],
               "passthrough_columns": expander.passthrough_columns(),
               "skipped_files": [{"source": s.source, "reason": s.reason} for s in skipped],
               "uploads": {"files": expander.images.planned[0], "bytes": expander.images.planned[1], "planned": True}}
    click.echo(render(summary))
    sys.exit(1 if invalid or unreadable else 0)


@main.command()
@click.argument("job", required=False, type=click.Path(path_type=Path, dir_okay=False), metavar="[JOB.toml]")
@click.option("--state", envvar="SEEDANCE_BATCH_STATE",
              help=f"The ledger written by submit. [env SEEDANCE_BATCH_STATE; default {default_state_path()}]")
@click.option("--results", metavar="FILE|s3://...",
              help="Follow this results table's tasks and rewrite it from the ledger (tasks the ledger lacks are "
                   "adopted; a job file's output is the default).")
@click.option("--fake-api", is_flag=True, help="Follow the tasks a --fake-api submit made (its own state file).")
@click.option("--download", "download_dir", metavar="DIR|s3://BUCKET/PREFIX/",
              envvar="SEEDANCE_BATCH_DOWNLOAD_DIR", help="Download ready outputs to DIR/<id>_<request_id>.<ext>. "
              "[env SEEDANCE_BATCH_DOWNLOAD_DIR]")
@click.option("--wait", is_flag=True, help="Keep polling until every task is terminal or --timeout passes (default: one pass).")
@click.option("--timeout", "wait_timeout", default="6h", show_default=True, help="With --wait: stop polling after this long.")
@click.option("--poll-interval", type=FiniteFloatRange(0.1), default=10.0, show_default=True,
              help="First wait between polls of a pending task; grows 1.5x per poll up to 10 min.")
@base_url_option()
@api_key_file_option()
@click.option("--rate", default="100/min", show_default=True, envvar="SEEDANCE_BATCH_RATE",
              help="Max polls started, shared per key with submissions: 2/s, 100/min... [env SEEDANCE_BATCH_RATE]")
@click.option("--concurrency", type=click.IntRange(1, 512), default=8, show_default=True, help="Polls in flight.")
@click.option("--download-concurrency", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Downloads in flight.")
@click.option("--http-timeout", type=FiniteFloatRange(1, 3600), default=60.0, show_default=True,
              help="Seconds one poll may take; for downloads, the longest pause between bytes.")
@click.option("--download-max-bytes", type=click.IntRange(1), default=2 << 30, show_default=True,
              help="Largest output file accepted (announced or received).")
@click.option("--download-max-task-bytes", type=click.IntRange(1), default=2 << 30, show_default=True,
              help="Largest total of one task's output files.")
@click.option("--download-timeout", default="30m", show_default=True, help="Longest time one file may take.")
@click.option("--download-min-rate", type=FiniteFloatRange(0), default=16 * 1024, show_default=True,
              help="Bytes/s a download must keep up over every 30 s, or it is cut off (and retried).")
@allow_insecure_option()
@transport_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-html", is_flag=True, help="With --download and --results: do not write the page beside the table.")
@click.option("--prices", "prices_file", type=click.Path(path_type=Path, dir_okay=False),
              envvar="SEEDANCE_BATCH_PRICES", help="Price table for the page's and the message's spend (a job "
              "file's [prices] otherwise). [env SEEDANCE_BATCH_PRICES]")
@notify_option("notify_urls")
@log_option()
@click.pass_context
def collect(ctx: click.Context, job: Path | None, as_json: bool, **kw: Any) -> None:
    """Follow submitted tasks to completion and download their outputs before they expire.

    With JOB.toml, its state, base_url, output (as --results), download and rate are the
    defaults; options win."""
    unset = lambda name: ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None)  # noqa: E731
    opts, spec = collect_options(kw, job, unset)
    summary = collect_night(opts, spec, page=not kw["no_html"])
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(render_collect(summary) + (f"\n  page: {summary['page']}" if summary.get("page") else ""))
    if summary.get("local_fault"):
        logs.report_error(summary["local_fault"], summary["exit_code"])
    notify.finish(summary["exit_code"], summary, summary.get("page"))
    sys.exit(summary["exit_code"])


def collect_options(kw: dict[str, Any], job: Path | None, unset: Callable[[str], bool],
                    command: str = "collect") -> tuple[CollectOptions, JobFile | None]:
    """``collect``'s options (and :func:`batch.collect`'s) resolved once: the job file's
    values where ``unset(name)``, the key, the transport; ``--notify`` armed."""
    state, results, download_dir = kw["state"], kw["results"], kw["download_dir"]
    base_url, rate, proxy, ca_bundle = kw["base_url"], kw["rate"], kw["proxy"], kw["ca_bundle"]
    fake_api, http_timeout = kw["fake_api"], kw["http_timeout"]
    run_tables, spec = None, None
    notify.arm(kw["notify_urls"], command, notify.url_secrets(proxy))
    if results and "{" in results:  # every night's table the followed runs wrote under this name
        run_tables = table_template(results)
        results = dated("--results", results)
    if job is not None:
        spec = read_job(job)
        state = state or spec.get("state")
        if not results and spec.output_template and "{" in spec.output_template:
            run_tables = spec.output_template  # tonight's name may not be last night's: ask the ledger too
        results = results or (str(spec.get("output")) if spec.get("output") else None)
        download_dir = download_dir or (str(spec.get("download")) if spec.get("download") else None)
        base_url = spec.get("base_url", base_url) if unset("base_url") else base_url
        rate = str(spec.get("rate", rate)) if unset("rate") else rate
        proxy = proxy or spec.get("proxy")
        ca_bundle = ca_bundle or spec.get("ca_bundle")
        notify.arm(kw["notify_urls"] or spec.get("notify"), command, notify.url_secrets(proxy))
    key = connection(kw["api_key_file"], base_url, kw["allow_insecure"], kw["log_level"], needs_key=not fake_api)
    config = CollectConfig(
        base_url=base_url, api_key=key, rate=rate_option(rate), concurrency=kw["concurrency"],
        http_timeout=http_timeout, wait=kw["wait"], wait_timeout=parse_duration(kw["wait_timeout"], "--timeout"),
        poll_min=kw["poll_interval"], download_dir=download_location(download_dir),
        download_concurrency=kw["download_concurrency"],
        download=DownloadPolicy(allow_local=fake_api or is_loopback(base_url), max_bytes=kw["download_max_bytes"],
                                task_max_bytes=kw["download_max_task_bytes"],
                                deadline=parse_duration(kw["download_timeout"], "--download-timeout"),
                                min_rate=kw["download_min_rate"], stall=http_timeout),
        transport=transport_of(proxy, ca_bundle),
    )
    default = fake_state_path() if fake_api else default_state_path()
    return CollectOptions(state_location(state) or default, config,
                          Target(no_url("--results", str(results))) if results else None, fake_api,
                          budget_dir=state_home(), run_tables=run_tables,
                          pricing=pricing_of(kw.get("prices_file"), spec)), spec


def collect_night(opts: CollectOptions, spec: JobFile | None, page: bool = True) -> dict[str, Any]:
    """The collect ``collect`` and :func:`batch.collect` share: follow, download, rewrite
    the table, then (with a download and a table) its page; the summary, printed by neither."""
    summary = run_collect(opts)
    structlog.get_logger("batch").info("collect_summary", **summary)
    if opts.results is not None and opts.config.download_dir is not None and page:
        from batch.page import write_page_after  # jinja2 and PyAV: only when a page is made

        pages = []
        pricing = opts.pricing
        for table in summary.get("tables") or []:  # each table collect rewrote gets its page beside it
            written = write_page_after(table, pricing=pricing)
            if written is not None:
                pages.append(written.path)
                if written.spend:
                    summary["spend"] = written.spend
        summary["page"] = ", ".join(pages) or None
    return summary


@main.command()
@click.argument("targets", nargs=-1, metavar="[JOB.toml|INPUT...]")
@common_options
@click.pass_context
def check(ctx: click.Context, targets: tuple[str, ...], **kw: Any) -> None:
    """Before the night: is the key valid, is each model in use listed and active, what is
    the balance (and, with prices, does it cover the estimate)? Read-only and free; one line
    per check; exit 0, or 5 when the provider definitely refuses (for cron's &&)."""
    job, kw = job_or_inputs(ctx, targets, kw)
    opts = build_options({**kw, "output": os.devnull}, command="check", job=job)
    models, estimate = [opts.expand.model], None
    if opts.inputs:
        expander, _, _ = load_and_expand(opts, "check")
        models = expander.models_in_use
        estimate = planned_cost(opts, expander)
    checks = asyncio.run(run_check(opts, models, estimate))
    for c in checks:
        click.echo(c.line())
    sys.exit(EXIT_PROVIDER if fatal(checks) else 0)


@main.group("models", invoke_without_command=True)
@click.pass_context
def models_group(ctx: click.Context) -> None:
    """The models this tool knows (shipped, fetched, added): slug, kind, completeness, fields."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(models_list)


@models_group.command("list")
def models_list() -> None:
    """List the known models; a fetched or added spec wins over the shipped one."""
    catalog = Catalog(models_dir())
    for problem in catalog.problems:
        click.echo(f"unreadable spec: {problem}", err=True)
    for slug in sorted(catalog.models):
        spec = catalog.models[slug]
        click.echo(f"{slug}  {spec.kind}  {spec.origin}, {spec.completeness}"
                   + (f" ({spec.source_date})" if spec.source_date else "")
                   + ("  [this tool's default]" if slug == DEFAULT_MODEL else "")
                   + (f"  [provider's default for {spec.provider_default}]" if spec.provider_default else ""))
        click.echo("    " + ", ".join(f"{n}{'*' if f.required else ''}:{f.type}" for n, f in spec.fields.items()))
        if spec.rules:
            click.echo("    rules: " + ", ".join(spec.rules))
    unknown = {s: k for s, k in names_only().items() if s not in catalog.models}
    if unknown:  # named by the provider, fields stated nowhere: 'models fetch' or 'models add' makes them usable
        click.echo("known by name only (fields not stated; 'models fetch SLUG' or 'models add FILE'): "
                   + ", ".join(f"{s} ({k})" for s, k in sorted(unknown.items())))


@models_group.command("fetch")
@click.argument("slug")
@click.option("--schema-base", default="https://www.modellix.ai", show_default=True,
              help="Where the provider publishes schema documents ({base}/models/{provider}/{model}/api_schema).")
@click.option("--fake-api", is_flag=True, help="Fetch from the bundled fake (for trying it out).")
@allow_insecure_option()
@transport_options
def models_fetch(slug: str, schema_base: str, fake_api: bool, allow_insecure: bool, proxy: str | None,
                 ca_bundle: Path | None) -> None:
    """Download a model's published request schema into the state directory; it then wins
    over the shipped spec. No key is sent: the documents are public pages."""
    logs.configure("warning")
    try:
        slug = check_slug(slug)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not fake_api:
        check_transport(schema_base, allow_insecure, "--schema-base")
    doc, url = asyncio.run(fetch_schema(schema_base, slug, fake_api, transport_of(proxy, ca_bundle)))
    spec = save_spec(models_dir(), doc, "fetched", url, slug)
    click.echo(f"{spec.slug}: {len(spec.fields)} fields ({', '.join(spec.fields)}) from {url}")


async def fetch_schema(base: str, slug: str, fake_api: bool, transport: Transport) -> tuple[Any, str]:
    fake = None
    if fake_api:
        from batch.fake_api import start_fake

        fake = await start_fake()
        base = fake.url
    url = f"{base.rstrip('/')}/models/{slug}/api_schema"
    try:
        async with make_session(2, 60.0, 10.0, transport) as session, \
                session.get(url, allow_redirects=False, proxy=transport.proxy_for(url)) as resp:
            raw = await read_capped(resp, MAX_SPEC_BYTES)
            if resp.status != 200:
                raise ConfigError(f"models fetch {slug}: {url} answered HTTP {resp.status}")
        return json.loads(raw), url
    except (aiohttp.ClientError, TimeoutError, TooLarge, ValueError) as exc:
        raise ConfigError(f"models fetch {slug}: {url}: {describe(exc) if not isinstance(exc, ValueError) else exc}") \
            from None
    finally:
        if fake is not None:
            await fake.close()


@models_group.command("add")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--slug", help="provider/model, when the document does not say.")
def models_add(file: Path, slug: str | None) -> None:
    """Add a model from a schema document file (the provider's api_schema format)."""
    logs.configure("warning")
    try:
        if file.stat().st_size > MAX_SPEC_BYTES:
            raise ConfigError(f"{file}: larger than {MAX_SPEC_BYTES} bytes; not a schema document")
        doc = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{file}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{file}: not JSON ({exc})") from None
    spec = save_spec(models_dir(), doc, "added", str(file), check_slug(slug) if slug else None)
    click.echo(f"{spec.slug}: {len(spec.fields)} fields ({', '.join(spec.fields)}) added")


@main.group("state")
def state_group() -> None:
    """Look after a ledger (the state file)."""


@state_group.command("backup")
@click.argument("dest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--state", envvar="SEEDANCE_BATCH_STATE",
              help=f"The ledger to copy. [env SEEDANCE_BATCH_STATE; default {default_state_path()}]")
def state_backup(dest: Path, state: str | None) -> None:
    """Copy the ledger to DEST safely, even while a run writes to it (SQLite online backup).
    A plain cp of the .sqlite file alone can miss what is still in its -wal companion."""
    logs.configure("warning")
    source = state_location(state) or default_state_path()
    if isinstance(source, PgLocation):
        raise ConfigError(f"--state {source}: a PostgreSQL ledger is backed up with pg_dump (or copied to a "
                          f"SQLite file with 'seedance-batch state copy')")
    dest = local_file("DEST", dest)
    if not source.exists():
        raise StateError(f"{source}: no state file")
    counts = ledger_backup(source, dest)
    click.echo(f"{dest}: {sum(counts.values())} requests ("
               + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")")


@state_group.command("copy")
@click.argument("source", metavar="SRC")
@click.argument("dest", metavar="DST")
def state_copy(source: str, dest: str) -> None:
    """Copy a ledger between stores (a SQLite file or postgresql://...?ledger=NAME), each
    under its lock: requests, runs, the retry lineage, uploads and expiry times; then check
    every table's count (exit 2 on a mismatch). DST must hold none of them yet."""
    from batch.ledger import copy_ledger

    logs.configure("warning")
    src, dst = state_location(source), state_location(dest)
    if src is None or dst is None:
        raise ConfigError("state copy: give SRC and DST")
    if isinstance(src, Path) and not src.exists():
        raise StateError(f"{src}: no state file")
    counts = copy_ledger(src, dst)
    by_status = {k.partition(":")[2]: n for k, n in counts.items() if k.startswith("requests:")}
    others = {"runs": "runs", "task_lineage": "earlier tasks (retry lineage)", "uploads": "uploads",
              "task_expiry": "expiry times"}
    click.echo(f"{dst}: {counts['requests']} requests copied ("
               + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) + "), "
               + ", ".join(f"{counts[t]} {name}" for t, name in others.items()) + "; counts verified")


@main.command()
@click.argument("results", metavar="RESULTS")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--html", "html", metavar="FILE|s3://...", help="Also write the night's page (cards, posters, filters).")
@click.option("--prices", "prices_file", type=click.Path(path_type=Path, dir_okay=False),
              envvar="SEEDANCE_BATCH_PRICES", help="Price table for the page's spend. [env SEEDANCE_BATCH_PRICES]")
def report(results: str, as_json: bool, html: str | None, prices_file: Path | None) -> None:
    """Print the summary of an existing results table; with --html, write its page."""
    try:
        summary = summarize_table(Target(results))
    except ValueError as exc:
        raise ConfigError(f"{results}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"{results}: cannot read results table ({type(exc).__name__})") from None
    if html:
        from batch.page import write_page  # jinja2 and PyAV: only when a page is made

        logs.configure("warning")
        written = write_page(results, html, pricing=pricing_of(prices_file, None), catalog=Catalog(models_dir()))
        summary["page"] = written.path
    text = render(summary) + (f"\n  page: {summary['page']}" if summary.get("page") else "")
    click.echo(json.dumps(summary, ensure_ascii=False) if as_json else text)


@main.command("fake-api")
@click.option("--port", type=click.IntRange(0, 65535), default=8787, show_default=True, help="Port on 127.0.0.1 (0: random).")
@click.option("--latency", type=FiniteFloatRange(0), default=0.0, show_default=True, help="Seconds added to every answer.")
@click.option("--jitter", type=FiniteFloatRange(0), default=0.0, show_default=True,
              help="Extra random seconds, uniform in [0, jitter].")
@click.option("--rate-limit", type=int, help="Answer 429 beyond N requests in any sliding 1-second window.")
@click.option("--fault", "faults", multiple=True, metavar="SPEC",
              help="Inject a fault: KIND[,prob=P][,match=S][,times=N][,retry_after=S][,endpoint=submit|query|download]; "
                   "KIND is an HTTP status or code|badjson|no_task_id|drop|drop_accepted|slow. Repeatable.")
@click.option("--task-delay", type=FiniteFloatRange(0), default=0.0, show_default=True, help="Seconds until a task is terminal.")
@click.option("--api-key", help="Accept only this bearer key (default: any non-empty key).")
def fake_api(port: int, latency: float, jitter: float, rate_limit: int | None, faults: tuple[str, ...],
             task_delay: float, api_key: str | None) -> None:
    """Run the bundled fake API on 127.0.0.1 until SIGINT/SIGTERM."""
    from batch.fake_api import FakeConfig, Fault, start_fake  # aiohttp.web: ~20 ms no real run needs

    try:
        parsed = [Fault.parse(f) for f in faults]
    except ValueError as exc:
        raise ConfigError(f"--fault: {exc}") from None
    config = FakeConfig(api_key=api_key, latency=latency, jitter=jitter, rate_limit=rate_limit,
                        faults=parsed, task_delay=task_delay, record_bodies=False)

    async def serve() -> None:
        server = await start_fake(config, port)
        click.echo(f"fake API listening on {server.url}", nl=True)
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(s, stop.set)
        await stop.wait()
        state = server.state
        click.echo(json.dumps({"requests": len(state.records), "tasks": len(state.tasks)}))
        await server.close()

    try:
        asyncio.run(serve())
    except OSError as exc:
        raise ConfigError(f"fake-api: cannot listen on 127.0.0.1:{port} ({exc.strerror})") from None
