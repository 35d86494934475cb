"""A TCP relay that delays each direction and counts round trips: the latency scenario's network.

``with DelayingProxy("127.0.0.1", 5432, delay=0.0005) as proxy:`` listens on
``127.0.0.1:proxy.port`` and relays every connection to the target, holding each chunk
``delay`` seconds in each direction (so a request and its answer cost at least
``2 * delay``), the way a database one network hop away would.  ``proxy.round_trips``
is the number of round trips since the start or the last ``proxy.reset()``;
``proxy.connection_round_trips()`` the same per proxied connection.

**What counts as a round trip**: each time the client sends after having received from
the server, plus its first send on a connection.  A burst of client messages sent
before any answer reaches it (a pipelined Parse/Bind/Execute/Sync, however the
kernel splits it) is one round trip; a client that writes again before reading the
answer (pipelining) does not start a new one.  Everything the client sends counts,
so a connection's start-up (SSL request, start-up message, authentication) and its
``Terminate`` at close count too: measure on a warmed pool, between ``reset()`` and the
read of ``round_trips``.

**Precision**: the relay runs in its own process (the script below, over a line
protocol on its stdin/stdout), so that the process measured never shares a GIL with
it, and uses one thread per direction and connection with ``time.sleep`` rather than
asyncio: asyncio's selector timeouts are rounded up to whole milliseconds
(``BaseSelectorEventLoop._run_once`` passes the timeout to ``selectors.EpollSelector
.select``, which does ``math.ceil(timeout * 1e3) * 1e-3``), so a 0.5 ms asyncio sleep
lasts 1 ms.  The threads lower their timer slack to 1 ns (Linux ``prctl
PR_SET_TIMERSLACK``; the default 50 µs is added to every sleep), sleep until shortly
before a chunk's deadline and yield until it (``_SPIN``).  The hold actually given each
chunk, from its read to its write, is measured: ``proxy.stats()["hold"]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["DelayingProxy"]

#: The delay added to each direction by default: 0.5 ms each way, 1 ms a round trip.
DEFAULT_DELAY = 0.0005
#: The last part of a hold spent yielding rather than sleeping: a sleep wakes this much
#: late (the scheduler's wake-up latency, measured 20-40 µs here with a 1 ns slack).
_SPIN = 60e-6
_PR_SET_TIMERSLACK = 29  # linux/prctl.h
_CHUNK = 65536
_HOLDS_KEPT = 100_000  # the most recent holds kept per direction, for their quantiles


def _lower_timer_slack() -> None:
    """Let this thread's sleeps end on time (Linux only; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


def _wait_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > _SPIN:
        time.sleep(remaining - _SPIN)
    while time.perf_counter() < deadline:
        time.sleep(0)  # releases the GIL: the other directions' threads go on


@dataclass
class _Connection:
    """One proxied connection: its sockets and its round-trip count."""

    client: socket.socket
    server: socket.socket
    round_trips: int = 0
    # True once server data has been written to the client since its last send (and
    # before its first): the client's next send starts a new round trip.
    answered: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client_sent(self) -> bool:
        """Record a read from the client; True when it starts a round trip."""
        with self.lock:
            starts = self.answered
            if starts:
                self.round_trips += 1
                self.answered = False
            return starts

    def server_answering(self) -> None:
        with self.lock:
            self.answered = True

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class _Relay:
    """The relay itself: an accepting thread, and per connection two readers and two writers."""

    def __init__(self, target: tuple[str, int], delay: float, listen_host: str) -> None:
        self.target = target
        self.delay = delay
        self.listener = socket.create_server((listen_host, 0))
        self.port: int = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.connections: list[_Connection] = []
        self.reset_counts: list[int] = []  # each connection's count at the last reset
        self.holds: dict[str, collections.deque[float]] = {
            "to_server": collections.deque(maxlen=_HOLDS_KEPT),
            "to_client": collections.deque(maxlen=_HOLDS_KEPT),
        }
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(client, server)
            with self.lock:
                self.connections.append(connection)
                self.reset_counts.append(0)
            for source, sink, direction in (
                (client, server, "to_server"),
                (server, client, "to_client"),
            ):
                chunks: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
                threading.Thread(
                    target=self._read, args=(connection, source, chunks, direction), daemon=True
                ).start()
                threading.Thread(
                    target=self._write, args=(connection, sink, chunks, direction), daemon=True
                ).start()

    def _read(
        self,
        connection: _Connection,
        source: socket.socket,
        chunks: queue.SimpleQueue[tuple[float, bytes] | None],
        direction: str,
    ) -> None:
        while True:
            try:
                data = source.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:
                chunks.put(None)
                return
            received = time.perf_counter()
            if direction == "to_server":
                connection.client_sent()
            chunks.put((received, data))

    def _write(
        self,
        connection: _Connection,
        sink: socket.socket,
        chunks: queue.SimpleQueue[tuple[float, bytes] | None],
        direction: str,
    ) -> None:
        _lower_timer_slack()
        holds = self.holds[direction]
        while (chunk := chunks.get()) is not None:
            received, data = chunk
            _wait_until(received + self.delay)
            if direction == "to_client":
                # Before the write: the client may answer before this thread runs again.
                connection.server_answering()
            holds.append(time.perf_counter() - received)
            try:
                sink.sendall(data)
            except OSError:
                break
        # The source closed (or the sink failed): pass the end on, then let both go.
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        if direction == "to_client":
            connection.close()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            counts = [
                c.round_trips - r for c, r in zip(self.connections, self.reset_counts, strict=True)
            ]
        return {
            "round_trips": sum(counts),
            "connections": counts,
            "hold": {d: _quantiles(list(h)) for d, h in self.holds.items()},
        }

    def reset(self) -> None:
        with self.lock:
            self.reset_counts = [c.round_trips for c in self.connections]
        for holds in self.holds.values():
            holds.clear()

    def drop(self) -> None:
        """Cut every proxied connection, as a network failure or a server restart would."""
        with self.lock:
            connections = list(self.connections)
        for connection in connections:
            connection.close()

    def close(self) -> None:
        self.listener.close()
        self.drop()


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    values.sort()
    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "median": values[len(values) // 2],
        "p99": values[min(len(values) - 1, int(len(values) * 0.99))],
        "max": values[-1],
    }


class DelayingProxy:
    """A delaying, round-trip-counting TCP relay to ``host:port``, run in a child process.

    A context manager: entering starts the relay (``port`` is then where to connect),
    leaving stops it and cuts the connections still open.  ``delay`` is added to each
    direction (seconds).
    """

    def __init__(
        self,
        host: str,
        port: int,
        delay: float = DEFAULT_DELAY,
        *,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.target = (host, port)
        self.delay = delay
        self.listen_host = listen_host
        self.host = listen_host
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> DelayingProxy:
        self._process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                self.target[0],
                str(self.target[1]),
                f"--delay={self.delay!r}",
                f"--listen-host={self.listen_host}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self._ask("port"))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        with contextlib.suppress(OSError):
            process.stdin.close()  # the child's end of input: it stops
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def _ask(self, command: str) -> str:
        process = self._process
        if process is None or process.stdin is None or process.stdout is None:
            raise RuntimeError("The proxy is not running: use it inside `with DelayingProxy(...)`.")
        process.stdin.write(command + "\n")
        process.stdin.flush()
        answer = process.stdout.readline()
        if not answer:
            raise RuntimeError(f"The proxy process ended (exit code {process.wait()}).")
        return answer.strip()

    def stats(self) -> dict[str, Any]:
        """Round trips (total and per connection) and the holds added (seconds, per direction)."""
        stats: dict[str, Any] = json.loads(self._ask("stats"))
        return stats

    @property
    def round_trips(self) -> int:
        """Round trips through the proxy since it started or since the last :meth:`reset`."""
        return int(self.stats()["round_trips"])

    def connection_round_trips(self) -> list[int]:
        """Round trips per proxied connection (in the order they were accepted), since the reset."""
        return [int(n) for n in self.stats()["connections"]]

    def reset(self) -> None:
        """Start counting round trips (and measuring holds) from zero."""
        self._ask("reset")

    def drop_connections(self) -> None:
        """Cut every proxied connection at once (both ends see it closed)."""
        self._ask("drop")


def _serve(commands: IO[str], answers: IO[str], relay: _Relay) -> None:
    """The child's loop: a command a line on ``commands``, an answer a line on ``answers``."""
    for line in commands:
        command = line.strip()
        if command == "port":
            answer = str(relay.port)
        elif command == "stats":
            answer = json.dumps(relay.stats())
        elif command == "reset":
            relay.reset()
            answer = "ok"
        elif command == "drop":
            relay.drop()
            answer = "ok"
        else:
            answer = f"unknown command: {command!r}"
        answers.write(answer + "\n")
        answers.flush()


@contextlib.contextmanager
def _relay(target: tuple[str, int], delay: float, listen_host: str) -> Iterator[_Relay]:
    relay = _Relay(target, delay, listen_host)
    try:
        yield relay
    finally:
        relay.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--delay", type=float, default=DEFAULT_DELAY, help="seconds, each way")
    parser.add_argument("--listen-host", default="127.0.0.1")
    args = parser.parse_args(argv)
    with _relay((args.host, args.port), args.delay, args.listen_host) as relay:
        _serve(sys.stdin, sys.stdout, relay)


if __name__ == "__main__":
    main()
