"""Time the middleware adds to a request that never touches the database.

Calls a bare ASGI app and the same app wrapped in ``SQLAlchemyMiddleware`` in-process,
in interleaved rounds (A B A B ...) so machine noise hits both alike, and prints the
median time per request of each and their difference.

    python benchmarks/overhead.py [--rounds 31] [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from asgi_sqla import Database, SQLAlchemyMiddleware

START = {"type": "http.response.start", "status": 200, "headers": []}
BODY = {"type": "http.response.body", "body": b"ok", "more_body": False}


async def bare_app(scope: Any, receive: Any, send: Any) -> None:
    await send(START)
    await send(BODY)


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    return None


async def time_per_request(app: Any, requests: int) -> float:
    scope = {"type": "http", "path": "/", "method": "GET", "headers": []}
    started = time.perf_counter()
    for _ in range(requests):
        await app(dict(scope), receive, send)
    return (time.perf_counter() - started) / requests


async def main(rounds: int, requests: int) -> None:
    wrapped = SQLAlchemyMiddleware(bare_app, Database("sqlite+aiosqlite://"))
    bare: list[float] = []
    with_middleware: list[float] = []
    await time_per_request(bare_app, requests)  # warm-up
    await time_per_request(wrapped, requests)
    for _ in range(rounds):
        bare.append(await time_per_request(bare_app, requests))
        with_middleware.append(await time_per_request(wrapped, requests))
    b = statistics.median(bare) * 1e6
    w = statistics.median(with_middleware) * 1e6
    diffs = [(m - a) * 1e6 for a, m in zip(bare, with_middleware, strict=True)]
    print(f"bare app:            {b:.2f} us/request (median of {rounds} rounds)")
    print(f"with middleware:     {w:.2f} us/request")
    print(f"added per request:   {statistics.median(diffs):.2f} us (median of paired rounds)")
    print(f"ratio:               {w / b:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.requests))
