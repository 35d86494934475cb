"""The benchmark runner: every scenario, every system, interleaved, in one run.

``make bench`` (or ``.venv-bench/bin/python -m benchmarks``) runs, on the app of
:mod:`benchmarks.app` built six ways:

1. **Overhead, no database**: ``GET /ping`` in-process; time per request, and the
   difference and ratio to the bare app (the app without middleware).  Plus the
   middleware alone around a bare ASGI app (``benchmarks/overhead.py``'s measurement).
2. **Overhead, one query**: ``GET /item`` (one ``SELECT``) in-process, on SQLite
   (aiosqlite) and PostgreSQL (asyncpg); ratio to the hand-written baseline.
3. **Slow clients, small pool**: pool of 2, 40 concurrent ``GET /stream`` (an
   ``INSERT``, then a streamed body each chunk of which takes the client
   ``chunk_delay`` s to read); requests per second and the ratio to the baseline.
   A probe also asks PostgreSQL whether a transaction is still open while a body is
   being sent.
4. **Failing commit**: ``POST /orphans`` breaks a ``DEFERRABLE INITIALLY DEFERRED``
   foreign key, so the ``COMMIT`` fails: the status each system answers.
5. **Real server**: each app under uvicorn, loaded by ``wrk`` (or the Python generator
   of :mod:`benchmarks.load`) at fixed concurrency; requests per second, p50 and p99
   for the read and the write route.
6. **Latency** (``--only latency``): PostgreSQL reached through
   :class:`benchmarks.proxy.DelayingProxy`, 0.5 ms each way, in-process, one request at
   a time on a warmed pool: for each system (and the hand-written app and asgi_sqla
   again with ``pool_pre_ping=True``) and each request kind (one read, three reads, one
   write, a write after a read), the round trips per request counted at the proxy and
   the latency per request (median, p99); beside them, one round trip alone (asyncpg,
   autocommit), the physical floor.
7. **Sync** (:mod:`benchmarks.sync`, ``--only sync`` or ``make bench-sync``): FastAPI
   ``def`` endpoints on psycopg 3 used synchronously, the SQL tutorial's ``yield``
   dependency against ``SyncDatabase``: the real server (with worker-thread hops and
   CPU time per request) and the slow clients.

The machine may be shared and noisy: systems run in rounds, in an order that rotates
each round (A B C…, B C… A, …), and every figure is a median over rounds.  In-process
(slow clients included), each batch of a system is run right beside a fresh batch of
the reference, and a ratio is the median of these pairs' ratios; under uvicorn, the
median of the per-round ratios.  PostgreSQL is a throwaway cluster started with
``tests/_postgres.py`` (or ``TEST_DATABASE_URL``); without one the PostgreSQL
scenarios say why they did not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import logging
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks import report
from benchmarks.app import SYSTEMS, AppConfig, build_app, children, create_schema, package_version
from benchmarks.inprocess import ASGIApp, InProcessServer, Message, Receive, Scope, Send
from benchmarks.load import load_generator, run_load

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import _postgres  # noqa: E402  (tests/: the throwaway PostgreSQL the tests use)
import _servers  # noqa: E402  (tests/: run an app under uvicorn on a free loopback port)

BASELINE = "by_hand"
Result = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    """How much of each scenario to run; ``--quick`` divides it for a smoke run."""

    no_db_rounds: int = 31
    no_db_batch_seconds: float = 0.04
    pure_asgi_requests: int = 20000
    query_rounds: int = 25
    query_batch_seconds: float = 0.08
    slow_rounds: int = 7
    slow_clients: int = 40
    slow_pool: int = 2
    slow_chunks: int = 10
    slow_chunk_delay: float = 0.01
    failing_requests: int = 5
    server_rounds: int = 7
    server_duration: float = 2.0
    server_connections: int = 16
    server_pool: int = 20
    sync_rounds: int = 9
    sync_duration: float = 2.0
    sync_connections: int = 16
    sync_pool: int = 20
    sync_slow_rounds: int = 7
    latency_rounds: int = 7
    latency_requests: int = 50
    latency_delay: float = 0.0005

    def quick(self) -> Settings:
        """A run of a minute or two that exercises every code path."""
        return replace(
            self,
            no_db_rounds=5,
            no_db_batch_seconds=0.02,
            pure_asgi_requests=5000,
            query_rounds=3,
            query_batch_seconds=0.05,
            slow_rounds=2,
            failing_requests=2,
            server_rounds=1,
            server_duration=1.0,
            sync_rounds=1,
            sync_duration=1.0,
            sync_slow_rounds=2,
            latency_rounds=2,
            latency_requests=20,
        )


def log(message: str) -> None:
    """Progress, on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotations(systems: Sequence[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """``(round, order)``: every system once per round, the order rotating each round."""
    n = len(systems)
    for r in range(rounds):
        k = r % n if n else 0
        yield r, [*systems[k:], *systems[:k]]


def summarise(
    samples: dict[str, list[float]], *, reference: str, scale: float = 1.0, prefix: str = ""
) -> dict[str, Result]:
    """Medians of ``samples`` (times ``scale``), and paired comparisons to ``reference``.

    ``ratio`` is the median over rounds of sample / reference-sample of the same
    round; ``added`` the median of their differences (times ``scale``).  Keys get
    ``prefix`` (``"cpu_"`` for the CPU-time figures).
    """
    ref = samples.get(reference)
    summary: dict[str, Result] = {}
    for system, values in samples.items():
        entry: Result = {
            f"{prefix}median": statistics.median(values) * scale,
            f"{prefix}samples": [round(v * scale, 3) for v in values],
        }
        if ref and len(ref) == len(values):
            pairs = list(zip(values, ref, strict=True))
            entry[f"{prefix}ratio"] = statistics.median(v / r for v, r in pairs)
            entry[f"{prefix}added"] = statistics.median((v - r) * scale for v, r in pairs)
        summary[system] = entry
    return summary


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


#: Builds a system's app: :func:`benchmarks.app.build_app`, or the sync scenario's.
Build = Callable[[str, AppConfig], ASGIApp]


@contextlib.asynccontextmanager
async def started_apps(
    systems: Sequence[str], config: AppConfig, failures: dict[str, str], build: Build = build_app
) -> AsyncIterator[dict[str, InProcessServer]]:
    """Build and start (lifespan) each system's app; a system that fails goes to ``failures``."""
    async with contextlib.AsyncExitStack() as stack:
        servers: dict[str, InProcessServer] = {}
        for system in systems:
            try:
                server = InProcessServer(build(system, config))
                servers[system] = await stack.enter_async_context(server)
            except Exception as exc:
                failures[system] = f"n/a: {_short(exc)}"
                log(f"  {system}: could not start: {failures[system]}")
        yield servers


#: The real-server scenarios' routes: name -> (method, path).
ROUTES = {"read": ("GET", "/item"), "write": ("POST", "/items")}


@contextlib.contextmanager
def uvicorn_apps(
    target: str, systems: Sequence[str], config: AppConfig, failures: dict[str, str]
) -> Iterator[dict[str, _servers.Server]]:
    """Each system's app under uvicorn: ``target`` with ``BENCH_SYSTEM`` set to the system.

    A system whose server does not start goes to ``failures``.  The servers' logs are
    deleted once they have stopped.
    """
    logs: list[Path] = []
    try:
        with contextlib.ExitStack() as stack:
            servers: dict[str, _servers.Server] = {}
            for system in systems:
                env = {**config.env(), "BENCH_SYSTEM": system}
                try:
                    server = stack.enter_context(
                        _servers.serve(target, "uvicorn", env=env, ready_path="/ping")
                    )
                except Exception as exc:
                    failures[system] = f"n/a: {_short(exc)}"
                    log(f"  {system}: uvicorn did not start: {failures[system]}")
                    continue
                servers[system] = server
                logs.append(server.log_path)
            yield servers
    finally:
        for log_path in logs:
            log_path.unlink(missing_ok=True)


def warm_up(
    servers: dict[str, _servers.Server], connections: int, generator: str, seconds: float = 1.0
) -> None:
    """Load every route of every server for ``seconds``: pool filled, statements prepared."""
    for server in servers.values():
        for method, path in ROUTES.values():
            run_load(
                server.url + path,
                method=method,
                connections=connections,
                duration=seconds,
                generator=generator,
            )


#: A real server's samples: route -> figure (``rps``, ``p50``, ``p99``, ``cpu``...) ->
#: system -> one value per round.
Series = dict[str, dict[str, dict[str, list[float]]]]


def summarise_routes(
    series: Series, errors: dict[str, dict[str, int]], *, cpu_scale: float = 1.0
) -> dict[str, dict[str, Result]]:
    """Per route and system: requests/s and CPU per request (``cpu`` times ``cpu_scale``, in
    µs) as :func:`summarise` gives them, the medians of p50 and p99, and the errors."""
    by_route: dict[str, dict[str, Result]] = {}
    for route, values in series.items():
        summary = summarise(values.get("rps", {}), reference=BASELINE)
        cpu = summarise(values.get("cpu", {}), reference=BASELINE, scale=cpu_scale, prefix="cpu_")
        for system, entry in summary.items():
            entry.update(cpu.get(system, {}))
            entry["p50_ms"] = statistics.median(values["p50"][system])
            entry["p99_ms"] = statistics.median(values["p99"][system])
            entry["errors"] = errors[route].get(system, 0)
        by_route[route] = summary
    return by_route


Measure = Callable[[str], Awaitable[tuple[float, ...]]]

#: How :func:`paired_rounds` names and scales what a measure returns: in-process, wall
#: and CPU seconds per request, reported in µs.
CLOCKS: tuple[tuple[str, float], ...] = (("", 1e6), ("cpu_", 1e6))


async def paired_rounds(
    measure: Measure,
    systems: Sequence[str],
    *,
    reference: str,
    rounds: int,
    failures: dict[str, str],
    metrics: tuple[tuple[str, float], ...] = CLOCKS,
) -> dict[str, Result]:
    """Measure every system beside a run of ``reference`` made just before or just after it.

    ``measure(system)`` returns one figure per entry of ``metrics`` (key prefix,
    scale): by default wall and CPU seconds per request.  Each round visits the
    other systems in an order that rotates every round, and measures each one next to
    a fresh run of the reference (reference first or second, alternately): the two
    halves of a pair are a fraction of a second apart, so a machine that is busy for
    a while slows both.  A system's ``ratio`` and ``added`` are the medians over its
    pairs; the reference's ``median`` is over all its runs.
    """
    own: dict[str, list[tuple[float, ...]]] = {}
    beside: dict[str, list[tuple[float, ...]]] = {}
    reference_runs: list[tuple[float, ...]] = []
    others = [s for s in systems if s != reference]
    for r, order in rotations(others, rounds):
        gc.collect()
        for i, system in enumerate(order):
            if system in failures:
                continue
            reference_first = (r + i) % 2 == 0
            try:
                if reference_first:
                    base = await measure(reference)
                result = await measure(system)
                if not reference_first:
                    base = await measure(reference)
            except Exception as exc:
                failures[system] = f"n/a: {_short(exc)}"
                continue
            own.setdefault(system, []).append(result)
            beside.setdefault(system, []).append(base)
            reference_runs.append(base)
    summary: dict[str, Result] = {}
    if reference_runs:
        summary[reference] = _paired_summary(metrics, reference_runs)
    for system in others:
        if system in own and system not in failures:
            summary[system] = _paired_summary(metrics, own[system], beside[system])
    return summary


def _paired_summary(
    metrics: tuple[tuple[str, float], ...],
    runs: list[tuple[float, ...]],
    references: list[tuple[float, ...]] | None = None,
) -> Result:
    """Medians of each metric of ``runs``; with ``references``, the paired ratios and gaps."""
    entry: Result = {}
    for index, (prefix, scale) in enumerate(metrics):
        values = [run[index] for run in runs]
        entry[f"{prefix}median"] = statistics.median(values) * scale
        entry[f"{prefix}samples"] = [round(v * scale, 3) for v in values]
        if references is not None:
            pairs = [(v, ref[index]) for v, ref in zip(values, references, strict=True)]
            entry[f"{prefix}ratio"] = statistics.median(v / r for v, r in pairs)
            entry[f"{prefix}added"] = statistics.median((v - r) * scale for v, r in pairs)
    return entry


async def timed_rounds(
    servers: dict[str, InProcessServer],
    path: str,
    *,
    rounds: int,
    batch_seconds: float,
    failures: dict[str, str],
) -> tuple[dict[str, Result], dict[str, int]]:
    """``GET path`` on every server, one request at a time, paired with the baseline.

    Each system's batch is sized (from a warm-up) to last about ``batch_seconds``, so
    that a slow system does not stretch the run and every pair is short.  Returns the
    summary (see :func:`paired_rounds`) and the batch size of each system.
    """
    batch: dict[str, int] = {}
    for system, server in servers.items():  # warm-up (connections, caches), then calibrate
        try:
            await server.time_requests("GET", path, 20, 200)
            estimates = [(await server.time_requests("GET", path, 20, 200))[0] for _ in range(3)]
        except Exception as exc:
            failures[system] = f"n/a: {_short(exc)}"
            continue
        batch[system] = max(10, min(100_000, round(batch_seconds / statistics.median(estimates))))
    if BASELINE in failures:
        raise RuntimeError(f"the baseline failed: {failures[BASELINE]}")

    async def measure(system: str) -> tuple[float, ...]:
        return await servers[system].time_requests("GET", path, batch[system], 200)

    summary = await paired_rounds(
        measure, list(batch), reference=BASELINE, rounds=rounds, failures=failures
    )
    return summary, {s: n for s, n in batch.items() if s not in failures}


# -- 1. overhead without a database ------------------------------------------------------


def _pass_through(app: ASGIApp) -> ASGIApp:
    """The cheapest possible middleware: calls the app, changes nothing."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send)

    return middleware


def _send_wrapper(app: ASGIApp) -> ASGIApp:
    """The cheapest middleware that sees the response: ``send`` wrapped in a closure."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped(message: Message) -> None:
            await send(message)

        await app(scope, receive, wrapped)

    return middleware


async def _time_pure(app: ASGIApp, requests: int) -> tuple[float, float]:
    """``benchmarks/overhead.py``'s loop, timed with both clocks: seconds per request."""
    from benchmarks import overhead

    scope = {"type": "http", "path": "/", "method": "GET", "headers": []}
    cpu_started = time.process_time()
    started = time.perf_counter()
    for _ in range(requests):
        await app(dict(scope), overhead.receive, overhead.send)
    elapsed = time.perf_counter() - started
    return elapsed / requests, (time.process_time() - cpu_started) / requests


async def no_database(settings: Settings, sqlite_url: str) -> Result:
    """``GET /ping`` in-process, per system; plus the middleware around a bare ASGI app."""
    from asgi_sqla import Database, SQLAlchemyMiddleware
    from benchmarks.overhead import bare_app

    failures: dict[str, str] = {}
    async with started_apps(SYSTEMS, AppConfig(url=sqlite_url), failures) as servers:
        summary, batch = await timed_rounds(
            servers,
            "/ping",
            rounds=settings.no_db_rounds,
            batch_seconds=settings.no_db_batch_seconds,
            failures=failures,
        )

    # The middleware alone around an ASGI app that does nothing (benchmarks/overhead.py),
    # beside the two cheapest middlewares there can be: the floor any middleware pays.
    pure_apps: dict[str, ASGIApp] = {
        "bare ASGI app": bare_app,
        "pass-through middleware": _pass_through(bare_app),
        "send-wrapping middleware": _send_wrapper(bare_app),
        "asgi_sqla": SQLAlchemyMiddleware(bare_app, Database("sqlite+aiosqlite://")),
    }
    for app in pure_apps.values():
        await _time_pure(app, 1000)

    async def measure(name: str) -> tuple[float, ...]:
        return await _time_pure(pure_apps[name], settings.pure_asgi_requests)

    pure = await paired_rounds(
        measure,
        list(pure_apps),
        reference="bare ASGI app",
        rounds=settings.no_db_rounds,
        failures={},
    )
    return {
        "unit": "µs/request",
        "reference": BASELINE,
        "requests_per_round": batch,
        "rounds": settings.no_db_rounds,
        "systems": summary,
        "failures": failures,
        "pure_asgi": pure,
    }


# -- 2. overhead with one query ----------------------------------------------------------


async def one_query(settings: Settings, url: str) -> Result:
    """``GET /item`` (one ``SELECT``) in-process, per system, on the database at ``url``."""
    await create_schema(url)
    failures: dict[str, str] = {}
    async with started_apps(SYSTEMS, AppConfig(url=url), failures) as servers:
        summary, batch = await timed_rounds(
            servers,
            "/item",
            rounds=settings.query_rounds,
            batch_seconds=settings.query_batch_seconds,
            failures=failures,
        )
    return {
        "unit": "µs/request",
        "reference": BASELINE,
        "requests_per_round": batch,
        "rounds": settings.query_rounds,
        "systems": summary,
        "failures": failures,
    }


# -- 3. slow clients, small pool ---------------------------------------------------------


def _transactions_open(admin_url: str) -> int:
    """How many sessions of the benchmark database are idle inside a transaction."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
    )
    with psycopg.connect(admin_url, autocommit=True) as connection:
        row = connection.execute(query).fetchone()
    return int(row[0]) if row else 0


async def slow_clients(settings: Settings, url: str, admin_url: str) -> Result:
    """40 concurrent streamed responses read slowly, through a pool of 2."""
    return await slow_clients_of(
        SYSTEMS, build_app, settings, url, admin_url, rounds=settings.slow_rounds
    )


async def slow_clients_of(
    systems: Sequence[str],
    build: Build,
    settings: Settings,
    url: str,
    admin_url: str,
    *,
    rounds: int,
) -> Result:
    """The slow-client scenario for ``systems``, each app made by ``build``, in ``rounds``."""
    await create_schema(url)
    config = AppConfig(
        url=url,
        pool_size=settings.slow_pool,
        max_overflow=0,
        stream_chunks=settings.slow_chunks,
    )
    failures: dict[str, str] = {}
    errors: dict[str, int] = {}
    held: dict[str, bool] = {}
    async with started_apps(systems, config, failures, build) as servers:
        # The probe: one slow request alone; at its first body chunk, is a transaction
        # of this app still open on the server?
        for system in servers:
            seen: list[int] = []

            async def look(seen: list[int] = seen) -> None:
                seen.append(await asyncio.to_thread(_transactions_open, admin_url))

            outcome = await servers[system].request(
                "GET", "/stream", chunk_delay=0.02, on_first_chunk=look
            )
            held[system] = bool(seen and seen[0] > 0)
            if outcome.status != 200:
                failures[system] = f"n/a: GET /stream answered {outcome.status} {outcome.error}"
        if BASELINE in failures:
            raise RuntimeError(f"the baseline failed: {failures[BASELINE]}")

        async def measure(system: str) -> tuple[float, ...]:
            server = servers[system]
            started = time.perf_counter()
            outcomes = await asyncio.gather(
                *(
                    server.request("GET", "/stream", chunk_delay=settings.slow_chunk_delay)
                    for _ in range(settings.slow_clients)
                )
            )
            elapsed = time.perf_counter() - started
            bad = sum(1 for o in outcomes if o.status != 200 or o.error)
            errors[system] = errors.get(system, 0) + bad
            return (settings.slow_clients / elapsed,)

        summary = await paired_rounds(
            measure,
            [s for s in servers if s not in failures],
            reference=BASELINE,
            rounds=rounds,
            failures=failures,
            metrics=(("", 1.0),),
        )
    for system, entry in summary.items():
        entry["errors"] = errors.get(system, 0)
        entry["holds_transaction_during_body"] = held.get(system)
    return {
        "unit": "requests/s",
        "reference": BASELINE,
        "clients": settings.slow_clients,
        "pool_size": settings.slow_pool,
        "chunks": settings.slow_chunks,
        "chunk_delay_s": settings.slow_chunk_delay,
        "rounds": rounds,
        "systems": summary,
        "failures": failures,
    }


# -- 4. a commit that fails ------------------------------------------------------------


async def failing_commit(settings: Settings, url: str) -> Result:
    """``POST /orphans``: the deferred foreign key fails at COMMIT; what does the client get?"""
    await create_schema(url)
    failures: dict[str, str] = {}
    results: dict[str, Result] = {}
    logging.disable(logging.CRITICAL)  # the systems log the failed commits; we count them
    try:
        async with started_apps(SYSTEMS, AppConfig(url=url), failures) as servers:
            for system, server in servers.items():
                outcomes = [
                    await server.request("POST", "/orphans")
                    for _ in range(settings.failing_requests)
                ]
                statuses = [o.status for o in outcomes]
                raised = sorted({o.error for o in outcomes if o.error})
                results[system] = {
                    "statuses": statuses,
                    "count_2xx": sum(1 for s in statuses if s is not None and 200 <= s < 300),
                    "requests": len(outcomes),
                    "raised_to_server": raised,
                }
    finally:
        logging.disable(logging.NOTSET)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(select(func.count()).select_from(children))).scalar()
    finally:
        await engine.dispose()
    return {
        "requests": settings.failing_requests,
        "systems": results,
        "failures": failures,
        "rows_committed": rows,
    }


# -- 5. a real server ------------------------------------------------------------------


def real_server(settings: Settings, url: str) -> Result:
    """Each system under uvicorn; a load generator process at fixed concurrency."""
    asyncio.run(create_schema(url))
    generator = load_generator()
    config = AppConfig(url=url, pool_size=settings.server_pool, max_overflow=0)
    failures: dict[str, str] = {}
    series: Series = {route: {} for route in ROUTES}
    errors: dict[str, dict[str, int]] = {route: {} for route in ROUTES}

    def record(route: str, system: str, name: str, value: float) -> None:
        series[route].setdefault(name, {}).setdefault(system, []).append(value)

    with uvicorn_apps("benchmarks.server:app", SYSTEMS, config, failures) as servers:
        systems = list(servers)
        warm_up(servers, settings.server_connections, generator)
        for _round, order in rotations(systems, settings.server_rounds):
            for route, (method, path) in ROUTES.items():
                for system in order:
                    result = run_load(
                        servers[system].url + path,
                        method=method,
                        connections=settings.server_connections,
                        duration=settings.server_duration,
                        generator=generator,
                        server_pid=servers[system].process.pid,
                    )
                    record(route, system, "rps", result.rps)
                    if result.server_cpu_us is not None:
                        record(route, system, "cpu", result.server_cpu_us)
                    record(route, system, "p50", result.p50_ms)
                    record(route, system, "p99", result.p99_ms)
                    errors[route][system] = errors[route].get(system, 0) + result.errors
    by_route = summarise_routes(series, errors)
    return {
        "unit": "requests/s",
        "reference": BASELINE,
        "generator": generator,
        "connections": settings.server_connections,
        "duration_s": settings.server_duration,
        "rounds": settings.server_rounds,
        "pool_size": settings.server_pool,
        "routes": {route: f"{m} {p}" for route, (m, p) in ROUTES.items()},
        "systems": by_route,
        "failures": failures,
    }


# -- 6. latency: the database 0.5 ms away ----------------------------------------------

#: The latency scenario's request kinds: name -> (method, path, expected status).
LATENCY_KINDS: dict[str, tuple[str, str, int]] = {
    "one read": ("GET", "/item", 200),
    "three reads": ("GET", "/reads", 200),
    "one write": ("POST", "/items", 201),
    "write after read": ("POST", "/read-write", 201),
}
#: The latency scenario's extra rows: the system, built with ``pool_pre_ping=True``.
PRE_PING_ROWS: dict[str, str] = {
    "by_hand_pre_ping": "by_hand",
    "asgi_sqla_pre_ping": "asgi_sqla",
}
#: The row of one bare round trip (asyncpg, autocommit, a prepared ``SELECT 1``).
FLOOR = "one_round_trip"


def _percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


async def latency(settings: Settings, url: str) -> Result:
    """Round trips and latency per request, the database behind a delaying proxy."""
    import asyncpg
    from sqlalchemy import make_url

    from benchmarks.proxy import DelayingProxy

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    await create_schema(url)
    target = make_url(url)
    assert target.host is not None
    assert target.port is not None
    rows = [*SYSTEMS, *PRE_PING_ROWS]
    failures: dict[str, str] = {}
    round_trips: dict[str, dict[str, list[float]]] = {kind: {} for kind in LATENCY_KINDS}
    samples: dict[str, dict[str, list[float]]] = {kind: {} for kind in LATENCY_KINDS}
    medians: dict[str, dict[str, list[float]]] = {kind: {} for kind in LATENCY_KINDS}
    floor: list[float] = []
    with DelayingProxy(target.host, target.port, delay=settings.latency_delay) as proxy:
        proxied = target.set(host=proxy.host, port=proxy.port)
        proxied_url = proxied.render_as_string(hide_password=False)
        async with contextlib.AsyncExitStack() as stack:
            servers: dict[str, InProcessServer] = {}
            for row in rows:
                system = PRE_PING_ROWS.get(row, row)
                config = AppConfig(url=proxied_url, pool_pre_ping=row in PRE_PING_ROWS)
                try:
                    server = InProcessServer(build_app(system, config))
                    servers[row] = await stack.enter_async_context(server)
                    for method, path, status in LATENCY_KINDS.values():  # warm-up
                        await server.latencies(method, path, 10, status)
                except Exception as exc:
                    failures[row] = f"n/a: {_short(exc)}"
                    log(f"  {row}: {failures[row]}")
            raw = await asyncpg.connect(
                host=proxy.host,
                port=proxy.port,
                user=target.username,
                password=target.password,
                database=target.database,
            )
            stack.push_async_callback(raw.close)
            select_one = await raw.prepare("SELECT 1")
            for _round, order in rotations(
                [r for r in rows if r in servers], settings.latency_rounds
            ):
                for _ in range(settings.latency_requests):
                    started = time.perf_counter()
                    await select_one.fetchval()
                    floor.append(time.perf_counter() - started)
                for kind, (method, path, status) in LATENCY_KINDS.items():
                    for row in order:
                        if row in failures:
                            continue
                        proxy.reset()
                        try:
                            batch = await servers[row].latencies(
                                method, path, settings.latency_requests, status
                            )
                        except Exception as exc:
                            failures[row] = f"n/a: {_short(exc)}"
                            continue
                        trips = proxy.round_trips / settings.latency_requests
                        round_trips[kind].setdefault(row, []).append(trips)
                        samples[kind].setdefault(row, []).extend(batch)
                        medians[kind].setdefault(row, []).append(statistics.median(batch))
            hold = proxy.stats()["hold"]
    systems: dict[str, dict[str, Result]] = {}
    for kind in LATENCY_KINDS:
        reference = medians[kind].get(BASELINE, [])
        for row, values in samples[kind].items():
            if row in failures:
                continue
            entry: Result = {
                "round_trips": statistics.median(round_trips[kind][row]),
                "round_trips_range": [min(round_trips[kind][row]), max(round_trips[kind][row])],
                "median_ms": statistics.median(values) * 1e3,
                "p99_ms": _percentile(values, 0.99) * 1e3,
            }
            if len(reference) == len(medians[kind][row]):
                pairs = zip(medians[kind][row], reference, strict=True)
                entry["ratio"] = statistics.median(v / r for v, r in pairs)
            systems.setdefault(row, {})[kind] = entry
    return {
        "unit": "ms/request",
        "reference": BASELINE,
        "delay_ms": settings.latency_delay * 1e3,
        "requests_per_batch": settings.latency_requests,
        "rounds": settings.latency_rounds,
        "kinds": {kind: f"{m} {p}" for kind, (m, p, _) in LATENCY_KINDS.items()},
        "floor": {
            "round_trips": 1,
            "median_ms": statistics.median(floor) * 1e3 if floor else None,
            "p99_ms": _percentile(floor, 0.99) * 1e3 if floor else None,
        },
        "hold_ms": {
            direction: {k: v * 1e3 if k != "count" else v for k, v in figures.items()}
            for direction, figures in hold.items()
        },
        "systems": systems,
        "failures": failures,
        # Its own: with --merge, the run's meta (versions included) stays the older run's.
        "versions": {system: package_version(system) for system in SYSTEMS},
        "python": platform.python_version(),
        "load_average_at_start": load_at_start,
    }


# -- PostgreSQL, the machine, the versions ---------------------------------------------


@contextlib.contextmanager
def postgresql() -> Iterator[tuple[str, str] | str]:
    """``(asyncpg URL, admin URL)`` of a fresh database, or the reason there is none.

    A throwaway cluster (``tests/_postgres.py``), or the server of ``TEST_DATABASE_URL``;
    the database is dropped and the cluster stopped and deleted on exit.
    """
    with contextlib.ExitStack() as cleanup:
        try:
            external = os.environ.get("TEST_DATABASE_URL")
            if external:
                server = _postgres.server_url_from_env(external)
            else:
                bindir = _postgres.find_bindir()
                if bindir is None:
                    raise _postgres.PostgresUnavailable(
                        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) on this machine"
                    )
                cluster = _postgres.TemporaryCluster(bindir)
                cleanup.callback(cluster.stop)
                log(f"starting a throwaway PostgreSQL from {bindir}")
                server = cluster.start()
            factory = _postgres.DatabaseFactory(server)
            cleanup.callback(factory.close)
            database = factory.create()
            cleanup.callback(factory.drop, database)
        except Exception as exc:
            unavailable: str | None = f"PostgreSQL unavailable: {_short(exc)}"
        else:
            unavailable = None
        if unavailable is not None:
            yield unavailable
        else:
            yield (
                database.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False),
                database.set(drivername="postgresql").render_as_string(hide_password=False),
            )


def _postgres_version(admin_url: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "?"


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _wrk_version() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).split("[")[0].replace("wrk", "").strip() or "?"
    return None


def environment(postgres_version: str | None) -> Result:
    """The machine and the versions of everything measured."""
    from importlib.metadata import version

    libraries = {}
    for name in (
        "sqlalchemy",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "asyncpg",
        "aiosqlite",
    ):
        with contextlib.suppress(Exception):
            libraries[name] = version(name)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "memory_gib": _memory_gib(),
            "os": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "python": platform.python_version(),
        "systems": {system: package_version(system) for system in SYSTEMS},
        "libraries": libraries,
        "postgresql": postgres_version,
        "sqlite": sqlite3.sqlite_version,
        "load_generator": f"wrk {_wrk_version()}" if load_generator() == "wrk" else "python",
    }


# -- main --------------------------------------------------------------------------------

SCENARIOS = (
    "no_db",
    "sqlite",
    "postgresql",
    "slow_clients",
    "failing_commit",
    "real_server",
    "sync",
    "latency",
)


def _timed(name: str, results: Result, run: Callable[[], Result]) -> None:
    log(f"{name} ...")
    started = time.perf_counter()
    try:
        results[name] = run()
    except Exception as exc:  # one scenario's failure is reported, the others still run
        log(f"{name} failed: {_short(exc)}")
        results[name] = {"error": f"n/a: {_short(exc)}"}
    results[name]["seconds"] = round(time.perf_counter() - started, 1)
    log(f"{name} done in {results[name]['seconds']} s")


def _sync_scenario(settings: Settings, url: str, admin_url: str) -> Result:
    # Imported here: benchmarks.sync uses this module's helpers.
    from benchmarks.sync import sync_scenario

    return sync_scenario(settings, url, admin_url)


def _merged(document: Result, previous_path: Path) -> Result:
    """``document``'s scenarios laid over those of the results.json at ``previous_path``.

    The other scenarios keep their figures and the description of the run that made
    them (``meta``); ``meta["updates"]`` says which scenarios were measured again,
    when and how.
    """
    if not previous_path.exists():
        return document
    previous: Result = json.loads(previous_path.read_text())
    meta = previous["meta"]
    new_meta = document["meta"]
    names = sorted(document["scenarios"])
    updates = [u for u in meta.get("updates", []) if u["scenarios"] != names]
    updates.append(
        {
            "scenarios": names,
            "date": new_meta["date"],
            "command": new_meta["command"],
            "seconds": new_meta["seconds"],
            "load_generator": new_meta["load_generator"],
            "postgresql": new_meta["postgresql"],
        }
    )
    meta["updates"] = updates
    meta["settings"] = {**meta.get("settings", {}), **new_meta["settings"]}
    return {"meta": meta, "scenarios": {**previous["scenarios"], **document["scenarios"]}}


def _run_async(coroutine: Callable[[], Coroutine[Any, Any, Result]]) -> Callable[[], Result]:
    def run() -> Result:
        return asyncio.run(coroutine())

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios, print the table, write results.{md,json,png}; exit status 0."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (~2 min)")
    parser.add_argument(
        "--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="scenarios to run"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other scenarios of the existing results.json, replace those run now "
        "(make bench-sync)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="where results.md, results.json and results.png go (default: benchmarks/)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: write the table and the chart again from a results.json",
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        document = json.loads(args.from_json.read_text())
        document["bar"] = report.bar(document)
        print(report.write(document, args.output_dir))
        return 0
    settings = Settings().quick() if args.quick else Settings()
    started = time.perf_counter()
    results: Result = {}
    only = set(args.only)
    needs_postgres = bool(
        only & {"postgresql", "slow_clients", "failing_commit", "real_server", "sync", "latency"}
    )
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="asgi-sqla-bench-"))
        pg = stack.enter_context(postgresql()) if needs_postgres else "not requested (--only)"
        sqlite_url = f"sqlite+aiosqlite:///{scratch}/bench.db"
        no_postgres = pg if isinstance(pg, str) else None
        if no_postgres:
            log(f"PostgreSQL scenarios will not run: {no_postgres}")
        pg_version = None if isinstance(pg, str) else _postgres_version(pg[1])
        if "no_db" in only:
            _timed("no_db", results, _run_async(partial(no_database, settings, sqlite_url)))
        if "sqlite" in only:
            _timed(
                "one_query_sqlite", results, _run_async(partial(one_query, settings, sqlite_url))
            )
        postgres_scenarios: list[tuple[str, str, Callable[[str, str], Callable[[], Result]]]] = [
            (
                "postgresql",
                "one_query_postgresql",
                lambda url, admin: _run_async(partial(one_query, settings, url)),
            ),
            (
                "slow_clients",
                "slow_clients",
                lambda url, admin: _run_async(partial(slow_clients, settings, url, admin)),
            ),
            (
                "failing_commit",
                "failing_commit",
                lambda url, admin: _run_async(partial(failing_commit, settings, url)),
            ),
            ("real_server", "real_server", lambda url, admin: partial(real_server, settings, url)),
            ("sync", "sync", lambda url, admin: partial(_sync_scenario, settings, url, admin)),
            ("latency", "latency", lambda url, admin: _run_async(partial(latency, settings, url))),
        ]
        for option, name, runner in postgres_scenarios:
            if option not in only:
                continue
            if isinstance(pg, str):
                results[name] = {"error": f"n/a: {pg}"}
                continue
            _timed(name, results, runner(*pg))
    meta = environment(pg_version)
    meta["settings"] = asdict(settings)
    if not args.merge:
        command = "make bench" + (" BENCH_ARGS=--quick" if args.quick else "")
    elif only == {"sync"}:
        command = "make bench-sync" + (" BENCH_ARGS=--quick" if args.quick else "")
    else:
        command = "python -m benchmarks --merge --only " + " ".join(args.only)
        command += " --quick" if args.quick else ""
    meta["command"] = command
    meta["seconds"] = round(time.perf_counter() - started, 1)
    document: Result = {"meta": meta, "scenarios": results}
    if args.merge:
        document = _merged(document, args.output_dir / "results.json")
    document["bar"] = report.bar(document)
    table = report.write(document, args.output_dir)
    print(table)
    log(f"wrote {args.output_dir}/results.md, results.json, results.png in {meta['seconds']} s")
    return 0
