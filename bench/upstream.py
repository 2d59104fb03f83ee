"""A fast fake OpenAI-compatible upstream for the failoverd benchmark.

One asyncio Protocol per connection, HTTP/1.1 keep-alive, pre-built response bytes and
minimal parsing: find the end of the head, read Content-Length, look for `"stream":true`
and the model name in the JSON body. The model name selects the scenario:

    bench-fast-N          N content deltas, all written at once
    bench-paced-N-MS      the head, the role delta and the first content delta at once,
                          then one content delta every MS milliseconds (absolute schedule)
    bench-trickle-N-MS    the same as paced (used with MS = 1000)
    bench-hung            reads the request and never answers

A streaming reply (`"stream":true`) is `text/event-stream` with chunked encoding: a role
delta, content deltas, a finish_reason chunk, a usage chunk with `"choices":[]`, then
`data: [DONE]`. A non-streaming reply is one `chat.completion` JSON with Content-Length.

Run as `python bench/upstream.py`: prints the port on stdout, exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys

CREATED = 1700000000
TOKEN = "tok "
HEAD_SSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
END_CHUNKED = b"0\r\n\r\n"


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return _chunked(f"data: {data}\n\n".encode())


def _chunk(model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _json_reply(status: int, obj: dict) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    reason = {200: b"OK", 404: b"Not Found"}.get(status, b"Error")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason, len(body), body))


class Scenario:
    """Pre-built bytes for one model name."""

    __slots__ = ("mode", "n", "interval", "first", "mid", "last", "whole", "reply")

    def __init__(self, model: str) -> None:
        parts = model.split("-")
        self.mode = parts[1] if len(parts) > 1 and parts[0] == "bench" else "unknown"
        if self.mode == "trickle":
            self.mode = "paced"
        self.n = max(1, int(parts[2])) if len(parts) > 2 and parts[2].isdigit() else 4
        self.interval = int(parts[3]) / 1000 if len(parts) > 3 and parts[3].isdigit() else 0.02
        if self.mode not in ("fast", "paced", "hung"):
            self.mode = "unknown"
            self.reply = _json_reply(404, {"error": {
                "message": f"model {model!r} does not exist", "type": "invalid_request_error",
                "code": "model_not_found"}})
            return
        role = _event(_chunk(model, {"role": "assistant", "content": ""}))
        content = _event(_chunk(model, {"content": TOKEN}))
        tail = (_event(_chunk(model, {}, "stop"))
                + _event({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                          "created": CREATED, "model": model, "choices": [],
                          "usage": {"prompt_tokens": 12, "completion_tokens": self.n,
                                    "total_tokens": 12 + self.n}})
                + _event("[DONE]") + END_CHUNKED)
        self.whole = HEAD_SSE + role + content * self.n + tail
        self.first = HEAD_SSE + role + content + (tail if self.n == 1 else b"")
        self.mid = content
        self.last = content + tail
        self.reply = _json_reply(200, {
            "id": "chatcmpl-bench", "object": "chat.completion", "created": CREATED,
            "model": model, "choices": [{"index": 0, "message": {
                "role": "assistant", "content": TOKEN * self.n}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": self.n,
                      "total_tokens": 12 + self.n}})


_scenarios: dict[bytes, Scenario] = {}


def scenario(model: bytes) -> Scenario:
    s = _scenarios.get(model)
    if s is None:
        s = _scenarios[model] = Scenario(model.decode("utf-8", "replace"))
    return s


def _model_of(body: bytes) -> bytes:
    i = body.find(b'"model"')
    if i < 0:
        return b""
    i = body.find(b'"', body.find(b":", i + 7) + 1)
    j = body.find(b'"', i + 1)
    return body[i + 1:j] if i >= 0 and j > i else b""


class Upstream(asyncio.Protocol):
    __slots__ = ("transport", "buf", "busy", "timer", "loop")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False  # a paced reply is in progress, or the request hangs
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        self._serve()

    def _serve(self) -> None:
        buf = self.buf
        while not self.busy:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                break
            head = buf[:i].lower()
            j = head.find(b"content-length:")
            length = 0
            if j >= 0:
                k = head.find(b"\r\n", j)
                length = int(head[j + 15:k if k >= 0 else len(head)])
            end = i + 4 + length
            if len(buf) < end:
                break
            body = buf[i + 4:end]
            buf = buf[end:]
            self._respond(body)
        # Bytes that arrive while a reply is paced or hung are dropped: the load
        # generator never pipelines, so there are none on a healthy run.
        self.buf = buf if not self.busy else b""

    def _respond(self, body: bytes) -> None:
        s = scenario(_model_of(body))
        stream = b'"stream":true' in body or b'"stream": true' in body
        t = self.transport
        if t is None:
            return
        if s.mode == "hung":
            self.busy = True
        elif s.mode == "unknown" or not stream:
            t.write(s.reply)
        elif s.mode == "fast" or s.n == 1:
            t.write(s.whole)
        else:
            self.busy = True
            t.write(s.first)
            start = self.loop.time()
            self.timer = self.loop.call_at(start + s.interval, self._tick, s, start, 1)

    def _tick(self, s: Scenario, start: float, k: int) -> None:
        """Write content delta k (0-based) on its absolute schedule; the last one ends."""
        self.timer = None
        t = self.transport
        if t is None:
            return
        if k < s.n - 1:
            t.write(s.mid)
            self.timer = self.loop.call_at(start + (k + 1) * s.interval, self._tick, s, start,
                                           k + 1)
            return
        t.write(s.last)
        self.busy = False


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    stdin_closed = loop.create_future()

    class _Stdin(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            if not stdin_closed.done():
                stdin_closed.set_result(None)

    await loop.connect_read_pipe(_Stdin, os.fdopen(sys.stdin.fileno(), "rb", 0))
    async with server:
        await stdin_closed


if __name__ == "__main__":
    asyncio.run(main())
