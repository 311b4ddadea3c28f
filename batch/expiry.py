"""When a task's outputs stop being downloadable: the provider's ``result_expires_at``.

The provider's newer client (``Modellix/dsh-modellix``, its prediction client; recorded in
``shared/api/provider-today.md``, "Additions read 2026-12-06") reads a ``result_expires_at``
field on task answers. Its format is not documented, so an ISO 8601 time (with an offset,
or UTC when it has none) and a Unix time in seconds or milliseconds are read; anything else
is ignored with a warning (the 24 h rule of :mod:`batch.following` still holds): an
unreadable expiry never makes a task's answer an error.

Guarantee: the times are kept in their own ledger table, ``task_expiry`` (in either store;
added in place when a writable ledger opens; an older ledger opened read-only simply has
none), one row per request, as UTC ISO text, so ``collect`` can
download the soonest-expiring outputs first and warn about outputs that will be gone
before the next collect.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

# Nightly cron: the next collect is a day away unless told otherwise.
NEXT_COLLECT = 24 * 3600.0
_EARLIEST, _LATEST = datetime(2000, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)


def parse_expiry(value: Any) -> str | None:
    """``result_expires_at`` as UTC ISO text, or ``None`` when it is not a plausible time.

    Never raises: a provider's number no float holds (``10**400``), an infinity, a date
    past year 9999 are "unknown expiry", and a task must not stay undecided over one."""
    try:
        return _parse(value)
    except (OverflowError, OSError, ValueError, TypeError):
        return None


def _parse(value: Any) -> str | None:
    when: datetime | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        if not -1e13 < value < 1e13:  # compared exactly: no float conversion of a huge int
            return None
        seconds = value / 1000 if value > 1e11 else value  # milliseconds, as JavaScript clients send
        when = datetime.fromtimestamp(seconds, UTC)
    elif isinstance(value, str) and 0 < len(value) <= 64:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    if when is None or not _EARLIEST <= when <= _LATEST:
        return None
    return when.astimezone(UTC).isoformat(timespec="seconds")


def seconds_left(expires_at: str | None, now: datetime | None = None) -> float | None:
    if not expires_at:
        return None
    try:
        return (datetime.fromisoformat(expires_at) - (now or datetime.now(UTC))).total_seconds()
    except ValueError:
        return None


def before(expires_at: str | None, horizon: float) -> bool:
    """Will these outputs be gone within ``horizon`` seconds from now?"""
    left = seconds_left(expires_at)
    return left is not None and left < horizon


def sort_key(expires_at: str | None) -> str:
    """Soonest first; a task without a stated expiry after every one with."""
    return expires_at or (datetime.now(UTC) + timedelta(days=36500)).isoformat()
