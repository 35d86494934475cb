"""Load shedding measured: ``admission_limit`` against the pool's own queue, under wrk.

``make bench-shedding`` (or ``python -m benchmarks.shedding``) serves
``benchmarks.shedding_app`` three times under uvicorn on a throwaway PostgreSQL
(asyncpg): a request holds a connection for a few ms, the pool has 5 connections and
no overflow; one server has no limit, one ``admission_limit=5``, one also
``admission_timeout=0.05``.  wrk loads ``GET /work`` with 10 times the pool size of
connections, in interleaved rounds (the order rotates); each figure is the median
over rounds:

* throughput (wrk's requests/s, all statuses) and admitted (2xx) responses per second;
* p50 and p99 latency of admitted requests, timed in the server from the moment the
  request reaches the app to its last byte (wrk cannot tell statuses apart in its
  latencies), and wrk's own p99 over every response;
* the share of 503 responses, and of anything else (other statuses, socket errors).

Traffic goes to the loopback address only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.load import run_load
from benchmarks.run import postgresql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import _servers  # noqa: E402  (tests/: run an app under uvicorn on a free loopback port)


def _stats(server: _servers.Server) -> dict[str, Any]:
    figures: dict[str, Any] = httpx.get(server.url + "/stats", timeout=10).json()
    return figures


def measure(
    url: str, *, pool: int, hold_ms: float, rounds: int, duration: float
) -> dict[str, dict[str, float]]:
    """Median figures per variant (see the module doc)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `make bench-wrk` installs it (as root).")
    connections = 10 * pool
    variants = list(_variants(pool))
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    with _servers_for(url, pool, hold_ms) as servers:
        for server in servers.values():  # warm up: pool filled, statement prepared
            run_load(
                server.url + "/work",
                method="GET",
                connections=connections,
                duration=1,
                generator="wrk",
            )
            _stats(server)
        for round_ in range(rounds):
            shift = round_ % len(variants)  # the order rotates each round
            order = variants[shift:] + variants[:shift]
            for name in order:
                server = servers[name]
                result = run_load(
                    server.url + "/work",
                    method="GET",
                    connections=connections,
                    duration=duration,
                    generator="wrk",
                )
                figures = _stats(server)
                total = max(1, figures["responses"])
                socket_errors = max(0, result.errors - (figures["responses"] - figures["admitted"]))
                row = {
                    "rps": result.rps,
                    "admitted_rps": result.rps * figures["admitted"] / total,
                    "p50_ms": figures["p50_ms"] or 0.0,
                    "p99_ms": figures["p99_ms"] or 0.0,
                    "wrk_p99_ms": result.p99_ms,
                    "shed_share": figures["shed"] / total,
                    "other_share": (figures["other"] + socket_errors) / total,
                }
                print(f"round {round_ + 1} {name}: " + json.dumps(row), file=sys.stderr)
                for key, value in row.items():
                    samples[name].setdefault(key, []).append(value)
    return {
        name: {key: statistics.median(values) for key, values in figures_.items()}
        for name, figures_ in samples.items()
    }


@contextlib.contextmanager
def _servers_for(url: str, pool: int, hold_ms: float) -> Iterator[dict[str, _servers.Server]]:
    """Every variant under uvicorn at once (each idle while another is loaded)."""
    env = {"SHEDDING_URL": url, "SHEDDING_POOL": str(pool), "SHEDDING_HOLD_MS": str(hold_ms)}
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(
                _servers.serve(
                    "benchmarks.shedding_app:app",
                    "uvicorn",
                    env={**env, **variant},
                    ready_path="/ping",
                )
            )
            for name, variant in _variants(pool).items()
        }


def _variants(pool: int) -> dict[str, dict[str, str]]:
    """The servers: name -> their environment (no limit, or a limit of the pool's size,
    refusing at once or after a short wait)."""
    return {
        "no limit": {"SHEDDING_LIMIT": ""},
        f"admission_limit={pool}": {"SHEDDING_LIMIT": str(pool)},
        f"admission_limit={pool}, admission_timeout=0.05": {
            "SHEDDING_LIMIT": str(pool),
            "SHEDDING_TIMEOUT": "0.05",
        },
    }


def table(results: dict[str, dict[str, float]], *, pool: int, hold_ms: float) -> str:
    """The results as a Markdown table."""
    lines = [
        f"| pool {pool}, {10 * pool} connections, {hold_ms:g} ms per request | "
        "requests/s | admitted/s | p50 admitted | p99 admitted | p99 (wrk, all) | 503 | "
        "other errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['rps']:,.0f} | {r['admitted_rps']:,.0f} | {r['p50_ms']:.1f} ms | "
            f"{r['p99_ms']:.1f} ms | {r['wrk_p99_ms']:.1f} ms | {r['shed_share']:.1%} | "
            f"{r['other_share']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per run")
    parser.add_argument("--pool", type=int, default=5)
    parser.add_argument("--hold-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    with postgresql() as database:
        if isinstance(database, str):
            raise SystemExit(database)
        url, _admin = database
        results = measure(
            url, pool=args.pool, hold_ms=args.hold_ms, rounds=args.rounds, duration=args.duration
        )
    print(table(results, pool=args.pool, hold_ms=args.hold_ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
