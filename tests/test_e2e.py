"""End to end: the real `openai` client over the daemon's Unix socket, scripted upstreams
on loopback (`failoverd.FakeUpstream`), real time, the ledger read back from disk.

Deadlines here are short (0.5 s) and every test is bounded with `trio.fail_after`; the
exact timing of deadlines is tested in virtual time elsewhere. The sync openai client
runs in a worker thread so the daemon and the upstreams keep running on the trio loop.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx2
import openai
import pytest
import trio
from conftest import http_request

import failoverd as fo

T = TypeVar("T")

ROUTE = "desk"
MESSAGES = [{"role": "user", "content": "Say hello."}]
# Short enough to keep the file fast, long enough for a loaded CI box on loopback.
TIMING = {"first_token_timeout_s": 0.5, "stall_timeout_s": 0.5, "total_timeout_s": 10.0}
CLIENT_TIMEOUT_S = 10.0  # the SDK's own bound, so a worker thread never outlives a test

HUNG: fo.Script = [("hang",)]
BOOM: fo.Script = [("respond", 500, {}, b'{"error":{"message":"boom","type":"server_error"}}')]
# Two content tokens, then the connection drops: no finish_reason, no [DONE].
CUTS_OUT: fo.Script = [
    ("head", 200, {}),
    ("sse", fo.sse_chunk(role="assistant", content="")),
    ("sse", fo.sse_chunk("The answer")),
    ("sse", fo.sse_chunk(" is")),
    ("sleep", 0.1),
    ("close",),
]


def healthy(words: list[str], *, model: str = "sim-1", prompt_tokens: int = 12) -> fo.Script:
    return fo.token_script(words, first=0.02, gap=0.02, model=model, prompt_tokens=prompt_tokens)


class Rig:
    """One FakeUpstream serving every provider (scripts keyed by model name) and a
    daemon on a Unix socket in a short temporary directory."""

    def __init__(self, nursery: trio.Nursery, workdir: str) -> None:
        self.nursery = nursery
        self.sock = os.path.join(workdir, "fo.sock")
        self.ledger_path = os.path.join(workdir, "ledger.jsonl")
        self.upstream: fo.FakeUpstream | None = None
        self.d: fo.Daemon | None = None
        self._stopped = trio.Event()
        self._sdk_clients: list[openai.OpenAI] = []

    async def start(self, scripts: dict[str, Any], chain: list[str],
                    models: dict[str, fo.ModelConfig] | None = None,
                    **timing: Any) -> fo.FakeUpstream:
        """Serve route `desk` = `chain` (PROVIDER/MODEL slots); returns the upstream. A
        script may be a function of (model, body, n), such as a ContinuingModel."""

        def play(model: str, body: dict[str, Any], n: int) -> fo.Script:
            script = scripts[model]
            return script(model, body, n) if callable(script) else script

        self.upstream = upstream = fo.FakeUpstream(play)
        await self.nursery.start(upstream.serve)
        cfg = fo.Config(
            daemon=fo.DaemonConfig(socket=self.sock, ledger=self.ledger_path,
                                   shutdown_grace_s=1.0),
            defaults=fo.Timing(**{**TIMING, **timing}),
            providers={slot.split("/")[0]: fo.ProviderConfig(base_url=upstream.base_url)
                       for slot in chain},
            models=models or {},
            routes={ROUTE: fo.RouteConfig(chain=chain)},
        )
        self.d = fo.Daemon(cfg, ledger=fo.Ledger(self.ledger_path))
        listener = await fo.open_unix_listener(self.sock, "0600")
        await self.nursery.start(self._serve, listener)
        return upstream

    async def _serve(self, listener: trio.SocketListener, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.d is not None
        try:
            await fo.serve(self.d, [listener], task_status=task_status)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        for client in self._sdk_clients:
            client.close()
        if self.d is None:
            return
        self.d.shutdown.set()
        with trio.fail_after(5):
            await self._stopped.wait()
        await self.d.aclose()
        self.d.ledger.close()

    async def settled(self) -> None:
        """Wait until no request is in flight: its ledger rows are all written."""
        assert self.d is not None
        with trio.fail_after(5):
            await self.d.no_inflight.wait()

    def sdk(self) -> openai.OpenAI:
        """The real openai client, speaking HTTP over the daemon's Unix socket."""
        http_client = openai.DefaultHttpxClient(transport=httpx2.HTTPTransport(uds=self.sock),
                                                trust_env=False)
        client = openai.OpenAI(base_url="http://failoverd/v1", api_key="unused", max_retries=0,
                               timeout=CLIENT_TIMEOUT_S, http_client=http_client)
        self._sdk_clients.append(client)
        return client

    @asynccontextmanager
    async def http(self) -> AsyncIterator[httpx2.AsyncClient]:
        transport = httpx2.AsyncHTTPTransport(uds=self.sock)
        async with httpx2.AsyncClient(transport=transport, base_url="http://failoverd",
                                     timeout=CLIENT_TIMEOUT_S, trust_env=False) as client:
            yield client

    def rows(self, kind: type[T]) -> list[T]:
        return [row for _, row in fo.read_ledger(self.ledger_path) if isinstance(row, kind)]

    def outcomes(self) -> list[tuple[str, str, int | None]]:
        """(provider/model, outcome, status) of each attempt row, in order."""
        return [(f"{r.provider}/{r.model}", r.outcome, r.status)
                for r in self.rows(fo.AttemptRow)]

    def request_row(self) -> fo.RequestRow:
        (row,) = self.rows(fo.RequestRow)
        return row


@pytest.fixture
async def rig(nursery) -> AsyncIterator[Rig]:
    workdir = tempfile.mkdtemp(prefix="fo-e2e-", dir="/tmp")  # AF_UNIX paths are short
    r = Rig(nursery, workdir)
    try:
        yield r
    finally:
        await r.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking SDK call off the trio loop (abandoned if the test times out)."""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


def chunk_text(chunk: Any) -> str:
    return "".join(c.delta.content or "" for c in chunk.choices)


def stream_text(client: openai.OpenAI) -> Callable[[], tuple[str, BaseException | None]]:
    def call() -> tuple[str, BaseException | None]:
        seen = []
        try:
            for chunk in client.chat.completions.create(model=ROUTE, messages=MESSAGES,
                                                        stream=True):
                seen.append(chunk_text(chunk))
        except openai.APIError as e:
            return "".join(seen), e
        return "".join(seen), None
    return call


async def test_streaming_request_fails_over_from_hung_upstream_to_healthy_one(rig):
    await rig.start({"stuck": HUNG, "healthy": healthy(["Hello", " from", " good"])},
                    ["hung/stuck", "good/healthy"])
    client = rig.sdk()

    def call() -> tuple[httpx2.Headers, str]:
        raw = client.chat.completions.with_raw_response.create(
            model=ROUTE, messages=MESSAGES, stream=True)
        return raw.headers, "".join(chunk_text(chunk) for chunk in raw.parse())

    with trio.fail_after(5):
        headers, text = await in_thread(call)
        await rig.settled()

    assert text == "Hello from good"
    assert headers["x-failoverd-served-by"] == "good/healthy"
    assert headers["x-failoverd-attempts"] == "2"
    assert rig.outcomes() == [("hung/stuck", "first_token_timeout", None),
                              ("good/healthy", "ok", 200)]
    request = rig.request_row()
    assert (request.outcome, request.status, request.served_by, request.attempts) == \
        ("ok", 200, "good/healthy", 2)
    assert request.request_id == headers["x-failoverd-request-id"]
    # SO_PEERCRED over the real socket: the caller is this process.
    assert {r.client_pid for r in rig.rows(fo.AttemptRow)} == {os.getpid()}


async def test_non_streaming_request_fails_over_from_http_500_with_fallback_usage(rig):
    upstream = await rig.start(
        {"boom": BOOM,
         "healthy": healthy(["Hello", " from", " fallback"], model="healthy-0613",
                            prompt_tokens=17)},
        ["bad/boom", "good/healthy"])
    client = rig.sdk()

    with trio.fail_after(5):
        completion = await in_thread(lambda: client.chat.completions.create(
            model=ROUTE, messages=MESSAGES))
        await rig.settled()

    assert completion.choices[0].message.content == "Hello from fallback"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "healthy-0613"  # what the answering upstream reported
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
            completion.usage.total_tokens) == (17, 3, 20)
    # One quick same-slot retry after a fast 5xx, then the fallback.
    assert rig.outcomes() == [("bad/boom", "http_error", 500), ("bad/boom", "http_error", 500),
                              ("good/healthy", "ok", 200)]
    assert [body["model"] for body in upstream.requests] == ["boom", "boom", "healthy"]
    assert all(body["stream"] is True for body in upstream.requests)  # always streamed upstream
    request = rig.request_row()
    assert (request.outcome, request.status, request.served_by) == ("ok", 200, "good/healthy")


async def test_upstream_cut_after_commit_makes_sdk_stream_raise(rig):
    upstream = await rig.start({"cuts-out": CUTS_OUT, "healthy": healthy(["never", " sent"])},
                               ["cuts/cuts-out", "good/healthy"])
    with trio.fail_after(5):
        seen, error = await in_thread(stream_text(rig.sdk()))
        await rig.settled()

    assert seen == "The answer is"  # the tokens before the cut reached the client
    assert isinstance(error, openai.APIError), "a truncated stream must not end cleanly"
    assert "truncated" in error.message
    (attempt,) = rig.rows(fo.AttemptRow)  # committed: no failover after the first token
    assert (attempt.outcome, attempt.committed) == ("truncated", True)
    assert [body["model"] for body in upstream.requests] == ["cuts-out"]
    request = rig.request_row()
    assert (request.outcome, request.served_by) == ("error", None)
    assert request.status >= 500


CANONICAL = ["The", " answer", " is", " ", "forty", "-two", "."]


async def test_an_answer_cut_after_commit_is_continued_for_the_sdk(rig):
    upstream = await rig.start(
        {"cuts": fo.ContinuingModel(CANONICAL, cut_after=4, gap=0.02),
         "continues": fo.ContinuingModel(CANONICAL, prefill="prefix", gap=0.02)},
        ["a/cuts", "b/continues"], models={"b/continues": fo.ModelConfig(prefill="prefix")},
        continuation=True)
    with trio.fail_after(5):
        text, error = await in_thread(stream_text(rig.sdk()))
        await rig.settled()
    assert error is None
    assert text == "".join(CANONICAL)  # one answer: nothing lost or repeated at the seam
    assert upstream.requests[1]["messages"][-1] == {"role": "assistant",
                                                    "content": "The answer is", "prefix": True}
    assert [(o, row.continued) for (_, o, _), row in
            zip(rig.outcomes(), rig.rows(fo.AttemptRow), strict=True)] == \
        [("truncated", False), ("ok", True)]
    assert rig.request_row().continued


async def test_a_fallback_that_rejects_the_prefill_is_never_what_the_sdk_sees(rig):
    await rig.start(
        {"cuts": fo.ContinuingModel(CANONICAL, cut_after=4, gap=0.02),
         "rejects": fo.ContinuingModel(CANONICAL, prefill="vllm", rejects=True)},
        ["a/cuts", "b/rejects"], models={"b/rejects": fo.ModelConfig(prefill="vllm")},
        continuation=True)
    with trio.fail_after(5):
        text, error = await in_thread(stream_text(rig.sdk()))
        await rig.settled()
    assert text == "The answer is "
    assert isinstance(error, openai.APIError)
    assert "a/cuts failed mid-stream: truncated" in error.message
    assert [o for _, o, _ in rig.outcomes()] == ["truncated", "prefill_rejected"]


async def test_client_disconnect_closes_upstream_connection_at_once(rig):
    upstream = await rig.start({"slow": [("head", 200, {}), ("hang",)]}, ["slow/slow"],
                               first_token_timeout_s=30.0, stall_timeout_s=30.0,
                               total_timeout_s=60.0)
    body = {"model": ROUTE, "messages": MESSAGES, "stream": True}

    with trio.fail_after(5):
        conn = await trio.open_unix_socket(rig.sock)
        await conn.send_all(http_request(body))
        await trio.sleep(0.3)
        assert len(upstream.requests) == 1, "the request should have reached the upstream"
        assert not upstream.disconnected.is_set()
        await conn.aclose()
        # Only the client's hang-up can explain a disconnect this early (deadlines: 30 s).
        with trio.fail_after(2):
            await upstream.disconnected.wait()
        await rig.settled()

    assert rig.outcomes() == [("slow/slow", "client_disconnected", None)]
    request = rig.request_row()
    assert (request.outcome, request.status) == ("error", 499)


async def test_models_and_healthz_answer_over_unix_socket(rig):
    await rig.start({"healthy": healthy(["hi"])}, ["good/healthy"])

    with trio.fail_after(5):
        async with rig.http() as client:
            models = await client.get("/v1/models")
            health = await client.get("/healthz")

    assert models.status_code == 200
    assert models.json()["object"] == "list"
    assert [m["id"] for m in models.json()["data"]] == [ROUTE]
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}


async def test_keep_alive_serves_sequential_requests_on_one_connection(rig):
    await rig.start({"healthy": healthy(["Hello", " again"])}, ["good/healthy"])

    with trio.fail_after(5):
        async with rig.http() as client:
            replies = []
            for stream in (False, True):
                body = {"model": ROUTE, "messages": MESSAGES, "stream": stream}
                replies.append(await client.post("/v1/chat/completions", json=body))
        await rig.settled()

    plain, streamed = replies
    assert (plain.status_code, streamed.status_code) == (200, 200)
    assert plain.json()["choices"][0]["message"]["content"] == "Hello again"
    assert streamed.text.endswith("data: [DONE]\n\n")
    assert plain.extensions["network_stream"] is streamed.extensions["network_stream"]
    assert [r.outcome for r in rig.rows(fo.RequestRow)] == ["ok", "ok"]


async def test_demo_command_runs_and_shows_failover():
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-c", "import failoverd; failoverd.cli()", "demo"],
            capture_stdout=True, capture_stderr=True, check=False)

    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "first_token_timeout" in out
    assert "good/healthy" in out


async def test_the_example_client_talks_to_failoverd_with_the_installed_openai(tmp_path):
    """examples/openai_client.py, as a user runs it: the transport it builds is the one
    the installed SDK uses (httpx2 under openai 3.x, httpx under 1.x and 2.x)."""
    upstream = fo.FakeUpstream(lambda model, body, n: fo.token_script(["one", " two"]))
    sock = os.path.join(tempfile.mkdtemp(dir="/tmp"), "fo.sock")
    example = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples",
                           "openai_client.py")
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.serve)
        cfg = fo.Config(daemon=fo.DaemonConfig(socket=sock, ledger=str(tmp_path / "l.jsonl")),
                        providers={"up": fo.ProviderConfig(base_url=upstream.base_url)},
                        routes={"desk": fo.RouteConfig(chain=["up/m"])})
        d = fo.Daemon(cfg, ledger=fo.Ledger(cfg.daemon.ledger))
        await nursery.start(fo.serve, d, [await fo.open_unix_listener(sock, "0600")])
        with trio.fail_after(60):
            done = await trio.run_process([sys.executable, example, sock, "desk"],
                                          capture_stdout=True, capture_stderr=True, check=False)
        nursery.cancel_scope.cancel()
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == [
        "sim-1 (served by up/m, 1 attempt(s)): one two", "one two"]
