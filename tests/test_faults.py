"""Faults, hostile input and secrets (issue 16): what one client sends never counts
against an upstream, and what an upstream sends never grows the daemon without bound.
"""

from __future__ import annotations

import logging
import os
import tempfile

import httpx
import msgspec
import pytest
import trio
from conftest import http_request, ok_script
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
    statuses = {(await h.send(with_extra(depth))).status for depth in range(650, 1001)}

    assert statuses <= {200, 400}
    assert {o for _, o in h.outcomes()} <= {"ok"}
    assert closed(h)


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
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
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
    transport = httpx.AsyncHTTPTransport(uds=os.path.join(tmp, "fo.sock"))
    with trio.fail_after(10):
        async with httpx.AsyncClient(transport=transport, base_url="http://failoverd") as client:
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
