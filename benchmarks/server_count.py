"""Instructions per request of a real uvicorn process: hand-written code against asgi_sqla.

``make bench-hotpath`` runs it after :mod:`benchmarks.hotpath` (``python -m
benchmarks.server_count``).  The in-process cases of ``hotpath`` call the app one
request at a time from the same process; this runs the benchmark's Starlette app
(``benchmarks.server:app``) under uvicorn, itself under Valgrind's cachegrind, and sends
it ``W + N`` then, in a second process, ``W + 2N`` keep-alive requests over ``C``
connections at once from a client process; the difference over ``N`` is what one
request costs the server process (interpreter, uvloop, httptools, asyncpg; not
PostgreSQL, not the client).  It is the figure behind the throughput of the
real-server scenario that a shared machine cannot time reliably.

It found what the in-process count did not: an engine-level ``after_cursor_execute``
listener turned on SQLAlchemy's dispatch of every connection event of every statement,
146,000 instructions a request (see ``_reconnect.watch_sends``).

    python -m benchmarks.server_count [--requests 400] [--connections 1 16] [--path /item]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.app import AppConfig, create_schema

#: Requests before the counted ones: pool filled, statements prepared, caches warm.
WARM_UP = 300
SYSTEMS = ("by_hand", "asgi_sqla")
_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


async def _client(port: int, path: str, method: str, requests: int, connections: int) -> None:
    """Send exactly ``requests`` keep-alive requests over ``connections`` connections."""
    request = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n".encode()
    left = requests

    async def connection() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 2"):
                    raise RuntimeError(f"{method} {path}: {head.splitlines()[0]!r}")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def count(system: str, url: str, requests: int, connections: int, path: str) -> int:
    """Instructions of a uvicorn process that served ``WARM_UP + requests`` requests."""
    port = _free_port()
    config = AppConfig(url=url, pool_size=max(5, connections + 4), max_overflow=0)
    env = {**os.environ, **config.env(), "BENCH_SYSTEM": system, "PYTHONHASHSEED": "0"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    command = [
        *("valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"),
        *(sys.executable, "-m", "uvicorn", "benchmarks.server:app", "--port", str(port)),
        *("--log-level", "warning"),
    ]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, env=env, stderr=log, text=True)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                except OSError as exc:
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        message = f"uvicorn did not start:\n{log.read()[-3000:]}"
                        raise RuntimeError(message) from exc
                    time.sleep(0.5)
            method = "POST" if path == "/items" else "GET"
            asyncio.run(_client(port, path, method, WARM_UP, connections))
            asyncio.run(_client(port, path, method, requests, connections))
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=300)
        log.seek(0)
        found = _IREFS.search(log.read())
    if found is None:
        raise RuntimeError(f"{system}: no instruction count from Valgrind")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.server_count", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--requests", type=int, default=400, help="N (see the module doc)")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--path", default="/item", choices=["/item", "/items", "/ping"])
    args = parser.parse_args(argv)
    from benchmarks.run import postgresql

    with postgresql() as pg:
        if isinstance(pg, str):
            raise SystemExit(pg)
        url = pg[0]
        asyncio.run(create_schema(url))
        print(f"| connections | {' | '.join(SYSTEMS)} | difference |")
        print("|---|---|---|---|")
        for connections in args.connections:
            per_request = {}
            for system in SYSTEMS:
                once = count(system, url, args.requests, connections, args.path)
                twice = count(system, url, 2 * args.requests, connections, args.path)
                per_request[system] = (twice - once) / args.requests
            ref, own = per_request["by_hand"], per_request["asgi_sqla"]
            versus = f"{own - ref:+,.0f} ({own / ref:.3f}x)"
            print(f"| {connections} | {ref:,.0f} | {own:,.0f} | {versus} |", flush=True)
    return 0


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent.parent)
    raise SystemExit(main())
