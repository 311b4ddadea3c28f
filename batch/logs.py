"""structlog set-up: JSON lines on stderr for cron, readable console lines on a TTY.

Guarantee: off a TTY every line on stderr is one JSON event. Our own events go through
structlog; the standard library's logging (aiohttp, asyncio) and Python warnings
(polars, pyarrow) are routed through the same renderer; the one-line error of a failed
command is an ``error`` event (:func:`report_error`). Every event passes the redactor,
so not even a library's message can carry the key.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import structlog

from batch.client import Secret

LEVELS = ("debug", "info", "warning", "error")
_SECRETS: list[str] = []  # every secret this process was configured with (batch.notify scrubs them too)


def known_secrets() -> list[str]:
    return list(_SECRETS)


_keys: list[Secret] = []  # the process's keys, as configure() was given them
# Other secrets met at start (a database password: batch.ledger.postgres), replaced as
# written and percent-encoded; kept across configure() calls.
_plain: list[str] = []


def add_plain_secrets(values: list[str]) -> None:
    """Scrub ``values`` too from every event and error from now on (longest first)."""
    _plain.extend(v for v in values if v and v not in _plain)
    _plain.sort(key=len, reverse=True)


def _scrub_plain(text: str) -> str:
    from urllib.parse import quote

    for secret in _plain:
        for form in (secret, quote(secret, safe=""), quote(secret)):
            text = text.replace(form, "***")
    return text


def scrub(text: str) -> str:
    """``text`` with this process's keys scrubbed (:meth:`batch.client.Secret.scrub`)."""
    for secret in _keys:
        text = secret.scrub(text)
    return _scrub_plain(text)


def _scrubbed(value: Any, keys: list[Secret]) -> Any:
    """``value`` with every string in it scrubbed, nested lists and dicts too (a summary
    or an answer logged whole)."""
    if isinstance(value, str):
        for secret in keys:
            value = secret.scrub(value)
        return _scrub_plain(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v, keys) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrubbed(v, keys) for v in value]
    return value


# JSON leaves these unescaped, yet each ends a line for str.splitlines and many log
# shippers: escaped, an event stays one line whatever text a user or server supplied.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def one_line_json(obj: Any, **kw: Any) -> str:
    text = json.dumps(obj, **kw)
    for char, escaped in _LINE_BREAKS.items():
        text = text.replace(char, escaped)
    return text


def _redactor(secrets: list[str]) -> Any:
    keys = [Secret(s) for s in secrets]

    def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # Defence in depth: provider text is scrubbed where it enters (batch.client), but
        # an exception or a library message could still echo the key; the same scrubber,
        # so every case and encoding of the key goes here too.
        for key, value in event.items():
            event[key] = _scrubbed(value, keys)
        return event

    return redact


# True while a command runs (set by batch.cli's command group): the command owns the process's
# logging. False for the Python API (batch.submit/collect), whose caller owns it.
command = False


def json_stderr() -> bool:
    return not sys.stderr.isatty()


def configure(level: str = "info", json_lines: bool | None = None, secrets: list[str] | None = None) -> None:
    """Configure structlog (and stdlib logging, and warnings) for this process;
    ``json_lines=None`` decides by stderr being a TTY. Outside a command (see :data:`command`)
    only the ``batch`` stdlib logger is configured, never the root logger."""
    if json_lines is None:
        json_lines = json_stderr()
    _SECRETS.extend(s for s in secrets or [] if s and s not in _SECRETS)
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=one_line_json, ensure_ascii=False) if json_lines
        else structlog.dev.ConsoleRenderer(colors=True)
    )
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redactor([s for s in (secrets or []) if s]),
    ]
    _keys[:] = [Secret(s) for s in (secrets or []) if s]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # The standard library's loggers (aiohttp, asyncio's "Task was destroyed...") and
    # warnings (polars, pyarrow) render through the same processors.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
    ))
    stdlib_level = max(logging.WARNING, getattr(logging, level.upper()))
    if not command:
        # Called as a library (a notebook, a DAG task): the caller's logging is the caller's.
        # Only the tool's own stdlib logger gets our handler; the root logger, its level and
        # warnings.showwarning are left exactly as they were.
        own = logging.getLogger("batch")
        own.handlers[:] = [handler]
        own.setLevel(stdlib_level)
        own.propagate = False
        return
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(stdlib_level)
    logging.captureWarnings(True)


def report_error(message: str, exit_code: int) -> None:
    """The one line a failed command leaves on stderr: a JSON ``error`` event off a TTY."""
    message = scrub(message)  # it may quote a URL or an answer
    if json_stderr():
        event = {"event": "error", "level": "error", "error": message, "exit_code": exit_code,
                 "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
        print(one_line_json(event, ensure_ascii=False), file=sys.stderr, flush=True)
    else:
        flat = "".join(repr(c)[1:-1] if c in _LINE_BREAKS or not c.isprintable() else c for c in message)
        print(f"seedance-batch: error: {flat}", file=sys.stderr, flush=True)
