"""The submit hot path's shortcuts decide exactly as the slow definitions they replace."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.api import on_origin, origin
from batch.client import Transport, _choose_proxy

ORIGINS = ["http://127.0.0.1:8080", "https://api.modellix.ai", "http://[::1]:9"]
TAILS = ["/v2/result/t1", "", "@evil.example/x", ".evil.example/x", ":99/x", "0/x", "//x", "/", "?q", "#f",
         "\\@evil/x", "/x\r\nHost: evil", "%2F@evil/"]


@pytest.mark.parametrize("api", ORIGINS)
@pytest.mark.parametrize("tail", TAILS)
def test_on_origin_is_origin_equality(api: str, tail: str) -> None:
    for url in (api + tail, api.upper() + tail, api.replace("://", "://user@") + tail):
        try:
            slow = origin(url) == api
        except ValueError:
            with pytest.raises(ValueError):
                on_origin(url, api)
            continue
        assert on_origin(url, api) == slow, url


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ORIGINS), st.text(alphabet="/@:.%?#[]\\ab1", max_size=12))
def test_on_origin_on_generated_tails(api: str, tail: str) -> None:
    url = api + tail
    try:
        slow = origin(url) == api
    except ValueError:
        return
    assert on_origin(url, api) == slow, url


def test_the_proxy_is_chosen_once_per_url_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice is memoised on (explicit proxy, URL, environment): a changed
    environment is a new choice, never a stale one."""
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    transport = Transport()
    url = "https://api.example/api/v1/x/async"
    assert transport.proxy_for(url) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")
    assert transport.proxy_for(url) == "http://proxy.local:3128"
    monkeypatch.setenv("NO_PROXY", "api.example")
    assert transport.proxy_for(url) is None
    _choose_proxy.cache_clear()  # type: ignore[attr-defined]
    assert os.environ["NO_PROXY"] == "api.example" and transport.proxy_for(url) is None
