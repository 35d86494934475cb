"""Where the sync scenario's time goes: CPU per request in-process, with and without concurrency.

``.venv-bench/bin/python -m benchmarks.sync_profile`` (a minute or two; a throwaway
PostgreSQL as for ``make bench``).  A diagnostic, not part of ``make bench``: no
sockets, no uvicorn, no wrk, so the figures are the app's own, and this process's
CPU time (``process_time``: every thread) is far steadier than throughput on a shared
machine.  For each route (``GET /item``, ``POST /items``) and each concurrency (1, 16
clients), paired rounds (:func:`benchmarks.run.paired_rounds`) of:

* ``by_hand``: FastAPI's SQL tutorial (three hops, all in anyio's worker threads);
* ``asgi_sqla``: ``SyncDatabase`` (two hops: the endpoint in anyio's threads, the
  ending in the package's own pool);
* ``asgi_sqla, endings on anyio's threads``: the same app with the package's
  ``_threaded.in_worker`` replaced, for this run only, by anyio's
  ``to_thread.run_sync`` with a limiter of its own (64 tokens, as many as the
  package's pool has threads).  anyio reuses the thread that has just finished the
  endpoint, where the package's pool wakes one of its own: the difference between the
  two asgi_sqla rows is the cost of that hand-over between pools.

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

import anyio
import anyio.to_thread

from benchmarks.app import AppConfig, create_schema
from benchmarks.inprocess import InProcessServer
from benchmarks.run import paired_rounds, postgresql
from benchmarks.sync_app import build_sync_app

ROUTES = (("GET", "/item", 200), ("POST", "/items", 201))
ON_ANYIO = "asgi_sqla, endings on anyio's threads"
_SLUGS = {"by_hand": "by_hand", "asgi_sqla": "asgi_sqla", ON_ANYIO: "asgi_sqla_endings_on_anyio"}


class _Endings:
    """Switches where asgi_sqla runs its endings: its own pool, or anyio's threads."""

    def __init__(self) -> None:
        from asgi_sqla import _threaded

        self._threaded = _threaded
        self._own = _threaded.in_worker
        self._limiter = anyio.CapacityLimiter(64)
        self.on_anyio = False
        _threaded.in_worker = self._in_worker

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.on_anyio:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        return await self._own(fn, *args)

    def restore(self) -> None:
        self._threaded.in_worker = self._own


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
    endings = _Endings()
    config = AppConfig(url=url, pool_size=20)
    try:
        async with (
            InProcessServer(build_sync_app("by_hand", config)) as by_hand,
            InProcessServer(build_sync_app("asgi_sqla", config)) as mine,
        ):
            servers = {"by_hand": by_hand, "asgi_sqla": mine, ON_ANYIO: mine}
            requests = 480 if clients > 1 else 240

            async def measure(system: str) -> tuple[float, ...]:
                endings.on_anyio = system == ON_ANYIO
                return await _batch(servers[system], method, path, expect, requests, clients)

            for system in servers:  # warm-up: connections, prepared statements, threads
                await measure(system)
            summary = await paired_rounds(
                measure, list(servers), reference="by_hand", rounds=rounds, failures={}
            )
            if profile:
                await _profile(measure, list(servers), f"{profile}-{path.strip('/')}-{clients}")
    finally:
        endings.restore()
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
