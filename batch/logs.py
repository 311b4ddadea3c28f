"""structlog set-up: JSON lines on stderr for cron, readable console lines on a TTY."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error")


def _redactor(secrets: list[str]) -> Any:
    def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # Defence in depth: no code path logs the key, but a provider message or an
        # exception text could echo it back.
        for key, value in event.items():
            if isinstance(value, str):
                for secret in secrets:
                    if secret and secret in value:
                        value = value.replace(secret, "***")
                event[key] = value
        return event

    return redact


def configure(level: str = "info", json_lines: bool | None = None, secrets: list[str] | None = None) -> None:
    """Configure structlog for this process; ``json_lines=None`` decides by stderr being a TTY."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer(ensure_ascii=False) if json_lines
        else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redactor([s for s in (secrets or []) if s]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
