"""failoverd's own httpcore network stream (NetStream, TLSStream, NetBackend) under
httpx's transport: real loopback sockets, plain and TLS (a throwaway CA from trustme).

The relay's hot path reads through these classes, so they must behave as httpcore's
own trio backend does: bytes intact, connections reused, errors mapped to httpx's.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable

import httpx2
import pytest
import trio
import trustme

import failoverd as fo

EVENTS = [fo._json_encode(fo.sse_chunk(f"tok{i} ")) for i in range(5)] + [b"[DONE]"]
BODY = b"".join(b"data: " + e + b"\n\n" for e in EVENTS)


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts)


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def read_request(stream: trio.abc.Stream) -> bytes:
    """One request (head and content-length body); b"" when the client closed."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return b""
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head


Handler = Callable[[trio.abc.Stream, int], Awaitable[bool]]


async def paced_sse(stream: trio.abc.Stream, n: int) -> bool:
    """Each SSE event its own chunk and its own write, 1 ms apart, as tokens come."""
    await stream.send_all(HEAD)
    for e in EVENTS:
        await stream.send_all(chunked([b"data: " + e + b"\n\n"]))
        await trio.sleep(0.001)
    await stream.send_all(b"0\r\n\r\n")
    return True  # keep the connection open for the next request


async def cut_midway(stream: trio.abc.Stream, n: int) -> bool:
    await stream.send_all(HEAD + chunked([b"data: " + EVENTS[0] + b"\n\n"]))
    return False


async def reset_midway(stream: trio.abc.Stream, n: int) -> bool:
    """One token, then a TCP reset (SO_LINGER 0): the reader gets ECONNRESET."""
    await stream.send_all(HEAD + chunked([b"data: " + EVENTS[0] + b"\n\n"]))
    await trio.sleep(0.05)
    raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.socket.close()
    return False


class Server:
    """A loopback HTTP/1.1 server, plain or TLS, counting connections."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.closed = trio.Event()  # this side has closed a connection
        self.port = 0

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        if self.tls is not None:
            stream = trio.SSLStream(stream, self.tls, server_side=True)
        n = 0
        try:
            while await read_request(stream):
                n += 1
                if not await self.handler(stream, n):
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
            self.closed.set()

    async def start(self, nursery: trio.Nursery) -> None:
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, self.serve, 0, host="127.0.0.1"))
        self.port = listener.socket.getsockname()[1]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def fetch(transport: httpx2.AsyncBaseTransport, url: str,
                connect_timeout: float = 5.0) -> tuple[int, list[bytes]]:
    request = httpx2.Request("POST", url, content=b'{"model":"m"}', extensions={
        "timeout": {"connect": connect_timeout, "read": None, "write": None, "pool": None}})
    resp = await transport.handle_async_request(request)
    parts: list[bytes] = []
    try:
        await read_into(parts, resp)
    finally:
        await resp.aclose()
    return resp.status_code, parts


async def serving(nursery: trio.Nursery, handler: Handler, ca: trustme.CA,
                  use_tls: bool) -> tuple[Server, fo.UpstreamTransport, str]:
    server = Server(handler, server_tls(ca) if use_tls else None)
    await server.start(nursery)
    transport = fo.UpstreamTransport(client_tls(ca), keepalive=4)
    scheme = "https" if use_tls else "http"
    return server, transport, f"{scheme}://127.0.0.1:{server.port}/v1/chat/completions"


async def read_into(parts: list[bytes], resp: httpx2.Response) -> None:
    async for part in resp.stream:
        parts.append(part)


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
async def test_paced_stream_arrives_intact_and_the_connection_is_reused(
        nursery, ca, use_tls):
    server, transport, url = await serving(nursery, paced_sse, ca, use_tls)
    with trio.fail_after(10):
        for _ in range(3):
            status, parts = await fetch(transport, url)
            assert status == 200
            assert b"".join(parts) == BODY
            assert len(parts) == len(EVENTS)  # one part per HTTP chunk, as httpcore yields
    assert server.connections == 1  # kept alive and reused
    await transport.aclose()


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
async def test_a_stream_cut_midway_is_an_httpx_protocol_error(nursery, ca, use_tls):
    """The connection closes inside a chunked body: h11 reports the body incomplete."""
    server, transport, url = await serving(nursery, cut_midway, ca, use_tls)
    with trio.fail_after(10), pytest.raises(httpx2.RemoteProtocolError):
        await fetch(transport, url)
    await transport.aclose()


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
async def test_a_reset_mid_stream_is_an_httpx_read_error_after_the_first_token(
        nursery, ca, use_tls):
    server, transport, url = await serving(nursery, reset_midway, ca, use_tls)
    request = httpx2.Request("POST", url, content=b"{}")
    resp = await transport.handle_async_request(request)
    parts: list[bytes] = []
    with trio.fail_after(10), pytest.raises(httpx2.ReadError):
        await read_into(parts, resp)
    assert parts == [b"data: " + EVENTS[0] + b"\n\n"]
    await transport.aclose()


async def test_refused_connection_is_an_httpx_connect_error():
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transport = fo.UpstreamTransport(ssl.create_default_context(), keepalive=4)
    with trio.fail_after(10), pytest.raises(httpx2.ConnectError):
        await fetch(transport, f"http://127.0.0.1:{port}/v1/chat/completions")


async def test_a_tls_handshake_that_never_answers_is_a_connect_timeout(
        nursery, ca, autojump_clock):
    async def silent(stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()

    [listener] = await nursery.start(
        functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    transport = fo.UpstreamTransport(client_tls(ca), keepalive=4)
    start = trio.current_time()
    with trio.fail_after(10), pytest.raises(httpx2.ConnectTimeout) as raised:
        await fetch(transport, f"https://127.0.0.1:{port}/v1/chat/completions",
                    connect_timeout=3.0)
    assert trio.current_time() - start == pytest.approx(3.0)
    assert "TLS handshake took over 3 s" in str(raised.value)  # TCP connected; TLS hung


async def test_an_idle_connection_the_server_closed_is_not_reused(nursery, ca):
    async def one_then_close(stream: trio.abc.Stream, n: int) -> bool:
        await paced_sse(stream, n)
        return False  # close after each reply, without saying so in the headers

    server = Server(one_then_close)
    await server.start(nursery)
    transport = fo.UpstreamTransport(client_tls(ca), keepalive=4)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    with trio.fail_after(10):
        await fetch(transport, url)
        await server.closed.wait()  # the server has closed: on loopback, our socket reads EOF
        status, parts = await fetch(transport, url)  # is_readable: a new connection
    assert (status, b"".join(parts)) == (200, BODY)
    assert server.connections == 2
    await transport.aclose()


async def test_light_traffic_reuses_one_connection_across_the_pool_shards(nursery, ca):
    """Pools are taken in turn among twice as many as there are requests under way:
    sequential requests all lease the first pool, so its idle connection is reused."""
    server, _, url = await serving(nursery, paced_sse, ca, use_tls=False)
    shards = fo.PoolShards([fo.UpstreamTransport(client_tls(ca), fo.POOL_KEEPALIVE)
                            for _ in range(fo.POOL_SHARDS)])
    with trio.fail_after(10):
        for _ in range(10):
            with shards.lease() as pool:
                status, parts = await fetch(pool, url)
            assert (status, b"".join(parts)) == (200, BODY)
            await trio.sleep(0.02)
    assert server.connections == 1
    assert shards.active == 0


def test_pool_shards_spread_only_under_load():
    shards = fo.PoolShards(list(range(4)))  # stand-ins for transports
    with contextlib.ExitStack() as stack:
        leased = [stack.enter_context(shards.lease()) for _ in range(6)]
        assert shards.active == 6
    assert leased == [0, 1, 2, 3, 0, 1]  # more pools as more requests are under way, then turns
    assert shards.active == 0
    for _ in range(3):  # one at a time: always the first pool
        with shards.lease() as pool:
            assert pool == 0


def https_daemon(port: int, tmp_path) -> fo.Daemon:
    cfg = fo.Config(providers={"a": fo.ProviderConfig(base_url=f"https://127.0.0.1:{port}/v1")},
                    routes={"r": fo.RouteConfig(chain=["a/m"])})
    return fo.Daemon(cfg, ledger=fo.Ledger(str(tmp_path / "ledger.jsonl")))


@pytest.mark.parametrize(("bundle", "cert_for", "verified"), [
    (False, "127.0.0.1", False),  # a private CA is not in the system store
    (True, "127.0.0.1", True),  # SSL_CERT_FILE names a bundle that has it
    (True, "elsewhere.test", False),  # trusted CA, wrong name: still refused
], ids=["system-store", "ssl-cert-file", "wrong-name"])
async def test_upstream_tls_is_verified_against_the_system_store_or_ssl_cert_file(
        nursery, ca, tmp_path, monkeypatch, bundle, cert_for, verified):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(cert_for).configure_cert(ctx)
    server = Server(paced_sse, ctx)
    await server.start(nursery)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    if bundle:
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    else:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    d = https_daemon(server.port, tmp_path)
    pool = d.snap.pools["a"].pools[0]
    url = f"https://127.0.0.1:{server.port}/v1/chat/completions"
    with trio.fail_after(10):
        if verified:
            assert await fetch(pool, url) == (200, [b"data: " + e + b"\n\n" for e in EVENTS])
        else:
            with pytest.raises(httpx2.ConnectError,
                               match="CERTIFICATE_VERIFY_FAILED.*SSL_CERT_FILE"):
                await fetch(pool, url)
    await d.aclose()


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
async def test_h11body_reads_plain_and_tls_bodies_and_the_connection_is_reused(
        nursery, ca, use_tls):
    server, transport, url = await serving(nursery, paced_sse, ca, use_tls)
    with trio.fail_after(10):
        for _ in range(3):
            assert await read_h11(transport, url) == [b"data: " + e + b"\n\n" for e in EVENTS]
    assert server.connections == 1
    await transport.aclose()


async def read_h11(transport: fo.UpstreamTransport, url: str) -> list[bytes]:
    """A streamed reply's parts as H11Body reads them (asserting it does)."""
    resp = await transport.handle_async_request(httpx2.Request("POST", url, content=b"{}"))
    body = fo.upstream_body(resp)
    assert isinstance(body, fo.H11Body)
    try:
        return [bytes(part) async for part in body]
    finally:
        await resp.aclose()


async def sse_with_length(stream: trio.abc.Stream, n: int) -> bool:
    """A streamed reply framed by Content-Length, the connection kept open after it."""
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                          b"content-length: %d\r\n\r\n" % len(BODY))
    for e in EVENTS:
        await stream.send_all(b"data: " + e + b"\n\n")
        await trio.sleep(0.001)
    return True


async def test_h11body_ends_a_content_length_body_without_waiting_for_more_bytes(nursery, ca):
    """Once Content-Length bytes are in, h11 has the end of the body without another
    read: the reader must ask it rather than wait on a socket that stays quiet."""
    server, transport, url = await serving(nursery, sse_with_length, ca, use_tls=False)
    with trio.fail_after(5):
        for _ in range(2):
            assert b"".join(await read_h11(transport, url)) == BODY
    assert server.connections == 1
    await transport.aclose()
