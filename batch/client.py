"""One HTTP attempt against the API, and what it means.

:func:`classify` maps an HTTP answer to a :class:`Verdict`; :func:`post_once` makes
one attempt and never raises for a network problem. The decisive question for a
paid, non-idempotent submission is whether the provider *may* have accepted it:

* ``OK``        HTTP 2xx, ``code == 0`` and a non-empty ``data.task_id``.
* ``RETRY``     certainly not accepted, transient: 429, 503, or a connection that
                could not be set up (so nothing was written).
* ``FAIL``      certainly not accepted, permanent: 400/403/404/413/422, another 4xx,
                or HTTP 200 with ``code != 0``.
* ``FATAL``     401 (bad key), 402 (no balance): nothing else can succeed.
* ``UNKNOWN``   the task may exist: 500/502/504 and other 5xx, a timeout or dropped
                connection once connected, a 2xx without a usable
                task id or with a body that is not JSON.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import aiohttp

from batch.api import SUBMIT_PATH


class Secret:
    """An API key that does not print itself: ``repr``/``str`` show ``***``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


class Kind(Enum):
    OK = "ok"
    RETRY = "retry"
    FAIL = "fail"
    FATAL = "fatal"
    UNKNOWN = "unknown"


@dataclass(slots=True)
class Verdict:
    kind: Kind
    http_status: int | None = None
    task_id: str | None = None
    error: str | None = None
    error_code: int | None = None
    retry_after: float | None = None  # seconds the provider asked us to wait
    data: dict[str, Any] | None = None  # ``data`` of a successful answer


PERMANENT = frozenset({400, 403, 404, 413, 422})
TRANSIENT = frozenset({429, 503})
FATAL_STATUSES = frozenset({401, 402})
MAX_RETRY_AFTER = 600.0


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds before retry ``attempt`` (1-based): exponential with "equal jitter" (AWS
    architecture blog), at least half the step so retries never hammer, spread so that
    workers do not retry in step."""
    step = min(cap, base * 2 ** (attempt - 1))
    return random.uniform(step / 2, step)


def retry_after_seconds(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait per ``Retry-After`` (seconds or HTTP date) or ``X-RateLimit-Reset``."""
    now = time.time() if now is None else now
    waits: list[float] = []
    value = headers.get("Retry-After")
    if value:
        value = value.strip()
        try:
            waits.append(float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                waits.append(when.timestamp() - now)
            except (TypeError, ValueError, IndexError):
                pass
    reset = headers.get("X-RateLimit-Reset")
    if reset:
        try:
            number = float(reset.strip())
            # Providers send either an epoch timestamp or a delta in seconds.
            waits.append(number - now if number > 1e9 else number)
        except ValueError:
            pass
    if not waits:
        return None
    return min(max(max(waits), 0.0), MAX_RETRY_AFTER)


def _provider_message(raw: bytes, fallback: str) -> tuple[str, int | None]:
    try:
        body = json.loads(raw)
    except ValueError:
        return fallback, None
    if isinstance(body, dict):
        message = body.get("message")
        code = body.get("code")
        return (str(message)[:300] if message else fallback), (code if isinstance(code, int) else None)
    return fallback, None


def classify(status: int, raw: bytes, headers: Any) -> Verdict:
    """What an HTTP answer to a submission or query means (see the module docstring)."""
    if 200 <= status < 300:
        try:
            body = json.loads(raw)
        except ValueError:
            return Verdict(Kind.UNKNOWN, status, error=f"HTTP {status} with a body that is not JSON")
        if not isinstance(body, dict) or "code" not in body:
            return Verdict(Kind.UNKNOWN, status, error=f"HTTP {status} without a 'code' field")
        code = body.get("code")
        if code == 0:
            data = body.get("data")
            task_id = data.get("task_id") if isinstance(data, dict) else None
            if isinstance(task_id, str) and task_id.strip():
                return Verdict(Kind.OK, status, task_id=task_id, data=data)
            return Verdict(Kind.UNKNOWN, status, error=f"HTTP {status}, code 0 but no task_id")
        message = str(body.get("message") or "rejected")[:300]
        return Verdict(Kind.FAIL, status, error=message, error_code=code if isinstance(code, int) else None)
    message, code = _provider_message(raw, f"HTTP {status}")
    code = code if code is not None else status
    if status in TRANSIENT:
        return Verdict(Kind.RETRY, status, error=message, error_code=code,
                       retry_after=retry_after_seconds(headers))
    if status in FATAL_STATUSES:
        return Verdict(Kind.FATAL, status, error=message, error_code=code)
    if status in PERMANENT or 400 <= status < 500:
        return Verdict(Kind.FAIL, status, error=message, error_code=code)
    return Verdict(Kind.UNKNOWN, status, error=message, error_code=code)


def make_session(concurrency: int, timeout: float, connect_timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=10)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout),
        raise_for_status=False,
        # A bearer-key API sets no cookies we need, and pre-signed download URLs must not
        # receive any: a dummy jar also skips cookie filtering on every request and answer.
        cookie_jar=aiohttp.DummyCookieJar(),
    )


# Raised only while a connection is being set up (DNS, TCP, TLS, connect timeout): the
# request cannot have been written. Everything after that point may have reached the
# provider. (An on_request_headers_sent trace would tell the same story for a little
# more precision, at 10-15% of the client's throughput, measured with benchmarks/bench.py.)
NOT_SENT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def _describe(exc: BaseException) -> str:
    # The type and the OS reason only: aiohttp's messages may quote the request.
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout"
    reason = getattr(exc, "strerror", None) or getattr(exc, "os_error", None)
    name = type(exc).__name__
    return f"{name}: {reason}" if isinstance(reason, str) and reason else name


async def request_once(
    session: aiohttp.ClientSession, method: str, url: str, key: Secret, body: bytes | None = None
) -> Verdict:
    """One attempt; a network failure becomes RETRY (nothing sent) or UNKNOWN (maybe sent)."""
    headers = {"Authorization": f"Bearer {key.reveal()}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        async with session.request(
            method, url, data=body, headers=headers, allow_redirects=False
        ) as response:
            raw = await response.read()
            return classify(response.status, raw, response.headers)
    except NOT_SENT_ERRORS as exc:
        return Verdict(Kind.RETRY, error=f"connection failed before sending ({_describe(exc)})")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Verdict(Kind.UNKNOWN, error=f"no answer after sending ({_describe(exc)})")


def submit_url(base_url: str) -> str:
    return base_url.rstrip("/") + SUBMIT_PATH
