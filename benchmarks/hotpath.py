"""The hot path in instructions: what a request costs, counted rather than timed.

``make bench-hotpath`` (``python -m benchmarks.hotpath``).  On a shared machine a
microsecond figure moves by more than the differences it is meant to show (a few µs
in 20); the number of instructions a request executes does not.  Each case runs in a
process of its own under Valgrind's cachegrind (``--cache-sim=no``: it only counts
instructions, ``I refs``, in every thread of the process), twice: ``W + N`` and
``W + 2N`` requests after the same start-up and warm-up, so that the difference, over
``N``, is the cost of one request alone.  ``PYTHONHASHSEED`` is fixed, so that both
runs hash (and lay out dicts and sets) alike.  Counts include the interpreter, the
drivers' C code and, with aiosqlite, its worker thread; not the PostgreSQL server,
another process.

The cases, on the Starlette app of :mod:`benchmarks.app`, called in-process by
:class:`benchmarks.inprocess.InProcessServer` one request at a time:

==========================  ==========================================================
``bare``                    ``GET /ping`` on the hand-written app (no middleware)
``send-wrapper``            the same app under a middleware that only wraps ``send``
``asgi_sqla``               ``GET /ping`` with ``SQLAlchemyMiddleware``
``by_hand sqlite``          ``GET /item`` (one ``SELECT``), hand-written, aiosqlite
``asgi_sqla sqlite``        the same with ``SQLAlchemyMiddleware``
``by_hand postgresql``      ``GET /item``, hand-written, asyncpg
``asgi_sqla postgresql``    the same with ``SQLAlchemyMiddleware``
==========================  ==========================================================

Then, without Valgrind, the same cases timed (µs per request, wall and CPU), each
batch beside a batch of its reference, medians of the paired ratios: the figure the
instruction counts explain.  ``--no-time`` leaves that out, ``--only`` picks cases.

    python -m benchmarks.hotpath [--requests 400] [--repeat 3] [--only bare asgi_sqla]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass

from benchmarks.app import AppConfig, build_app, create_schema
from benchmarks.inprocess import ASGIApp, InProcessServer, Message, Receive, Scope, Send

#: Requests before counting starts: the pool filled, statements prepared, caches warm.
WARM_UP = 200


@dataclass(frozen=True)
class Case:
    """One measured request: which app, which route, on which database."""

    name: str
    system: str  # benchmarks.app's system, or "send-wrapper"
    path: str
    database: str  # "sqlite" or "postgresql"
    reference: str  # the case it is compared with ("" for the references themselves)


CASES = (
    Case("bare", "by_hand", "/ping", "sqlite", ""),
    Case("send-wrapper", "send-wrapper", "/ping", "sqlite", "bare"),
    Case("asgi_sqla", "asgi_sqla", "/ping", "sqlite", "bare"),
    Case("by_hand sqlite", "by_hand", "/item", "sqlite", ""),
    Case("asgi_sqla sqlite", "asgi_sqla", "/item", "sqlite", "by_hand sqlite"),
    Case("by_hand postgresql", "by_hand", "/item", "postgresql", ""),
    Case("asgi_sqla postgresql", "asgi_sqla", "/item", "postgresql", "by_hand postgresql"),
)
BY_NAME = {case.name: case for case in CASES}


def send_wrapper(app: ASGIApp) -> ASGIApp:
    """The cheapest middleware that sees the response: ``send`` wrapped in a closure."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped(message: Message) -> None:
            await send(message)

        await app(scope, receive, wrapped)

    return middleware


def make_app(case: Case, url: str) -> ASGIApp:
    if case.system == "send-wrapper":
        return send_wrapper(build_app("by_hand", AppConfig(url=url)))
    return build_app(case.system, AppConfig(url=url))


# -- the child: one process, run under Valgrind -------------------------------------------


async def serve(case: Case, url: str, requests: int) -> None:
    """Start the app, warm it up, then serve ``requests`` requests one at a time."""
    async with InProcessServer(make_app(case, url)) as server:
        await server.time_requests("GET", case.path, WARM_UP, 200)
        if requests:
            await server.time_requests("GET", case.path, requests, 200)


# -- the parent -----------------------------------------------------------------------------

_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def count_instructions(case: Case, url: str, requests: int) -> int:
    """Instructions executed by a child process serving ``WARM_UP + requests`` requests."""
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.hotpath",
        "--child",
        case.name,
        "--url",
        url,
        "--requests",
        str(requests),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = _IREFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{case.name}: the child failed:\n{done.stderr[-3000:]}")
    return int(found.group(1).replace(",", ""))


def instructions_per_request(case: Case, url: str, requests: int) -> float:
    """``(I(W + 2N) - I(W + N)) / N``: start-up and warm-up cancel out."""
    once = count_instructions(case, url, requests)
    twice = count_instructions(case, url, 2 * requests)
    return (twice - once) / requests


async def timed(cases: list[Case], urls: dict[str, str], rounds: int) -> dict[str, list[float]]:
    """Wall and CPU µs per request of each case, each batch paired with its reference's.

    Returns, per case, ``[wall median, cpu median, wall ratio, cpu ratio]`` (ratios are
    medians of the pairs' ratios; 1.0 for references).
    """
    names = {c.name for c in cases} | {c.reference for c in cases if c.reference}
    needed = [BY_NAME[n] for n in BY_NAME if n in names]
    runs: dict[str, list[tuple[float, float]]] = {c.name: [] for c in needed}
    ratios: dict[str, list[tuple[float, float]]] = {c.name: [] for c in needed}
    async with AsyncExitStack() as stack:
        servers = {
            c.name: await stack.enter_async_context(InProcessServer(make_app(c, urls[c.database])))
            for c in needed
        }
        batch: dict[str, int] = {}
        for case in needed:
            server = servers[case.name]
            await server.time_requests("GET", case.path, WARM_UP, 200)
            seconds = (await server.time_requests("GET", case.path, 50, 200))[0]
            batch[case.name] = max(20, round(0.05 / seconds))
        for r in range(rounds):
            for case in needed:
                if not case.reference:
                    continue
                order = [case, BY_NAME[case.reference]]
                if r % 2:
                    order.reverse()
                pair = {}
                for c in order:
                    pair[c.name] = await servers[c.name].time_requests(
                        "GET", c.path, batch[case.name], 200
                    )
                    runs[c.name].append(pair[c.name])
                own, ref = pair[case.name], pair[case.reference]
                ratios[case.name].append((own[0] / ref[0], own[1] / ref[1]))
    result: dict[str, list[float]] = {}
    for case in needed:
        wall = statistics.median(w for w, _ in runs[case.name]) * 1e6
        cpu = statistics.median(c for _, c in runs[case.name]) * 1e6
        if case.reference:
            wall_ratio = statistics.median(w for w, _ in ratios[case.name])
            cpu_ratio = statistics.median(c for _, c in ratios[case.name])
        else:
            wall_ratio = cpu_ratio = 1.0
        result[case.name] = [wall, cpu, wall_ratio, cpu_ratio]
    return result


@contextmanager
def databases(cases: list[Case]) -> Iterator[dict[str, str]]:
    """The URL of each database the cases need: a file of SQLite, a throwaway PostgreSQL."""
    from benchmarks.run import postgresql

    with ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="asgi-sqla-hotpath-"))
        urls = {"sqlite": f"sqlite+aiosqlite:///{scratch}/bench.db"}
        if any(c.database == "postgresql" for c in cases):
            pg = stack.enter_context(postgresql())
            if isinstance(pg, str):
                raise SystemExit(pg)
            urls["postgresql"] = pg[0]
        for url in urls.values():
            asyncio.run(create_schema(url))
        yield urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hotpath", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), default=list(BY_NAME))
    parser.add_argument("--requests", type=int, default=400, help="N (see the module doc)")
    parser.add_argument("--repeat", type=int, default=3, help="counts per case (median)")
    parser.add_argument("--rounds", type=int, default=21, help="timed pairs per case")
    parser.add_argument("--no-time", action="store_true", help="count instructions only")
    parser.add_argument("--no-count", action="store_true", help="time only (no Valgrind)")
    parser.add_argument("--child", choices=list(BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(serve(BY_NAME[args.child], args.url, args.requests))
        return 0
    if shutil.which("valgrind") is None and not args.no_count:
        raise SystemExit("valgrind is needed: apt-get install valgrind")
    cases = [BY_NAME[name] for name in args.only]
    with databases(cases) as urls:
        counts: dict[str, float] = {}
        for case in [] if args.no_count else cases:
            samples = [
                instructions_per_request(case, urls[case.database], args.requests)
                for _ in range(args.repeat)
            ]
            counts[case.name] = statistics.median(samples)
            spread = (max(samples) - min(samples)) / 2
            print(
                f"{case.name:<22} {counts[case.name]:>10,.0f} instructions/request "
                f"(±{spread:,.0f} over {args.repeat})",
                flush=True,
            )
        times = {} if args.no_time else asyncio.run(timed(cases, urls, args.rounds))
    print()
    print("| case | instructions/request | vs. reference | µs/request (wall · CPU) | ratio |")
    print("|---|---|---|---|---|")
    for case in cases:
        count = counts.get(case.name)
        ref = counts.get(case.reference)
        versus = "reference" if not case.reference else "—"
        if count is not None and ref is not None:
            versus = f"{count - ref:+,.0f} ({count / ref:.3f}x)"
        t = times.get(case.name)
        timing = f"{t[0]:.1f} · {t[1]:.1f}" if t else "—"
        ratio = f"{t[2]:.3f}x · {t[3]:.3f}x" if t and case.reference else "—"
        counted = "—" if count is None else f"{count:,.0f}"
        print(f"| {case.name} | {counted} | {versus} | {timing} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
