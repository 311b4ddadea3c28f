"""The Python API: :func:`submit` and :func:`collect` (``batch.submit``, ``batch.collect``)
for notebooks and orchestrators.

Guarantees:

* **The CLI's run, not a second one.** Each keyword is the CLI option of the same name
  (``--max-spend`` is ``max_spend``), converted and checked by that option's own type and
  defaulted to its default (environment variables are not read, except the API key's); the
  options are then resolved by the builders the CLI uses (:func:`batch.cli.build_options`,
  :func:`batch.cli.collect_options`) and the run is the CLI's (:func:`batch.cli.submit_night`,
  :func:`batch.cli.collect_night`): same ledger, lock, probes, preflight, key scrubbing,
  notifications and page.
* **A DataFrame is an input like a file.** Each polars DataFrame is one more source
  (``source``, by default ``dataframe``) read as a Parquet file's rows are and validated and
  expanded by the same code (:func:`batch.load.frame_table`).
* **Exceptions, never ``SystemExit``.** A finished run (exit 0, or 1: some requests or tasks
  not OK) returns a :class:`Night`; every other outcome raises the :class:`~batch.errors.BatchError`
  subclass whose ``exit_code`` the CLI would have exited with; one raised after the run
  started sending carries its ``summary`` (and ``results`` when the table could be read).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Any

import click
import polars as pl

from batch import cli
from batch import notify as notices  # not `notify`: that is a keyword of submit and collect
from batch.errors import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_LOCAL_FAULT,
    EXIT_OK,
    EXIT_PROVIDER,
    BatchError,
    ConfigError,
    InputError,
    LocalFaultError,
    ProviderError,
    StoppedError,
)
from batch.expand import normalize
from batch.load import SUFFIXES
from batch.pipeline import Interrupted
from batch.results import read_results
from batch.storage import Target

_UNSET = getattr(click.core, "UNSET", None)  # click's "no default" marker (absent before 8.3: None)

Inputs = str | Path | pl.DataFrame | pl.LazyFrame | Iterable[str | Path | pl.DataFrame | pl.LazyFrame]


@dataclass(frozen=True)
class Night:
    """What a run returns: the results table as written (one row per request, with its
    ``status``, ``task_id`` and, after a download, ``local_path``) and the summary (the
    dict the CLI prints with ``--json``; ``exit_code`` is the CLI's exit code)."""

    results: pl.DataFrame
    summary: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return int(self.summary["exit_code"])

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK


@contextlib.contextmanager
def _told(stopped: str) -> Iterator[None]:
    """A night that ends early as an exception, after the notification the CLI would send;
    an interruption becomes :class:`StoppedError` (``stopped`` says what it left behind)."""
    try:
        yield
    except BatchError as exc:
        notices.fatal(exc.exit_code, str(exc))
        raise
    except Interrupted as exc:
        notices.fatal(EXIT_INTERRUPTED, f"interrupted by {exc}")
        raise StoppedError(f"interrupted by {exc}{stopped}") from None


def submit(
    inputs: Inputs, *, output: str | Path, source: str = "dataframe",
    state: str | Path | None = None, base_url: str | None = None, model: str | None = None,
    endpoint: str | None = None, api_key_file: str | Path | None = None, rate: str | None = None,
    concurrency: int | None = None, tier: str | None = None,
    param: Mapping[str, Any] | Iterable[str] | None = None, passthrough: Iterable[str] | None = None,
    dry_run: bool = False, fake_api: bool = False, resend_unknown: bool = False,
    results_from: Iterable[str | Path] | None = None, moved_from: Iterable[str] | None = None,
    max_attempts: int | None = None, timeout: float | None = None,
    retry_failed: bool = False, retry_cap: int | None = None, max_requests: int | None = None,
    deadline: str | None = None, grace: float | None = None, sheet: str | None = None,
    header_row: int | None = None, encoding: str | None = None, allow_insecure: bool = False,
    proxy: str | None = None, ca_bundle: str | Path | None = None, metrics_file: str | Path | None = None,
    progress_interval: float | None = None, prices: str | Path | None = None, max_spend: float | None = None,
    no_preflight: bool = False, wait: bool = False, wait_timeout: str | None = None,
    download: str | Path | None = None, no_html: bool = False, notify: Iterable[str] | None = None,
    log_level: str | None = None,
) -> Night:
    """Validate, expand and submit ``inputs`` as ``seedance-batch submit`` does.

    ``inputs``: a path, glob, directory or bucket URL, a polars DataFrame, or a list of
    them; each DataFrame is a source named ``source`` (``source[2]``... when several).
    ``param`` takes ``FIELD=V1,V2`` texts like ``--param``, or a mapping ``{field: value or
    list}`` like a job file's ``[params]`` (a list expands into a grid). Every other keyword
    is the CLI option of that name; ``None`` means its default.

    Returns a :class:`Night`; raises :class:`~batch.errors.InputError`,
    :class:`~batch.errors.ConfigError`, :class:`~batch.errors.StateError` (nothing sent),
    :class:`~batch.errors.LockedError`, :class:`~batch.errors.ProviderError`,
    :class:`~batch.errors.StoppedError` or :class:`~batch.errors.LocalFaultError`.
    """
    given = {name: value for name, value in locals().items() if name not in ("inputs", "source")}
    grid = given.pop("param") if isinstance(param, Mapping) else None
    specs, frames = _split_inputs(inputs, source)
    kw = _cli_options(cli.submit, given)
    _arm(kw["notify"], kw["proxy"], "submit (Python API)")
    with _told("; nothing was sent that the ledger does not record"):
        opts = cli.build_options({**kw, "inputs": specs}, command="submit")
        if grid is not None:
            opts = replace(opts, expand=replace(opts.expand, params={**opts.expand.params, **_params(grid)}))
        summary, data = cli.submit_night(replace(opts, frames=frames), kw["metrics_file"], "python",
                                         page=not kw["no_html"])
    notices.finish(summary.exit_code, data, data.get("page"))
    return _night(data, data.get("results") or None, summary.table_written or opts.dry_run)


def collect(
    job: str | Path | None = None, *, results: str | Path | None = None, state: str | Path | None = None,
    fake_api: bool = False, download: str | Path | None = None, wait: bool = False, timeout: str | None = None,
    poll_interval: float | None = None, base_url: str | None = None, api_key_file: str | Path | None = None,
    rate: str | None = None, concurrency: int | None = None, download_concurrency: int | None = None,
    http_timeout: float | None = None, download_max_bytes: int | None = None,
    download_max_task_bytes: int | None = None, download_timeout: str | None = None,
    download_min_rate: float | None = None, allow_insecure: bool = False, proxy: str | None = None,
    ca_bundle: str | Path | None = None, no_html: bool = False, prices: str | Path | None = None,
    notify: Iterable[str] | None = None, log_level: str | None = None,
) -> Night:
    """Follow submitted tasks (and download their outputs) as ``seedance-batch collect``
    does; ``job`` is a job file (its state, output, download and rate are the defaults),
    every keyword the CLI option of that name (``timeout`` is ``--timeout``: how long
    ``wait`` polls). With ``download`` and ``results`` the page is written beside the
    table unless ``no_html``.

    Returns a :class:`Night` whose ``results`` is the rewritten results table (empty when
    no table was named: the ledger alone was followed); raises as :func:`submit` does.
    """
    given = {name: value for name, value in locals().items() if name != "job"}
    kw = _cli_options(cli.collect, given)
    _arm(kw["notify_urls"], kw["proxy"], "collect (Python API)")
    with _told(""):
        job_path = cli.local_file("JOB", job) if job is not None else None
        opts, spec = cli.collect_options(kw, job_path, lambda name: given.get(_api_name(cli.collect, name)) is None,
                                         command="collect (Python API)")
        summary = cli.collect_night(opts, spec, page=not kw["no_html"])
    notices.finish(summary["exit_code"], summary, summary.get("page"))
    return _night(summary, str(opts.results) if opts.results is not None else None, opts.results is not None)


def _arm(urls: Iterable[str], proxy: str | None, command: str) -> None:
    notices.arm(None, "")  # a notebook runs many nights in one process: nothing armed carries over
    notices.arm(urls, command, notices.url_secrets(proxy))


def _split_inputs(inputs: Inputs, source: str) -> tuple[list[str], tuple[tuple[str, pl.DataFrame], ...]]:
    """Paths and URLs (as the CLI's arguments) apart from DataFrames (named sources)."""
    single = (str, Path, pl.DataFrame, pl.LazyFrame, Mapping)
    items = [inputs] if isinstance(inputs, single) or not isinstance(inputs, Iterable) else list(inputs)
    specs, frames = [], []
    for item in items:
        if isinstance(item, pl.LazyFrame):
            item = item.collect()
        if isinstance(item, pl.DataFrame):
            frames.append(item)
        elif isinstance(item, Mapping):  # iterated, its keys ("prompt") were taken for file names
            raise InputError("inputs: a dict is not a table; pass polars.DataFrame(...) (e.g. "
                             "polars.DataFrame({'prompt': [...]}))")
        elif isinstance(item, str) and not _path_like(item):
            shown = item if len(item) <= 60 else item[:57] + "..."
            raise InputError(f"inputs: {shown!r} is not a path, a URL or a DataFrame (no such file or directory); "
                             "for prompts as text, pass polars.DataFrame({'prompt': [...]})")
        elif isinstance(item, (str, Path)):
            specs.append(_text("inputs", str(item)))
        else:
            hint = " (pandas: pass polars.from_pandas(df))" if type(item).__module__.startswith("pandas") else ""
            raise InputError(f"inputs: {type(item).__name__} is neither a path, a URL nor a polars DataFrame{hint}")
    name = _text("source", source).strip()
    if not name:
        raise ConfigError("source: empty name for the DataFrame input")
    named = [(name if len(frames) == 1 else f"{name}[{i}]", df) for i, df in enumerate(frames, 1)]
    return specs, tuple(named)


def _path_like(text: str) -> bool:
    """Whether a string given as an input may name one: a URL, a glob, something that
    exists, or a file name of a kind the loader reads (a missing one is then its own
    "no such file" error). Anything else is text, most likely a prompt."""
    if "://" in text or any(c in text for c in "*?[") or "\x00" in text:
        return True  # a NUL is refused by _text with its own message
    try:
        if os.path.exists(text):
            return True
    except (OSError, ValueError):
        return False
    return PurePath(text).suffix.lower() in SUFFIXES


def _params(grid: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping of job-level values, as a job file's ``[params]`` holds them."""
    out = {}
    for name, value in grid.items():
        field = normalize(_text("param", str(name)))
        if not field:
            raise ConfigError(f"param {name!r}: empty field name")
        out[field] = list(value) if isinstance(value, tuple) else value
    return out


def _text(option: str, value: str) -> str:
    if "\x00" in value:  # every path and URL function would raise on it
        raise ConfigError(f"{option}: a value contains a NUL character")
    return value


def _api_name(command: click.Command, name: str) -> str:
    """The keyword of a CLI parameter: its long option without dashes (``--download`` is
    ``download`` whatever the parameter is called inside the CLI)."""
    param = next(p for p in command.params if p.name == name)
    return max(param.opts, key=len).lstrip("-").replace("-", "_")


def _cli_options(command: click.Command, given: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords as the CLI command's parameters: each converted and checked by its
    option's own click type (a bad value is a :class:`ConfigError` naming the option),
    each left ``None`` given the option's default."""
    ctx = click.Context(command)
    kw: dict[str, Any] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        key = _api_name(command, param.name)
        value = given.get(key)
        if value is None:
            value = param.get_default(ctx)
            if value is _UNSET:  # click >= 8.3: an option without a default
                value = None
        elif isinstance(value, str):
            value = _text(f"--{key.replace('_', '-')}", value)
        elif param.multiple and isinstance(value, (str, Path)):
            value = [value]
        try:
            kw[param.name] = param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise ConfigError(f"{key}={value!r}: {exc.message}") from None
    unknown = set(given) - {_api_name(command, p.name) for p in command.params if p.name}
    if unknown:  # a keyword the CLI does not have: the signature and the CLI have drifted apart
        raise TypeError(f"{command.name}: no CLI option for {sorted(unknown)}")
    return kw


def _night(summary: dict[str, Any], table: str | None, written: bool) -> Night:
    """The run's outcome as the CLI's exit code says: 0/1 return, 4/5/6 raise."""
    code = summary["exit_code"]
    results = _read_back(table, summary) if table and written else None
    if code in (EXIT_OK, EXIT_INCOMPLETE):
        if results is None and table and written:
            raise _with(LocalFaultError(f"{table}: the results table cannot be read back; the ledger "
                                        f"{summary.get('state')} holds every outcome"), summary, None)
        return Night(results if results is not None else pl.DataFrame(), summary)
    kind = {EXIT_INTERRUPTED: StoppedError, EXIT_PROVIDER: ProviderError, EXIT_LOCAL_FAULT: LocalFaultError}
    reason = summary.get("local_fault") or summary.get("interrupted") or summary.get("stop_reason") or ""
    top = summary.get("top_errors") or []
    if not reason and top:
        reason = top[0]["error"] if isinstance(top[0], dict) else str(top[0])
    message = f"exit {code}: {reason or 'see the summary'}; results: {summary.get('results') or '-'}"
    raise _with(kind.get(code, BatchError)(message), summary, results)


def _read_back(table: str, summary: dict[str, Any]) -> pl.DataFrame | None:
    try:
        return read_results(Target(table))
    except Exception:  # the run is over; a table that cannot be read is said by the caller
        return None


def _with(exc: BatchError, summary: dict[str, Any], results: pl.DataFrame | None) -> BatchError:
    exc.summary, exc.results = summary, results
    return exc


__all__ = ["Night", "collect", "submit"]
