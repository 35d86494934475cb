"""Load generators for the real-server scenario, each in a process of its own.

* ``wrk`` (Debian's ``wrk`` package) when it is on ``PATH``: one thread, fixed
  connections, ``--latency`` for the percentiles.
* Otherwise this module run as a program, ``python -m benchmarks.load URL …``: an
  asyncio HTTP/1.1 keep-alive client on raw sockets (far lighter than an HTTP
  library, so that it is not the bottleneck), bounded in time and in requests.
  It prints one JSON object.

Both send traffic only to the loopback address they are given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["LoadResult", "load_generator", "process_cpu_seconds", "run_load"]

#: Hard cap on the requests the Python generator sends per run, whatever the duration.
_MAX_REQUESTS = 2_000_000


@dataclass
class LoadResult:
    """One run: requests per second, latency percentiles (ms), failures.

    ``server_cpu_us`` is the CPU time the server process spent per request, when its
    pid was given (Linux): unlike throughput, it hardly moves when other processes
    compete for the machine.
    """

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    server_cpu_us: float | None = None


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` so far (``/proc``), None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    # Fields 14 and 15 of stat(5), utime and stime; [0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / ticks


def load_generator() -> str:
    """``"wrk"`` if wrk is installed, else ``"python"`` (the generator in this module)."""
    return "wrk" if shutil.which("wrk") else "python"


def run_load(
    url: str,
    *,
    method: str,
    connections: int,
    duration: float,
    generator: str,
    server_pid: int | None = None,
) -> LoadResult:
    """Load ``url`` with ``connections`` concurrent keep-alive connections for ``duration`` s.

    With ``server_pid``, also measure the server process's CPU time per request.
    """
    if urlsplit(url).hostname not in {"127.0.0.1", "localhost", "::1"}:
        raise ValueError(f"load is only ever sent to loopback, not {url}")
    cpu_before = process_cpu_seconds(server_pid) if server_pid else None
    result = _generate_load(url, method, connections, duration, generator)
    cpu_after = process_cpu_seconds(server_pid) if server_pid else None
    if cpu_before is not None and cpu_after is not None and result.requests:
        result.server_cpu_us = (cpu_after - cpu_before) / result.requests * 1e6
    return result


def _generate_load(
    url: str, method: str, connections: int, duration: float, generator: str
) -> LoadResult:
    if generator == "wrk":
        return _run_wrk(url, method=method, connections=connections, duration=duration)
    command = [
        sys.executable,
        "-m",
        "benchmarks.load",
        url,
        f"--method={method}",
        f"--connections={connections}",
        f"--duration={duration}",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 60, check=True
    )
    return LoadResult(**json.loads(done.stdout))


# -- wrk -------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if match is None:
        raise ValueError(f"unexpected wrk latency {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _run_wrk(url: str, *, method: str, connections: int, duration: float) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="asgi-sqla-wrk-") as directory:
        command = [
            "wrk",
            "--threads=1",
            f"--connections={connections}",
            f"--duration={max(1, round(duration))}s",
            "--timeout=10s",
            "--latency",
        ]
        if method != "GET":
            script = Path(directory) / "method.lua"
            script.write_text(f'wrk.method = "{method}"\nwrk.body = ""\n')
            command.append(f"--script={script}")
        output = subprocess.run(
            [*command, url], capture_output=True, text=True, timeout=duration + 60, check=True
        ).stdout
    return _parse_wrk(output)


def _parse_wrk(output: str) -> LoadResult:
    def find(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, output, re.MULTILINE)

    rps = find(r"^Requests/sec:\s+([\d.]+)")
    p50 = find(r"^\s+50%\s+(\S+)")
    p99 = find(r"^\s+99%\s+(\S+)")
    total = find(r"^\s+(\d+) requests in")
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"could not read wrk's output:\n{output}")
    errors = 0
    non_2xx = find(r"Non-2xx or 3xx responses:\s+(\d+)")
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = find(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return LoadResult(
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        requests=int(total.group(1)),
        errors=errors,
    )


# -- the Python generator ----------------------------------------------------------------


async def _connection(
    host: str, port: int, request: bytes, deadline: float, latencies: list[float]
) -> int:
    """Send ``request`` over one keep-alive connection until ``deadline``; return errors."""
    errors = 0
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline and len(latencies) < _MAX_REQUESTS:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not 200 <= status < 400:
                errors += 1
    finally:
        writer.close()
    return errors


async def _generate(url: str, method: str, connections: int, duration: float) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + duration
    errors = await asyncio.gather(
        *(_connection(host, port, request, deadline, latencies) for _ in range(connections))
    )
    elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3

    return LoadResult(
        rps=len(latencies) / elapsed,
        p50_ms=percentile(0.50),
        p99_ms=percentile(0.99),
        requests=len(latencies),
        errors=sum(errors),
    )


def main() -> None:
    """Entry point of ``python -m benchmarks.load``: print one :class:`LoadResult` as JSON."""
    parser = argparse.ArgumentParser(description="HTTP/1.1 keep-alive load on a loopback URL.")
    parser.add_argument("url")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    if urlsplit(args.url).hostname not in {"127.0.0.1", "localhost", "::1"}:
        parser.error("only loopback URLs")
    try:
        import uvloop  # the same event loop uvicorn uses, when installed
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    result = runner(_generate(args.url, args.method, args.connections, args.duration))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
