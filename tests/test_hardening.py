"""Defects found in review, each pinned by the behaviour that must hold instead.

Slow clients, untidy stream endings, probes that must not leak, context errors that
must not be claimed for transient outages, replies failoverd did not foresee, bad
keys, and a ledger that cannot be reopened.
"""

from __future__ import annotations

import conftest
import h11
import pytest
import trio
import trio.testing
from conftest import ClientResult, FixedJitter, http_request, make_config, ok_script, read_response
from test_engine import OVERFLOW, respond
from test_tokens import LOCAL, send, truncating

import failoverd as fo


def socket_pair(buffer: int = 8192) -> tuple[trio.SocketStream, trio.SocketStream]:
    """A kernel socket pair with small buffers, so a client that stops reading blocks us."""
    return conftest.socket_pair(buffer)


async def read_all(stream: trio.SocketStream) -> bytes:
    parts = []
    while data := await stream.receive_some(65536):
        parts.append(data)
    return b"".join(parts)


# -- a slow client is never blamed on the upstream ------------------------------

BIG = "x" * 65536  # tokens that fill the socket buffers at once


async def test_client_that_stops_reading_is_dropped_without_blaming_the_upstream(
        harness, autojump_clock, nursery):
    h = harness({"a/m1": ok_script(" ".join([BIG] * 20), gap=1.0), "b/m2": ok_script("b")})
    client, server = socket_pair()
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
    await client.send_all(http_request({"model": "r", "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]}))
    await client.receive_some(1000)  # the head and the start of the answer
    await trio.sleep(300)  # the agent's event loop is busy
    await read_all(client)  # the connection was closed by then
    [attempt] = h.rows("attempt")
    assert attempt["outcome"] == "client_disconnected"
    assert attempt["latency_ms"] == 30000.0  # blocked from the start, dropped at the timeout
    assert h.rows("request")[0]["status"] == 499
    assert not any(b.failures or b.state != "closed" for b in h.d.health.breakers.values())


async def test_slow_client_does_not_eat_into_the_stall_deadline(harness, autojump_clock,
                                                                 nursery):
    h = harness({"a/m1": ok_script(" ".join([BIG] * 4), gap=1.0)}, routes={"r": ["a/m1"]},
                stall_timeout_s=10.0)
    client, server = socket_pair()
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
    await client.send_all(http_request({"model": "r", "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]}))
    await trio.sleep(20.0)  # longer than the stall deadline, shorter than the write timeout
    with trio.fail_after(60):
        rest = await read_response(client, ClientResult())
    assert rest.body.endswith(b"data: [DONE]\n\n")
    assert h.outcomes() == [("a/m1", "ok")]


# -- untidy endings of a complete answer ----------------------------------------

@pytest.mark.parametrize("stream", [True, False])
async def test_reset_after_done_is_still_a_success(harness, autojump_clock, stream):
    h = harness({"a/m1": [*ok_script("complete answer"), ("reset",)], "b/m2": ok_script("b")})
    r = await h.chat(stream=stream)
    assert (r.status, r.text) == (200, "complete answer")
    assert h.outcomes() == [("a/m1", "ok")]
    assert h.upstreams.keys_called() == ["a/m1"]  # not generated (and billed) twice


async def test_stall_after_finish_reason_is_still_a_success(harness, autojump_clock):
    script = [("head", 200, {}), ("sse", fo.sse_chunk("whole answer")),
              ("sse", fo.sse_chunk(finish="stop")), ("hang",)]
    h = harness({"a/m1": script, "b/m2": ok_script("b")})
    r = await h.chat(stream=True)
    assert r.events[-1] == "[DONE]"
    assert r.text == "whole answer"
    assert h.outcomes() == [("a/m1", "ok")]


@pytest.mark.parametrize("stream", [True, False])
async def test_stream_with_no_output_before_done_fails_over(harness, autojump_clock, stream):
    empty = [("head", 200, {}), ("sse", fo.sse_chunk(role="assistant", content="")),
             ("sse", "[DONE]")]
    h = harness({"a/m1": empty, "b/m2": ok_script("second")})
    r = await h.chat(stream=stream)
    assert r.text == "second"
    assert h.outcomes() == [("a/m1", "protocol_error"), ("b/m2", "ok")]


# -- probes and context errors ----------------------------------------------------

async def test_no_probe_is_claimed_for_a_slot_never_tried(harness, autojump_clock):
    h = harness({"c/local": truncating(4000), "b/big": respond(500), "a/m1": ok_script("a"),
                 "b/m2": ok_script("b2")},
                routes={"r": ["c/local", "b/big", "a/m1"], "other": ["a/m1", "b/m2"]},
                models=LOCAL, retry_same=0)
    h.d.health._trip(("model", "a/m1"), 5.0, "earlier failures")
    await trio.sleep(10)  # a/m1 is due a probe
    assert (await send(h, 6000)).status == 502  # one re-dispatch (b/big), then no more
    breaker = h.d.health.breakers[("model", "a/m1")]
    assert not breaker.probing
    assert (await h.chat("other")).text == "a"  # the next request probes and closes it


async def test_prompt_that_fits_a_throttled_slot_is_not_called_too_large(harness,
                                                                         autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")},
                routes={"r": ["a/m1", "b/m2"], "big": ["b/m2"]},
                models={"a/m1": fo.ModelConfig(context_window=2000),
                        "b/m2": fo.ModelConfig(context_window=100_000, rpm_limit=1)})
    await h.send(http_request({"model": "big", "messages": [{"role": "user", "content": "x"}]}))
    r = await send(h, 20_000)  # fits b/m2, which is out of budget for this minute
    assert r.status == 502
    assert r.json["error"]["code"] != "context_length_exceeded"


async def test_overflow_then_open_breaker_is_not_called_too_large(harness, autojump_clock):
    h = harness({"a/m1": respond(400, OVERFLOW), "b/m2": ok_script("b")},
                models={"b/m2": fo.ModelConfig(context_window=100_000)})
    h.d.health._trip(("provider", "b"), 30.0, "5 consecutive failures")
    r = await send(h, 4000)
    # not "too large": b/m2 would have taken it, had its breaker been closed
    assert (r.status, r.json["error"]["code"]) == (502, "upstream_failed")
    assert h.outcomes() == [("a/m1", "context_overflow"), ("b/m2", "skipped:breaker_open")]


# -- replies failoverd did not foresee ----------------------------------------------

async def test_stream_options_that_is_not_an_object_is_a_client_error(harness, autojump_clock):
    h = harness({"a/m1": ok_script()})
    r = await h.chat(stream=True, stream_options=True)
    assert r.status == 400
    assert r.json["error"]["param"] == "stream_options"
    assert h.upstreams.calls == []


async def test_anthropic_null_output_tokens_are_tolerated(harness, autojump_clock):
    def ev(kind: str, **kw) -> tuple:
        return ("raw", b"event: %b\ndata: %b\n\n" % (kind.encode(),
                                                     fo._json_encode({"type": kind, **kw})))

    script = [("head", 200, {}),
              ev("message_start", message={"id": "m", "model": "c", "usage": {"input_tokens": 5}}),
              ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "hello"}),
              ev("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": None}),
              ev("message_stop")]
    h = harness({"z/m1": script}, routes={"r": ["z/m1"]}, anthropic=("z",))
    r = await h.chat()
    assert (r.status, r.text) == (200, "hello")
    assert r.json["usage"]["prompt_tokens"] == 5


async def test_an_unforeseen_error_in_an_attempt_fails_over(harness, autojump_clock,
                                                           monkeypatch, caplog):
    def explode(*args):
        raise KeyError("surprise")

    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")})
    monkeypatch.setattr(fo.OpenAIAdapter, "digest", explode)
    r = await h.chat()
    assert r.status == 502
    assert [o for _, o in h.outcomes()] == ["protocol_error", "protocol_error"]
    assert h.rows("request")[0]["status"] == 502
    assert "unexpected error handling the upstream reply" in caplog.text


# -- keys and the ledger --------------------------------------------------------------

@pytest.mark.parametrize("key", ["sk-proj-abcdef123456\u200b", "Zq9dk2LmPa0sXw8QQ\nline2secret",
                                 "sk-with space", "sk-\x00nul"])
def test_keys_that_cannot_go_into_a_header_are_rejected_at_load(key, tmp_path):
    provider = fo.ProviderConfig(base_url="http://x.test", api_key_env="K")
    with pytest.raises(fo.ConfigError) as e:
        fo.resolve_api_key("a", provider, {"K": key})
    assert "providers.a" in str(e.value)
    assert key.strip() not in str(e.value)
    (tmp_path / "key").write_text(key)
    provider = fo.ProviderConfig(base_url="http://x.test", api_key_file=str(tmp_path / "key"))
    with pytest.raises(fo.ConfigError):
        fo.resolve_api_key("a", provider, {})


async def test_failed_ledger_reopen_keeps_the_daemon_writing(tmp_path, caplog):
    path = tmp_path / "logs" / "ledger.jsonl"
    path.parent.mkdir()  # failoverd creates no directory but its own (SYSTEMD_DIRECTORIES)
    cfg = make_config({"r": ["a/m1"]}, ledger=str(path))
    d = fo.Daemon(cfg, ledger=fo.Ledger(str(path)))
    (tmp_path / "logs").rename(tmp_path / "logs.1")  # rotated away ...
    (tmp_path / "logs").write_text("not a directory")  # ... and the path is now unusable
    d.ledger.reopen()
    assert "cannot reopen" in caplog.text
    d.ledger.write(fo.RequestRow(ts="t", request_id="x", route="r", outcome="ok",
                                 served_by=None, attempts=1, total_ms=1.0, ttft_ms=1.0,
                                 status=200))
    assert (tmp_path / "logs.1" / "ledger.jsonl").read_bytes().endswith(b'"status":200,'
                                                                        b'"stream":false,'
                                                                        b'"client_pid":null,'
                                                                        b'"client_uid":null,'
                                                                        b'"total_timeout_s":null,'
                                                                        b'"client_cliff_s":null,'
                                                                        b'"continued":false}\n')


class RecordingReply(fo.Reply):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def start(self, status, headers, body=b"", *, final=False) -> None:
        self.calls.append("start")

    async def send(self, data: bytes) -> None:
        self.calls.append("send")

    async def finish(self, data: bytes, settle) -> None:
        self.calls.append("finish")
        settle(True)

    async def respond(self, status, headers, body, settle) -> None:
        self.calls.append("respond")
        settle(True)

    def abort(self) -> None:
        self.calls.append("abort")


async def test_output_handled_after_the_deadline_fired_ends_the_attempt(harness,
                                                                        autojump_clock):
    """A token handled after its deadline already fired (a late event loop) ends the
    attempt as that timeout: nothing is written, nothing is silently dropped."""
    h = harness({"a/m1": ok_script()})
    reply = RecordingReply()
    req = fo.Request(h.d, h.d.snap, h.d.routes["r"],
                     {"messages": [{"role": "user", "content": "x"}]}, stream=True,
                     peer=fo.Peer(), reply=reply, request_id="r1", body_size=60)
    attempt = fo.Attempt(req, fo.Slot("a", "m1"), claim=(), hedge=False, retry=False)
    attempt.scope.cancel()  # the deadline fired while the token sat in the run queue
    attempt.st.progress = True
    with pytest.raises(fo.Failure) as e:
        await attempt._digested(b'{"choices":[]}')
    assert e.value.outcome == "first_token_timeout"
    assert reply.calls == []
    assert not req.committed


# -- overload: shed fast instead of queueing ------------------------------------------

def test_lag_estimate_attacks_fast_and_decays_by_halves():
    assert fo.smoothed_lag(0.0, 0.4) == 0.4
    assert fo.smoothed_lag(0.4, 0.0) == 0.2
    assert fo.smoothed_lag(0.2, 0.001) == 0.1


def test_shed_share_rises_with_lateness_and_falls_slowly():
    limit = 0.02
    assert fo.next_shed_share(0.0, 0.01, limit) == 0.0  # on time: nothing refused
    assert fo.next_shed_share(0.0, 0.02, limit) == 0.0  # at the limit: still nothing
    # late: a step per limit's worth of lateness, capped
    assert fo.next_shed_share(0.0, 0.04, limit) == pytest.approx(0.2)
    assert fo.next_shed_share(0.5, 1.0, limit) == fo.SHED_MAX
    # calm: a tenth of a step down per probe, never below zero
    assert fo.next_shed_share(0.5, 0.0, limit) == pytest.approx(0.49)
    assert fo.next_shed_share(0.005, 0.0, limit) == 0.0
    assert fo.next_shed_share(0.5, 1.0, 0.0) == 0.0  # shed_lag_s = 0 turns it off


async def test_overloaded_daemon_sheds_its_share_of_new_requests_at_once(
        harness, autojump_clock):
    h = harness({"a/m1": ok_script("a")})
    h.d.shed_share = 0.5
    # a request is refused exactly when its draw falls under the share
    h.d.rng = FixedJitter(0.49)
    assert [(await h.chat()).status for _ in range(3)] == [503, 503, 503]
    h.d.rng = FixedJitter(0.51)
    assert [(await h.chat()).status for _ in range(2)] == [200, 200]
    refused = [r for r in h.rows("request") if r["status"] == 503]
    assert [r["attempts"] for r in refused] == [0, 0, 0]
    assert len(h.upstreams.calls) == 2
    assert h.d.status()["shed_requests"] == 3
    # streams have their own share, zero here: a new stream still goes through
    h.d.rng = FixedJitter(0.0)
    assert (await h.chat(stream=True)).status == 200
    h.d.shed_share_streams = 0.5
    assert (await h.chat(stream=True)).status == 503
    h.d.shed_share = fo.SHED_MAX
    h.d.rng = FixedJitter(0.0)
    calls = len(h.upstreams.calls)
    r = await h.chat()
    assert (r.status, r.headers["retry-after"], r.json["error"]["code"]) == \
        (503, "1", "overloaded")
    assert r.t_first == 0.0  # refused at once,
    assert len(h.upstreams.calls) == calls  # no upstream touched
    assert "shed (overloaded now: refusing 95% of new requests, 50% of new streams)" in \
        "\n".join(fo.format_status(h.d.status(), width=200))
    h.d.shed_share = 0.0
    assert (await h.chat()).text == "a"


async def test_lag_probe_sets_the_shed_share(harness, autojump_clock, nursery):
    h = harness({"a/m1": ok_script("a")})
    h.d.inflight["busy"] = None  # requests in flight: probed every LAG_PROBE_S
    nursery.start_soon(h.d.watch_lag)
    await trio.sleep(0.005)
    autojump_clock.jump(0.2)  # as if a burst of work held the loop for 0.2 s
    await trio.sleep(0.001)
    assert h.d.loop_lag == pytest.approx(0.195)
    assert h.d.shed_share == fo.SHED_MAX  # 0.195 s late is ~10 limits' worth
    assert h.d.shed_share_streams == 0.0  # streams: under 10 x shed_lag_s = 0.2 s
    assert h.d.overloaded
    await trio.sleep(0.5)  # 50 calm probes take 0.01 each off: 0.95 -> 0.45
    assert h.d.shed_share == pytest.approx(fo.SHED_MAX - 50 * fo.SHED_STEP / 10, abs=0.011)
    await trio.sleep(0.5)
    assert h.d.shed_share == 0.0
    assert not h.d.overloaded
    autojump_clock.jump(0.41)  # 0.4 s late: 2 stream limits' worth
    await trio.sleep(0.001)
    assert h.d.shed_share_streams == pytest.approx(0.2, abs=0.01)


async def test_an_idle_daemon_probes_its_loop_rarely(harness, autojump_clock, nursery):
    h = harness({"a/m1": ok_script("a")})
    nursery.start_soon(h.d.watch_lag)
    await trio.sleep(0.005)
    autojump_clock.jump(0.3)
    await trio.sleep(0.001)
    # the probe slept LAG_PROBE_IDLE_S, not LAG_PROBE_S: 0.305 - 0.25 late
    assert h.d.loop_lag == pytest.approx(0.055)
    # a request beginning wakes the idle probe: from then on it probes at the busy pace
    h.d.shed_share = h.d.shed_share_streams = h.d.loop_lag = 0.0  # calm again
    await trio.sleep(0.02)  # the probe goes back to its idle pace
    h.d.begin(fo.Request(h.d, h.d.snap, h.d.routes["r"], {"messages": []}, stream=False,
                         peer=fo.Peer(pid=None, uid=None), reply=fo.Reply(),
                         request_id="x", body_size=0))
    await trio.sleep(0.001)
    autojump_clock.jump(0.05)  # a busy probe (0.01 s) now sees 0.04 s of lateness
    await trio.sleep(0.001)
    assert h.d.loop_lag == pytest.approx(0.04, abs=0.002)


# -- a late event loop and slow clients while relaying ------------------------------------

async def test_late_event_loop_never_turns_a_lost_frame_into_a_complete_answer(
        harness, autojump_clock, busy_loop_scripts):
    """The stall deadline passes while the loop is busy; the next read brings the last
    content, the finish and [DONE] at once. The client must not get [DONE] after a hole."""
    tail = b"".join(fo.script_bytes(s) for s in (
        ("sse", fo.sse_chunk(" LOST")), ("sse", fo.sse_chunk(finish="stop")), ("sse", "[DONE]")))
    script = [("head", 200, {}), ("sse", fo.sse_chunk("hello")), ("jump", 11.0), ("raw", tail)]
    h = harness({"a/m1": script, "b/m2": ok_script("b")}, stall_timeout_s=10.0)
    r = await h.chat(stream=True)
    assert r.events[-1] != "[DONE]"
    assert r.events[-1]["error"]["code"] == "stall_timeout"
    assert h.outcomes() == [("a/m1", "stall_timeout")]


async def test_stuck_client_is_dropped_at_the_write_timeout_not_the_stall(harness,
                                                                          autojump_clock,
                                                                          nursery):
    h = harness({"a/m1": ok_script("hi " + " ".join([BIG] * 20), gap=1.0)},
                routes={"r": ["a/m1"]})  # stall 60 s, client_write_timeout_s 30 s
    client, server = socket_pair()
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
    await client.send_all(http_request({"model": "r", "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]}))
    await client.receive_some(100)
    await trio.sleep(300)
    await read_all(client)
    [attempt] = h.rows("attempt")
    assert attempt["outcome"] == "client_disconnected"
    assert 30000.0 <= attempt["latency_ms"] <= 32000.0


async def test_upstream_stall_during_a_slow_non_progress_write_is_a_stall(harness,
                                                                          autojump_clock,
                                                                          nursery):
    big_empty = ('{"choices":[{"index":0,"delta":{"content":""},"finish_reason":null}],"pad":"'
                 + "x" * 65536 + '"}')
    script = [("head", 200, {}), ("sse", fo.sse_chunk("hi")), ("sleep", 1.0),
              ("sse", big_empty), ("sse", big_empty), ("sse", big_empty), ("hang",)]
    h = harness({"a/m1": script}, routes={"r": ["a/m1"]}, stall_timeout_s=10.0)
    client, server = socket_pair()
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
    await client.send_all(http_request({"model": "r", "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]}))
    await client.receive_some(100)
    await trio.sleep(10.5)  # a pause well under client_write_timeout_s
    await read_all(client)
    [attempt] = h.rows("attempt")
    assert attempt["outcome"] == "stall_timeout"  # the upstream's silence, not the client


async def test_a_client_gone_mid_relay_is_client_gone_and_the_connection_is_done():
    """The synchronous relay write to a closed client (EPIPE/ECONNRESET) must become
    ClientGone, which the Exchange records as client_disconnected, never a failover."""
    ours, theirs = trio.socket.socketpair()
    conn = h11.Connection(h11.SERVER)
    reply = fo.H11Reply(conn, trio.SocketStream(ours), write_timeout=5.0)
    reply.chunked = True
    assert reply.relay_now(b"1") == b""  # a reading client takes it at once
    theirs.close()
    with pytest.raises(fo.ClientGone):
        reply.relay_now(b"2")
    assert conn.our_state is h11.ERROR
    with pytest.raises(fo.ClientGone):  # and nothing more is written
        reply.relay_now(b"3")
    ours.close()


# -- failover storms: next attempts wait their turn while the loop runs late ---------


def test_fallback_release_doubles_on_time_and_halves_when_late():
    assert fo.next_release(4, 0.0) == 8
    assert fo.next_release(4, fo.FALLBACK_LAG_S) == 8  # at the limit: still on time
    assert fo.next_release(fo.FALLBACK_RELEASE_MAX, 0.0) == fo.FALLBACK_RELEASE_MAX
    assert fo.next_release(8, 0.05) == 4
    assert fo.next_release(fo.FALLBACK_RELEASE_MIN, 0.05) == fo.FALLBACK_RELEASE_MIN


async def test_a_fallback_waits_for_the_next_lag_probe_while_the_loop_runs_late(
        harness, autojump_clock, nursery):
    h = harness({"a/m1": respond(401), "b/m2": ok_script("from b")})
    nursery.start_soon(h.d.watch_lag)
    await trio.sleep(0.001)
    h.d.late = 0.05  # the last probe woke 50 ms late
    started = trio.current_time()
    done = ClientResult()
    async def chat() -> None:
        nonlocal done
        done = await h.chat()
    nursery.start_soon(chat)
    await trio.sleep(0.005)
    # a failed at once; its fallback waits instead of adding to a late loop
    assert len(h.d.fallbacks) == 1
    assert h.outcomes() == [("a/m1", "auth_error")]
    await trio.sleep(0.05)
    # the request woke the probe; its next, on-time probe 10 ms later let b start
    assert len(h.d.fallbacks) == 0
    assert done.status == 200
    assert "from b" in done.body.decode()
    assert done.t_end - started == pytest.approx(fo.LAG_PROBE_S)
    assert h.outcomes() == [("a/m1", "auth_error"), ("b/m2", "ok")]


async def test_a_fallback_starts_at_once_when_the_loop_is_on_time(harness, autojump_clock):
    h = harness({"a/m1": respond(401), "b/m2": ok_script("from b")})
    h.d.late = fo.FALLBACK_LAG_S  # on time, as far as the gate is concerned
    result = await h.chat()
    assert result.status == 200
    assert result.t_end - result.t_start == 0.0
    assert len(h.d.fallbacks) == 0


async def test_a_waiting_fallback_gives_up_at_the_total_deadline(harness, autojump_clock):
    h = harness({"a/m1": respond(401), "b/m2": ok_script("from b")}, total_timeout_s=5.0)
    h.d.late = 0.05  # late, and no probe runs to let anyone start
    result = await h.chat()
    assert result.t_end - result.t_start == 5.0
    assert result.status == 502  # a gateway error: the one attempt made failed
    assert len(h.d.fallbacks) == 0
    assert h.outcomes() == [("a/m1", "auth_error")]
    [request] = h.rows("request")
    assert request["total_ms"] == 5000.0


async def test_a_client_gone_while_its_fallback_waits_leaves_the_queue(harness, autojump_clock,
                                                                      nursery):
    h = harness({"a/m1": respond(401), "b/m2": ok_script("from b")})
    h.d.late = 0.05
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(4242, 1000))
    await client.send_all(http_request({"model": "r", "messages": [
        {"role": "user", "content": "hello"}]}))
    await trio.sleep(1.0)
    assert len(h.d.fallbacks) == 1
    status = h.d.status()
    assert status["fallbacks_waiting"] == 1
    assert "1 next attempt(s) waiting their turn" in "\n".join(fo.format_status(status, width=200))
    await client.aclose()
    await trio.sleep(0.1)
    assert len(h.d.fallbacks) == 0
    [request] = h.rows("request")
    assert request["status"] == fo.STATUS_CLIENT_CLOSED
    assert h.outcomes() == [("a/m1", "auth_error")]


async def test_deadlines_that_fire_together_are_all_recorded_before_any_fallback(
        harness, autojump_clock, nursery):
    """Even with the loop on time, a next attempt yields once first: when many first-token
    deadlines fire at the same moment, every abandoned attempt is in the ledger before
    any fallback starts its heavier work."""
    rows_seen: list[int] = []

    def b_script(now: float) -> fo.Script:
        rows_seen.append(sum(r["outcome"] == "first_token_timeout" for r in h.rows("attempt")))
        return ok_script("from b")

    h = harness({"a/m1": [("hang",)], "b/m2": b_script}, first_token_timeout_s=2.0)
    results: list[ClientResult] = []

    async def chat() -> None:
        results.append(await h.chat())

    for _ in range(3):
        nursery.start_soon(chat)
    await trio.sleep(5)
    assert [r.status for r in results] == [200, 200, 200]
    assert [r.t_end for r in results] == [2.0, 2.0, 2.0]
    assert rows_seen == [3, 3, 3]
