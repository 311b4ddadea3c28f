import base64
import json
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from batch.client import Kind, Secret, classify, retry_after_seconds

H = CIMultiDict()


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


OK = body({"code": 0, "message": "success", "data": {"status": "pending", "task_id": "t-1", "model_id": "m"}})


@pytest.mark.parametrize(("status", "raw", "kind"), [
    (200, OK, Kind.OK),
    (200, body({"code": 0, "message": "success", "data": {"status": "pending"}}), Kind.UNKNOWN),
    (200, body({"code": 0, "data": {"task_id": ""}}), Kind.UNKNOWN),
    (200, body({"code": 0, "data": None}), Kind.UNKNOWN),
    (200, b"<html>proxy</html>", Kind.UNKNOWN),
    (200, body([1, 2]), Kind.UNKNOWN),
    (201, body({"message": "no code"}), Kind.UNKNOWN),
    # A 2xx with code != 0 is undocumented; the official CLI calls it "outcome unknown".
    (200, body({"code": 1001, "message": "Rejected: nope"}), Kind.UNKNOWN),
    (200, body({"code": "0", "data": {"task_id": "t-1"}}), Kind.UNKNOWN),
    (200, body({"code": True, "data": {"task_id": "t-1"}}), Kind.UNKNOWN),
    (400, body({"code": 400, "message": "Bad Request: prompt"}), Kind.FAIL),
    (403, b"", Kind.FAIL), (404, b"", Kind.FAIL), (405, b"", Kind.FAIL), (413, b"", Kind.FAIL), (415, b"", Kind.FAIL),
    (422, b"", Kind.FAIL),
    # 4xx the official CLI does not list as definite rejections: the task may exist.
    (408, b"", Kind.UNKNOWN), (409, b"", Kind.UNKNOWN), (425, b"", Kind.UNKNOWN), (418, b"", Kind.UNKNOWN),
    (401, body({"code": 401, "message": "Unauthorized: bad key"}), Kind.FATAL), (402, b"", Kind.FATAL),
    (429, b"", Kind.RETRY), (503, b"", Kind.RETRY),
    (500, b"", Kind.UNKNOWN), (502, b"", Kind.UNKNOWN), (504, b"", Kind.UNKNOWN), (599, b"", Kind.UNKNOWN),
    (302, b"", Kind.UNKNOWN),
])
def test_classify(status: int, raw: bytes, kind: Kind) -> None:
    assert classify(status, raw, H).kind is kind


def test_classify_keeps_provider_code_and_message() -> None:
    v = classify(200, body({"code": 1001, "message": "Rejected: quota"}), H)
    assert (v.error_code, v.http_status) == (1001, 200) and "Rejected: quota" in v.error
    v = classify(400, body({"code": 400, "message": "Bad Request: prompt too long"}), H)
    assert (v.error_code, v.error) == (400, "Bad Request: prompt too long")
    assert classify(200, OK, H).task_id == "t-1"


def test_retry_after_forms() -> None:
    now = 1_000_000_000.0
    assert retry_after_seconds(CIMultiDict({"Retry-After": "3"}), now) == 3
    assert retry_after_seconds(CIMultiDict({"Retry-After": "1.5"}), now) == 1.5
    date = formatdate(now + 7, usegmt=True)
    assert retry_after_seconds(CIMultiDict({"Retry-After": date}), now) == pytest.approx(7, abs=1)
    assert retry_after_seconds(CIMultiDict({"X-RateLimit-Reset": str(now + 4)}), now) == pytest.approx(4)
    assert retry_after_seconds(CIMultiDict({"X-RateLimit-Reset": "2"}), now) == 2
    both = CIMultiDict({"Retry-After": "1", "X-RateLimit-Reset": "5"})
    assert retry_after_seconds(both, now) == 5
    assert retry_after_seconds(CIMultiDict({"Retry-After": "soon"}), now) is None
    assert retry_after_seconds(CIMultiDict({"Retry-After": "99999"}), now) == 600
    assert retry_after_seconds(H, now) is None
    assert classify(429, b"", CIMultiDict({"Retry-After": "2"})).retry_after == 2


def test_secret_never_prints() -> None:
    s = Secret("sk-live-123")
    assert "sk-live" not in repr(s) and "sk-live" not in str(s) and "sk-live" not in f"{s}"
    assert s.reveal() == "sk-live-123"


@pytest.mark.parametrize("task_id", ["../../evil?x=1#frag", "a/b", "..", ".hidden", "x" * 257, "tab\tid", "sp ace",
                                     "ünï", "%2e%2e", 42, ["t"], {"t": 1}])
def test_a_task_id_that_is_not_a_plain_token_is_unknown_and_not_kept(task_id: object) -> None:
    v = classify(200, body({"code": 0, "data": {"task_id": task_id}}), H)
    assert v.kind is Kind.UNKNOWN and v.task_id is None


@pytest.mark.parametrize("task_id", ["task-video-abc123", "cgt-2026:1.2_x+y=z@q~w", "A" * 256])
def test_plain_task_ids_are_accepted(task_id: str) -> None:
    assert classify(200, body({"code": 0, "data": {"task_id": task_id}}), H).task_id == task_id


KEY = "sk-live-SECRET/with+odd=chars"


@pytest.mark.parametrize("raw", [
    body({"code": 400, "message": f"Bad Request: key {KEY} is not allowed"}),
    json.dumps({"code": 400, "message": f"Bad Request: key {KEY}"}).replace("/", "\\/").encode(),  # escaped slash
    json.dumps({"code": 400, "message": f"Bad Request: key {KEY}"}, ensure_ascii=True)
    .replace("s", "\\u0073").encode(),  # unicode escapes: the raw bytes never hold the key
])
def test_an_answer_echoing_the_key_is_scrubbed_whatever_its_escaping(raw: bytes) -> None:
    from batch.client import Secret as S
    v = classify(400, raw, H, S(KEY))
    assert KEY not in repr(v) and "***" in v.error


def test_the_key_is_scrubbed_from_every_string_of_a_successful_answer() -> None:
    from batch.client import Secret as S
    raw = body({"code": 0, "data": {"task_id": "t-1", "note": f"Bearer {KEY}", "list": [{"deep": KEY}]}})
    v = classify(200, raw, H, S(KEY))
    assert v.kind is Kind.OK and KEY not in repr(v.data) and KEY not in repr(v.body)


def test_scrubbing_never_changes_an_answers_structure() -> None:
    from batch.client import Secret as S

    for key in ("k", "task", "data"):  # too short to be a key: nothing is rewritten
        v = classify(200, OK, H, S(key))
        assert v.kind is Kind.OK and v.task_id == "t-1", key


def test_a_task_id_containing_the_key_never_survives() -> None:
    from batch.client import Secret as S
    v = classify(200, body({"code": 0, "data": {"task_id": f"t-{KEY}"}}), H, S(KEY))
    assert v.kind is Kind.UNKNOWN and v.task_id is None and KEY not in repr(v)


def test_control_characters_in_provider_text_are_removed() -> None:
    v = classify(400, body({"code": 400, "message": "Bad \x1b[31mRequest\x00\u202e: x" + "y" * 500}), H)
    assert "\x1b" not in v.error and "\x00" not in v.error and "\u202e" not in v.error and len(v.error) <= 300


def test_rate_limit_headers_are_read() -> None:
    now = 1_000_000_000.0
    assert retry_after_seconds(CIMultiDict({"X-RateLimit-Reset": str(int((now + 9) * 1000))}), now) \
        == pytest.approx(9)  # epoch milliseconds
    v = classify(200, OK, CIMultiDict({"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "3",
                                       "X-RateLimit-Reset": "12"}))
    assert (v.rate_limit, v.rate_remaining, v.rate_reset) == (100, 3, 12)


# -- issue #21: the quick paths of the hot path give what the slow ones give -------------

_FRAGMENTS = [KEY, KEY.upper(), KEY.replace("/", "%2F"), KEY.replace("/", "%252f"), KEY.replace("+", "%2B"),
              base64.b64encode(KEY.encode()).decode(), KEY[:5], "plain", "%", "+", "\ud800", "\udfff", "é", "\\", '"']
_texts = st.lists(st.sampled_from(_FRAGMENTS), max_size=4).map("".join) | st.text(max_size=12)
_values = st.recursive(st.none() | st.booleans() | st.integers() | _texts,
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
                       max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(_values, st.sampled_from(["utf-8", "utf-16", "utf-32-le"]), st.booleans())
def test_an_answer_checked_as_a_whole_text_parses_as_the_walk_does(value: object, encoding: str, ascii: bool) -> None:
    """parse_answer skips the walk over every string when the whole text shows it needs
    none: whatever the answer holds (the key in any form or case, escapes, lone surrogates,
    any JSON encoding), the result is the walk's."""
    from batch.client import Secret as S
    from batch.client import _scrub_json, parse_answer

    raw = json.dumps(value, ensure_ascii=ascii).encode(encoding, "surrogatepass")
    for secret in (S(KEY), S("short"), None):
        assert parse_answer(raw, secret) == _scrub_json(json.loads(raw), secret)


def test_a_runs_proxy_is_read_once_and_still_honours_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    from batch.client import Transport

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "api.internal")
    pinned = Transport().pinned()
    monkeypatch.setenv("HTTPS_PROXY", "http://other.example:1")
    assert pinned.proxy_for("https://api.example/x") == "http://proxy.example:3128"
    assert pinned.proxy_for("https://api.internal/x") is None
    assert pinned.proxied
    assert Transport().proxy_for("https://api.example/x") == "http://other.example:1"  # unpinned: read each time
    assert Transport(proxy="http://explicit.example:1").pinned().proxy_for("https://api.internal/x") is None
    assert Transport(proxy="http://explicit.example:1").pinned().proxy_for("https://api.example/x") \
        == "http://explicit.example:1"


@pytest.mark.parametrize(("poll", "kept"), [
    ("http://127.0.0.1:8080/api/v1/task/t-1", True),
    ("HTTP://127.0.0.1:8080/api/v1/task/t-1", True),  # the parse's answer: scheme case does not matter
    ("http://127.0.0.1:8080@evil.example/api/v1/task/t-1", False),
    ("http://127.0.0.1:80800/api/v1/task/t-1", False),
    ("http://127.0.0.1:8080.evil.example/x", False),
    ("http://127.0.0.1:8080/api/v1/task/t-1#frag", False),
    ("http://127.0.0.1:8080/api/v1/task/t 1", False),
    ("http://127.0.0.1:8080/api/v1/task/t-1\r\nX: y", False),
    ("https://127.0.0.1:8080/api/v1/task/t-1", False),
    ("http://127.0.0.1:8080/" + "x" * 2100, False),
])
def test_only_the_apis_own_poll_url_is_kept(poll: str, kept: bool) -> None:
    from batch.client import Verdict
    from batch.ratelimit import SmoothLimiter
    from batch.sending import SubmitConfig, Submitter

    submitter = Submitter(SubmitConfig("http://127.0.0.1:8080", Secret(KEY)), None, "run",  # type: ignore[arg-type]
                          limiter=SmoothLimiter(None))
    verdict = Verdict(Kind.OK, 200, task_id="t-1", data={"task_id": "t-1", "get_result": {"url": poll}})
    assert submitter._poll_url(verdict) == (poll if kept else None)
