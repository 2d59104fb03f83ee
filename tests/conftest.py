"""Shared test machinery.

- `MockUpstreams`: an `httpx2.MockTransport` that plays failoverd's upstream scripts
  (the same step format as `failoverd.FakeUpstream`) in trio time, so deadline tests
  run under `autojump_clock` with exact times.
- `Harness`: a Daemon on that transport, a ledger in tmp_path, and `chat()` that
  speaks HTTP/1.1 to `failoverd.handle_connection` over a kernel socket pair (the
  production relay path), or over `memory_stream_pair()` with `memory=True`.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable
from typing import Any

import h11
import httpx2
import msgspec
import pytest
import trio
import trio.testing

import failoverd as fo

PROVIDERS = ("a", "b", "c")


class FixedJitter(random.Random):
    """Every draw is `value`: by default the middle of the jitter range, so a 0.3 s
    backoff waits exactly 0.3 s."""

    def __init__(self, value: float = 0.5) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def make_config(
    routes: dict[str, list[str]] | None = None,
    *,
    ledger: str = "",
    models: dict[str, fo.ModelConfig] | None = None,
    anthropic: tuple[str, ...] = (),
    **timing: Any,
) -> fo.Config:
    """Providers a, b, c (OpenAI kind) and any named in `anthropic` (Anthropic kind)."""
    providers = {p: fo.ProviderConfig(base_url=f"http://{p}.test/v1") for p in PROVIDERS}
    for p in anthropic:
        providers[p] = fo.ProviderConfig(kind="anthropic", base_url=f"http://{p}.test/v1")
    return fo.Config(
        daemon=fo.DaemonConfig(ledger=ledger),
        defaults=fo.Timing(**timing),
        providers=providers,
        models=models or {},
        routes={name: fo.RouteConfig(chain=chain) for name, chain in (routes or {}).items()},
    )


def socket_pair(buffer: int | None = None) -> tuple[trio.SocketStream, trio.SocketStream]:
    """A kernel Unix socket pair; small buffers make a client that stops reading block."""
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b) if buffer else ():
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    return trio.SocketStream(a), trio.SocketStream(b)


class _ScriptStream(httpx2.AsyncByteStream):
    def __init__(self, upstream: MockUpstreams, key: str, steps: fo.Script) -> None:
        self.upstream = upstream
        self.key = key
        self.steps = steps

    async def __aiter__(self):
        try:
            async for piece in fo.play_script(self.steps):
                yield piece
        except ConnectionResetError as e:
            raise httpx2.ReadError(str(e)) from None

    async def aclose(self) -> None:
        self.upstream.closed.append((trio.current_time(), self.key))


class MockUpstreams:
    """Scripts keyed by "provider/model". A value is one script, a list of scripts (one
    per call, the last repeating), a function of the trio time returning a script, or a
    `failoverd.ContinuingModel` (which reads the request body)."""

    def __init__(self, scripts: dict[str, Any] | None = None) -> None:
        self.scripts: dict[str, Any] = dict(scripts or {})
        self.calls: list[tuple[float, str]] = []
        self.requests: list[httpx2.Request] = []
        self.closed: list[tuple[float, str]] = []
        self.transport = httpx2.MockTransport(self._handle)

    def keys_called(self) -> list[str]:
        return [key for _, key in self.calls]

    def _script(self, key: str, body: dict[str, Any]) -> fo.Script:
        entry = self.scripts.get(key)
        if entry is None:
            raise AssertionError(f"no script for {key}")
        if isinstance(entry, fo.ContinuingModel):
            n = sum(1 for _, k in self.calls if k == key) - 1  # this call is in already
            return entry(str(body.get("model")), body, n)
        if callable(entry):
            return entry(trio.current_time())
        if entry and isinstance(entry[0], list):  # one script per call
            n = sum(1 for _, k in self.calls if k == key) - 1
            return entry[min(n, len(entry) - 1)]
        return entry

    async def _handle(self, request: httpx2.Request) -> httpx2.Response:
        provider = request.url.host.split(".")[0]
        body = msgspec.json.decode(request.content)
        key = f"{provider}/{body['model']}"
        self.calls.append((trio.current_time(), key))
        self.requests.append(request)
        steps = list(self._script(key, body))
        while steps and steps[0][0] in ("sleep", "hang", "refuse", "connect_timeout"):
            step = steps.pop(0)
            if step[0] == "refuse":
                raise httpx2.ConnectError("[Errno 111] Connection refused")
            if step[0] == "connect_timeout":
                raise httpx2.ConnectTimeout("timed out")
            if step[0] == "hang":
                await trio.sleep_forever()
            await trio.sleep(step[1])
        if not steps:
            raise AssertionError(f"script for {key} has no response")
        first = steps[0]
        if first[0] == "respond":
            return httpx2.Response(first[1], headers=first[2], content=first[3])
        if first[0] == "head":
            headers = {"content-type": "text/event-stream", **first[2]}
            return httpx2.Response(first[1], headers=headers,
                                  stream=_ScriptStream(self, key, steps[1:]))
        headers = {"content-type": "text/event-stream"}
        return httpx2.Response(200, headers=headers, stream=_ScriptStream(self, key, steps))


class ClientResult:
    """What the client saw, with trio times of the head and the first body byte."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.t_start = 0.0
        self.t_head: float | None = None
        self.t_first: float | None = None  # first body byte
        self.t_end: float | None = None

    @property
    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    @property
    def events(self) -> list[Any]:
        """SSE data payloads: dicts, or the string "[DONE]"."""
        out = []
        for block in self.body.split(b"\n\n"):
            if block.startswith(b"data: "):
                data = block[6:]
                out.append("[DONE]" if data == b"[DONE]" else msgspec.json.decode(data))
        return out

    @property
    def text(self) -> str:
        """The assistant text, streamed or not."""
        if self.headers.get("content-type") == "application/json":
            return self.json["choices"][0]["message"]["content"]
        return "".join(
            (c.get("delta") or {}).get("content") or ""
            for e in self.events if isinstance(e, dict) for c in e.get("choices") or ()
        )


def http_request(body: dict[str, Any] | bytes, path: str = "/v1/chat/completions",
                 method: str = "POST", headers: dict[str, str] | None = None) -> bytes:
    payload = body if isinstance(body, bytes) else msgspec.json.encode(body)
    head = [f"{method} {path} HTTP/1.1", "host: failoverd", f"content-length: {len(payload)}",
            "content-type: application/json"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (payload if method != "GET" else b"")


async def read_response(stream: trio.abc.Stream, result: ClientResult) -> ClientResult:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    parts = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            result.status = event.status_code
            result.headers = {k.decode(): v.decode() for k, v in event.headers}
            result.t_head = trio.current_time()
        elif isinstance(event, h11.Data):
            if result.t_first is None:
                result.t_first = trio.current_time()
            parts.append(event.data)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    result.body = b"".join(parts)
    result.t_end = trio.current_time()
    return result


class Harness:
    """A daemon on mock upstreams, driven over in-memory client connections."""

    def __init__(self, cfg: fo.Config, upstreams: MockUpstreams, ledger_path: str,
                 nursery: trio.Nursery) -> None:
        self.ledger = fo.Ledger(ledger_path)
        self.upstreams = upstreams
        self.d = fo.Daemon(cfg, ledger=self.ledger, transport=upstreams.transport,
                           rng=FixedJitter(), keys={"a": "sk-test-secret-key-aaaa"})
        self.d.background = nursery
        self.nursery = nursery
        self.ledger_path = ledger_path

    async def send(self, raw: bytes, peer: fo.Peer | None = None, *,
                   memory: bool = False) -> ClientResult:
        """One request over a kernel socket pair, the path production takes (the
        relay's one-write fast path and the final write need a real socket), or over
        a memory stream."""
        client, server = trio.testing.memory_stream_pair() if memory else socket_pair()
        self.nursery.start_soon(fo.handle_connection, self.d, server, peer or fo.Peer(4242, 1000))
        result = ClientResult()
        result.t_start = trio.current_time()
        await client.send_all(raw)
        await read_response(client, result)
        await client.aclose()
        return result

    async def chat(self, route: str = "r", *, stream: bool = False, memory: bool = False,
                   **extra: Any) -> ClientResult:
        body = {"model": route, "stream": stream,
                "messages": [{"role": "user", "content": "hello"}], **extra}
        return await self.send(http_request(body), memory=memory)

    def rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        with open(self.ledger_path, "rb") as f:
            rows = [msgspec.json.decode(line) for line in f if line.strip()]
        return [r for r in rows if kind is None or r["kind"] == kind]

    def outcomes(self) -> list[tuple[str, str]]:
        """(provider/model, outcome or skipped:reason) of each attempt row, in order."""
        return [
            (f"{r['provider']}/{r['model']}",
             r["outcome"] if r["outcome"] != "skipped" else f"skipped:{r['skip_reason']}")
            for r in self.rows("attempt")
        ]


@pytest.fixture
async def harness(tmp_path, nursery):
    """harness(scripts, routes=..., **timing) -> Harness; route "r" = a/m1 -> b/m2 by default."""

    def make(scripts: dict[str, Any], routes: dict[str, list[str]] | None = None,
             models: dict[str, fo.ModelConfig] | None = None, anthropic: tuple[str, ...] = (),
             breakers: fo.BreakerConfig | None = None, **timing: Any) -> Harness:
        cfg = make_config(routes or {"r": ["a/m1", "b/m2"]}, ledger=str(tmp_path / "ledger.jsonl"),
                          models=models, anthropic=anthropic, **timing)
        if breakers is not None:
            cfg = msgspec.structs.replace(cfg, breakers=breakers)
        return Harness(cfg, MockUpstreams(scripts), str(tmp_path / "ledger.jsonl"), nursery)

    return make


@pytest.fixture
def busy_loop_scripts(monkeypatch, autojump_clock):
    """Scripts may hold ("jump", seconds): time passes with no checkpoint, as on an
    event loop busy elsewhere."""
    play = fo.play_script

    async def play_with_jumps(script):
        for step in script:
            if step[0] == "jump":
                autojump_clock.jump(step[1])
                continue
            async for piece in play([step]):
                yield piece

    monkeypatch.setattr(fo, "play_script", play_with_jumps)


def ok_script(text: str = "hi there", **kw: Any) -> fo.Script:
    words = text.split(" ")
    parts = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return fo.token_script(parts, **kw)


Scripts = dict[str, Callable[..., fo.Script] | fo.Script]


HOST_PATHS = ("/var/lib/failoverd/ledger.jsonl", "/var/lib/failoverd/state.json",
              "/run/failoverd/failoverd.sock")


def _host_files() -> dict[str, float | None]:
    return {p: os.stat(p).st_mtime if os.path.exists(p) else None for p in HOST_PATHS}


@pytest.fixture(autouse=True, scope="session")
def _no_test_touches_the_hosts_failoverd():
    """The suite must never write the ledger, state or socket of a failoverd installed on
    this host (a config without [daemon] paths means the defaults: tests give their own)."""
    before = _host_files()
    yield
    assert _host_files() == before, "a test wrote to the host's failoverd paths"
