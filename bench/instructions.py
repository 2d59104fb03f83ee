"""The engine's own cost per request and per relayed chunk, counted in instructions.

    python bench/instructions.py                       # this checkout's failoverd.py
    python bench/instructions.py --ab OLD.py NEW.py    # two daemon files, side by side
    python bench/instructions.py --cpu                 # process CPU time instead (fast, noisy)

Each workload runs in its own process under `valgrind --tool=callgrind`, which counts
the instructions Python executes: the same figure for the same code and inputs whatever
else the machine is doing, so an A/B of two daemon files needs no quiet machine. The
workload is in-process: requests go over kernel socket pairs to `handle_connection`
(the front end, the race, the relay's one-write fast path, the ledger), and the
upstream is an httpx2 MockTransport playing pre-built SSE bytes. So the figures are
failoverd's own work above the upstream HTTP client; the full system (httpcore, the
kernel, a real upstream) is `bench/run.py`'s.

Per request: a non-streaming request of 4 content deltas, (cost of N+W requests - cost
of W requests) / N. Per chunk: streams of 100 and of 10 deltas, the difference divided
by 90 deltas per stream. Start-up (imports, config) cancels out of both differences.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WARMUP = 20  # requests run in every workload, before and in the base count
REQUESTS = 200  # the measured non-streaming requests
STREAMS = 40  # streams per chunk workload


def load(path: str):
    spec = importlib.util.spec_from_file_location("failoverd", path)
    fo = importlib.util.module_from_spec(spec)
    sys.modules["failoverd"] = fo
    spec.loader.exec_module(fo)
    return fo


def sse_body(fo, deltas: int) -> bytes:
    steps = fo.token_script([" tok"] * deltas)[1:]
    return b"".join(fo.script_bytes(s) for s in steps)


async def workload(fo, kind: str, n: int, deltas: int) -> None:
    import socket

    import trio

    body = sse_body(fo, deltas)
    hx = getattr(fo, "httpx2", None) or fo.httpx  # daemon files from before httpx2, too

    def handle(request):
        return hx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    tmp = tempfile.mkdtemp(prefix="fo-instr-")
    cfg = fo.Config(daemon=fo.DaemonConfig(ledger=os.path.join(tmp, "ledger.jsonl")),
                    providers={"up": fo.ProviderConfig(base_url="http://up.test/v1")},
                    routes={"r": fo.RouteConfig(chain=["up/m"])})
    d = fo.Daemon(cfg, ledger=fo.Ledger(cfg.daemon.ledger),
                  transport=hx.MockTransport(handle))
    stream = kind == "stream"
    payload = json.dumps({"model": "r", "stream": stream,
                          "messages": [{"role": "user", "content": "hello"}]}).encode()
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
           b"\r\ncontent-length: %d\r\n\r\n" % len(payload)) + payload
    async with trio.open_nursery() as nursery:
        d.background = nursery
        for _ in range(n):
            a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            client, server = trio.SocketStream(a), trio.SocketStream(b)
            nursery.start_soon(fo.handle_connection, d, server, fo.Peer(1, 1))
            await client.send_all(raw)
            got = b""
            end = b"0\r\n\r\n" if stream else b"}"
            while not got.endswith(end):
                data = await client.receive_some(65536)
                if not data:
                    break
                got += data
            await client.aclose()
        nursery.cancel_scope.cancel()
    d.ledger.close()
    shutil.rmtree(tmp, ignore_errors=True)


def run_here(path: str, kind: str, n: int, deltas: int) -> float:
    """Run one workload in this process; its process CPU seconds."""
    import trio

    fo = load(path)
    start = time.process_time()
    trio.run(workload, fo, kind, n, deltas)
    return time.process_time() - start


def measure(path: str, kind: str, n: int, deltas: int, callgrind: bool) -> float:
    """Instructions (callgrind) or CPU seconds of one workload, in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, kind, str(n), str(deltas)]
    if not callgrind:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "cg.out")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
                        *cmd], capture_output=True, text=True, check=True)
        with open(out_file) as f:
            m = re.search(r"^summary:\s+(\d+)", f.read(), re.M)
        assert m, "callgrind wrote no summary"
        return float(m.group(1))


def figures(path: str, callgrind: bool) -> dict[str, float]:
    base = measure(path, "plain", WARMUP, 4, callgrind)
    plain = measure(path, "plain", WARMUP + REQUESTS, 4, callgrind)
    short = measure(path, "stream", STREAMS, 10, callgrind)
    long = measure(path, "stream", STREAMS, 100, callgrind)
    return {"per request": (plain - base) / REQUESTS,
            "per chunk": (long - short) / (STREAMS * 90)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ab", nargs=2, metavar=("OLD", "NEW"), help="compare two daemon files")
    ap.add_argument("--cpu", action="store_true", help="process CPU time, not instructions")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, kind, n, deltas = args.child
        print(run_here(path, kind, int(n), int(deltas)))
        return
    callgrind = not args.cpu
    if callgrind and shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt install valgrind), or pass --cpu")
    files = args.ab or [os.path.join(os.path.dirname(HERE), "failoverd.py")]
    unit = "instructions" if callgrind else "CPU us"
    scale = 1.0 if callgrind else 1e6
    results = [figures(f, callgrind) for f in files]
    for name in results[0]:
        cells = [f"{r[name] * scale:12,.0f}" for r in results]
        ratio = f"  new/old {results[1][name] / results[0][name]:.3f}" if len(results) == 2 else ""
        print(f"{name:<12} {unit}: {'  '.join(cells)}{ratio}")


if __name__ == "__main__":
    main()
