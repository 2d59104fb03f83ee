"""The HTTP front end: bad input of every kind gets a clear error in OpenAI's shape,
the connection deadlines hold in virtual time, and the daemon keeps serving.

Every test runs against a daemon whose limits are small and distinct (see DAEMON),
so an assertion on a time or a size tells which limit fired.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from conftest import (
    ClientResult,
    Harness,
    MockUpstreams,
    http_request,
    make_config,
    ok_script,
    read_response,
)

import failoverd as fo

ROUTES = {"desk": ["a/m1", "b/m2"], "batch": ["b/m2"]}
DAEMON = {"max_body_bytes": 1000, "head_timeout_s": 7.0, "body_timeout_s": 20.0,
          "keepalive_timeout_s": 45.0}
GOOD = {"model": "desk", "messages": [{"role": "user", "content": "hello"}]}
ERROR_FIELDS = {"message", "type", "code", "param"}


@pytest.fixture
def h(tmp_path, nursery) -> Harness:
    ledger = str(tmp_path / "ledger.jsonl")
    cfg = msgspec.structs.replace(make_config(ROUTES),
                                  daemon=fo.DaemonConfig(ledger=ledger, **DAEMON))
    scripts = {"a/m1": ok_script(), "b/m2": ok_script()}
    return Harness(cfg, MockUpstreams(scripts), ledger, nursery)


class Conn:
    """One raw client connection to `handle_connection`, for tests that pace their bytes."""

    def __init__(self, h: Harness) -> None:
        self.client, server = trio.testing.memory_stream_pair()
        self.handler_done: float | None = None
        self._done = trio.Event()
        h.nursery.start_soon(self._serve, h.d, server)

    async def _serve(self, d: fo.Daemon, server: trio.abc.Stream) -> None:
        await fo.handle_connection(d, server, fo.Peer(4242, 1000))
        self.handler_done = trio.current_time()
        self._done.set()

    async def handler_returned_at(self) -> float:
        await self._done.wait()
        assert self.handler_done is not None
        return self.handler_done

    async def send(self, data: bytes) -> None:
        await self.client.send_all(data)

    async def response(self) -> ClientResult:
        result = ClientResult()
        result.t_start = trio.current_time()
        return await read_response(self.client, result)

    async def read_until(self, marker: bytes) -> bytes:
        data = b""
        while marker not in data:
            chunk = await self.client.receive_some()
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        return data

    async def read_to_close(self) -> bytes:
        parts = []
        while chunk := await self.client.receive_some():
            parts.append(chunk)
        return b"".join(parts)

    async def is_open_after(self, seconds: float) -> bool:
        """True if the daemon neither sent nor closed anything for `seconds`."""
        with trio.move_on_after(seconds):
            await self.client.receive_some()
            return False
        return True

    async def closed_at(self) -> float:
        """Wait until the daemon closes the connection; the time it did."""
        assert await self.client.receive_some() == b""
        return trio.current_time()


def split_head(raw: bytes) -> tuple[bytes, bytes]:
    head, body = raw.split(b"\r\n\r\n", 1)
    return head + b"\r\n\r\n", body


def error_of(body: Any, *, code: str, param: str | None = None) -> str:
    """Check OpenAI's error shape; the message."""
    error = body["error"]
    assert set(error) == ERROR_FIELDS
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param)
    assert isinstance(error["message"], str)
    assert error["message"]
    return error["message"]


async def assert_still_serving(h: Harness) -> None:
    result = await h.chat("desk")
    assert result.status == 200
    assert result.text == "hi there"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHAT_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: failoverd\r\n"
             b"content-type: application/json\r\n")

# (id, raw request, status, code, param, words the message must contain)
BAD_REQUESTS = [
    ("malformed JSON", http_request(b'{"model": "desk", "messages": ['), 400, "invalid_json",
     None, ["not valid JSON"]),
    ("body is a JSON array", http_request(b'[{"model": "desk"}]'), 400, "invalid_json", None,
     ["JSON object"]),
    ("missing messages", http_request({"model": "desk"}), 400, "missing_messages", "messages",
     ["messages"]),
    ("empty messages", http_request({"model": "desk", "messages": []}), 400, "missing_messages",
     "messages", ["messages"]),
    ("messages is not an array", http_request({"model": "desk", "messages": "hello"}), 400,
     "missing_messages", "messages", ["messages"]),
    ("invalid UTF-8", http_request(b'{"model": "desk", "messages": [{"role": "user", '
                                   b'"content": "\xff\xfe"}]}'), 400, "invalid_json", None,
     ["not valid JSON"]),
    ("unknown route", http_request({**GOOD, "model": "nope"}), 404, "model_not_found", "model",
     ["'nope'", "desk", "batch"]),
    ("undeclared provider in a bare PROVIDER/MODEL", http_request({**GOOD, "model": "zz/m1"}),
     404, "model_not_found", "model", ["desk", "batch"]),
    ("model missing", http_request({"messages": GOOD["messages"]}), 400, "model_not_found",
     "model", ["desk", "batch"]),
    ("malformed request line", b"NOT AN HTTP REQUEST\r\n\r\n", 400, "bad_http", None,
     ["malformed HTTP request"]),
    ("unknown path", http_request(b"", path="/v2/chat", method="GET"), 404, "not_found", None,
     ["/v2/chat", "POST /v1/chat/completions"]),
    ("wrong method", http_request(b"", path="/v1/chat/completions", method="GET"), 405,
     "method_not_allowed", None, ["GET", "/v1/chat/completions"]),
    ("bad chunked framing", CHAT_HEAD + b"transfer-encoding: chunked\r\n\r\nzz\r\n", 400,
     "bad_http", None, ["malformed HTTP request"]),
    # Wrong types anywhere failoverd reads: a 400 naming the field, no upstream called.
    ("stream as a string", http_request({**GOOD, "stream": "true"}), 400, "invalid_value",
     "stream", ["'stream'", "bool", "str"]),
    ("content a number", http_request({**GOOD, "messages": [
        {"role": "system", "content": "hi"}, {"role": "user", "content": 5}]}), 400,
     "invalid_value", "messages[1].content", ["'messages[1].content'", "got `int`"]),
    ("tool_calls of numbers", http_request({**GOOD, "messages": [
        {"role": "assistant", "content": None, "tool_calls": [1]}]}), 400, "invalid_value",
     "messages[0].tool_calls[0]", ["object"]),
    ("image_url a string", http_request({**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": "x"}]}]}), 400, "invalid_value",
     "messages[0].content[0].image_url", ["object"]),
    ("a text part without text", http_request({**GOOD, "messages": [{"role": "user", "content": [
        {"type": "text"}]}]}), 400, "invalid_value", "messages[0].content[0]", ["'text'"]),
    ("a part without a type", http_request({**GOOD, "messages": [{"role": "user", "content": [
        {"text": "hi"}]}]}), 400, "invalid_value", "messages[0].content[0]", ["`type`"]),
    ("role a number", http_request({**GOOD, "messages": [{"role": 3, "content": "x"}]}), 400,
     "invalid_value", "messages[0].role", ["str"]),
    ("a message that is not an object", http_request({**GOOD, "messages": ["hello"]}), 400,
     "invalid_value", "messages[0]", ["object"]),
    ("max_tokens a string", http_request({**GOOD, "max_tokens": "10"}), 400, "invalid_value",
     "max_tokens", ["int"]),
    ("max_tokens negative", http_request({**GOOD, "max_tokens": -1}), 400, "invalid_value",
     "max_tokens", [">= 0"]),
    ("stop a number", http_request({**GOOD, "stop": 5}), 400, "invalid_value", "stop", []),
    ("tools not objects", http_request({**GOOD, "tools": ["f"]}), 400, "invalid_value",
     "tools[0]", []),
    ("stream_options not an object", http_request({**GOOD, "stream_options": True}), 400,
     "invalid_value", "stream_options", []),
]


@pytest.mark.parametrize(("raw", "status", "code", "param", "words"),
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS])
async def test_bad_request_gets_a_clear_openai_error_and_the_daemon_keeps_serving(
        h, raw, status, code, param, words):
    result = await h.send(raw)

    assert result.status == status
    assert result.headers["content-type"] == "application/json"
    message = error_of(result.json, code=code, param=param)
    for word in words:
        assert word in message
    assert h.upstreams.calls == []
    await assert_still_serving(h)


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
async def test_body_over_limit_by_content_length_gets_413_before_the_body_is_sent(
        h, autojump_clock, expect):
    head, _ = split_head(http_request(b" " * 1001, headers={"expect": "100-continue"}
                                     if expect else {}))
    conn = Conn(h)
    await conn.send(head)
    with trio.fail_after(1):
        raw = await conn.read_to_close()

    assert raw.startswith(b"HTTP/1.1 413 ")  # and no 100 Continue before it
    message = error_of(msgspec.json.decode(raw.split(b"\r\n\r\n", 1)[1]), code="body_too_large")
    assert "1001" in message
    assert "daemon.max_body_bytes = 1000" in message
    assert b"\r\nconnection: close\r\n" in raw.lower()
    await assert_still_serving(h)


async def test_body_exactly_at_the_limit_is_accepted(h):
    payload = msgspec.json.encode(GOOD)
    payload += b" " * (DAEMON["max_body_bytes"] - len(payload))

    result = await h.send(http_request(payload))

    assert result.status == 200
    assert result.text == "hi there"


async def test_chunked_body_growing_over_limit_gets_413_without_waiting_for_the_end(
        h, autojump_clock):
    conn = Conn(h)
    await conn.send(CHAT_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(b" " * 600))
    assert await conn.is_open_after(5)  # 600 bytes are within the limit: no reply yet

    await conn.send(chunked(b" " * 600))  # 1200 > 1000; the last chunk is never sent
    with trio.fail_after(1):
        raw = await conn.read_to_close()

    assert raw.startswith(b"HTTP/1.1 413 ")
    message = error_of(msgspec.json.decode(raw.split(b"\r\n\r\n", 1)[1]), code="body_too_large")
    assert "daemon.max_body_bytes = 1000" in message
    await assert_still_serving(h)


def head_of(size: int) -> bytes:
    """A GET /healthz head of exactly `size` bytes."""
    start, end = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize(("size", "status"), [
    (fo.MAX_HEAD_BYTES, 200), (fo.MAX_HEAD_BYTES + 1, 431), (100 * 1024, 431),
    (127 * 1024, 431), (1024 * 1024, 431)])
async def test_request_heads_are_limited_to_64_kib(h, autojump_clock, size, status):
    """h11 checks its limit only on a head still incomplete: one sent in a single write
    used to pass up to ~128 KiB, whatever the limit said."""
    conn = Conn(h)
    h.nursery.start_soon(conn.send, head_of(size))

    result = await conn.response()

    assert result.status == status
    if status == 431:
        assert error_of(result.json, code="bad_http")
        assert result.headers["connection"] == "close"


@pytest.mark.parametrize(("size", "status"), [(fo.MAX_HEAD_BYTES, 200),
                                              (fo.MAX_HEAD_BYTES + 464, 431)])
async def test_a_head_sent_in_two_writes_is_held_to_the_same_limit(h, autojump_clock, size,
                                                                   status):
    """The second read must not take the head past the limit in one go either."""
    conn = Conn(h)
    head = head_of(size)
    await conn.send(head[:1000])
    await trio.sleep(1)
    h.nursery.start_soon(conn.send, head[1000:])

    assert (await conn.response()).status == status


async def test_a_head_within_the_limit_behind_a_pipelined_request_is_served(h, autojump_clock):
    conn = Conn(h)
    await conn.send(head_of(200) + head_of(fo.MAX_HEAD_BYTES))
    first, second = await conn.response(), await conn.response()
    assert (first.status, second.status) == (200, 200)


async def test_head_sent_byte_by_byte_slower_than_head_timeout_gets_408_at_the_deadline(
        h, autojump_clock):
    raw = http_request(GOOD)
    conn = Conn(h)
    t0 = trio.current_time()

    async def dribble() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for i in range(len(raw)):
                await conn.send(raw[i:i + 1])
                await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        result = await conn.response()
        closed = await conn.closed_at()
        nursery.cancel_scope.cancel()

    assert result.status == 408
    assert "daemon.head_timeout_s = 7 s" in error_of(result.json, code="request_timeout")
    assert result.headers["connection"] == "close"
    assert result.t_head == t0 + 7.0
    assert closed == t0 + 7.0
    assert await conn.handler_returned_at() == t0 + 7.0
    assert h.upstreams.calls == []
    await assert_still_serving(h)


async def test_body_that_stops_arriving_gets_408_at_body_timeout(h, autojump_clock):
    head, body = split_head(http_request(GOOD))
    conn = Conn(h)
    t0 = trio.current_time()
    await conn.send(head + body[:10])

    result = await conn.response()

    assert result.status == 408
    assert "daemon.body_timeout_s = 20 s" in error_of(result.json, code="request_timeout")
    assert result.t_head == t0 + 20.0
    assert await conn.closed_at() == t0 + 20.0
    await assert_still_serving(h)


async def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(h, autojump_clock):
    conn = Conn(h)
    await conn.send(http_request(b"", path="/healthz", method="GET"))
    first = await conn.response()
    assert first.status == 200
    assert "connection" not in first.headers  # kept alive

    assert await conn.closed_at() == first.t_end + 45.0
    assert await conn.handler_returned_at() == first.t_end + 45.0


async def test_connection_that_never_sends_is_closed_after_keepalive_timeout(h, autojump_clock):
    conn = Conn(h)
    t0 = trio.current_time()

    assert await conn.closed_at() == t0 + 45.0


async def test_keepalive_serves_a_second_request_after_an_idle_gap(h, autojump_clock):
    """Idle time between requests counts against keepalive_timeout_s, not head_timeout_s."""
    conn = Conn(h)
    await conn.send(http_request(GOOD))
    first = await conn.response()
    await trio.sleep(44.0)
    await conn.send(http_request({**GOOD, "stream": True}))
    second = await conn.response()

    assert (first.status, first.text) == (200, "hi there")
    assert (second.status, second.text) == (200, "hi there")
    assert second.events[-1] == "[DONE]"
    assert first.headers["x-failoverd-request-id"] != second.headers["x-failoverd-request-id"]
    assert h.upstreams.keys_called() == ["a/m1", "a/m1"]
    assert await conn.is_open_after(1.0)


async def test_expect_100_continue_gets_100_before_the_body(h, autojump_clock):
    head, body = split_head(http_request(GOOD, headers={"expect": "100-continue"}))
    conn = Conn(h)
    await conn.send(head)
    with trio.fail_after(1):
        interim = await conn.read_until(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 ")
    assert interim.endswith(b"\r\n\r\n")  # nothing but the interim response so far

    await conn.send(body)
    result = await conn.response()

    assert (result.status, result.text) == (200, "hi there")


async def test_models_lists_the_routes(h):
    result = await h.send(http_request(b"", path="/v1/models", method="GET"))

    assert result.status == 200
    body = result.json
    assert body["object"] == "list"
    assert sorted(m["id"] for m in body["data"]) == ["batch", "desk"]
    assert {m["object"] for m in body["data"]} == {"model"}


async def test_healthz_is_200_while_serving(h):
    result = await h.send(http_request(b"", path="/healthz", method="GET"))

    assert result.status == 200
    assert result.json == {"status": "ok"}


async def test_status_shows_an_in_flight_request_and_breakers(h, autojump_clock):
    h.upstreams.scripts["a/m1"] = [("hang",)]
    results: list[ClientResult] = []

    async def slow_chat() -> None:
        results.append(await h.chat("desk"))

    h.nursery.start_soon(slow_chat)
    await trio.sleep(5.0)
    during = await h.send(http_request(b"", path="/status", method="GET"))
    await trio.sleep(60.0)  # the first-token deadline fails a/m1 over to b/m2
    after = await h.send(http_request(b"", path="/status", method="GET"))

    assert during.status == 200
    assert during.headers["content-type"] == "application/json"
    [inflight] = during.json["in_flight"]
    assert (inflight["route"], inflight["slot"], inflight["age_s"]) == ("desk", "a/m1", 5.0)
    assert isinstance(during.json["breakers"], list)
    assert [r.status for r in results] == [200]
    assert after.json["in_flight"] == []
