"""Be told: one message when ``submit``/``run``/``collect`` ends, also on a fatal exit,
through Apprise (Slack, Teams, Discord, email, ntfy, webhooks: one URL scheme).

Guarantees:

* **One message per command**: :func:`arm` when the command knows its ``--notify``
  URLs, then :func:`finish` at the end or :func:`fatal` on a fatal exit; whichever comes
  first sends, the other is a no-op.
* **A notification never changes the outcome**: whatever Apprise or the receiver does
  (refused, unreachable, dripping its answer), it is logged as a ``notify_failed`` warning
  and the exit code stays the run's. The whole notification takes at most
  :data:`NOTIFY_LIMIT_S`, and SIGINT/SIGTERM while it runs ends it at once.
* **No secret leaves in a message or a log line**: the API key and every secret the
  logs know (:func:`batch.logs.known_secrets`), passwords in URLs (a proxy's, a
  database's: ``scheme://user:password@host``), bearer tokens, and the values of
  environment variables whose names say key, secret, token or password are replaced by
  ``***``. A notification URL is logged by scheme and host only (it often holds a token).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog

from batch import logs
from batch.errors import ConfigError
from batch.report import spend_line

log = structlog.get_logger("batch.notify")

EXIT_MEANING = {
    0: "everything OK",
    1: "finished, but some requests or tasks are not OK",
    2: "usage, configuration, input or state error; nothing was sent",
    3: "another run holds the ledger; nothing was sent",
    4: "interrupted",
    5: "the provider refused the night",
    6: "a local write failed after requests were sent",
}
_SECRET_ENV = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH|_PWD$", re.IGNORECASE)
# Not a bare PWD: the shell's PWD/OLDPWD hold the working directory, and masking it blanked
# every path under $HOME in messages. MYSQL_PWD-style names (``_PWD`` at the end) are passwords.
_URL_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]*(?::[^/\s@]*)?@")
# "Bearer X" takes a space; the other names a ``=`` or ``:`` (libpq's "password authentication
# failed" is a sentence, not a credential).
_BEARER = re.compile(r"(?i)\b(bearer)( +)[^\s&,;\"']+|\b(token|apikey|api_key|password|passwd|pwd)( *[=:] *)[^\s&,;\"']+")
NOTIFY_LIMIT_S = 15.0  # the whole notification, all URLs: a cron job's end is not held longer
MAX_BODY = 3500  # chat services cut long messages (Slack ~4k); the page and the table hold the rest


@dataclass
class _Armed:
    urls: tuple[str, ...]
    command: str
    secrets: list[str] = field(default_factory=list)
    sent: bool = False


_armed: _Armed | None = None
# Set by the console script (never for in-process callers): a notification given up on ends
# the process at once instead of at Apprise's pool join.
exit_when_abandoned = False


def check_urls(urls: Iterable[str]) -> tuple[str, ...]:
    """Each URL is one Apprise understands, or a usage error (exit 2) before anything is sent."""
    import apprise

    checked = []
    for url in urls:
        if not isinstance(url, str) or apprise.Apprise.instantiate(url) is None:
            raise ConfigError(f"--notify {safe_url(str(url))}: not a notification URL Apprise knows "
                              "(json://host/path, slack://..., mailto://..., ntfys://...)")
        checked.append(url)
    return tuple(checked)


def arm(urls: Iterable[str] | None, command: str, secrets: Iterable[str | None] = ()) -> None:
    """Remember where this command's one message goes. Without URLs nothing is armed."""
    global _armed
    urls = tuple(u for u in (urls or ()) if u)
    if not urls:
        _armed = None
        return
    _armed = _Armed(check_urls(urls), command, [s for s in secrets if s])


def finish(exit_code: int, summary: Mapping[str, Any], page: str | None = None) -> None:
    """The command's end: its summary (submit's or collect's) in one message."""
    _send(exit_code, compose(_armed.command if _armed else "", exit_code, summary, page))


def fatal(exit_code: int, error: str) -> None:
    """A fatal exit (a BatchError, an interruption, a crash): the error in one message."""
    _send(exit_code, compose(_armed.command if _armed else "", exit_code, {}, None, error))


def _send(exit_code: int, message: tuple[str, str]) -> None:
    armed = _armed
    if armed is None or armed.sent:
        return
    armed.sent = True
    title, body = (scrub(part, armed.secrets) for part in message)
    results: dict[str, tuple[bool, str]] = {}

    def deliver_all() -> None:
        for url in armed.urls:
            try:
                results[url] = _deliver(url, title, body, exit_code)
            except Exception as exc:  # a notifier must never turn a night's outcome into a crash
                results[url] = (False, f"{type(exc).__name__}: {exc}")

    # Apprise bounds each socket read, not the whole answer: a receiver that drips a byte
    # a second holds it for ever. So it runs in a daemon thread (abandoned at exit) and we
    # wait at most NOTIFY_LIMIT_S, and a SIGINT/SIGTERM meanwhile stops the wait at once.
    worker = threading.Thread(target=deliver_all, name="notify", daemon=True)
    stopped = _wait(worker, NOTIFY_LIMIT_S)
    abandoned = worker.is_alive()
    for url in armed.urls:
        ok, why = results.get(url, (False, f"interrupted by {stopped}" if stopped
                                    else f"gave up after {NOTIFY_LIMIT_S:g} s (the receiver did not answer)"))
        if ok:
            log.info("notified", to=safe_url(url), exit_code=exit_code)
        else:
            log.warning("notify_failed", to=safe_url(url), error=scrub(why, armed.secrets)[:300])
    if abandoned and exit_when_abandoned:
        # Apprise's worker pool is joined at interpreter exit, so a normal exit would wait
        # for the dripping receiver after all. The command's own process exits here, with
        # the code it was about to exit with (every caller of finish/fatal exits next).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def _wait(worker: threading.Thread, limit: float) -> str | None:
    """Run ``worker`` and wait for it up to ``limit`` seconds; the name of a signal that
    stopped the wait, else None. The exit code is decided before we notify, so a signal
    only cuts the message short (the caller then exits with the run's code)."""
    stop: list[str] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():  # only there can handlers be set

        def on_signal(signum: int, _frame: Any) -> None:
            stop.append(signal.Signals(signum).name)

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        worker.start()
        deadline = time.monotonic() + limit
        while worker.is_alive() and not stop and time.monotonic() < deadline:
            worker.join(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return stop[0] if stop else None


def _deliver(url: str, title: str, body: str, exit_code: int) -> tuple[bool, str]:
    import apprise

    kind = apprise.NotifyType.SUCCESS if exit_code == 0 else (
        apprise.NotifyType.WARNING if exit_code == 1 else apprise.NotifyType.FAILURE)
    sender = apprise.Apprise()
    sender.add(url)
    # Apprise's own log lines may name the URL: captured here, scrubbed, and logged once by us.
    with apprise.LogCapture(level=apprise.logging.WARNING) as captured:
        ok = sender.notify(title=title, body=body, notify_type=kind, body_format=apprise.NotifyFormat.TEXT)
        text = captured.getvalue().strip().splitlines()
    return bool(ok), (text[-1] if text else "the receiver did not accept it")


def compose(command: str, exit_code: int, summary: Mapping[str, Any], page: str | None,
            error: str | None = None) -> tuple[str, str]:
    """Title and text: exit code and meaning, counts, spend, top errors, where the results are."""
    meaning = EXIT_MEANING.get(exit_code, "error")
    title = f"seedance-batch {command or 'run'}: exit {exit_code} ({meaning})"
    lines = [f"exit code {exit_code}: {meaning}"]
    if error:
        lines.append(f"error: {error}")
    counts = summary.get("counts") or {}
    if counts:
        lines.append(f"requests: {sum(counts.values())} (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")")
    tasks = summary.get("task_status") or (summary.get("collect") or {}).get("task_status") or {}
    if tasks:
        lines.append("tasks: " + ", ".join(f"{n} {s}" for s, n in tasks.items()))
    table = summary.get("table_tasks") or {}
    if table:  # collect: what the table holds, also the tasks that ended on an earlier pass
        lines.append("tasks in the results table: " + ", ".join(f"{n} {s}" for s, n in table.items()))
    for key, label in (("downloaded", "downloaded"), ("download_failed", "downloads failed"),
                       ("not_downloaded", "successful tasks without their files")):
        if summary.get(key):
            lines.append(f"{label}: {summary[key]}")
    if summary.get("estimated_spend_usd") is not None:
        lines.append(f"estimated spend: {summary['estimated_spend_usd']:.2f} USD")
    elif (summary.get("estimate") or {}).get("cost_usd") is not None:
        lines.append(f"estimated cost (dry run): {summary['estimate']['cost_usd']:.2f} USD")
    spend = summary.get("spend")
    seconds = summary.get("video_seconds")
    video = f"{seconds:.1f} s of video" if seconds is not None else None
    if isinstance(spend, Mapping):  # submit's meter: as its printed summary says it
        lines.append(spend_line(spend) + (f"; {video}" if video else ""))
    elif spend:  # collect's: the page's figure
        lines.append(f"estimated spend: {spend}")
    elif video and summary.get("estimated_spend_usd") is None:
        lines.append(f"estimated spend: {video} (no price table)")
    for key in ("stop_reason", "interrupted", "local_fault"):
        if summary.get(key):
            lines.append(f"{key.replace('_', ' ')}: {summary[key]}")
    errors = summary.get("top_errors") or []
    if errors:
        lines.append("top errors:")
        lines += [f"  {e['count']} x {str(e['error'])[:200]}" for e in errors[:5] if isinstance(e, Mapping)]
    if summary.get("results"):
        lines.append(f"results: {summary['results']}")
    if page:
        lines.append(f"page: {page}")
    body = "\n".join(lines)
    return title, body if len(body) <= MAX_BODY else body[: MAX_BODY - 1] + "…"


def environment_secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """Values that must never be sent: secret-named variables' values (8+ characters, so
    that ``AUTH=1`` does not blank every ``1``) and the passwords of URLs in any variable."""
    env = os.environ if env is None else env
    found = []
    for name, value in env.items():
        if _SECRET_ENV.search(name) and len(value) >= 8:
            found.append(value)
        if "://" in value and "@" in value:
            found += url_secrets(value)
    return found


def url_secrets(url: str | None) -> list[str]:
    """The password of ``scheme://user:password@host`` (as written and decoded), and the user
    name too but for a database's URL: a proxy's user name may be a token, a ledger's role is
    a plain word (README's ``batch``) that masking would blank in every path and sentence."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        database = parts.scheme.lower() in ("postgresql", "postgres")
        secrets = [parts.password or "", "" if database else parts.username or ""]
    except ValueError:
        return []
    return [s for secret in secrets if len(secret) >= 3 for s in {secret, unquote(secret)}]


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret we know and every credential-shaped part replaced by ``***``."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _BEARER.sub(lambda m: f"{m.group(1) or m.group(3)}{m.group(2) or m.group(4)}***", text)
    known = {*secrets, *logs.known_secrets(), *environment_secrets()}
    for secret in sorted((s for s in known if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# Schemes whose host is a host; in others (slack://TokenA/..., tgram://bottoken/...) it is a token.
_HOST_SCHEMES = frozenset({"json", "jsons", "form", "forms", "xml", "xmls", "http", "https", "ntfy", "ntfys",
                           "mailto", "mailtos", "apprise", "apprises", "mmost", "mmosts", "rocket", "rockets"})


def safe_url(url: str) -> str:
    """A notification URL fit for a log: its scheme (and host where that is one)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "(unparsable URL)"
    if not parts.scheme:
        return "(not a URL)"
    return f"{parts.scheme}://{host if parts.scheme.lower() in _HOST_SCHEMES else '***'}"
