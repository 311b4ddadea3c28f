"""Behind a corporate proxy, with a private certificate authority (issue #14 part 1).

A small forward proxy runs here on 127.0.0.1 (CONNECT tunnels for https, absolute-form
requests for http, optional Basic credentials) and records what passes; the fake API
serves TLS with a certificate from a test authority (trustme). Tests assert from the
proxy's own record that the requests went through it, in a tunnel: the key never
crosses the proxy in clear."""

import asyncio
import base64
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme
from conftest import KEY, cli, error_line, json_lines, prompts, results, write_csv

from batch.fake_api import FakeConfig, FakeServer, fake_in_thread


class ForwardProxy:
    """CONNECT and absolute-form forwarding; ``lines`` are the first lines it saw, ``raw``
    every byte that crossed it from clients."""

    def __init__(self, credentials: str | None = None) -> None:
        self.credentials = credentials
        self.lines: list[str] = []
        self.raw = bytearray()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        self.raw += head
        first = head.split(b"\r\n", 1)[0].decode()
        self.lines.append(first)
        if self.credentials is not None:
            expected = "Proxy-Authorization: Basic " + base64.b64encode(self.credentials.encode()).decode()
            if expected.encode() not in head:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                writer.close()
                return
        method, target, _ = first.split(" ", 2)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        else:  # absolute-form: the server accepts it as is
            hostport = target.split("/", 3)[2]
            host, _, port = hostport.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port or 80))
            up_writer.write(head)
        await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False))

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
        try:
            while data := await src.read(65536):
                if record:
                    self.raw += data
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    @contextmanager
    def running(self) -> Iterator[str]:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            server = loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        ready.wait(10)
        try:
            yield f"http://127.0.0.1:{self.port}"
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[FakeServer, Path]]:
    """The fake over https://localhost with a test authority's certificate; its CA file."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "corporate-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with fake_in_thread(FakeConfig(), context) as server:
        yield server, ca_file


def run(fake: FakeServer, tmp_path: Path, *extra: str, env: dict[str, str] | None = None):
    path = write_csv(tmp_path / "in.csv", prompts(4))
    return cli(["submit", str(path), "-o", str(tmp_path / "r.parquet"), "--base-url", fake.url, "--state",
                str(tmp_path / "s.sqlite"), "--rate", "0", *extra], env=env)


def test_https_goes_through_the_proxy_in_a_tunnel_and_downloads_too(tls, tmp_path: Path) -> None:
    fake, ca = tls
    proxy = ForwardProxy()
    with proxy.running() as proxy_url:
        res = run(fake, tmp_path, "--proxy", proxy_url, "--ca-bundle", str(ca))
        assert res.exit_code == 0, res.output
        col = cli(["collect", "--state", str(tmp_path / "s.sqlite"), "--base-url", fake.url, "--rate", "0",
                   "--results", str(tmp_path / "r.parquet"), "--download", str(tmp_path / "v"), "--proxy", proxy_url,
                   "--ca-bundle", str(ca)])
        assert col.exit_code == 0, col.output
    port = fake.url.rsplit(":", 1)[1]
    assert proxy.lines and all(line == f"CONNECT localhost:{port} HTTP/1.1" for line in proxy.lines)
    assert len(fake.state.submissions()) == 4 and len(list((tmp_path / "v").glob("*.mp4"))) == 4
    assert KEY.encode() not in proxy.raw  # only TLS records crossed it
    assert results(tmp_path / "r.parquet")["status"].to_list() == ["submitted"] * 4


def test_the_environments_proxy_and_no_proxy(tls, tmp_path: Path) -> None:
    fake, ca = tls
    proxy = ForwardProxy()
    with proxy.running() as proxy_url:
        res = run(fake, tmp_path, "--ca-bundle", str(ca), env={"HTTPS_PROXY": proxy_url})
        assert res.exit_code == 0, res.output
        assert len(proxy.lines) >= 4
        seen = len(proxy.lines)
        res = run(fake, tmp_path, "--ca-bundle", str(ca), env={"https_proxy": proxy_url, "NO_PROXY": "localhost"})
        assert res.exit_code == 0 and len(proxy.lines) == seen  # bypassed
        res = run(fake, tmp_path, "--ca-bundle", str(ca), "--proxy", proxy_url, env={"no_proxy": "localhost"})
        assert res.exit_code == 0 and len(proxy.lines) == seen  # an explicit proxy honours NO_PROXY too


def test_proxy_credentials_work_and_never_appear_in_any_output(tls, tmp_path: Path) -> None:
    fake, ca = tls
    proxy = ForwardProxy(credentials="ops:s3cret-proxy-pass")
    with proxy.running() as proxy_url:
        with_creds = proxy_url.replace("http://", "http://ops:s3cret-proxy-pass@")
        res = run(fake, tmp_path, "--proxy", with_creds, "--ca-bundle", str(ca), "--log-level", "debug")
        assert res.exit_code == 0, res.output
        haystack = res.output + res.stderr + "".join(
            p.read_bytes().decode("latin-1") for p in tmp_path.iterdir() if p.is_file())
        assert "s3cret-proxy-pass" not in haystack
        assert any(e.get("proxy") == f"http://***@127.0.0.1:{proxy.port}" for e in json_lines(res.stderr))
        res = run(fake, tmp_path, "--proxy", proxy_url, "--ca-bundle", str(ca))
        assert res.exit_code == 5 and "the proxy asks for credentials (HTTP 407)" in error_line(res.stderr)


def test_an_untrusted_certificate_is_one_line_naming_the_host_and_the_option(tls, tmp_path: Path) -> None:
    fake, ca = tls
    res = run(fake, tmp_path)
    assert res.exit_code == 5
    line = error_line(res.stderr)
    assert "TLS: the certificate of localhost is not trusted" in line and "--ca-bundle" in line
    assert fake.state.records == []
    res = run(fake, tmp_path, env={"SSL_CERT_FILE": str(ca)})
    assert res.exit_code == 0, res.output
    res = run(fake, tmp_path, "--ca-bundle", str(tmp_path / "missing.pem"))
    assert res.exit_code == 2 and "--ca-bundle" in error_line(res.stderr)


def test_one_ssl_context_per_trust_setting_and_an_edited_bundle_is_read_again(tmp_path: Path) -> None:
    """Loading the system's authorities costs 20-90 ms; a run asked three times (and the
    suite's in-process runs paid it ~2,000 times). An edited bundle is still read again."""
    from batch.client import Transport

    bundle = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(bundle))
    first = Transport(ca_bundle=str(bundle)).ssl_context()
    assert Transport(ca_bundle=str(bundle)).ssl_context() is first
    assert Transport().ssl_context() is not first  # another trust setting, another context
    trusted = len(first.get_ca_certs())
    trustme.CA().cert_pem.write_to_path(str(bundle), append=True)
    again = Transport(ca_bundle=str(bundle)).ssl_context()
    assert again is not first and len(again.get_ca_certs()) == trusted + 1
