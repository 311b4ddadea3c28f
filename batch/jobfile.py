"""Declarative job files (TOML) for ``seedance-batch run`` and ``validate``.

Every key is checked: an unknown key or a value of the wrong type is a
:class:`~batch.errors.ConfigError` naming the key and the file, never silently ignored.
Relative paths are resolved against the job file's directory, so cron's working
directory does not matter. ``output`` may contain ``{date}`` (the run's local date,
``YYYY-MM-DD``) and ``{datetime}`` (``YYYY-MM-DDTHHMMSS``).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from batch.errors import ConfigError
from batch.ledger import night_of
from batch.models import normalize_name
from batch.storage import is_remote
from batch.validate import TIERS

# key -> (accepted types, description for errors)
_TOP: dict[str, tuple[tuple[type, ...], str]] = {
    "inputs": ((list, str), "a list of files, directories or globs"),
    "output": ((str,), "a results path (.parquet or .csv)"),
    "state": ((str,), "a state file path or a postgresql:// URL"),
    "sheet": ((str, int, list), "a workbook sheet name or number, a list of them, or \"all\""),
    "header_row": ((int,), "the 1-based row of the header (1 to 20)"),
    "encoding": ((str,), "the encoding of CSV/TSV inputs that are not UTF-8 (e.g. cp1252)"),
    "base_url": ((str,), "a URL"),
    "model": ((str,), "a model slug provider/model"),
    "endpoint": ((str,), "a route form (seed, async, v1) or a URL template"),
    "moved_from": ((list, str), "base URLs this ledger's requests were sent to before"),
    "tier": ((str,), f"one of {', '.join(TIERS)}"),
    "rate": ((str, int, float), "a rate such as 100/min"),
    "concurrency": ((int,), "an integer"),
    "max_attempts": ((int,), "an integer"),
    "timeout": ((int, float), "seconds"),
    "max_requests": ((int,), "an integer"),
    "deadline": ((str,), "a duration or clock time"),
    "grace": ((int, float), "seconds"),
    "id_column": ((str,), "a column name"),
    "passthrough": ((list, str), "columns kept as they are although they resemble an API field"),
    "prompt_template": ((str,), "a template with {column} placeholders"),
    "metrics_file": ((str,), "a path"),
    "download": ((str,), "a directory for collect's downloads"),
    "proxy": ((str,), "a proxy URL http://[user:password@]host:port"),
    "ca_bundle": ((str,), "a PEM file of certificate authorities to trust"),
    "columns": ((dict,), "a table mapping input columns to API fields"),
    "params": ((dict,), "a table of API field values"),
    "prices": ((dict,), "tables of model slug -> resolution = USD per second"),
    "prices_file": ((str,), "a TOML price table"),
    "max_spend": ((int, float), "USD"),
    "preflight": ((bool,), "true or false"),
    "notify": ((list, str), "Apprise URLs told when a run or collect ends"),
    "retry_failed": ((bool,), "true or false"),
    "retry_cap": ((int,), "an integer (tasks per request in all)"),
}
# The number keys and the ranges their command-line options accept (batch.cli).
_NUMBER_RANGES: dict[str, tuple[float, float | None]] = {"timeout": (1, 3600), "grace": (0, 3600), "max_spend": (0, None)}
PATH_KEYS = ("output", "state", "metrics_file", "prices_file", "download", "ca_bundle")


@dataclass(frozen=True)
class JobFile:
    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    # ``output`` before {date}/{datetime} were filled in (resolved like the other paths):
    # collect finds the tables of earlier nights by it.
    output_template: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def fill_output(text: str, now: datetime | None = None) -> str:
    """A results path with ``{date}`` (the night, :func:`batch.ledger.night_of`, the date
    the spend cap counts) and ``{datetime}`` filled in: the one definition for a job's
    ``output`` and the command line's ``-o``/``--results``. Other braces are an error."""
    now = now or datetime.now()
    try:
        return text.format(date=night_of(now), datetime=now.strftime("%Y-%m-%dT%H%M%S"))
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(f"only {{date}} and {{datetime}} may be used ({type(exc).__name__}: {exc})") from None


def _fail(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {message}")


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def load_job(path: Path, now: datetime | None = None, known_fields: Iterable[str] = (),
             aliases: Iterable[str] = ()) -> JobFile:
    """Read and check a job file; ``known_fields`` (every model's, :mod:`batch.models`)
    lets ``[params]`` and ``[columns]`` name only API fields, or their header synonyms
    (``aliases``)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read job file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _TOP:
            raise _fail(path, key, f"unknown key (known: {', '.join(sorted(_TOP))})")
        types, what = _TOP[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise _fail(path, key, f"expected {what}, got {type(value).__name__}")
        if _holds_nul(value):  # TOML allows "\u0000"; no path, URL or prompt setting may hold one
            raise _fail(path, key, "contains a NUL character")
        values[key] = value
    for key, (low, high) in _NUMBER_RANGES.items():
        number = values.get(key)
        # TOML has nan and inf: either would pass a range check and make a cap or a timeout none.
        if number is not None and not (math.isfinite(number) and low <= number and (high is None or number <= high)):
            raise _fail(path, key, f"expected a number from {low:g}" + (f" to {high:g}" if high else " up")
                        + f", got {number!r}")
    base = path.parent
    inputs = values.get("inputs", [])
    if isinstance(inputs, str):
        inputs = [inputs]
    if not all(isinstance(i, str) for i in inputs):
        raise _fail(path, "inputs", "expected a list of strings")
    values["inputs"] = [i if is_remote(i) else os.path.normpath(base / i) for i in inputs]
    now = now or datetime.now()
    template = values.get("output")
    if isinstance(template, str) and not is_remote(template):
        template = os.path.abspath(os.path.normpath(base / template))
    for key in PATH_KEYS:
        if key in values:
            text = values[key]
            if key == "output":
                try:
                    text = fill_output(text, now)
                except ValueError as exc:
                    raise _fail(path, key, str(exc)) from None
            # A bucket URL is kept as written: a path join would fold its "//".
            keep = is_remote(text) or (key == "state" and text.startswith(("postgresql://", "postgres://")))
            values[key] = text if keep else Path(os.path.normpath(base / text))
    if "tier" in values and values["tier"] not in TIERS:
        raise _fail(path, "tier", f"expected one of {', '.join(TIERS)}, got {values['tier']!r}")
    known = {normalize_name(f) for f in known_fields}
    named = known | {normalize_name(a) for a in aliases}
    targets = named | {normalize_name(values.get("id_column", "id")), "model"}
    for src, dst in values.get("columns", {}).items():
        if not isinstance(dst, str) or (known and normalize_name(dst) not in targets):
            raise _fail(path, f"columns.{src}", "must name an API field, the id column or model")
    for name, value in values.get("params", {}).items():
        if known and normalize_name(name) not in named:
            raise _fail(path, f"params.{name}", f"unknown API field (known: {', '.join(sorted(known))})")
        items = value if isinstance(value, list) else [value]
        if not items or any(isinstance(v, dict) for v in items):
            raise _fail(path, f"params.{name}", "expected a value or a list of values")
    for key in ("passthrough", "moved_from", "notify"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
        if not all(isinstance(v, str) for v in values.get(key, [])):
            raise _fail(path, key, "expected a list of strings")
    if "sheet" in values:
        sheets = values["sheet"] if isinstance(values["sheet"], list) else [values["sheet"]]
        if not sheets or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in sheets):
            raise _fail(path, "sheet", "expected a sheet name or number, or a list of them")
        values["sheet"] = ",".join(str(v) for v in sheets)
    if "header_row" in values and not (isinstance(values["header_row"], int) and 1 <= values["header_row"] <= 20):
        raise _fail(path, "header_row", "expected a row number from 1 to 20")
    return JobFile(path, values, template)
