"""Where the sync scenario's time goes: CPU per request in-process, with and without concurrency.

``.venv-bench/bin/python -m benchmarks.sync_profile`` (a minute or two; a throwaway
PostgreSQL as for ``make bench``).  A diagnostic, not part of ``make bench``: no
sockets, no uvicorn, no wrk, so the figures are the app's own, and this process's
CPU time (``process_time``: every thread) is far steadier than throughput on a shared
machine.  For each route (``GET /item``, ``POST /items``) and each concurrency (1, 16
clients), paired rounds (:func:`benchmarks.run.paired_rounds`) of:

* ``by_hand``: FastAPI's SQL tutorial (three hops, all in anyio's worker threads);
* ``asgi_sqla``: ``SyncDatabase`` (two hops in anyio's worker threads: the endpoint,
  and the ending under the package's own limiter).

(This diagnostic found that an ending handed to a thread pool of the package's own
cost 30-65 µs of CPU more per request at 16 clients than one run in anyio's threads,
which reuse the thread that has just finished the endpoint: the package now runs its
endings there.)

``--cprofile FILE`` also writes a cProfile of the event loop's thread for one batch
of each system (``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from benchmarks.app import AppConfig, create_schema
from benchmarks.inprocess import InProcessServer
from benchmarks.run import paired_rounds, postgresql
from benchmarks.sync_app import build_sync_app

ROUTES = (("GET", "/item", 200), ("POST", "/items", 201))
_SLUGS = {"by_hand": "by_hand", "asgi_sqla": "asgi_sqla"}


async def _batch(
    server: InProcessServer, method: str, path: str, expect: int, requests: int, clients: int
) -> tuple[float, float]:
    """``requests`` requests from ``clients`` concurrent clients: wall and CPU s/request."""

    async def client() -> None:
        for _ in range(requests // clients):
            outcome = await server.request(method, path)
            if outcome.status != expect:
                raise RuntimeError(f"{method} {path} answered {outcome.status} {outcome.error}")

    cpu = time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    done = requests // clients * clients
    return (time.perf_counter() - wall) / done, (time.process_time() - cpu) / done


async def _route(
    url: str, route: tuple[str, str, int], clients: int, rounds: int, profile: str | None
) -> None:
    method, path, expect = route
    config = AppConfig(url=url, pool_size=20)
    async with (
        InProcessServer(build_sync_app("by_hand", config)) as by_hand,
        InProcessServer(build_sync_app("asgi_sqla", config)) as mine,
    ):
        servers = {"by_hand": by_hand, "asgi_sqla": mine}
        requests = 480 if clients > 1 else 240

        async def measure(system: str) -> tuple[float, ...]:
            return await _batch(servers[system], method, path, expect, requests, clients)

        for system in servers:  # warm-up: connections, prepared statements, threads
            await measure(system)
        summary = await paired_rounds(
            measure, list(servers), reference="by_hand", rounds=rounds, failures={}
        )
        if profile:
            await _profile(measure, list(servers), f"{profile}-{path.strip('/')}-{clients}")
    for system, entry in summary.items():
        ratios = (
            f"wall {entry['ratio']:.3f}x, CPU {entry['cpu_ratio']:.3f}x "
            f"({entry['cpu_added']:+.0f} µs)"
            if "ratio" in entry
            else "reference"
        )
        print(
            f"{method:4} {path:7} {clients:2} clients  {system:40} "
            f"wall {entry['median']:6.0f} µs  CPU {entry['cpu_median']:6.0f} µs  {ratios}",
            flush=True,
        )


async def _profile(
    measure: Callable[[str], Awaitable[tuple[float, ...]]], systems: list[str], path: str
) -> None:
    for system in systems:
        profiler = cProfile.Profile()
        profiler.enable()
        await measure(system)
        profiler.disable()
        target = f"{path}-{_SLUGS[system]}.prof"
        profiler.dump_stats(target)
        print(f"wrote {target}", flush=True)


def main() -> None:
    """Entry point of ``python -m benchmarks.sync_profile``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cprofile", metavar="FILE", help="prefix of cProfile dumps")
    args = parser.parse_args()
    try:
        import uvloop  # the event loop uvicorn uses in the real-server part
    except ImportError:
        run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    else:
        run = uvloop.run
    with postgresql() as pg:
        if isinstance(pg, str):
            raise SystemExit(pg)
        url = pg[0]
        asyncio.run(create_schema(url))
        for route in ROUTES:
            for clients in (1, 16):
                run(_route(url, route, clients, args.rounds, args.cprofile))


if __name__ == "__main__":
    main()
