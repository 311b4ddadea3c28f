"""The preflight: what can be known about tonight before anything is paid for.

Three read-only, free questions, asked of the endpoints the provider's official CLI uses
(``provider-today.md``): is the key valid (``GET /api/v1/apikey/validate``), is each
model in use listed and active (``GET /api/v1/models``), what is the balance
(``GET /api/v1/team/balance``, USD) and, with prices, will it cover the estimate.

Guarantee: a *definite* "key invalid", "model not listed" or "balance is zero" stops the
run before it sends anything (:class:`batch.errors.ProviderError`, exit 5). An endpoint
that is not there (404) or does not answer is a warning, never a stop: the seed's host
may not serve them, and a preflight must not cost a night that would have worked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from batch.client import Kind, Secret, Transport, Verdict, backoff_delay, make_session, request_once
from batch.ratelimit import SmoothLimiter

FAIL, WARN, OK = "FAIL", "warn", "ok"


@dataclass(frozen=True)
class Check:
    name: str
    outcome: str  # ok, warn, FAIL
    detail: str

    def line(self) -> str:
        return f"{self.outcome:<5} {self.name:<8} {self.detail}"


async def _get(session: Any, base_url: str, path: str, key: Secret, limiter: SmoothLimiter | None,
               transport: Transport | None) -> Verdict:
    """A GET, retried on 429/5xx/timeouts a few times (it is idempotent and free), taking
    its turn in the key's budget like every request: passing only the window guard, the
    checks' starts would later hold back (and then bunch) the night's first submissions."""
    verdict = Verdict(Kind.UNKNOWN)
    for attempt in range(1, 4):
        if limiter is not None:
            await limiter.acquire()
        verdict = await request_once(session, "GET", base_url.rstrip("/") + path, key, transport=transport)
        if verdict.kind is Kind.FATAL and verdict.http_status is None:
            return verdict  # TLS or proxy credentials: no retry helps
        if verdict.kind in (Kind.OK, Kind.FAIL, Kind.FATAL) or (verdict.http_status or 0) // 100 == 2:
            return verdict
        await asyncio.sleep(min(verdict.retry_after or 0, 5) or backoff_delay(attempt, 0.5, 4))
    return verdict


def _unreachable(name: str, verdict: Verdict) -> Check:
    if verdict.http_status == 404:
        return Check(name, WARN, "this host does not serve the endpoint (HTTP 404): not checked")
    return Check(name, WARN, f"no usable answer ({verdict.error or verdict.http_status}): not checked")


def _data(verdict: Verdict) -> Any:
    body = verdict.body
    return body.get("data") if isinstance(body, dict) else None


def check_key(verdict: Verdict) -> Check:
    if verdict.kind is Kind.FATAL and verdict.http_status is None:
        return Check("key", FAIL, str(verdict.error))  # TLS not trusted, or the proxy wants credentials
    if verdict.http_status == 401:
        return Check("key", FAIL, f"the provider refuses the key (HTTP 401: {verdict.error})")
    data = _data(verdict)
    valid = data.get("is_valid") if isinstance(data, dict) else None
    if (verdict.http_status or 0) // 100 == 2 and isinstance(valid, bool):
        return Check("key", OK, "valid") if valid else Check("key", FAIL, "the provider says the key is not valid")
    return _unreachable("key", verdict)


def _listed(data: Any) -> list[dict[str, Any]] | None:
    """The models of an answer: ``data.models``, ``data`` as a list, or ``models``."""
    for candidate in (data.get("models") if isinstance(data, dict) else None, data):
        if isinstance(candidate, list):
            return [m for m in candidate if isinstance(m, dict)]
    return None


def check_models(verdict: Verdict, slugs: Sequence[str]) -> Check:
    if verdict.http_status == 401:
        return Check("models", FAIL, f"the provider refuses the key (HTTP 401: {verdict.error})")
    body = verdict.body if isinstance(verdict.body, dict) else {}
    listed = _listed(_data(verdict)) if _data(verdict) is not None else _listed(body.get("models"))
    if (verdict.http_status or 0) // 100 != 2 or listed is None:
        return _unreachable("models", verdict)
    by_slug = {str(m.get("slug", "")).lower(): m for m in listed}
    missing = [s for s in slugs if s not in by_slug]
    inactive = [s for s in slugs if s in by_slug and str(by_slug[s].get("status", "active")).lower()
                not in ("active", "available", "online", "")]
    if missing or inactive:
        what = "; ".join([*(f"{s} is not listed" for s in missing), *(f"{s} is not active" for s in inactive)])
        return Check("models", FAIL, f"{what} ({len(listed)} models listed){_alternatives(by_slug)}: switch with "
                     "--model SLUG, a model column, or model = \"SLUG\" in the job file")
    return Check("models", OK, ", ".join(slugs) + " listed and active")


def _alternatives(by_slug: dict[str, dict[str, Any]], limit: int = 20) -> str:
    """The Seedance models the listing has and says are active: what a model that left
    the listing (as 1.0 Lite left the documentation index) can be switched to."""
    usable = sorted(s for s, m in by_slug.items() if "seedance" in s and len(s) <= 100
                    and str(m.get("status", "active")).lower() in ("active", "available", "online", ""))
    if not usable:
        return "; it lists no active Seedance model"
    more = f" and {len(usable) - limit} more" if len(usable) > limit else ""
    return f"; listed Seedance models: {', '.join(usable[:limit])}{more}"


def check_balance(verdict: Verdict, estimate_usd: float | None) -> Check:
    if verdict.http_status in (401, 402):
        return Check("balance", FAIL, f"HTTP {verdict.http_status}: {verdict.error}")
    data = _data(verdict)
    balance = data.get("balance") if isinstance(data, dict) else None
    if (verdict.http_status or 0) // 100 != 2 or isinstance(balance, bool) or not isinstance(balance, (int, float)):
        return _unreachable("balance", verdict)
    if balance <= 0:
        return Check("balance", FAIL, f"the balance is {balance:.2f} USD: nothing can be paid for")
    if estimate_usd is not None and estimate_usd > balance:
        return Check("balance", WARN, f"{balance:.2f} USD will not cover tonight's estimate of {estimate_usd:.2f} USD")
    cover = f"; tonight's estimate {estimate_usd:.2f} USD" if estimate_usd is not None else ""
    return Check("balance", OK, f"{balance:.2f} USD{cover}")


async def run_checks(base_url: str, key: Secret, slugs: Sequence[str], estimate_usd: float | None,
                     limiter: SmoothLimiter | None = None, transport: Transport | None = None,
                     timeout: float = 15.0) -> list[Check]:
    async with make_session(4, timeout, min(10.0, timeout), transport) as session:
        key_v, models_v, balance_v = await asyncio.gather(
            _get(session, base_url, "/api/v1/apikey/validate", key, limiter, transport),
            _get(session, base_url, "/api/v1/models", key, limiter, transport),
            _get(session, base_url, "/api/v1/team/balance", key, limiter, transport),
        )
    checks = [check_key(key_v), check_models(models_v, slugs), check_balance(balance_v, estimate_usd)]
    log = structlog.get_logger("batch.preflight")
    for c in checks:
        (log.warning if c.outcome != OK else log.info)("preflight", check=c.name, outcome=c.outcome, detail=c.detail)
    return checks


def fatal(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if c.outcome == FAIL]
