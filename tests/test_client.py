import json
from email.utils import formatdate

import pytest
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
    (200, body({"code": 1001, "message": "Rejected: nope"}), Kind.FAIL),
    (400, body({"code": 400, "message": "Bad Request: prompt"}), Kind.FAIL),
    (403, b"", Kind.FAIL), (404, b"", Kind.FAIL), (413, b"", Kind.FAIL), (422, b"", Kind.FAIL), (409, b"", Kind.FAIL),
    (401, body({"code": 401, "message": "Unauthorized: bad key"}), Kind.FATAL), (402, b"", Kind.FATAL),
    (429, b"", Kind.RETRY), (503, b"", Kind.RETRY),
    (500, b"", Kind.UNKNOWN), (502, b"", Kind.UNKNOWN), (504, b"", Kind.UNKNOWN), (599, b"", Kind.UNKNOWN),
    (302, b"", Kind.UNKNOWN),
])
def test_classify(status: int, raw: bytes, kind: Kind) -> None:
    assert classify(status, raw, H).kind is kind


def test_classify_keeps_provider_code_and_message() -> None:
    v = classify(200, body({"code": 1001, "message": "Rejected: quota"}), H)
    assert (v.error_code, v.error, v.http_status) == (1001, "Rejected: quota", 200)
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
