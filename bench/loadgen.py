"""A lean HTTP/1.1 load generator: asyncio Protocols, pre-built request bytes.

One `Conn` carries one request at a time (keep-alive, no pipelining) over a Unix socket
(to failoverd) or TCP (straight to the fake upstream). Responses are parsed minimally:
the status line, Content-Length or chunked framing, and for SSE bodies the number of
`data:` events per read, `[DONE]` and in-band `{"error"` events. Every timestamp is
`time.perf_counter_ns()` taken in `data_received`, before any parsing.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable
from time import perf_counter_ns as clock

NS = 1_000_000_000

_HEAD, _LENGTH, _CHUNKED, _CLOSE = range(4)


def post(body: dict, path: str = "/v1/chat/completions") -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return (f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n").encode() + data


def chat(model: str, *, stream: bool) -> bytes:
    """A small chat-completions request."""
    return post({"model": model, "messages": [{"role": "user", "content": "Say hi."}],
                 "stream": stream})


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n".encode()


class Result:
    __slots__ = ("status", "t_sched", "t_send", "t_first", "t_end", "events", "times", "done",
                 "error", "body")

    def __init__(self, t_sched: int, keep_times: bool) -> None:
        self.status = 0
        self.t_sched = t_sched  # when an open-loop schedule wanted it sent (else = t_send)
        self.t_send = 0
        self.t_first = 0  # first body byte
        self.t_end = 0
        self.events = 0  # SSE `data:` events
        self.times: list[int] | None = [] if keep_times else None  # reads carrying events
        self.done = False  # `[DONE]` seen, or the whole Content-Length body arrived
        self.error = ""  # "" when the exchange completed; else what went wrong
        self.body = b""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.error

    @property
    def ttfb_ns(self) -> int:
        return self.t_first - self.t_send

    @property
    def latency_ns(self) -> int:
        return self.t_end - self.t_sched


Callback = Callable[["Conn", Result], None]


class Conn(asyncio.Protocol):
    """One client connection; `request()` with a callback or `fetch()` awaited."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.res: Result | None = None
        self.cb: Callback | None = None
        self.state = _HEAD
        self.buf = b""
        self.left = 0  # body bytes (Content-Length), or chunk bytes incl. CRLF (chunked)
        self.parts: list[bytes] = []
        self.keep_body = False
        self.closed = False

    # -- asyncio -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.res is not None:
            if self.state == _CLOSE:
                self._finish(clock())
            else:
                self._finish(clock(), "connection closed")

    def data_received(self, data: bytes) -> None:
        now = clock()
        res = self.res
        if res is None:
            return
        if self.state == _HEAD:
            buf = self.buf + data if self.buf else data
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return
            self.buf = b""
            head = buf[:i].lower()
            if not buf.startswith(b"HTTP/1.") or not buf[9:12].isdigit():
                # e.g. body bytes with no response head before them: a server bug
                res.error = f"malformed response head: {buf[:40]!r}"
                self.abort(res.error)
                return
            res.status = int(buf[9:12])
            data = buf[i + 4:]
            if b"transfer-encoding: chunked" in head:
                self.state = _CHUNKED
                self.left = 0
            else:
                j = head.find(b"content-length:")
                if j >= 0:
                    k = head.find(b"\r\n", j)
                    self.left = int(head[j + 15:k if k >= 0 else len(head)])
                    self.state = _LENGTH
                    if self.left == 0:
                        res.t_first = now
                        res.done = True
                        self._finish(now)
                        return
                else:
                    self.state = _CLOSE
            if not data:
                return
        if not res.t_first:
            res.t_first = now
        if self.state == _LENGTH:
            self.left -= len(data)
            if self.keep_body:
                self.parts.append(data)
            if self.left <= 0:
                res.done = True
                if self.keep_body:
                    res.body = b"".join(self.parts)
                self._finish(now)
        elif self.state == _CHUNKED:
            self._chunked(data, now, res)
        else:
            self._payload(data, now, res)

    # -- parsing -------------------------------------------------------------------

    def _chunked(self, data: bytes, now: int, res: Result) -> None:
        buf = self.buf + data if self.buf else data
        self.buf = b""
        pos, n = 0, len(buf)
        events = 0
        while pos < n:
            if self.left == 0:  # a chunk-size line
                j = buf.find(b"\r\n", pos)
                if j < 0:
                    self.buf = buf[pos:]
                    break
                size = int(buf[pos:j].split(b";", 1)[0], 16)
                if size == 0:
                    if n - j - 2 < 2:  # the final CRLF has not arrived yet
                        self.buf = buf[pos:]
                        break
                    if events:
                        self._count(res, events, now)
                    self._finish(now)
                    return
                pos = j + 2
                self.left = size + 2
                self.parts = []
            take = min(self.left, n - pos)
            self.parts.append(buf[pos:pos + take])
            pos += take
            self.left -= take
            if self.left == 0:
                payload = b"".join(self.parts)
                self.parts = []
                events += payload.count(b"data:")
                if b"[DONE]" in payload:
                    res.done = True
                if b'data: {"error"' in payload:
                    res.error = "in-band error event"
                if self.keep_body:
                    res.body += payload[:-2]
        if events:
            self._count(res, events, now)

    def _payload(self, data: bytes, now: int, res: Result) -> None:
        """A close-delimited body."""
        events = data.count(b"data:")
        if b"[DONE]" in data:
            res.done = True
        if events:
            self._count(res, events, now)

    @staticmethod
    def _count(res: Result, events: int, now: int) -> None:
        res.events += events
        if res.times is not None:
            res.times.append(now)

    def _finish(self, now: int, error: str = "") -> None:
        res, cb = self.res, self.cb
        self.res = self.cb = None
        self.state = _HEAD
        self.buf = b""
        self.parts = []
        if res is None:
            return
        res.t_end = now
        if error and not res.error:
            res.error = error
        if cb is not None:
            cb(self, res)

    # -- API -----------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None

    def request(self, req: bytes, cb: Callback, *, t_sched: int = 0, keep_times: bool = False,
                keep_body: bool = False) -> Result:
        now = clock()
        res = Result(t_sched or now, keep_times)
        res.t_send = now
        self.keep_body = keep_body
        if self.transport is None:
            res.t_end = now
            res.error = "not connected"
            cb(self, res)
            return res
        self.res, self.cb = res, cb
        self.transport.write(req)
        return res

    def fetch(self, req: bytes, *, keep_times: bool = False,
              keep_body: bool = False) -> asyncio.Future[Result]:
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

        def done(_conn: Conn, res: Result) -> None:
            if not fut.done():
                fut.set_result(res)

        self.request(req, done, keep_times=keep_times, keep_body=keep_body)
        return fut

    def abort(self, why: str = "timeout") -> None:
        """Fail the request in flight (if any) and drop the connection."""
        self.closed = True
        if self.res is not None:
            self._finish(clock(), why)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


class Target:
    """Where requests go: failoverd's Unix socket or the fake upstream's TCP port."""

    def __init__(self, name: str, *, unix: str | None = None, port: int | None = None) -> None:
        self.name = name
        self.unix = unix
        self.port = port

    async def connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        if self.unix is not None:
            _, conn = await loop.create_unix_connection(Conn, self.unix)
        else:
            _, conn = await loop.create_connection(Conn, "127.0.0.1", self.port)
        return conn

    async def connect_many(self, n: int, batch: int = 100) -> list[Conn]:
        conns: list[Conn] = []
        for i in range(0, n, batch):
            conns += await asyncio.gather(*(self.connect() for _ in range(min(batch, n - i))))
        return conns


async def sleep_until(t_ns: int) -> None:
    delay = (t_ns - clock()) / NS
    if delay > 0:
        await asyncio.sleep(delay)


async def closed_loop(target: Target, req: bytes, *, concurrency: int, total: int | None = None,
                      duration_s: float | None = None, stagger_s: float = 0.0,
                      keep_times: bool = False, timeout_s: float = 30.0) -> list[Result]:
    """`concurrency` workers, each sending its next request when the last one is done,
    until `total` requests were sent or `duration_s` has passed. Worker i starts
    i * stagger_s after the first."""
    results: list[Result] = []
    start = clock()
    stop = start + int((duration_s if duration_s is not None else timeout_s) * NS)
    hard = start + int(timeout_s * NS)
    budget = [total if total is not None else 1 << 62]
    conns: list[Conn] = []

    async def worker(i: int) -> None:
        await sleep_until(start + int(i * stagger_s * NS))
        conn = await target.connect()
        conns.append(conn)
        while budget[0] > 0 and clock() < stop:
            budget[0] -= 1
            res = await conn.fetch(req, keep_times=keep_times)
            results.append(res)
            if not conn.usable:
                conn = await target.connect()
                conns.append(conn)

    tasks = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    try:
        _, slow = await asyncio.wait(tasks, timeout=max(0.0, (hard - clock()) / NS))
        for c in conns:
            c.abort("timeout")
        for t in slow:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for c in conns:
            c.close()
    return results


async def open_loop(target: Target, req: bytes, *, rate: float, duration_s: float,
                    pool: int = 16, cap: int = 1024, grace_s: float = 2.0) -> list[Result]:
    """Fixed-rate (open-loop) load: request i is due at start + i / rate whatever happened
    to the others; latency counts from the due time, so queueing in the client counts
    too. Up to `cap` connections; requests still unanswered `grace_s` after the last one
    was due are aborted and count as errors."""
    loop = asyncio.get_running_loop()
    idle: list[Conn] = await target.connect_many(pool)
    conns: list[Conn] = list(idle)
    waiting: collections.deque[int] = collections.deque()
    results: list[Result] = []
    count = int(rate * duration_s)
    all_done = loop.create_future()
    opening = [0]

    def done(conn: Conn, res: Result) -> None:
        results.append(res)
        if len(results) >= count and not all_done.done():
            all_done.set_result(None)
        if conn.usable:
            if waiting:
                conn.request(req, done, t_sched=waiting.popleft())
            else:
                idle.append(conn)

    async def open_and_send(t_sched: int) -> None:
        try:
            conn = await target.connect()
        except OSError as e:
            res = Result(t_sched, False)
            res.t_end = clock()
            res.error = f"connect: {e.strerror}"
            opening[0] -= 1
            done(Conn(), res)
            return
        opening[0] -= 1
        conns.append(conn)
        conn.request(req, done, t_sched=t_sched)

    def issue(t_sched: int) -> None:
        while idle:
            conn = idle.pop()
            if conn.usable:
                conn.request(req, done, t_sched=t_sched)
                return
        if len(conns) + opening[0] < cap:
            opening[0] += 1
            loop.create_task(open_and_send(t_sched))
        else:
            waiting.append(t_sched)

    period = NS / rate
    start = clock() + NS // 100
    i = 0
    try:
        while i < count:
            now = clock()
            while i < count and start + int(i * period) <= now:
                issue(start + int(i * period))
                i += 1
            if i < count:
                await sleep_until(start + int(i * period))
        end = start + int(count * period) + int(grace_s * NS)
        if count:
            await asyncio.wait([all_done], timeout=max(0.0, (end - clock()) / NS))
        for t_sched in waiting:
            res = Result(t_sched, False)
            res.t_end = clock()
            res.error = "never sent (client queue)"
            results.append(res)
        waiting.clear()
        for c in conns:
            c.abort("timeout")
    finally:
        for c in conns:
            c.close()
    return results


class Burst:
    """n requests, one per pre-opened connection, sent spread evenly over `spread_s`.

    With `retry_shed`, a 503 (the daemon shedding load) is retried on the same
    connection after its Retry-After, as the OpenAI SDKs do; `shed` counts them."""

    def __init__(self, target: Target, req: bytes, n: int, *, spread_s: float = 0.0,
                 keep_times: bool = False, retry_shed: bool = False) -> None:
        self.target, self.req, self.n = target, req, n
        self.spread_s, self.keep_times = spread_s, keep_times
        self.retry_shed = retry_shed
        self.shed = 0
        self.conns: list[Conn] = []
        self.results: list[Result] = []
        self.sent: list[Result] = []
        self.t0 = 0
        self._all = asyncio.get_running_loop().create_future()

    async def connect(self) -> None:
        self.conns = await self.target.connect_many(self.n)

    def _done(self, conn: Conn, res: Result) -> None:
        if self.retry_shed and res.status == 503 and conn.usable:
            self.shed += 1
            asyncio.get_running_loop().call_later(1.0, self._resend, conn)
            return
        self.results.append(res)
        if len(self.results) >= self.n and not self._all.done():
            self._all.set_result(None)

    async def send(self) -> None:
        self.t0 = clock()
        step = int(self.spread_s * NS / max(1, self.n))
        for i, conn in enumerate(self.conns):
            if step:
                await sleep_until(self.t0 + i * step)
            self.sent.append(conn.request(self.req, self._done, keep_times=self.keep_times))

    def _resend(self, conn: Conn) -> None:
        if conn.usable:
            self.sent.append(conn.request(self.req, self._done, keep_times=self.keep_times))

    def started(self) -> int:
        """How many replies have their first body byte (refusals do not count)."""
        return sum(1 for r in self.sent if r.t_first and r.status != 503)

    async def wait(self, timeout_s: float) -> list[Result]:
        if self.n:
            await asyncio.wait([self._all], timeout=timeout_s)
        return self.results

    def close(self) -> None:
        for c in self.conns:
            c.abort("timeout")
            c.close()
