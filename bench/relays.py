"""Reference relays for the per-chunk CPU figure: what a relay costs without failoverd.

    python bench/relays.py raw   PORT SOCKET   # trio, no HTTP parsing at all: the floor
    python bench/relays.py httpx2 PORT SOCKET  # trio + httpx2.AsyncClient.stream, naive

Both take one streaming request per connection on a Unix socket (the load generator's
request, sent as is) and relay the fake upstream's reply at PORT back to the client.

`raw` forwards bytes: wait for the upstream socket, read, write to the client. It is
what trio and the kernel cost per chunk, with nothing parsed.

`httpx2` is the relay one writes first: an `httpx2.AsyncClient`, `client.stream(...)`,
`aiter_raw()`, and each piece re-framed as an HTTP chunk to the client. No deadlines,
no SSE parsing, no ledger: failoverd does all of that on top of the same libraries.
"""

from __future__ import annotations

import os
import sys

import httpx2
import trio

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n")


async def read_request(stream: trio.SocketStream) -> bytes:
    """The whole request (head and content-length body) as sent by the load generator."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return b""
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


async def raw_relay(port: int, client: trio.SocketStream) -> None:
    req = await read_request(client)
    up = await trio.open_tcp_stream("127.0.0.1", port)
    await up.send_all(req)
    ufd, cfd = up.socket.fileno(), client.socket.fileno()
    while True:
        await trio.lowlevel.wait_readable(ufd)
        data = os.read(ufd, 65536)
        if not data:
            break
        os.write(cfd, data)
        if data.endswith(b"0\r\n\r\n"):
            break
    await up.aclose()


async def httpx2_relay(port: int, http: httpx2.AsyncClient,
                      client: trio.SocketStream) -> None:
    req = await read_request(client)
    body = req.partition(b"\r\n\r\n")[2]
    async with http.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                           content=body, headers={"content-type": "application/json"}) as resp:
        await client.send_all(HEAD)
        async for piece in resp.aiter_raw():
            await client.send_all(b"%x\r\n%b\r\n" % (len(piece), piece))
    await client.send_all(b"0\r\n\r\n")


async def main(mode: str, port: int, path: str) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(4096)
    # No idle connections kept: httpx2's pool scans every connection it holds on each
    # request, which would make the per-stream cost drift between bursts and spoil the
    # two-burst difference. A new upstream connection per stream costs the same in both.
    async with httpx2.AsyncClient(timeout=None, limits=httpx2.Limits(
            max_connections=None, max_keepalive_connections=0)) as http:
        async def handler(client: trio.SocketStream) -> None:
            try:
                if mode == "raw":
                    await raw_relay(port, client)
                else:
                    await httpx2_relay(port, http, client)
                await trio.sleep(0.5)  # let the client read the end before closing
            except (trio.BrokenResourceError, httpx2.HTTPError):
                pass
            finally:
                await client.aclose()

        await trio.serve_listeners(handler, [trio.SocketListener(sock)])


if __name__ == "__main__":
    if os.path.exists(sys.argv[3]):
        os.unlink(sys.argv[3])
    trio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3])
