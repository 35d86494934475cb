"""The sync scenario: FastAPI ``def`` endpoints on psycopg 3, by hand and with ``SyncDatabase``.

``python -m benchmarks --only sync`` (``make bench-sync``, a few minutes) runs, on the
apps of :mod:`benchmarks.sync_app`, PostgreSQL through ``postgresql+psycopg://``:

1. **Real server**: ``by_hand`` (FastAPI's SQL tutorial) and ``asgi_sqla`` each under
   uvicorn, loaded by ``wrk`` (or :mod:`benchmarks.load`) at fixed concurrency, in
   rounds whose order rotates; per route (read ``GET /item``, write ``POST /items``):
   requests per second, p50 and p99, the ratio asgi_sqla / by hand (median of the
   per-round ratios), and per request the server's CPU time and its worker-thread
   hops (anyio's ``to_thread.run_sync`` and asgi_sqla's ``in_worker``, counted in the
   server process; see :func:`benchmarks.sync_app.install_thread_counters`).  Both
   are divided by the requests the server itself counted as finished.
2. **Slow clients, pool of 2**: the async scenario's set-up (in-process, 40
   concurrent ``GET /stream``, each body chunk taking the client ``chunk_delay`` s),
   with the ``def`` endpoint of the tutorial's create (``INSERT``, commit, the row
   read back); the two hand-written dependencies (FastAPI's default ``yield``
   dependency, closed after the response; ``scope="function"``, closed before it)
   and asgi_sqla.  A probe asks PostgreSQL whether a transaction is still open while
   a body is being sent.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import statistics
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import httpx

from benchmarks.app import AppConfig, create_schema
from benchmarks.load import load_generator, process_cpu_seconds, run_load
from benchmarks.run import (
    BASELINE,
    ROUTES,
    Series,
    log,
    rotations,
    slow_clients_of,
    summarise_routes,
    uvicorn_apps,
    warm_up,
)
from benchmarks.sync_app import SYNC_SYSTEMS, build_sync_app

import _servers  # (tests/, on the path once benchmarks.run is imported: uvicorn on loopback)

if TYPE_CHECKING:
    from benchmarks.run import Settings

__all__ = ["sync_scenario"]

Result = dict[str, Any]

#: The systems under uvicorn: the brief's pair (the function-scope variant differs from
#: ``by_hand`` only once the response is sent, which the slow-client part measures).
SERVER_SYSTEMS = ("by_hand", "asgi_sqla")
#: The libraries whose versions the figures depend on.
VERSIONS = ("fastapi", "starlette", "anyio", "uvicorn", "sqlalchemy", "psycopg", "asgi-sqla")


def sync_scenario(settings: Settings, url: str, admin_url: str) -> Result:
    """Both parts on the PostgreSQL database at ``url`` (any driver: psycopg is used)."""
    asyncio.run(create_schema(url))
    result: Result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": _versions(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "reference": BASELINE,
    }
    log("sync: uvicorn, read and write routes ...")
    result["real_server"] = real_server(settings, url)
    log("sync: slow clients, pool of 2 ...")
    result["slow_clients"] = asyncio.run(slow_clients(settings, url, admin_url))
    return result


def _versions() -> dict[str, str]:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


# -- 1. a real server ----------------------------------------------------------------


@dataclass(frozen=True)
class _Counts:
    """What ``GET /_counters`` answered, and the server's CPU seconds at that moment."""

    requests: int
    framework_hops: int
    package_hops: int
    cpu_seconds: float | None


def _quiet_counts(server: _servers.Server, timeout: float = 10.0) -> _Counts:
    """The server's counters once no counted request is in flight.

    wrk stops by closing its connections; requests the server was serving then still
    run to their end (a ``def`` endpoint cannot be interrupted).  Polling another
    process, bounded by ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(server.url + "/_counters", timeout=5.0).json()
        if answer["in_flight"] == 0:
            return _Counts(
                requests=answer["requests"],
                framework_hops=answer["framework_hops"],
                package_hops=answer["package_hops"],
                cpu_seconds=process_cpu_seconds(server.process.pid),
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{answer['in_flight']} requests still in flight after {timeout} s")
        time.sleep(0.01)  # polling a process we do not control, bounded by the deadline


def real_server(settings: Settings, url: str) -> Result:
    """``by_hand`` and ``asgi_sqla`` under uvicorn, loaded in rotating rounds."""
    generator = load_generator()
    config = AppConfig(url=url, pool_size=settings.sync_pool, max_overflow=0)
    failures: dict[str, str] = {}
    series: Series = {route: {} for route in ROUTES}
    errors: dict[str, dict[str, int]] = {route: {} for route in ROUTES}

    def record(route: str, system: str, name: str, value: float) -> None:
        series[route].setdefault(name, {}).setdefault(system, []).append(value)

    with uvicorn_apps("benchmarks.sync_server:app", SERVER_SYSTEMS, config, failures) as servers:
        if BASELINE not in servers:
            raise RuntimeError(f"the baseline failed: {failures.get(BASELINE)}")
        systems = list(servers)
        warm_up(servers, settings.sync_connections, generator)
        for _round, order in rotations(systems, settings.sync_rounds):
            for route, (method, path) in ROUTES.items():
                for system in order:
                    server = servers[system]
                    before = _quiet_counts(server)
                    result = run_load(
                        server.url + path,
                        method=method,
                        connections=settings.sync_connections,
                        duration=settings.sync_duration,
                        generator=generator,
                    )
                    after = _quiet_counts(server)
                    served = after.requests - before.requests
                    record(route, system, "rps", result.rps)
                    record(route, system, "p50", result.p50_ms)
                    record(route, system, "p99", result.p99_ms)
                    record(route, system, "framework_hops", _per(after, before, served, 0))
                    record(route, system, "package_hops", _per(after, before, served, 1))
                    if after.cpu_seconds is not None and before.cpu_seconds is not None:
                        cpu = (after.cpu_seconds - before.cpu_seconds) / max(served, 1)
                        record(route, system, "cpu", cpu)
                    errors[route][system] = errors[route].get(system, 0) + result.errors
    by_route = summarise_routes(series, errors, cpu_scale=1e6)
    for route, summary in by_route.items():
        values = series[route]
        for system, entry in summary.items():
            framework = statistics.median(values["framework_hops"][system])
            package = statistics.median(values["package_hops"][system])
            entry["threads_per_request"] = {
                "framework": round(framework, 3),
                "package": round(package, 3),
                "total": round(framework + package, 3),
            }
    return {
        "unit": "requests/s",
        "reference": BASELINE,
        "generator": generator,
        "connections": settings.sync_connections,
        "duration_s": settings.sync_duration,
        "rounds": settings.sync_rounds,
        "pool_size": settings.sync_pool,
        "routes": {route: f"{m} {p}" for route, (m, p) in ROUTES.items()},
        "systems": by_route,
        "failures": failures,
    }


def _per(after: _Counts, before: _Counts, served: int, which: int) -> float:
    """Hops per request between two readings: ``which`` 0 the framework's, 1 the package's."""
    if which == 0:
        hops = after.framework_hops - before.framework_hops
    else:
        hops = after.package_hops - before.package_hops
    return hops / served if served else float("nan")


# -- 2. slow clients, small pool -------------------------------------------------------


async def slow_clients(settings: Settings, url: str, admin_url: str) -> Result:
    """40 concurrent streamed responses read slowly, through a pool of 2, ``def`` endpoints.

    The async scenario's measurement (:func:`benchmarks.run.slow_clients_of`), probe
    included, on the apps of :mod:`benchmarks.sync_app`.
    """
    return await slow_clients_of(
        SYNC_SYSTEMS, build_sync_app, settings, url, admin_url, rounds=settings.sync_slow_rounds
    )
