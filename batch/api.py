"""Where the provider is and how its URLs are built (``shared/api/*.md``).

Guarantees kept here:

* every URL that carries the key is built from a checked base URL and *quoted* path
  segments: a task id can never add a path segment, a query or a fragment;
* a task id is accepted only as a plain token (:func:`check_task_id`), so nothing odd
  reaches the ledger, a file name or a URL;
* text from outside is valid Unicode (:func:`whole_text`): a lone surrogate, which JSON's
  ``\\ud800`` escape or a header's undecodable byte can carry, is U+FFFD before it is
  stored, so no writer (sqlite, Parquet, CSV) can fail on it;
* an API has one identity (:func:`api_identity`): the ledger counts a request as sent
  only for runs against the API that accepted it, and the bundled fake is one API
  whatever its port.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import quote, urlsplit

DEFAULT_BASE_URL = "https://modellixapi.jpushoa.com"
DEFAULT_MODEL = "bytedance/seedance-1.0-lite-t2v"
TASK_PATH = "/api/v1/tasks/{task_id}"
DOCUMENTED_RATE_PER_MIN = 100  # per API key
FAKE_API = "fake"  # the bundled fake's identity in the ledger, whatever its port

# The official CLI accepts [A-Za-z0-9._~:/+@=-]; we drop "/" (a task id is one path
# segment and one file-name part) and ask for an alphanumeric first character, so
# "." and ".." can never be an id. 256 is far above any id the provider issues.
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:+@=-]{0,255}")


_SURROGATE = re.compile("[\ud800-\udfff]")


def whole_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (a pair in JSON is already
    one character once parsed: what is left is lone, and no UTF-8 writer accepts it)."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def whole_json(value: object) -> object:
    """A parsed JSON value with every string in it (names too) :func:`whole_text`."""
    if isinstance(value, str):
        return whole_text(value)
    if isinstance(value, list):
        return [whole_json(v) for v in value]
    if isinstance(value, dict):
        return {whole_text(k) if isinstance(k, str) else k: whole_json(v) for k, v in value.items()}
    return value


def check_task_id(value: object) -> str | None:
    """``value`` if it is a plain task-id token, else ``None``."""
    if isinstance(value, str) and _TASK_ID.fullmatch(value):
        return value
    return None


def origin(url: str) -> str:
    """``scheme://host[:port]``, lower-cased, default ports dropped."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or (scheme, port) in (("https", 443), ("http", 80)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def on_origin(url: str, api_origin: str) -> bool:
    """``origin(url) == api_origin`` (``api_origin`` as :func:`origin` gives it), without
    parsing the usual answer: a URL that starts with the origin and then ``/`` has that
    scheme, host and port (the authority ends at the first ``/``). Anything else is
    parsed; ``ValueError`` for a URL that cannot be."""
    if url.startswith(api_origin) and url[len(api_origin):len(api_origin) + 1] == "/":
        return True
    return origin(url) == api_origin


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_identity(base_url: str, fake: bool = False) -> str:
    """What the ledger records as the API a request was sent to."""
    return FAKE_API if fake else origin(base_url)


# Submit routes seen over time (provider-today.md): the seed page's, the per-model
# schema pages' (``/async``) and the newest pages' and official CLI's (no ``/async``).
SEED_ROUTE = "{base}/api/v1/text-to-video/{provider}/{model}/async"
ROUTE_FORMS = {
    "seed": SEED_ROUTE,
    "async": "{base}/api/v1/{provider}/{model}/async",
    "v1": "{base}/api/v1/{provider}/{model}",
}
_SLUG = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}/[a-z0-9][a-z0-9._-]{0,127}")


def check_slug(slug: str) -> str:
    """A model slug ``provider/model`` (lower case, dotted versions), or ValueError."""
    text = slug.strip()
    if not _SLUG.fullmatch(text):
        raise ValueError(f"model {slug!r}: expected provider/model, e.g. {DEFAULT_MODEL}")
    return text


DOCUMENTED = "documented"  # each model's own route, from its spec (batch.models), at the configured base


def endpoint_url(template: str, base_url: str, slug: str, documented: str | None = None) -> str:
    """Render a submit-route template (or a :data:`ROUTE_FORMS` name) for one model;
    ``documented`` is the path of the model's documented route."""
    provider, _, model = check_slug(slug).partition("/")
    if template == DOCUMENTED:
        if documented:
            return base_url.rstrip("/") + documented
        template = "async"  # a model without a documented route: today's schema pages' form
    form = ROUTE_FORMS.get(template, template)
    return form.format(base=base_url.rstrip("/"), provider=quote(provider, safe=""), model=quote(model, safe=""))


def check_endpoint(template: str, base_url: str) -> None:
    """The template renders, and only onto the API's own scheme and host (the key goes
    nowhere else), or ValueError naming what is wrong."""
    if template == DOCUMENTED:
        return
    form = ROUTE_FORMS.get(template, template)
    try:
        url = endpoint_url(form, base_url, DEFAULT_MODEL)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"endpoint {template!r}: placeholders are {{base}}, {{provider}}, {{model}} ({exc})") from None
    if origin(url) != origin(base_url):
        raise ValueError(f"endpoint {template!r} points at {origin(url)}, not at the API base {origin(base_url)}: "
                         "start the template with {base} or set --base-url")
    if "?" in url or "#" in url:
        raise ValueError(f"endpoint {template!r}: no query or fragment")


def task_url(base_url: str, task_id: str) -> str:
    """``{base}/api/v1/tasks/{task_id}`` with the id quoted as one path segment."""
    return base_url.rstrip("/") + TASK_PATH.format(task_id=quote(task_id, safe=""))
