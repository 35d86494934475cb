"""Run an ASGI app in a real server process on a free loopback port, for integration tests.

with serve("examples.fastapi_app:app", "uvicorn", env={"DATABASE_URL": url}) as server:
    httpx.get(server.url + "/notes")
assert server.returncode == 0 and "Application shutdown complete" in server.log
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

#: Servers the integration tests run under, and whether each is installed.
SERVERS = ("uvicorn", "hypercorn", "granian")


def server_available(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(target: str, server: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [
            *("-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)),
            *("--lifespan", "on", "--no-access-log"),
        ]
    if server == "hypercorn":
        return [*("-m", "hypercorn", target, "--bind", f"127.0.0.1:{port}")]
    if server == "gunicorn":
        # The worker class of the uvicorn-worker package: uvicorn.workers.UvicornWorker is
        # deprecated: importing it emits a DeprecationWarning (uvicorn 0.54).
        return [
            *("-m", "gunicorn", target, "--bind", f"127.0.0.1:{port}"),
            *("--worker-class", "uvicorn_worker.UvicornWorker"),
        ]
    if server == "granian":
        return [
            *("-m", "granian", "--interface", "asgi", "--host", "127.0.0.1"),
            *("--port", str(port), "--workers", "1", target),
        ]
    raise ValueError(f"unknown server {server!r}")


@dataclass
class Server:
    """A running server: its base URL; after the ``with`` block, its exit code and log."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    returncode: int | None = None

    @property
    def log(self) -> str:
        """Everything the server printed so far (stdout and stderr together)."""
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve(
    target: str,
    server: str = "uvicorn",
    *,
    env: dict[str, str] | None = None,
    ready_path: str = "/",
    startup_timeout: float = 20.0,
    stop_signal: int = signal.SIGINT,
    args: Sequence[str] = (),
) -> Iterator[Server]:
    """Start ``target`` (``module:attribute``) under ``server``; stop it gracefully at exit.

    ``args`` are appended to the server's command line (``("--workers", "2")``).

    Readiness is polled with a deadline: the block starts once ``ready_path`` answers
    any HTTP status.  At exit the server gets ``stop_signal`` (SIGINT: a graceful
    shutdown, lifespan included) and is killed if it has not exited within 20 s.
    """
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in finally
        prefix=f"{server}-", suffix=".log", delete=False
    )
    process_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, *_command(target, server, port), *args],
        cwd=ROOT,
        env=process_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    running = Server(f"http://127.0.0.1:{port}", process, Path(log_file.name))
    try:
        _wait_ready(running, ready_path, startup_timeout)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(stop_signal)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        running.returncode = process.returncode
        log_file.close()


def _wait_ready(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the server exited with {server.process.returncode} before it was ready:\n"
                f"{server.log}"
            )
        try:
            httpx.get(server.url + path, timeout=1.0)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server was not ready within {timeout} s:\n{server.log}"
                ) from None
            time.sleep(0.05)  # polling a process we don't control; bounded by the deadline
        else:
            return
