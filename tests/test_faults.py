"""Faults, hostile input and secrets (issue 16): what one client sends never counts
against an upstream, and what an upstream sends never grows the daemon without bound.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib

import h11
import httpx2
import msgspec
import pytest
import trio
from conftest import MockUpstreams, http_request, make_config, ok_script
from test_engine import ANTHROPIC_OK

import failoverd as fo

HELLO = [{"role": "user", "content": "hello"}]


def closed(h) -> bool:
    """Every breaker closed, with no failure counted against it."""
    return all(b.state == "closed" and not b.failures for b in h.d.health.breakers.values())


@pytest.fixture
def failoverd_log(caplog, monkeypatch) -> pytest.LogCaptureFixture:
    monkeypatch.setattr(fo.log, "propagate", True)
    caplog.set_level(logging.INFO, logger="failoverd")
    return caplog


# -- one client's bad input is its own 400, never an upstream's failure ---------------

MALFORMED = [
    ("content 5", [{"role": "user", "content": 5}], "messages[0].content"),
    ("tool_calls [1]", [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": None, "tool_calls": [1]}],
     "messages[1].tool_calls[0]"),
    ('image_url "x"', [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     "messages[0].content[0].image_url"),
]


async def test_malformed_messages_on_an_anthropic_route_never_open_its_breaker(
        harness, autojump_clock):
    h = harness({"x/claude": ANTHROPIC_OK}, routes={"r": ["x/claude"]}, anthropic=("x",))
    for _ in range(2):  # six bad requests: twice what opens a breaker
        for _name, messages, param in MALFORMED:
            r = await h.send(http_request({"model": "r", "messages": messages}))
            assert (r.status, r.json["error"]["param"]) == (400, param)
    assert h.upstreams.calls == []
    assert h.rows("attempt") == []

    r = await h.chat()

    assert (r.status, r.text) == (200, "Hello there")
    assert h.upstreams.keys_called() == ["x/claude"]
    assert h.outcomes() == [("x/claude", "ok")]
    assert closed(h)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def with_extra(depth: int) -> bytes:
    return http_request(b'{"model": "r", "messages": [{"role": "user", "content": "hi"}], '
                        b'"extra": ' + nested(depth) + b"}")


@pytest.mark.parametrize("depth", [1000, 100_000])
async def test_deeply_nested_json_gets_400_and_no_traceback(harness, autojump_clock,
                                                            failoverd_log, depth):
    """msgspec recurses: about 1,000 levels raise RecursionError (it was a 500 and a
    traceback in the log per request)."""
    h = harness({"a/m1": ok_script(), "b/m2": ok_script()})

    r = await h.send(with_extra(depth))

    assert r.status == 400
    assert r.json["error"]["code"] == "json_too_deep"
    assert "too deeply" in r.json["error"]["message"]
    assert not [rec for rec in failoverd_log.records if rec.exc_info or rec.levelno >= 40]
    assert h.upstreams.calls == []
    assert (await h.chat()).status == 200
    assert closed(h)


async def test_json_that_decodes_near_the_recursion_limit_is_never_an_upstream_failure(
        harness, autojump_clock):
    """A body a few levels short of the limit decoded in the front end but could not be
    encoded again deeper in the stack, where the upstream request is built: that was a
    protocol_error on every slot (and on their breakers). Near the limit a body is
    either served or the client's 400, whatever the depth."""
    h = harness({"a/m1": ok_script(), "b/m2": ok_script()})
    statuses = [(await h.send(with_extra(depth))).status for depth in range(650, 1001)]

    served = statuses.count(200)
    assert 0 < served < len(statuses)  # the range straddles the limit ...
    assert statuses == [200] * served + [400] * (len(statuses) - served)  # ... once
    assert [o for _, o in h.outcomes()] == ["ok"] * served  # every body sent was served
    assert closed(h)


async def test_tool_call_arguments_nested_near_the_limit_never_fail_an_anthropic_attempt(
        harness, autojump_clock):
    """The Anthropic translation decodes each tool call's arguments (a JSON string) and
    embeds them deeper than they were: arguments nested ~945 levels decoded, then could
    not be encoded (a 502, the breaker's failure). Now every depth is served; arguments
    that cannot be decoded become {} as invalid JSON always did."""
    h = harness({"x/c": ANTHROPIC_OK}, routes={"r": ["x/c"]}, anthropic=("x",))
    statuses = set()
    for depth in range(600, 1001):
        call = {"id": "t", "type": "function",
                "function": {"name": "f", "arguments": "[" * depth + "]" * depth}}
        statuses.add((await h.send(http_request({"model": "r", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "t", "content": "ok"}]}))).status)

    assert statuses == {200}
    assert {o for _, o in h.outcomes()} == {"ok"}


async def test_json_nested_a_few_hundred_levels_is_served(harness, autojump_clock):
    h = harness({"a/m1": ok_script()})

    r = await h.send(with_extra(400))

    assert r.status == 200
    assert msgspec.json.decode(h.upstreams.requests[0].content)["extra"] == \
        msgspec.json.decode(nested(400))


async def test_every_shape_the_api_allows_goes_to_an_openai_upstream_unchanged(
        harness, autojump_clock):
    """Validation checks types; it does not narrow what the API allows: parts and roles
    failoverd does not know, and fields it does not read, reach the upstream as sent."""
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                "detail": "low"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "video_url", "video_url": {"url": "http://v.test/a.mp4"}}]},
        {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": [{"type": "text", "text": "42"}]},
        {"role": "ipython", "content": "a custom role"},
    ]
    body = {"model": "r", "messages": messages, "stream": None, "stop": ["\n\n"],
            "max_completion_tokens": 64, "temperature": 0, "top_p": 1, "seed": 7,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"x": {"type": "array", "items": {}}}}}},
                      {"type": "custom", "custom": {"name": "grammar"}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
            "metadata": {"k": "v"}, "logit_bias": {"50256": -100}}
    h = harness({"a/m1": ok_script()})

    r = await h.send(http_request(body))

    assert r.status == 200
    sent = msgspec.json.decode(h.upstreams.requests[0].content)
    assert {k: v for k, v in sent.items() if k not in ("model", "stream", "stream_options")} \
        == {k: v for k, v in body.items() if k not in ("model", "stream")}


# -- the TCP listener: no peer identity, so no web page may use it ---------------------

async def serve_tcp(nursery: trio.Nursery, tmp: str) -> tuple[fo.Daemon, fo.FakeUpstream, int]:
    upstream = fo.FakeUpstream(lambda model, body, n: fo.token_script(["hi"]))
    await nursery.start(upstream.serve)
    cfg = fo.Config(daemon=fo.DaemonConfig(socket=os.path.join(tmp, "fo.sock"),
                                           tcp="127.0.0.1:0", ledger=os.path.join(tmp, "l.jsonl")),
                    providers={"a": fo.ProviderConfig(base_url=upstream.base_url)},
                    routes={"r": fo.RouteConfig(chain=["a/m"])})
    listeners = await fo.open_listeners(cfg)
    d = fo.Daemon(cfg, ledger=fo.Ledger(cfg.daemon.ledger))
    await nursery.start(fo.serve, d, listeners)
    return d, upstream, listeners[1].socket.getsockname()[1]


CHAT = msgspec.json.encode({"model": "r", "messages": HELLO})


async def test_a_web_pages_cross_origin_post_on_the_tcp_listener_spends_nothing(nursery):
    """A page in a local browser can send a "simple" POST (text/plain, no preflight) to
    127.0.0.1: it is refused before its body is read, and no upstream is called."""
    d, upstream, port = await serve_tcp(nursery, tempfile.mkdtemp(dir="/tmp"))
    with trio.fail_after(10):
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            simple = await client.post("/v1/chat/completions", content=CHAT, headers={
                "origin": "https://evil.example", "content-type": "text/plain;charset=UTF-8"})
            as_json = await client.post("/v1/chat/completions", content=CHAT, headers={
                "origin": "null", "content-type": "application/json"})
            no_origin = await client.post("/v1/chat/completions", content=CHAT,
                                          headers={"content-type": "text/plain"})
            status = await client.get("/status", headers={"origin": "http://evil.example"})
            assert upstream.requests == []
            local_page = await client.post("/v1/chat/completions", content=CHAT, headers={
                "origin": "http://localhost:3000", "content-type": "application/json"})
            agent = await client.post("/v1/chat/completions", json={"model": "r",
                                                                    "messages": HELLO})
    for refused, code in ((simple, 403), (as_json, 403), (no_origin, 415), (status, 403)):
        assert refused.status_code == code
        assert refused.headers["connection"] == "close"
        assert refused.json()["error"]["type"] == "invalid_request_error"
    assert "Origin" in simple.json()["error"]["message"]
    assert simple.json()["error"]["code"] == "cross_origin"
    assert no_origin.json()["error"]["code"] == "unsupported_media_type"
    assert (local_page.status_code, agent.status_code) == (200, 200)
    assert len(upstream.requests) == 2
    d.shutdown.set()


async def test_the_unix_socket_is_not_held_to_the_browser_rules(nursery):
    """A browser cannot reach a Unix socket; its clients are told apart by SO_PEERCRED."""
    tmp = tempfile.mkdtemp(dir="/tmp")
    d, upstream, _ = await serve_tcp(nursery, tmp)
    transport = httpx2.AsyncHTTPTransport(uds=os.path.join(tmp, "fo.sock"))
    with trio.fail_after(10):
        async with httpx2.AsyncClient(transport=transport, base_url="http://failoverd") as client:
            r = await client.post("/v1/chat/completions", content=CHAT,
                                  headers={"content-type": "text/plain"})
    assert r.status_code == 200
    d.shutdown.set()


async def test_content_length_with_chunked_encoding_is_refused(harness, autojump_clock):
    """RFC 9112 section 6.3: a server that would read the body either way is open to
    request smuggling behind a proxy that reads it the other way."""
    h = harness({"a/m1": ok_script()})
    body = b'{"model": "r", "messages": [{"role": "user", "content": "hi"}]}'
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
           b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
           + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))

    r = await h.send(raw)

    assert (r.status, r.json["error"]["code"]) == (400, "bad_http")
    assert "RFC 9112" in r.json["error"]["message"]
    assert r.headers["connection"] == "close"
    assert h.upstreams.calls == []


# -- what an upstream's body may make the daemon hold ---------------------------------

def json_body_steps(size: int, piece: int = 64 * 1024, **headers: str) -> list:
    """A 200 application/json reply of `size` bytes, written `piece` bytes at a time and
    never built whole: a completion whose content is one long string."""
    start = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"'
    filler = b"x" * piece
    steps: list = [("head", 200, {"content-type": "application/json", **headers}),
                   ("raw", start)]
    steps += [("raw", filler)] * (size // piece)
    return [*steps, ("raw", b'"},"finish_reason":"stop"}]}')]


@functools.cache
def gzip_bomb(start: bytes, mib: int = 64) -> bytes:
    """JSON that starts with `start` and inflates to `mib` MiB: 1,000 times smaller on
    the wire (a hostile upstream sends it although failoverd asked for identity)."""
    z = zlib.compressobj(9, wbits=31)
    zeros = b"0" * (1024 * 1024)
    body = z.compress(start) + b"".join(z.compress(zeros) for _ in range(mib))
    return body + z.compress(b'"}}]}') + z.flush()


def bomb_reply(status: int, start: bytes) -> list:
    """The bomb as a streamed reply (an httpx2.Response built from content would inflate
    it in the test's own transport)."""
    return [("head", status, {"content-type": "application/json", "content-encoding": "gzip"}),
            ("raw", gzip_bomb(start))]


def peak_bytes_during(coro_fn):
    """Run an async function under tracemalloc; the most Python held at once (bytes)."""
    async def run():
        tracemalloc.start()
        try:
            result = await coro_fn()
            return result, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return run()


@pytest.mark.parametrize("steps", [
    pytest.param(lambda: json_body_steps(64 * 1024 * 1024), id="64 MiB of JSON, chunked"),
    pytest.param(lambda: bomb_reply(200, b'{"choices":[{"index":0,"message":{"content":"'),
                 id="gzip bomb: 64 MiB in 65 KB"),
])
async def test_a_huge_200_json_body_fails_over_holding_at_most_its_limit(harness, autojump_clock,
                                                                        steps):
    h = harness({"a/m1": steps(), "b/m2": ok_script("fallback")})

    r, peak = await peak_bytes_during(h.chat)

    assert (r.status, r.text) == (200, "fallback")
    a = h.rows("attempt")[0]
    assert (a["outcome"], a["status"]) == ("protocol_error", 200)
    assert f"longer than {fo.WHOLE_BODY_LIMIT} bytes" in a["error"]
    assert peak < 3 * fo.WHOLE_BODY_LIMIT  # was 48 MiB for the first, 128 MiB for the second


async def test_a_gzip_bomb_as_an_error_body_is_cut_at_its_limit(harness, autojump_clock):
    h = harness({"a/m1": bomb_reply(503, b'{"error":{"message":"'),
                 "b/m2": ok_script("fallback")})

    r, peak = await peak_bytes_during(h.chat)

    assert (r.status, r.text) == (200, "fallback")
    assert h.outcomes()[0] == ("a/m1", "http_error")
    assert h.rows("attempt")[0]["error"].startswith("HTTP 503: {\"error\":{\"message\":\"000")
    assert peak < 8 * fo.ERROR_BODY_LIMIT + 1024 * 1024


async def test_a_200_json_body_at_its_limit_is_served(harness, autojump_clock):
    size = fo.WHOLE_BODY_LIMIT - 200
    h = harness({"a/m1": json_body_steps(size)})

    r = await h.chat()

    assert r.status == 200
    assert len(r.json["choices"][0]["message"]["content"]) == size // (64 * 1024) * 64 * 1024


TWO_GB = 2 * 1024**3


class HostileUpstream:
    """Answers every request 200 application/json with a 2 GB body it makes up as it
    goes, once `concurrent` requests have arrived; counts what it could send each."""

    def __init__(self, concurrent: int) -> None:
        self.concurrent = concurrent
        self.arrived = 0
        self.all_in = trio.Event()
        self.sent: list[int] = []
        self.port = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(await fo._next_event(conn, stream), h11.EndOfMessage):
            pass
        self.arrived += 1
        if self.arrived >= self.concurrent:
            self.all_in.set()
        await self.all_in.wait()
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                b'{"choices":[{"index":0,"message":{"content":"' % TWO_GB)
        filler, sent = b"x" * (256 * 1024), 0
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(head)
            while sent < TWO_GB:
                await stream.send_all(filler)
                sent += len(filler)
        self.sent.append(sent)
        await stream.aclose()


def vm_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


async def test_2_gb_json_bodies_at_20_concurrent_attempts_keep_the_daemon_small(nursery):
    """A daemon process (peak RSS is the kernel's VmHWM) meets 20 attempts at once whose
    upstream sends a 2 GB JSON body each: every attempt stops at WHOLE_BODY_LIMIT and
    fails over. It held ~16-48 MiB per attempt (about 1 GB here) before."""
    n = 20
    hostile, good = HostileUpstream(n), fo.FakeUpstream(lambda m, b, i: fo.token_script(["ok"]))
    await nursery.start(hostile.serve)
    await nursery.start(good.serve)
    tmp = tempfile.mkdtemp(dir="/tmp")
    sock = os.path.join(tmp, "fo.sock")
    with open(os.path.join(tmp, "failoverd.toml"), "w") as f:  # noqa: ASYNC230 (set-up)
        f.write(f'[daemon]\nsocket = "{sock}"\nledger = "{tmp}/ledger.jsonl"\nshed_lag_s = 0\n'
                f'[providers.evil]\nbase_url = "http://127.0.0.1:{hostile.port}/v1"\n'
                f'[providers.good]\nbase_url = "{good.base_url}"\n'
                '[routes.r]\nchain = ["evil/m", "good/m"]\n[routes.warm]\nchain = ["good/m"]\n')
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import failoverd; failoverd.cli()", "serve", "--config",
         os.path.join(tmp, "failoverd.toml"), "--quiet"])
    try:
        transport = httpx2.AsyncHTTPTransport(uds=sock)
        async with httpx2.AsyncClient(transport=transport, base_url="http://failoverd",
                                     timeout=60) as client:
            with trio.fail_after(120):
                while True:
                    with contextlib.suppress(httpx2.TransportError):
                        if (await client.post("/v1/chat/completions", json={
                                "model": "warm", "messages": HELLO})).status_code == 200:
                            break
                    await trio.sleep(0.05)
                before = vm_kib(proc.pid, "VmHWM")
                replies = []

                async def ask() -> None:
                    replies.append(await client.post("/v1/chat/completions",
                                                     json={"model": "r", "messages": HELLO}))

                async with trio.open_nursery() as asking:
                    for _ in range(n):
                        asking.start_soon(ask)
                peak = vm_kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        await proc.wait()
    assert [r.status_code for r in replies] == [200] * n
    assert {r.headers["x-failoverd-served-by"] for r in replies} == {"good/m"}
    assert hostile.arrived == n  # all 20 attempts met a body at once
    assert len(hostile.sent) == n
    assert all(fo.WHOLE_BODY_LIMIT <= s < TWO_GB for s in hostile.sent)
    grew_mib = (peak - before) / 1024
    print(f"VmHWM {before / 1024:.0f} -> {peak / 1024:.0f} MiB; sent per attempt (MiB): "
          f"{sorted(round(s / 2**20) for s in hostile.sent)}")
    assert grew_mib < n * 2 * fo.WHOLE_BODY_LIMIT / 2**20, f"peak RSS grew {grew_mib:.0f} MiB"


# -- file descriptors: idle connections cannot take them all ---------------------------

def start_daemon(tmp: str, nofile: tuple[int, int], extra: str = "") -> subprocess.Popen:
    """`failoverd serve` in a child whose RLIMIT_NOFILE is (soft, hard)."""
    config = os.path.join(tmp, "failoverd.toml")
    with open(config, "w") as f:
        f.write(f'[daemon]\nsocket = "{tmp}/fo.sock"\nledger = "{tmp}/ledger.jsonl"\n{extra}'
                '[providers.local]\nbase_url = "http://127.0.0.1:9/v1"\n'
                '[routes.r]\nchain = ["local/m"]\n')
    return subprocess.Popen(
        [sys.executable, "-c", "import failoverd; failoverd.cli()", "serve", "--config", config],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def healthz(path: str, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def wait_serving(path: str, proc: subprocess.Popen) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError):
            if healthz(path, 2).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(proc.communicate()[0].decode())


@pytest.fixture
def many_files():
    """This test process opens thousands of sockets (and its children may have 4096)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard RLIMIT_NOFILE of the test process is {hard}; 4096 are needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_2000_idle_connections_under_1024_descriptors_leave_healthz_answered(many_files):
    """The daemon may open 1,024 files (soft = hard, so raising changes nothing): 2,000
    connections that never send a byte would take every descriptor, and the next
    client would wait in the kernel's backlog. At the cap, idle connections are closed
    to make room instead."""
    tmp = tempfile.mkdtemp(dir="/tmp")
    sock = os.path.join(tmp, "fo.sock")
    proc = start_daemon(tmp, (1024, 1024))
    idle: list[socket.socket] = []
    try:
        wait_serving(sock, proc)
        for _ in range(2000):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            with contextlib.suppress(OSError):
                s.connect(sock)
            idle.append(s)
        answer = healthz(sock, 10)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(sock)
            s.sendall(b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n")
            status = b""
            while not status.endswith(b"}"):
                status += s.recv(65536)
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert answer.startswith(b"HTTP/1.1 200"), output
    connections = msgspec.json.decode(status.split(b"\r\n\r\n", 1)[1])["connections"]
    assert connections["max"] == fo.connection_cap(1024) == 448
    assert connections["open"] <= connections["max"] + fo.SPARE_CONNECTIONS
    assert "open files: 1024 allowed; at most 448 client connections" in output


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(many_files):
    tmp = tempfile.mkdtemp(dir="/tmp")
    proc = start_daemon(tmp, (1024, 4096))
    try:
        wait_serving(os.path.join(tmp, "fo.sock"), proc)
        with open(f"/proc/{proc.pid}/limits") as f:
            limits = next(line for line in f if line.startswith("Max open files")).split()
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert limits[3:5] == ["4096", "4096"], limits
    assert "open files: 4096 allowed (raised from 1024); at most 1984 client connections" \
        in output


async def serve_capped(nursery: trio.Nursery, scripts: dict) -> tuple[fo.Daemon, str]:
    """A daemon with daemon.max_connections = 2 on a real Unix socket (real time)."""
    tmp = tempfile.mkdtemp(dir="/tmp")
    cfg = make_config({"r": ["a/m1"]}, ledger=os.path.join(tmp, "ledger.jsonl"))
    cfg = msgspec.structs.replace(cfg, daemon=fo.DaemonConfig(
        socket=os.path.join(tmp, "fo.sock"), ledger=os.path.join(tmp, "ledger.jsonl"),
        max_connections=2, shutdown_grace_s=0))
    d = fo.Daemon(cfg, ledger=fo.Ledger(cfg.daemon.ledger),
                  transport=MockUpstreams(scripts).transport)
    listener = await fo.open_unix_listener(cfg.daemon.socket, "0600")
    await nursery.start(fo.serve, d, [listener])
    return d, cfg.daemon.socket


async def raw_exchange(path: str, request: bytes) -> bytes:
    stream = await trio.open_unix_socket(path)
    await stream.send_all(request)
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
        if b"\r\n\r\n" in data and data.endswith(b"}"):
            break
    await stream.aclose()
    return data


async def test_at_the_cap_an_idle_connection_makes_room(nursery):
    d, path = await serve_capped(nursery, {})
    with trio.fail_after(10):
        idle = [await trio.open_unix_socket(path) for _ in range(2)]
        while d.connections < 2:  # noqa: ASYNC110 (the kernel delivers the connections)
            await trio.sleep(0.01)
        answer = await raw_exchange(path, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        closed: list[trio.SocketStream] = []

        async def watch(s: trio.SocketStream) -> None:
            if await s.receive_some(10) == b"":
                closed.append(s)
                watching.cancel_scope.cancel()

        async with trio.open_nursery() as watching:
            for s in idle:
                watching.start_soon(watch, s)
    assert answer.startswith(b"HTTP/1.1 200")
    assert len(closed) == 1  # one idle connection was closed to make room
    d.shutdown.set()


async def test_at_the_cap_with_no_idle_connection_healthz_is_still_answered(nursery):
    d, path = await serve_capped(nursery, {"a/m1": [("hang",)]})
    with trio.fail_after(10):
        busy = []
        for _ in range(2):  # two requests in flight: nothing idle to close
            s = await trio.open_unix_socket(path)
            await s.send_all(http_request({"model": "r", "messages": HELLO}))
            busy.append(s)
        while len(d.inflight) < 2:  # noqa: ASYNC110 (the kernel delivers the requests)
            await trio.sleep(0.01)
        refused = await raw_exchange(path, http_request({"model": "r", "messages": HELLO}))
        health = await raw_exchange(path, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 503")
    assert b"retry-after: 1" in refused
    assert msgspec.json.decode(refused.split(b"\r\n\r\n", 1)[1])["error"]["code"] == \
        "too_many_connections"
    assert health.startswith(b"HTTP/1.1 200")
    assert len(d.inflight) == 2  # the requests in flight were not touched
    d.shutdown.set()


async def test_a_passed_through_400_carries_no_fragment_of_the_key(harness, autojump_clock):
    fragment = "test-secret-key-a"  # the middle of the harness's key for a: no sk- prefix
    body = msgspec.json.encode({"error": {"message": f"bad request (key ...{fragment}",
                                          "type": "invalid_request_error"}})
    h = harness({"a/m1": [("respond", 400, {}, body)]}, routes={"r": ["a/m1"]})
    r = await h.chat()
    assert r.status == 400
    assert b"secret-k" not in r.body
    assert b"[redacted]" in r.body
