"""One HTTP attempt against the API, and what it means.

:func:`classify` maps an HTTP answer to a :class:`Verdict`; :func:`request_once` makes
one attempt and never raises for a network problem. The decisive question for a
paid, non-idempotent submission is whether the provider *may* have accepted it. The
rules are at least as safe as the provider's official CLI (``modellix-client.ts``),
which treats every answer it does not list as a definite rejection as "outcome unknown":

* ``OK``        HTTP 2xx, ``code == 0`` and ``data.task_id`` a plain token.
* ``RETRY``     certainly not accepted, transient: 429, 503, or a connection that
                could not be set up (so nothing was written). 503 is retried although
                the official CLI does not retry POSTs: the provider's error page names
                it retryable ("service temporarily unavailable, circuit breaker open").
* ``FAIL``      certainly not accepted, permanent: 400, 403, 404, 405, 413, 415, 422.
* ``FATAL``     401 (bad key), 402 (no balance): nothing else can succeed.
* ``UNKNOWN``   the task may exist: 2xx with ``code != 0`` or without a usable task id
                or not JSON, 3xx, any other 4xx (408, 409, 425 ...), 5xx but 503, a
                timeout or dropped connection once connected, an answer over 1 MiB.

Provider text enters the process here and only here: every answer is read with a size
cap, and every string in it (and every error text built from a network exception) has
the API key scrubbed (:meth:`Secret.scrub`, every case and encoding) and control
characters removed before anything else sees it, so no output and no stored row can
carry the key. Downloads (:mod:`batch.following`) scrub their errors with the same method.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import functools
import json
import os
import random
import re
import ssl
import time
import urllib.request
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

import aiohttp

from batch.api import check_task_id, whole_text
from batch.mutant import mutant


class Secret:
    """An API key that does not print itself: ``repr``/``str`` show ``***``."""

    __slots__ = ("_b64", "_lower", "_needles", "_pattern", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._lower = value.lower()
        raw = value.encode()
        b64 = {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
        # The key base64-encoded after a prefix (Basic auth's "user:KEY", "Bearer KEY")
        # lands at any of three byte alignments: each alignment's characters that hold
        # only key bits, without the edge ones that depend on the neighbouring bytes.
        for offset in range(3):
            skip = (8 * offset + 5) // 6
            keep = (8 * (offset + len(raw))) // 6
            for enc in (base64.b64encode, base64.urlsafe_b64encode):
                b64.add(enc(b"\0" * offset + raw).decode()[skip:keep])
        self._b64 = sorted(b64 | {b.rstrip("=") for b in b64} | {raw.hex()}, key=len, reverse=True)
        # The quick test needs only the forms no other form contains (lower-cased once here).
        lowered = sorted({b.lower() for b in self._b64}, key=len)
        self._needles = tuple(n for i, n in enumerate(lowered) if not any(m in n for m in lowered[:i]))
        self._pattern: re.Pattern[str] | None = None

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: str) -> str:
        """``text`` with every occurrence of the key replaced by ``***``, in every form a
        server or library may hand it back: any letter case, each character as itself or
        percent-encoded (once or twice, either hex case), a space form-encoded as ``+``,
        base64 (standard or URL-safe, padded or not, alone or after a prefix as in Basic
        auth: at every byte alignment), and hex (either case). This is the one scrubber: every
        place outside text enters the tool calls it (through :func:`clean_text`). A value
        shorter than :data:`MIN_SECRET` is no real key (the fake's, a test's): scrubbing it
        would rewrite ordinary text."""
        if len(self._value) < MIN_SECRET or not text or not self._maybe_in(text):
            return text
        if self._pattern is None:
            self._pattern = _key_pattern(self._value, self._b64)
        text = self._pattern.sub("***", text)
        # A form the pattern missed but the quick test sees (the key split by an encoding
        # the pattern does not know): the whole text goes rather than the key.
        return "*** (text withheld: it carried the API key)" if self._maybe_in(text) else text

    def _maybe_in(self, text: str) -> bool:
        """A quick test every form passes (the full pattern costs ~15 us a string; this
        ~1 us, and every string of every answer goes through here)."""
        low = text.lower()
        if self._lower in low or any(n in low for n in self._needles):
            return True
        for _ in range(2):  # percent-encoded, once or twice
            if "%" not in text and not ("+" in text and " " in self._value):
                return False
            text = unquote_plus(text) if " " in self._value else unquote(text)
            if self._lower in text.lower():
                return True
        return False

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def _key_pattern(value: str, b64: list[str]) -> re.Pattern[str]:
    def char(c: str) -> str:
        encoded = "".join(f"%(?:25)?{b:02x}" for b in c.encode())
        return f"(?:{re.escape(c)}|{encoded}{'|[+]' if c == ' ' else ''})"

    forms = ["".join(map(char, value)), *map(re.escape, b64)]
    return re.compile("|".join(forms), re.IGNORECASE)


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
    data: dict[str, Any] | None = None  # ``data`` of a successful answer, scrubbed
    body: Any = None  # the whole answer, parsed and scrubbed (None when not JSON)
    rate_remaining: int | None = None  # X-RateLimit-Remaining
    rate_limit: int | None = None  # X-RateLimit-Limit
    rate_reset: float | None = None  # seconds until X-RateLimit-Reset


# Definite rejections, as the official CLI lists them (429 and 401/402 apart).
PERMANENT = frozenset({400, 403, 404, 405, 413, 415, 422})
TRANSIENT = frozenset({429, 503})
FATAL_STATUSES = frozenset({401, 402})
MAX_RETRY_AFTER = 600.0
MAX_ANSWER_BYTES = 1 << 20  # a submit or task answer is a few KB
MESSAGE_CHARS = 300
MIN_SECRET = 8
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds before retry ``attempt`` (1-based): exponential with "equal jitter" (AWS
    architecture blog), at least half the step so retries never hammer, spread so that
    workers do not retry in step."""
    step = min(cap, base * 2 ** (attempt - 1))
    return random.uniform(step / 2, step)


def retry_wait(verdict: Verdict, attempt: int, base: float, cap: float) -> float:
    """Seconds before retry ``attempt``: the backoff, but never less than the provider asked."""
    wait = backoff_delay(attempt, base, cap)
    return wait if verdict.retry_after is None else max(wait, verdict.retry_after)


def _reset_seconds(value: str, now: float) -> float | None:
    """``X-RateLimit-Reset`` as seconds to wait: providers send a delta in seconds, or an
    epoch time in seconds or milliseconds."""
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    if number > 1e12:
        return number / 1000 - now
    if number > 1e9:
        return number - now
    return number


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
        seconds = _reset_seconds(reset, now)
        if seconds is not None:
            waits.append(seconds)
    waits = [w for w in waits if w == w]  # no NaN
    if not waits:
        return None
    return min(max(max(waits), 0.0), MAX_RETRY_AFTER)


def _int_header(headers: Any, name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(float(value.strip()))
    except (ValueError, OverflowError):
        return None


def clean_text(text: str, secret: Secret | None, limit: int = MESSAGE_CHARS) -> str:
    """Provider text made safe to store and print: key scrubbed, controls and lone
    surrogates (a header's undecodable byte) replaced, capped."""
    text = whole_text(text)
    if secret is not None:
        text = secret.scrub(text)
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_NOT_JSON = object()  # an answer body that did not parse


def _scrub_json(value: Any, secret: Secret | None) -> Any:
    """Every string of a parsed answer whole (a ``\\ud800`` escape is valid JSON but no
    text any writer accepts) and, values only, with the key replaced (names keep their
    meaning: the answer's structure never changes)."""
    if isinstance(value, str):
        value = whole_text(value)
        return secret.scrub(value) if secret is not None else value
    if isinstance(value, list):
        return [_scrub_json(v, secret) for v in value]
    if isinstance(value, dict):
        return {whole_text(k): _scrub_json(v, secret) for k, v in value.items()}
    return value


def parse_answer(raw: bytes, secret: Secret | None) -> Any:
    """The JSON value of an answer with the key scrubbed, or ``ValueError``."""
    try:
        # As json.loads(bytes) decodes, but keeping the text for the quick test below.
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    scrub = secret is not None and secret.reveal() and not mutant("drop_key_scrub")
    if _clean_as_text(text, secret if scrub else None):
        return value
    return _scrub_json(value, secret if scrub else None)


def _clean_as_text(text: str, secret: Secret | None) -> bool:
    """Whether no string parsed from the JSON ``text`` needs :func:`_scrub_json`, judged
    on the whole text at once (the walk cost ~60 us an answer, issue #21). Without a
    backslash every string of the answer stands in the text as it is parsed, so a text
    without a lone surrogate holds none, and a text in which :meth:`Secret._maybe_in`
    finds no form of the key holds no string with one (the quick test only ever answers
    yes for a part of a text when it does for the whole). Otherwise: the walk."""
    if "\\" in text or whole_text(text) != text:
        return False
    return secret is None or len(secret.reveal()) < MIN_SECRET or not secret._maybe_in(text)


def _provider_message(body: Any, fallback: str, secret: Secret | None) -> tuple[str, int | None]:
    if isinstance(body, dict):
        message = body.get("message")
        code = body.get("code")
        text = clean_text(str(message), secret) if message else fallback
        return text, (code if isinstance(code, int) and not isinstance(code, bool) else None)
    return fallback, None


def classify(status: int, raw: bytes, headers: Any, secret: Secret | None = None) -> Verdict:
    """What an HTTP answer to a submission or query means (see the module docstring)."""
    try:
        body: Any = parse_answer(raw, secret)
    except ValueError:
        body = _NOT_JSON
    verdict = _classify(status, body, headers, secret)
    verdict.body = None if body is _NOT_JSON else body
    verdict.rate_remaining = _int_header(headers, "X-RateLimit-Remaining")
    verdict.rate_limit = _int_header(headers, "X-RateLimit-Limit")
    reset = headers.get("X-RateLimit-Reset")
    verdict.rate_reset = _reset_seconds(reset, time.time()) if reset else None
    return verdict


def _classify(status: int, body: Any, headers: Any, secret: Secret | None) -> Verdict:
    if 200 <= status < 300:
        if body is _NOT_JSON:
            return Verdict(Kind.UNKNOWN, status, error=f"HTTP {status} with a body that is not JSON")
        if not isinstance(body, dict) or "code" not in body:
            return Verdict(Kind.UNKNOWN, status, error=f"HTTP {status} without a 'code' field")
        code = body.get("code")
        if code != 0 or isinstance(code, bool):
            message, _ = _provider_message(body, "no message", secret)
            return Verdict(Kind.UNKNOWN, status, error=f"HTTP {status} with code {clean_text(str(code), secret, 40)}: "
                           f"{message} (an undocumented answer: the task may exist)",
                           error_code=code if isinstance(code, int) and not isinstance(code, bool) else None)
        data = body.get("data")
        task_id = data.get("task_id") if isinstance(data, dict) else None
        if task_id is None or task_id == "":
            return Verdict(Kind.UNKNOWN, status, error=f"HTTP {status}, code 0 but no task_id")
        if check_task_id(task_id) is None:
            shown = clean_text(repr(task_id), None, 60)
            return Verdict(Kind.UNKNOWN, status, error=f"HTTP {status}, code 0 with a task id that is not a plain "
                           f"token ({shown}): not stored, outcome unknown")
        assert isinstance(data, dict)
        return Verdict(Kind.OK, status, task_id=task_id, data=data)
    message, code = _provider_message(body, f"HTTP {status}", secret)
    code = code if code is not None else status
    if status in TRANSIENT:
        return Verdict(Kind.RETRY, status, error=message, error_code=code,
                       retry_after=retry_after_seconds(headers))
    if status in FATAL_STATUSES:
        return Verdict(Kind.FATAL, status, error=message, error_code=code)
    if status in PERMANENT or (status == 500 and mutant("treat_500_as_rejection")):
        return Verdict(Kind.FAIL, status, error=message, error_code=code)
    return Verdict(Kind.UNKNOWN, status, error=message, error_code=code)


@dataclass(frozen=True)
class Transport:
    """How requests reach the internet: a proxy (``--proxy``, else the environment's
    ``HTTPS_PROXY``/``HTTP_PROXY``, both honouring ``NO_PROXY``) and the authorities
    trusted for TLS (the system's, plus ``--ca-bundle`` or ``SSL_CERT_FILE`` for a
    TLS-inspecting proxy). https goes through the proxy in a CONNECT tunnel, so the
    proxy never sees the key."""

    proxy: str | None = None
    ca_bundle: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        bundle = self.ca_bundle or os.environ.get("SSL_CERT_FILE")
        try:
            stamp = _file_stamp(bundle) if bundle else None
        except OSError:
            return _new_ssl_context(bundle, None, None)  # unreadable: the caller reports the error
        # The environment's defaults are part of the key: create_default_context reads them.
        return _ssl_context(bundle, stamp, (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")))

    def proxy_for(self, url: str) -> str | None:
        """The proxy for ``url``: ``--proxy``, else the environment's for its scheme; none
        when ``NO_PROXY`` lists its host."""
        return _choose_proxy(self.proxy, url, _proxy_env())

    @property
    def proxied(self) -> bool:
        """Whether any request may go through a proxy (which then resolves host names)."""
        env = os.environ
        return self.proxy is not None or any(env.get(v) for v in _PROXY_VARS)

    def pinned(self) -> Transport:
        """This transport with the environment's proxies read once, now: a run's hot path
        asks :meth:`proxy_for` for every request, and reading six variables each time was
        measurable (issue #21). The environment of a running run does not change."""
        return _PinnedTransport(self.proxy, self.ca_bundle, _proxy_env())


def _proxy_env() -> tuple[str, str, str]:
    env = os.environ
    return (env.get("https_proxy") or env.get("HTTPS_PROXY") or "",
            env.get("http_proxy") or env.get("HTTP_PROXY") or "",
            env.get("no_proxy") or env.get("NO_PROXY") or "")


@dataclass(frozen=True)
class _PinnedTransport(Transport):
    """:meth:`Transport.pinned`: the proxy environment as it was when the run started."""

    env: tuple[str, str, str] = ("", "", "")

    def proxy_for(self, url: str) -> str | None:
        return _choose_proxy(self.proxy, url, self.env)


_PROXY_VARS = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")


def _file_stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _new_ssl_context(bundle: str | None, _stamp: object, _defaults: object) -> ssl.SSLContext:
    context = ssl.create_default_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR
    if bundle:
        context.load_verify_locations(cafile=bundle)
    return context


# Loading the system's authorities takes 20-90 ms of CPU, and a run (or a test suite calling
# the CLI in-process) asked for a context three times: one per trust setting is enough. The
# key holds the bundle's identity and stamp, so an edited bundle is read again; nothing
# changes a context once made, so sessions may share it.
_ssl_context = functools.lru_cache(maxsize=8)(_new_ssl_context)


# Sessions never read the environment themselves (trust_env=False): aiohttp would then look
# the proxy up in a worker thread for every request, two thread hops per request that cost
# ~20 us of CPU each and fought the event loop for the GIL (benchmarks/bench.py, 20k
# requests); nor would .netrc credentials be sent to the API. Cached per URL: a run talks
# to a handful of routes.
@functools.lru_cache(maxsize=256)
def _choose_proxy(explicit: str | None, url: str, env: tuple[str, str, str]) -> str | None:
    https, http, no_proxy = env
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    proxy = explicit or (https if scheme == "https" else http if scheme == "http" else "") or None
    if proxy and no_proxy and urllib.request.proxy_bypass_environment(parts.hostname or "", {"no": no_proxy}):
        return None
    return proxy


def redact_url(url: str | None) -> str | None:
    """A proxy URL fit for a log: no credentials."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        if parts.username or parts.password:
            return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
    except ValueError:  # unparseable ("http://[::1"): drop all that could be credentials
        return "***@" + url.rpartition("@")[2] if "@" in url else url
    return url


def make_session(concurrency: int, timeout: float, connect_timeout: float,
                 transport: Transport | None = None) -> aiohttp.ClientSession:
    transport = transport or Transport()
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=10,
                                     ssl=transport.ssl_context())
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout),
        raise_for_status=False,
        # A bearer-key API sets no cookies we need, and pre-signed download URLs must not
        # receive any: a dummy jar also skips cookie filtering on every request and answer.
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,  # proxies come from Transport.proxy_for, per request
    )


# Raised only while a connection is being set up (DNS, TCP, TLS, connect timeout): the
# request cannot have been written. Everything after that point may have reached the
# provider. (An on_request_headers_sent trace would tell the same story for a little
# more precision, at 10-15% of the client's throughput, measured with benchmarks/bench.py.)
NOT_SENT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def describe(exc: BaseException) -> str:
    # The type and the OS reason only: aiohttp's messages may quote the request.
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout"
    reason = getattr(exc, "strerror", None) or getattr(exc, "os_error", None)
    name = type(exc).__name__
    return f"{name}: {reason}" if isinstance(reason, str) and reason else name


class TooLarge(Exception):
    """An answer body over its size cap."""


async def read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """The whole body, or :class:`TooLarge` as soon as it passes ``cap`` bytes
    (announced or received: a missing or lying ``Content-Length`` does not help)."""
    length = response.content_length
    if length is not None and length > cap:
        raise TooLarge(f"answer of {length} bytes, over the {cap}-byte limit")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_any():
        total += len(chunk)
        if total > cap:
            raise TooLarge(f"answer over the {cap}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def tls_failure(exc: BaseException, url: str) -> str:
    host = urlsplit(url).hostname
    reason = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
    return (f"TLS: the certificate of {host} is not trusted ({str(reason)[:160]}); behind a proxy that inspects "
            f"TLS, give its certificate authority with --ca-bundle FILE (or SSL_CERT_FILE)")


async def request_once(
    session: aiohttp.ClientSession, method: str, url: str, key: Secret, body: bytes | None = None,
    cap: int = MAX_ANSWER_BYTES, transport: Transport | None = None, extra_headers: dict[str, str] | None = None,
) -> Verdict:
    """One attempt; a network failure becomes RETRY (nothing sent) or UNKNOWN (maybe sent);
    a certificate the machine does not trust, or a proxy asking for credentials, is FATAL:
    no retry can help, and nothing was sent."""
    headers = {**(extra_headers or {}), "Authorization": f"Bearer {key.reveal()}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    proxy = transport.proxy_for(url) if transport is not None else None
    try:
        async with session.request(
            method, url, data=body, headers=headers, allow_redirects=False, proxy=proxy
        ) as response:
            try:
                raw = await read_capped(response, cap)
            except TooLarge as exc:
                return Verdict(Kind.UNKNOWN, response.status, error=f"HTTP {response.status}: {exc}")
            return classify(response.status, raw, response.headers, key)
    except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientConnectorSSLError) as exc:
        return Verdict(Kind.FATAL, error=clean_text(tls_failure(exc, url), key, 500))
    except aiohttp.ClientHttpProxyError as exc:
        if exc.status == 407:
            return Verdict(Kind.FATAL, error="the proxy asks for credentials (HTTP 407): give them in the proxy URL, "
                                             "http://user:password@host:port")
        return Verdict(Kind.RETRY, error=f"the proxy refused the tunnel (HTTP {exc.status})")
    except NOT_SENT_ERRORS as exc:
        return Verdict(Kind.RETRY, error=f"connection failed before sending ({clean_text(describe(exc), key)})")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Verdict(Kind.UNKNOWN, error=f"no answer after sending ({clean_text(describe(exc), key)})")
