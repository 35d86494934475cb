"""The uvicorn target of ``benchmarks/shedding.py``: ``benchmarks.shedding_app:app``.

``GET /work`` holds a PostgreSQL connection for ``SHEDDING_HOLD_MS`` (``pg_sleep``)
through ``db.session``, on a pool of ``SHEDDING_POOL`` connections without overflow;
``SHEDDING_LIMIT``, when set, is the ``admission_limit`` (``SHEDDING_TIMEOUT`` its
``admission_timeout``).  Outside the middleware, a
recorder times every ``/work`` response from the moment the server hands the request
to the app to its last byte, by status; ``GET /stats`` returns those figures as JSON
and starts afresh, ``GET /ping`` answers at once (readiness).  The package's log is
kept to errors: a refused request logs a WARNING, and the benchmark measures the
shedding, not the log handler.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from typing import Any

from sqlalchemy import text

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.types import Message, Receive, Scope, Send

logging.getLogger("asgi_sqla").setLevel(logging.ERROR)

_limit = os.environ.get("SHEDDING_LIMIT", "")
db = Database(
    os.environ["SHEDDING_URL"],
    pool_size=int(os.environ.get("SHEDDING_POOL", "5")),
    max_overflow=0,
    admission_limit=int(_limit) if _limit else None,
    admission_timeout=float(os.environ.get("SHEDDING_TIMEOUT", "0")),
)
_HOLD = float(os.environ.get("SHEDDING_HOLD_MS", "5")) / 1000


async def _work(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            done = f"{message['type']}.complete"
            await send({"type": done})
            if message["type"] == "lifespan.shutdown":
                return
    await db.session.execute(text("SELECT pg_sleep(:s)"), {"s": _HOLD})
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


_inner = SQLAlchemyMiddleware(_work, db)

#: Seconds per ``/work`` response, by status, since the last ``/stats``.
_times: dict[int, list[float]] = {}


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _stats() -> dict[str, Any]:
    total = sum(len(v) for v in _times.values())
    admitted = _times.get(200, [])
    figures = {
        "responses": total,
        "admitted": len(admitted),
        "shed": len(_times.get(503, [])),
        "other": total - len(admitted) - len(_times.get(503, [])),
        "p50_ms": statistics.median(admitted) * 1000 if admitted else None,
        "p99_ms": _percentile(admitted, 0.99) * 1000 if admitted else None,
        "shed_p99_ms": _percentile(_times[503], 0.99) * 1000 if _times.get(503) else None,
    }
    _times.clear()
    return figures


async def _answer(send: Send, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    path = scope.get("path")
    if path == "/ping":
        await _answer(send, b"pong")
        return
    if path == "/stats":
        await _answer(send, json.dumps(_stats()).encode())
        return
    if scope["type"] != "http":
        await _inner(scope, receive, send)
        return
    started = time.perf_counter()
    status = 0

    async def timed(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            _times.setdefault(status, []).append(time.perf_counter() - started)

    await _inner(scope, receive, timed)
