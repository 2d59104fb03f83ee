"""The streamed-reply body path: H11Body drives the h11 state machine of the httpcore2
connection that received the head, and relays through the production client path.

Two kinds of upstream connection:

- real loopback sockets to a `FakeUpstream` (chunked, kept-alive replies), real time,
  every test bounded by `trio.fail_after`;
- in virtual time (`autojump_clock`), an httpcore2 network backend whose connect
  returns one end of a kernel socketpair served by an in-process `FakeUpstream`, so
  the deadlines are asserted to the exact `trio.current_time()`.

The client side is a kernel socketpair too (test_hardening's helper), so the relay's
one-write fast path (`H11Reply.relay_now`) is the one under test.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from typing import Any

import httpcore2
import httpx2
import msgspec
import pytest
import trio
from conftest import (
    ClientResult,
    FixedJitter,
    http_request,
    make_config,
    read_response,
    socket_pair,
)

import failoverd as fo

DONE = ("sse", "[DONE]")


def answer(words: list[str], *, gap: float = 0.0, done: bool = True) -> fo.Script:
    """A healthy streamed answer as a chunked reply: the same events as token_script,
    each its own HTTP chunk."""
    steps = fo.token_script(words, gap=gap, done=done)
    return [("chunked", 200, {}), *steps[1:]]


def ended(script: fo.Script) -> fo.Script:
    return [*script, ("end",)]


class PairBackend(httpcore2.AsyncNetworkBackend):
    """Every connect is a fresh kernel socketpair whose other end `upstream` serves."""

    def __init__(self, upstream: fo.FakeUpstream, nursery: trio.Nursery) -> None:
        self.upstream = upstream
        self.nursery = nursery

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Any = None) -> httpcore2.AsyncNetworkStream:
        ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.nursery.start_soon(self.upstream.serve_stream, trio.SocketStream(theirs))
        return fo.NetStream(trio.SocketStream(ours))

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class Rig:
    """A Daemon whose providers a and b are served by one FakeUpstream (scripts by
    model name, one per call where a list of scripts is given), over loopback TCP or
    over socketpairs; clients talk to `handle_connection` over a kernel socketpair."""

    def __init__(self, nursery: trio.Nursery, ledger: str, scripts: dict[str, Any],
                 *, pairs: bool, chain: tuple[str, ...] = ("a/m1", "b/m2"),
                 **timing: float) -> None:
        self.nursery = nursery
        self.ledger_path = ledger
        self.scripts = scripts
        self.upstream = fo.FakeUpstream(self._script)
        self.pairs = pairs
        self.chain = list(chain)
        self.timing = timing
        self.d: fo.Daemon | None = None

    def _script(self, model: str, body: dict[str, Any], n: int) -> fo.Script:
        entry = self.scripts[model]
        if entry and isinstance(entry[0], list):  # one script per call to this model
            calls = sum(1 for b in self.upstream.requests if b.get("model") == model) - 1
            return entry[min(calls, len(entry) - 1)]
        return entry

    async def start(self) -> Rig:
        cfg = make_config({"r": self.chain}, ledger=self.ledger_path, **self.timing)
        transport = None
        if self.pairs:
            backend = PairBackend(self.upstream, self.nursery)
            transport = fo.UpstreamTransport(fo.ssl.create_default_context(), 4, backend)
        else:
            await self.nursery.start(self.upstream.serve)
            url = self.upstream.base_url
            cfg = msgspec.structs.replace(cfg, providers={
                p: fo.ProviderConfig(base_url=url) for p in ("a", "b")})
        self.d = fo.Daemon(cfg, ledger=fo.Ledger(self.ledger_path), transport=transport,
                           rng=FixedJitter())
        self.d.background = self.nursery
        return self

    async def ask(self, *, stream: bool = True) -> trio.SocketStream:
        """A client connection that has sent its request."""
        assert self.d is not None
        client, server = socket_pair(buffer=256 * 1024)
        self.nursery.start_soon(fo.handle_connection, self.d, server, fo.Peer(1, 1))
        await client.send_all(http_request({"model": "r", "stream": stream,
                                            "messages": [{"role": "user", "content": "hi"}]}))
        return client

    async def chat(self, *, stream: bool = True) -> ClientResult:
        result = ClientResult()
        result.t_start = trio.current_time()
        client = await self.ask(stream=stream)
        await read_response(client, result)
        await client.aclose()
        return result

    def rows(self, kind: str) -> list[dict[str, Any]]:
        with open(self.ledger_path, "rb") as f:
            rows = [msgspec.json.decode(line) for line in f if line.strip()]
        return [r for r in rows if r["kind"] == kind]

    def outcomes(self) -> list[tuple[str, str]]:
        return [(f"{r['provider']}/{r['model']}", r["outcome"]) for r in self.rows("attempt")]


@pytest.fixture
def rig(nursery, tmp_path):
    async def make(scripts: dict[str, Any], *, pairs: bool = False, **kw: Any) -> Rig:
        return await Rig(nursery, str(tmp_path / "ledger.jsonl"), scripts, pairs=pairs,
                         **kw).start()
    return make


# -- the fast path is taken, and it hands the connection back -------------------------

async def test_a_streamed_reply_is_read_by_h11body_and_its_connection_goes_back_to_the_pool(
        nursery):
    upstream = fo.FakeUpstream(lambda model, body, n: ended(answer(["a", " b"])))
    await nursery.start(upstream.serve)
    transport = fo.UpstreamTransport(fo.ssl.create_default_context(), 4)
    request = httpx2.Request("POST", upstream.base_url + "/chat/completions",
                             content=b'{"model": "m"}')
    with trio.fail_after(10):
        resp = await transport.handle_async_request(request)
        body = fo.upstream_body(resp)
        assert isinstance(body, fo.H11Body)  # not httpcore2's generator
        parts = [bytes(part) async for part in body]
        await resp.aclose()
    expected = b"".join(fo.script_bytes(step) for step in answer(["a", " b"])[1:])
    assert b"".join(parts) == expected
    assert len(parts) == len(answer(["a", " b"])) - 1  # one part per HTTP chunk
    [conn] = transport.pool.connections
    assert conn.is_idle()  # h11 reached DONE: the connection is reusable
    await transport.aclose()


async def test_responses_from_other_transports_keep_their_own_stream():
    upstreams = fo.httpx2.MockTransport(lambda request: httpx2.Response(
        200, headers={"content-type": "text/event-stream"}, content=b"data: x\n\n"))
    resp = await upstreams.handle_async_request(httpx2.Request("POST", "http://x.test/"))
    assert fo.upstream_body(resp) is resp.stream


# -- over loopback TCP, real time ------------------------------------------------------

async def test_two_requests_in_turn_share_one_upstream_connection(rig):
    r = await rig({"m1": ended(answer(["Hello", " there"]))})
    with trio.fail_after(10):
        first = await r.chat()
        second = await r.chat(stream=False)
    assert (first.text, first.events[-1]) == ("Hello there", "[DONE]")
    assert second.text == "Hello there"
    assert r.upstream.connections == 1
    assert r.outcomes() == [("a/m1", "ok"), ("a/m1", "ok")]


async def test_a_body_cut_inside_a_chunk_is_truncated(rig):
    cut = [*answer(["The", " answer"], done=False)[:4], ("raw", b"40\r\ndata: {\"cho"),
           ("sleep", 0.05), ("close",)]
    r = await rig({"m1": cut, "m2": ended(answer(["b"]))})
    with trio.fail_after(10):
        result = await r.chat()
    assert result.text == "The answer"
    assert "truncated" in result.events[-1]["error"]["message"]
    [attempt] = r.rows("attempt")
    assert attempt["outcome"] == "truncated"
    assert "before the body ended" in attempt["error"]


async def test_a_body_without_its_terminating_chunk_is_truncated(rig):
    no_end = [*answer(["The", " answer"], done=False)[:4], ("sleep", 0.05), ("close",)]
    r = await rig({"m1": no_end, "m2": ended(answer(["b"]))})
    with trio.fail_after(10):
        result = await r.chat()
    assert result.text == "The answer"
    assert r.outcomes() == [("a/m1", "truncated")]
    assert "incomplete chunked read" in r.rows("attempt")[0]["error"]


async def test_a_whole_answer_whose_connection_then_drops_is_still_a_success(rig):
    r = await rig({"m1": [*answer(["All", " here"]), ("close",)]})  # no terminating chunk
    with trio.fail_after(10):
        result = await r.chat()
    assert (result.text, result.events[-1]) == ("All here", "[DONE]")
    assert r.outcomes() == [("a/m1", "ok")]


async def test_several_chunks_in_one_read_are_all_relayed(rig):
    """The [DONE] event and the terminating chunk arrive together with the last
    token: h11 is asked for every buffered event before the socket is read again."""
    steps = answer(["x", " y"])
    tail = b"".join(b"%x\r\n%b\r\n" % (len(fo.script_bytes(s)), fo.script_bytes(s))
                    for s in steps[3:])
    r = await rig({"m1": [*steps[:3], ("raw", tail + b"0\r\n\r\n"), ("hang",)]})
    with trio.fail_after(10):
        result = await r.chat()
    assert (result.text, result.events[-1]) == ("x y", "[DONE]")
    assert r.outcomes() == [("a/m1", "ok")]


async def test_after_done_a_slow_tail_is_left_after_the_drain_grace_and_not_reused(rig):
    slow_tail = [*answer(["slow", " end"]), ("sleep", 30.0), ("end",)]
    r = await rig({"m1": [slow_tail, ended(answer(["next"]))]})
    with trio.fail_after(10):
        first = await r.chat()
        second = await r.chat()
    assert (first.text, first.events[-1]) == ("slow end", "[DONE]")
    assert second.text == "next"
    assert r.outcomes() == [("a/m1", "ok"), ("a/m1", "ok")]
    assert r.upstream.connections == 2  # the first was closed, not put back
    assert r.upstream.disconnects == 1  # ... by failoverd, while the tail was pending


@pytest.mark.parametrize(("garbage", "why"), [
    (b"zz\r\n", "illegal chunk header"),  # a chunk size that is not hex
    (b"1" * (200 * 1024), "Receive buffer too long"),  # a chunk-size line that never ends
    (b"5\r\nhello" + b"XX", "malformed chunk footer"),  # a chunk longer than it said
])
async def test_bytes_that_break_chunked_framing_are_a_protocol_error(rig, garbage, why):
    steps = answer(["ok"], done=False)[:3]
    r = await rig({"m1": [*steps, ("raw", garbage), ("hang",)], "m2": ended(answer(["b"]))})
    with trio.fail_after(10):
        result = await r.chat()
    [attempt] = r.rows("attempt")
    assert attempt["outcome"] == "protocol_error"
    assert why in attempt["error"]
    assert "protocol_error" in result.events[-1]["error"]["message"]  # after commit: in band


async def test_garbage_before_the_first_token_fails_over(rig):
    r = await rig({"m1": [("chunked", 200, {}), ("raw", b"zz\r\n"), ("hang",)],
                   "m2": ended(answer(["from b"]))})
    with trio.fail_after(10):
        result = await r.chat()
    assert result.text == "from b"
    assert r.outcomes() == [("a/m1", "protocol_error"), ("b/m2", "ok")]


async def test_an_endless_sse_line_is_a_protocol_error(rig):
    """9 MiB of one data line in 64 KiB chunks: the 8 MiB cap trips; each chunk is
    searched once (see test_sse_parser_searches_each_byte_once)."""
    piece = ("raw", b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
    start = b'data: {"x'
    steps = [*answer(["ok"], done=False)[:3], ("raw", b"%x\r\n%b\r\n" % (len(start), start)),
             *[piece] * 144, ("hang",)]
    r = await rig({"m1": steps})
    with trio.fail_after(20):
        await r.chat()
    [attempt] = r.rows("attempt")
    assert attempt["outcome"] == "protocol_error"
    assert f"longer than {fo.MAX_SSE_LINE} bytes" in attempt["error"]


# -- in virtual time, over socketpairs -------------------------------------------------

async def test_first_token_deadline_fires_exactly_on_a_chunked_reply(rig, autojump_clock):
    late = [("chunked", 200, {}), ("sse", fo.sse_chunk(role="assistant", content="")),
            ("comment", "keep-alive"), ("sleep", 9.0), *answer(["late"])[2:], ("end",)]
    r = await rig({"m1": late, "m2": ended(answer(["b"]))}, pairs=True,
                  first_token_timeout_s=2.0)
    result = await r.chat()
    assert result.text == "b"
    assert r.outcomes() == [("a/m1", "first_token_timeout"), ("b/m2", "ok")]
    assert r.rows("attempt")[0]["latency_ms"] == 2000.0
    assert result.t_first == 2.0


async def test_stall_deadline_fires_exactly_mid_body(rig, autojump_clock):
    stalls = [*answer(["one", " two"], gap=1.0, done=False)[:5], ("sleep", 60.0), ("end",)]
    r = await rig({"m1": stalls}, pairs=True, chain=("a/m1",), stall_timeout_s=5.0)
    result = await r.chat()
    assert result.text == "one two"
    [attempt] = r.rows("attempt")
    assert attempt["outcome"] == "stall_timeout"
    assert attempt["latency_ms"] == 6000.0  # the last token at 1 s, then 5 s of silence
    assert result.t_end == 6.0


async def test_drain_after_done_ends_exactly_drain_s_later_and_the_connection_is_closed(
        rig, autojump_clock):
    slow_tail = [*answer(["a", " b"], gap=1.0), ("sleep", 10.0), ("end",)]
    r = await rig({"m1": [slow_tail, ended(answer(["c"]))]}, pairs=True)
    first = await r.chat()
    # The engine ends the client's reply once the attempt is over, drain included.
    assert first.t_end == 1.0 + fo.DRAIN_S
    second = await r.chat()
    assert (first.text, second.text) == ("a b", "c")
    attempt = r.rows("attempt")[0]
    assert attempt["outcome"] == "ok"
    assert attempt["latency_ms"] == 1000.0 + fo.DRAIN_S * 1000  # the tail got DRAIN_S
    assert r.upstream.connections == 2


async def test_a_clean_end_after_done_gives_the_connection_back_at_once(rig, autojump_clock):
    r = await rig({"m1": ended(answer(["a", " b"], gap=1.0))}, pairs=True)
    for _ in range(3):
        result = await r.chat()
        assert result.text == "a b"
    assert r.upstream.connections == 1
    assert [a["latency_ms"] for a in r.rows("attempt")] == [1000.0] * 3


async def test_a_client_gone_mid_body_hangs_up_on_the_upstream_at_once(rig, autojump_clock):
    r = await rig({"m1": [*answer(["a", " b", " c"], gap=1.0), ("end",)]}, pairs=True)
    client = await r.ask()
    await client.receive_some(65536)
    await trio.sleep(1.5)
    await client.aclose()
    await r.upstream.disconnected.wait()
    assert trio.current_time() == 1.5
    [attempt] = r.rows("attempt")
    assert attempt["outcome"] == "client_disconnected"


# -- the SSE parser: work in proportion to the bytes fed ------------------------------

class CountingBytes(bytes):
    """bytes that count what their searching, splitting, slicing and adding methods
    go through, so the parser's work can be asserted without a clock (joins, made on
    a plain separator, are counted by `joins` below)."""

    touched = 0

    def _count(self, n: int) -> None:
        CountingBytes.touched += n

    def find(self, *args: Any) -> int:
        self._count(len(self))
        return bytes.find(self, *args)

    def split(self, *args: Any) -> list[bytes]:
        self._count(len(self))
        return [CountingBytes(part) for part in bytes.split(self, *args)]

    def __add__(self, other: bytes) -> CountingBytes:
        self._count(len(self) + len(other))
        return CountingBytes(bytes.__add__(self, other))

    def __getitem__(self, key: Any) -> Any:
        part = bytes.__getitem__(self, key)
        if isinstance(part, bytes):
            self._count(len(part))
            return CountingBytes(part)
        return part


@contextlib.contextmanager
def joins() -> Iterator[list[int]]:
    """Counts the bytes joins made inside the block: sys.setprofile sees each C call."""
    count = [0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") == "join" and \
                isinstance(getattr(arg, "__self__", None), bytes):
            count[0] += 1

    sys.setprofile(profile)
    try:
        yield count
    finally:
        sys.setprofile(None)


def test_sse_parser_searches_each_byte_once():
    """A long line fed in small pieces costs work in proportion to its length (it was
    re-searched from its start on every piece: 7.9 MiB cost ~1.1 s of loop time)."""
    parser = fo.SSEParser()
    CountingBytes.touched = 0
    fed = 0
    first = CountingBytes(b"data: {\"content\": \"")
    parser.feed(first)
    fed += len(first)
    with joins() as held_joins:
        for _ in range(1024):
            piece = CountingBytes(b"y" * 256)
            assert parser.feed(piece) == []
            fed += len(piece)
    assert held_joins == [0]  # the held start is never re-joined while the line grows
    last = CountingBytes(b"\"}\n\n")
    with joins() as line_joins:
        [(event, data)] = parser.feed(last)
    assert line_joins == [1]  # joined once, when its end came
    fed += len(last)
    assert (event, data) == (None, b"{\"content\": \"" + b"y" * 256 * 1024 + b"\"}")
    assert CountingBytes.touched <= 3 * fed  # was ~1000x: quadratic in the line


def test_an_endless_line_trips_the_cap_after_linear_work():
    parser = fo.SSEParser()
    CountingBytes.touched = 0
    piece = CountingBytes(b"z" * 65536)
    with joins() as held_joins:
        for _ in range(fo.MAX_SSE_LINE // 65536):
            parser.feed(piece)  # up to the cap: held
    assert held_joins == [0]
    with pytest.raises(fo.Failure, match="SSE line longer than") as e:
        parser.feed(piece)
    assert e.value.outcome == "protocol_error"
    assert CountingBytes.touched <= 3 * (fo.MAX_SSE_LINE + 2 * 65536)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_sse_parser_gives_the_same_events_however_the_bytes_are_split(size):
    stream = (b": keep-alive\r\n\r\nevent: delta\r\ndata: {\"a\": 1}\r\n\r\n"
              b"data: line one\ndata: line two\n\nid: 7\nretry: 10\nnonsense\n\n"
              b"data: [DONE]\n\n")
    parser = fo.SSEParser()
    events = []
    for i in range(0, len(stream), size):
        events += parser.feed(bytearray(stream[i:i + size]))  # h11 hands out bytearrays
    events += parser.close()
    assert [(e, bytes(d)) for e, d in events] == [
        (b"delta", b"{\"a\": 1}"), (None, b"line one\nline two"), (None, b"[DONE]")]
    assert all(e is None or type(e) is bytes for e, _ in events)
    assert (parser.heartbeats, parser.junk) == (1, 1)
