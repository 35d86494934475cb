"""Fault-injection soak: nothing lost, nothing leaked, nothing lied about.

A real PostgreSQL cluster of the test's own (restarted mid-run), and
``tests/apps/soak_app.py`` under uvicorn on loopback with a pool smaller than the
number of clients; then the same with ``tests/apps/soak_sync_app.py``, its twin with
``def`` endpoints on a ``SyncDatabase`` (the ``sync`` variant).  Many concurrent
clients each write one uniquely keyed row while faults are injected at random:
commits that fail (a deferred foreign key, serializable conflicts), backends killed
mid-statement and mid-commit, clients that disconnect before, during and after the
response and mid-body, an app that raises before and after its response starts,
handler timeouts and a deadline that expires during the COMMIT, pool exhaustion, and a
database restart.

Afterwards what every client was told is compared with the committed rows:

* a *lie* is a non-2xx answer whose row is committed;
* a *lost* commit is a 2xx answer whose row is not;
* a *leak* is a connection still checked out of the server's pool once it is idle.

A client that hung up before it got a status line was told nothing, so its row may be
there or not.  The server's log must show no "non-checked-in connection" or "never
awaited" warning (the server runs with these warnings turned into errors), no
traceback of an unexpected kind, and never the database password.

Size: ``SOAK_REQUESTS`` (default 1000, and 300 for the sync variant, which ``make
test`` runs too) and ``SOAK_CONCURRENCY`` (default 50, and 30); ``make soak`` runs long
ones.  ``SOAK_SEED`` replays a run's mix of faults (the timing varies); ``SOAK_DRIVER``
is ``asyncpg`` (default) or ``psycopg``, ``SOAK_SYNC_DRIVER`` ``psycopg`` (default) or
``psycopg2``; ``SOAK_FAULTS=kind,...`` keeps only those kinds of fault; ``SOAK_REPORT``
names a file to write the figures to as well (and the server's log next to it, with
``.server.log`` appended); the sync variant's file has ``.sync`` appended.

The failover drill at the end of this file runs the same apps on a primary and its
streaming standby, stops the primary half-way and promotes the standby, and audits
the same way (see ``test_a_failover_mid_run_is_answered_503_and_loses_no_commit``).
"""

from __future__ import annotations

import collections
import os
import random
import re
import secrets
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from anyio.abc import SocketAttribute, SocketStream
from sqlalchemy import URL

import _postgres
from _helpers import DedicatedPostgres, eventually, postgres_unavailable, release
from _servers import Server, serve

SEED = int(os.environ.get("SOAK_SEED") or secrets.randbelow(1_000_000))
REPORT = os.environ.get("SOAK_REPORT")


@dataclass(frozen=True)
class Variant:
    """One app the soak runs, with its driver and its size."""

    name: str
    app: str
    driver: str
    requests: int
    concurrency: int

    @property
    def restarts(self) -> int:
        """One restart in a bounded soak, one more per 5000 requests in longer ones."""
        return 1 + self.requests // 5000

    @property
    def report(self) -> str | None:
        """The file for the figures (``SOAK_REPORT``, ``.sync`` appended for sync)."""
        if REPORT is None:
            return None
        return REPORT if self.name == "async" else f"{REPORT}.{self.name}"


def _size(variable: str, default: int) -> int:
    return int(os.environ.get(variable) or default)


VARIANTS = [
    Variant(
        "async",
        "tests.apps.soak_app:app",
        os.environ.get("SOAK_DRIVER", "asyncpg"),
        _size("SOAK_REQUESTS", 1000),
        _size("SOAK_CONCURRENCY", 50),
    ),
    # Shorter when bounded: `make test` runs both.  As many clients as the async soak:
    # with 30, a run could end without ever exhausting the pool (no 503 to check).
    Variant(
        "sync",
        "tests.apps.soak_sync_app:app",
        os.environ.get("SOAK_SYNC_DRIVER", "psycopg"),
        _size("SOAK_REQUESTS", 500),
        _size("SOAK_CONCURRENCY", 50),
    ),
]

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]

#: ``application_name`` prefixes the app gives backends for the killer (see soak_shared.py).
KILL_QUERY_TAG = "kill-query:"
KILL_COMMIT_TAG = "kill-commit:"

#: What the server runs with: these warnings become errors, so they cannot pass unseen.
#: SQLAlchemy's ``SAWarning`` ("non-checked-in connection") is a ``RuntimeWarning``, as
#: is "coroutine ... was never awaited".  (A dotted category such as
#: ``sqlalchemy.exc.SAWarning`` cannot be used here: Python reads ``PYTHONWARNINGS``
#: before it can import packages, and ignores the option.)
WARNINGS_AS_ERRORS = "error::RuntimeWarning"

#: Log lines that must never appear in the server's log.
FORBIDDEN_IN_LOG = (
    "Invalid -W option",
    "non-checked-in",
    "never awaited",
    "Exception ignored",
    "SAWarning",
    "RuntimeWarning",
    "Task was destroyed",
    "Task exception was never retrieved",
    "Unexpected ASGI message",
    "Expected ASGI message",
    "ConcurrentSessionUseError",
    "SessionEndedError",
)

#: The exceptions a traceback in the server's log may end with, by fault: the app's
#: own errors, failed commits, killed backends, and the database going down and up.
EXPECTED_EXCEPTIONS = re.compile(
    r"""^(
        tests\.apps\.soak_(sync_)?app\.SoakError: \s soak: .*
      | sqlalchemy\.exc\.(IntegrityError|OperationalError|DBAPIError|InterfaceError|
                          InternalError): .*
      | sqlalchemy\.exc\.InvalidatePoolError: \s \(\)   # pre-ping found the restart
      | sqlalchemy\.dialects\.postgresql\.\w+\.AsyncAdapt_\w+_dbapi\.\w+: .*
      | asyncpg\.exceptions\.[\w.]+: .*
      | psycopg2?\.[\w.]+: .*
      | (ConnectionError|ConnectionRefusedError|ConnectionResetError|OSError|TimeoutError)\b.*
      | asyncio\.exceptions\.CancelledError: \s {deadline}   # the Deadline middleware's fail_after
      | asgi_sqla\.\w+Error: .*   # the package's own, e.g. asgi_sqla.CommitFailedError
    )$""".replace(
        "{deadline}",
        # anyio 4.11 names the reason of a cancellation; before, every cancel scope's
        # message is the same, the deadline's included.
        r"Cancelled \s via \s cancel \s scope \s \w+; \s reason: \s deadline \s exceeded"
        if release("anyio") >= (4, 11)
        else r"Cancelled \s by \s cancel \s scope \s \w+",
    ),
    re.VERBOSE,
)


# -- the plan --------------------------------------------------------------------------

#: Fault kind -> relative weight in the random mix.
WEIGHTS = {
    "none": 24,
    "commit-fails": 7,
    "serialize": 5,  # a pair of requests
    "raise-before": 5,
    "raise-after": 5,
    "handler-timeout": 5,
    "deadline-mid-commit": 4,
    "kill-query": 5,
    "kill-commit": 5,
    "disconnect-before": 5,
    "disconnect-during": 5,
    "disconnect-mid-body": 5,
    "disconnect-after": 5,
}

#: ``SOAK_FAULTS=kind,kind`` keeps only those kinds (and ``none``), to chase one fault.
if os.environ.get("SOAK_FAULTS"):
    _chosen = {"none", *os.environ["SOAK_FAULTS"].split(",")}
    assert _chosen <= set(WEIGHTS), f"SOAK_FAULTS: unknown {_chosen - set(WEIGHTS)}"
    WEIGHTS = {kind: weight for kind, weight in WEIGHTS.items() if kind in _chosen}

#: How a request's client behaves: "httpx" reads the whole answer; the raw-socket
#: clients hang up right after sending, after ``hang_up_after`` seconds, after the
#: first body bytes, or abruptly (RST) after reading everything.
CLIENTS = {
    "disconnect-before": "before",
    "disconnect-during": "during",
    "disconnect-mid-body": "mid-body",
    "disconnect-after": "after",
}


@dataclass
class Request:
    kind: str
    key: str
    params: dict[str, str]
    client: str = "httpx"
    hang_up_after: float = 0.0


@dataclass
class Outcome:
    """What one client was told."""

    request: Request
    #: The status line's code; None if the client got none (it hung up, or was cut off).
    status: int | None = None
    #: The client hung up on purpose before it got a status line.
    vanished: bool = False
    retry_after: bool = False
    body: bytes = b""
    error: str = ""


def plan(rng: random.Random, total: int) -> list[list[Request]]:
    """Units of work (a serializable pair is one unit of two) adding up to ``total`` requests."""
    kinds = list(WEIGHTS)
    weights = list(WEIGHTS.values())
    units: list[list[Request]] = []
    count = 0
    while count < total:
        kind = rng.choices(kinds, weights)[0]
        number = len(units)
        key = f"{number:06d}-{kind}"
        if kind == "serialize":
            group = f"g{number}"
            unit = [
                Request(kind, f"{key}-{side}", {"fault": "serialize", "group": group})
                for side in "ab"
            ]
        else:
            unit = [_request(rng, kind, key)]
        units.append(unit)
        count += len(unit)
    return units


def _request(rng: random.Random, kind: str, key: str) -> Request:
    params: dict[str, str]
    hang_up_after = 0.0
    if kind in ("none", "commit-fails", "raise-before", "raise-after", "disconnect-after"):
        params = {"fault": "none" if kind == "disconnect-after" else kind}
    elif kind == "handler-timeout":
        params = {"fault": "timeout", "ms": "30"}
    elif kind == "deadline-mid-commit":
        # The request's deadline is 300 ms away and its COMMIT takes 400 ms: unless the
        # request waited that long for a connection, the deadline expires mid-commit.
        params = {"fault": "slow-commit", "ms": "400", "deadline_ms": "300"}
    elif kind == "kill-query":
        params = {"fault": "kill-query", "ms": "1000", "tag": KILL_QUERY_TAG + key}
    elif kind == "kill-commit":
        params = {"fault": "slow-commit", "ms": "1000", "tag": KILL_COMMIT_TAG + key}
    elif kind in ("disconnect-before", "disconnect-during"):
        sleep = rng.uniform(0.01, 0.06)
        params = {"fault": "sleep", "ms": f"{sleep * 1000:.0f}"}
        hang_up_after = rng.uniform(0.0, sleep)
    elif kind == "disconnect-mid-body":
        params = {"fault": "stream", "ms": "20"}
    else:
        raise AssertionError(kind)
    return Request(kind, key, params, CLIENTS.get(kind, "httpx"), hang_up_after)


# -- clients -----------------------------------------------------------------------------


async def send_httpx(client: httpx.AsyncClient, request: Request) -> Outcome:
    outcome = Outcome(request)
    try:
        async with client.stream(
            "POST", "/write", params={"key": request.key, **request.params}
        ) as response:
            outcome.status = response.status_code
            outcome.retry_after = "retry-after" in response.headers
            try:
                outcome.body = await response.aread()
            except httpx.HTTPError as exc:  # the body was cut off (raise-after)
                outcome.error = f"body: {type(exc).__name__}"
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


async def send_raw(port: int, request: Request) -> Outcome:
    """One request over a raw socket, hung up on as ``request.client`` says."""
    outcome = Outcome(request)
    query = "&".join(f"{k}={v}" for k, v in {"key": request.key, **request.params}.items())
    head = (
        f"POST /write?{query} HTTP/1.1\r\nHost: soak\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n"
    )
    stream = await anyio.connect_tcp("127.0.0.1", port)
    received = b""
    try:
        await stream.send(head.encode())
        if request.client == "before":
            pass
        elif request.client == "during":
            with anyio.move_on_after(request.hang_up_after):
                received = await _read_until(stream, received, b"\r\n\r\n")
        elif request.client == "mid-body":
            received = await _read_until(stream, received, b"\r\n\r\n")
            received = await _read_until(stream, received, b";", after=b"\r\n\r\n")
        else:  # "after": everything, then an abrupt close
            received = await _read_until(stream, received, None)
            sock = stream.extra(SocketAttribute.raw_socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except anyio.EndOfStream:
        pass
    finally:
        await stream.aclose()
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", received)
    if match and b"\r\n\r\n" in received:
        outcome.status = int(match.group(1))
        headers, _, outcome.body = received.partition(b"\r\n\r\n")
        outcome.retry_after = b"\r\nretry-after:" in headers.lower()
    else:
        outcome.vanished = True
    return outcome


async def _read_until(
    stream: SocketStream, received: bytes, marker: bytes | None, after: bytes = b""
) -> bytes:
    """Read until ``marker`` appears (past ``after``), or to the end if it is None."""

    def seen() -> bool:
        if marker is None:
            return False
        if after:
            _, separator, rest = received.partition(after)
            return bool(separator) and marker in rest
        return marker in received

    while not seen():
        try:
            received += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return received
    return received


# -- fault injectors ---------------------------------------------------------------------


@dataclass
class Injected:
    """Faults injected from outside the app."""

    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    restarts: list[float] = field(default_factory=list)  # seconds each took


class Killer:
    """Terminates the backends whose ``application_name`` asks for it, one poll at a time.

    Over one superuser connection, opened again after the database restarted.
    """

    def __init__(self, admin: URL, injected: Injected) -> None:
        self.admin = admin
        self.injected = injected
        self.connection: psycopg.Connection[Any] | None = None

    def poll(self) -> None:
        try:
            if self.connection is None or self.connection.closed:
                self.connection = _postgres.connect(self.admin)
            rows = self.connection.execute(
                "SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE state = 'active' AND (application_name LIKE %s OR application_name LIKE %s)",
                (KILL_QUERY_TAG + "%", KILL_COMMIT_TAG + "%"),
            ).fetchall()
        except psycopg.OperationalError:  # the database is restarting
            self.close()
            return
        for name, killed in rows:
            if killed:
                self.injected.kills[name.partition(":")[0]] += 1

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


# -- the run -----------------------------------------------------------------------------


@dataclass
class Run:
    outcomes: list[Outcome]
    injected: Injected
    seconds: float
    pool_size: int
    variant: Variant


async def soak(
    server: Server, pg: DedicatedPostgres, units: list[list[Request]], variant: Variant
) -> Run:
    port = int(server.url.rsplit(":", 1)[1])
    pool_size = server_pool(server)["size"]
    total = sum(len(unit) for unit in units)
    outcomes: list[Outcome] = []
    injected = Injected()
    restarts = variant.restarts
    restart_at = [total * (n + 1) // (restarts + 1) for n in range(restarts)]
    restart_due = anyio.Event()
    finished = anyio.Event()
    send_units, receive_units = anyio.create_memory_object_stream[list[Request]](len(units))
    for unit in units:
        send_units.send_nowait(unit)
    send_units.close()
    limits = httpx.Limits(max_connections=variant.concurrency * 2, max_keepalive_connections=0)

    async def one(client: httpx.AsyncClient, request: Request) -> None:
        if request.client == "httpx":
            outcome = await send_httpx(client, request)
        else:
            outcome = await send_raw(port, request)
        outcomes.append(outcome)
        if restart_at and len(outcomes) >= restart_at[0]:
            restart_at.pop(0)
            restart_due.set()

    async def worker(client: httpx.AsyncClient) -> None:
        async for unit in receive_units:
            async with anyio.create_task_group() as group:
                for request in unit:
                    group.start_soon(one, client, request)

    async def killer() -> None:
        killer = Killer(pg.admin, injected)
        try:
            while not finished.is_set():
                await anyio.to_thread.run_sync(killer.poll)
                await anyio.sleep(0.01)  # polling interval of the fault injector
        finally:
            killer.close()

    async def restarter() -> None:
        nonlocal restart_due
        for _ in range(restarts):
            await restart_due.wait()
            restart_due = anyio.Event()
            began = time.monotonic()
            await anyio.to_thread.run_sync(pg.restart)
            injected.restarts.append(time.monotonic() - began)

    began = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client,
        receive_units,
        anyio.create_task_group() as injectors,
    ):
        injectors.start_soon(killer)
        injectors.start_soon(restarter)
        async with anyio.create_task_group() as workers:
            for _ in range(variant.concurrency):
                workers.start_soon(worker, client)
        finished.set()
        injectors.cancel_scope.cancel()
    return Run(outcomes, injected, time.monotonic() - began, pool_size, variant)


# -- the test ----------------------------------------------------------------------------


@pytest.fixture
def pg() -> Iterator[DedicatedPostgres]:
    """A cluster of this test's own: restarting it disturbs no other test."""
    try:
        with DedicatedPostgres() as cluster:
            yield cluster
    except _postgres.PostgresUnavailable as exc:
        postgres_unavailable(str(exc))


def committed_keys(url: URL) -> set[str]:
    with _postgres.connect(url) as conn:
        return {key for (key,) in conn.execute("SELECT key FROM items")}


def server_pool(server: Server) -> dict[str, int]:
    data: dict[str, int] = httpx.get(server.url + "/pool", timeout=10).json()
    return data


def traceback_exceptions(log: str) -> list[str]:
    """The exception line closing every traceback in ``log`` (chained ones included)."""
    found = []
    lines = log.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            for following in lines[number + 1 :]:
                if following and not following.startswith((" ", "\t", "^", "~")):
                    found.append(following)
                    break
    return found


@dataclass
class Reconciled:
    """What the clients were told, compared with the committed rows."""

    lies: list[Outcome]
    lost: list[Outcome]
    leaked: int
    vanished_committed: int
    vanished_not_committed: int
    tracebacks: collections.Counter[str]


def reconcile(run: Run, rows: set[str], leaked: int, log: str) -> Reconciled:
    lies: list[Outcome] = []
    lost: list[Outcome] = []
    vanished = [0, 0]
    for outcome in run.outcomes:
        committed = outcome.request.key in rows
        if outcome.vanished:  # hung up before any status line: told nothing
            vanished[not committed] += 1
        elif outcome.status is not None and 200 <= outcome.status < 300:
            if not committed:
                lost.append(outcome)
        elif committed:  # an error status, or cut off without one: told "failed"
            lies.append(outcome)
    tracebacks = collections.Counter(
        line.split(":")[0].split(" ")[0] for line in traceback_exceptions(log)
    )
    return Reconciled(lies, lost, leaked, vanished[0], vanished[1], tracebacks)


def _told(outcome: Outcome) -> str:
    return "vanished" if outcome.vanished else str(outcome.status or "no status")


def figures_table(run: Run, reconciled: Reconciled) -> str:
    outcomes = run.outcomes
    variant = run.variant
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        by_kind[outcome.request.kind][_told(outcome)] += 1
    statuses = collections.Counter(_told(o) for o in outcomes)
    kills = run.injected.kills

    def counts(counter: collections.Counter[str]) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(counter.items()))

    def by_fault(found: list[Outcome]) -> str:
        kinds = collections.Counter(o.request.kind for o in found)
        return f"   ({counts(kinds)})" if found else ""

    lines = [
        "",
        f"Soak ({variant.name}): {len(outcomes)} requests, "
        f"{variant.concurrency} concurrent clients, "
        f"pool of {run.pool_size} (no overflow, 0.5 s timeout), "
        f"driver {variant.driver}, seed {SEED}, {run.seconds:.1f} s "
        f"({len(outcomes) / run.seconds:.0f} requests/s)",
        f"  told: {counts(statuses)}",
        "  faults injected (requests by kind: what their clients were told):",
        *(
            f"    {kind:<22} {sum(by_kind[kind].values()):>6}   {counts(by_kind[kind])}"
            for kind in WEIGHTS
        ),
        f"    {'backends killed':<22} {sum(kills.values()):>6}   "
        f"mid-statement x{kills['kill-query']}, mid-commit x{kills['kill-commit']}",
        f"    {'unavailable (503)':<22} {statuses['503']:>6}",
        f"    {'database restarts':<22} {len(run.injected.restarts):>6}   "
        + ", ".join(f"{s:.2f} s down" for s in run.injected.restarts),
        f"  lies (non-2xx with a committed row):  {len(reconciled.lies)}"
        + by_fault(reconciled.lies),
        f"  lost commits (2xx without its row):   {len(reconciled.lost)}"
        + by_fault(reconciled.lost),
        f"  leaked connections (pool afterwards): {reconciled.leaked}",
        f"  vanished clients: {reconciled.vanished_committed} committed, "
        f"{reconciled.vanished_not_committed} not",
        f"  server log tracebacks: {counts(reconciled.tracebacks)}",
    ]
    for outcome in (reconciled.lies + reconciled.lost)[:20]:
        lines.append(
            f"    ! {outcome.request.key}: told {outcome.status} {outcome.error} "
            f"{outcome.body[:80]!r}"
        )
    return "\n".join(lines)


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(
            variant, id=variant.name, marks=pytest.mark.timeout(60 + variant.requests // 10)
        )
        for variant in VARIANTS
    ],
)
async def test_under_random_faults_every_answer_matches_the_database_and_nothing_leaks(
    pg: DedicatedPostgres, capsys: pytest.CaptureFixture[str], variant: Variant
) -> None:
    """The async app (async endpoints, ``Database``), and its sync twin (``def``
    endpoints in anyio's worker threads, ``SyncDatabase``): the same faults, the same
    checks.  (A timeout mark per variant: cluster and server start-up, plus the run;
    generous, the run itself is bounded.)
    """
    password = secrets.token_hex(16)
    database = pg.add_password_role("soak", password)
    driver = f"postgresql+{variant.driver}"
    url = database.set(drivername=driver).render_as_string(hide_password=False)
    units = plan(random.Random(SEED), variant.requests)
    env = {"DATABASE_URL": url, "PYTHONWARNINGS": WARNINGS_AS_ERRORS}

    with serve(variant.app, "uvicorn", env=env, ready_path="/health") as server:
        run = await soak(server, pg, units, variant)

        # The server still answers, and recovered from the restarts: plain writes work.
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            after = [await client.post("/write", params={"key": f"after-{n}"}) for n in range(10)]
        # Handlers of vanished clients may still be finishing: let the pool settle.
        eventually(lambda: server_pool(server)["checked_out"] == 0, seconds=10)
        leaked = server_pool(server)["checked_out"]
        no_open_transaction = eventually(
            lambda: (
                not any(
                    (state or "").startswith("idle in transaction")
                    for _, state, _ in pg.backends("soak")
                )
            )
        )
    log = server.log
    rows = committed_keys(database)
    reconciled = reconcile(run, rows, leaked, log)

    kinds = collections.Counter(o.request.kind for o in run.outcomes)
    answered = [o for o in run.outcomes if o.status is not None]
    unexpected = [e for e in traceback_exceptions(log) if not EXPECTED_EXCEPTIONS.match(e)]
    forbidden = [marker for marker in FORBIDDEN_IN_LOG if marker in log]
    # A deadline that expires during the COMMIT at response start leaves the response
    # cut short on purpose: its true status line goes out, then nothing (no lying 504).
    # The server reports each such response as incomplete; nothing else may be.  The
    # status line is whatever the ending decided: a 2xx, or a 500 when that COMMIT
    # failed (a backend killed, the restart) just as the deadline expired, which a
    # loaded machine makes likelier.  In the sync app the deadline may also expire
    # while the `def` code runs (anyio waits for its thread, and the 0.5 s pool timeout
    # outlasts the 0.3 s deadline): the response it then starts ends under the expired
    # deadline too (a 503 ending a session that got no connection).  Only the
    # deadline's own 504, sent when nothing had started, is complete.
    incomplete = log.count("ASGI callable returned without completing response")
    cut_short = sum(
        1
        for o in run.outcomes
        if o.request.kind == "deadline-mid-commit" and o.status is not None and o.status != 504
    )
    checks = {
        "no lies": not reconciled.lies,
        "no lost commits": not reconciled.lost,
        "no leaked connections": leaked == 0,
        "no transaction left open": no_open_transaction,
        "10 plain writes after the run: 201, committed": (
            [r.status_code for r in after] == [201] * 10
            and {f"after-{n}" for n in range(10)} <= rows
        ),
        f"at least {variant.requests} requests": len(run.outcomes) >= variant.requests,
        "every fault kind injected": all(kinds[kind] for kind in WEIGHTS),
        "backends killed mid-statement and mid-commit": all(
            run.injected.kills[kind] or kind not in WEIGHTS
            for kind in ("kill-query", "kill-commit")
        ),
        f"database restarted {variant.restarts} time(s)": (
            len(run.injected.restarts) == variant.restarts
        ),
        "pool exhausted (some 503s)": any(o.status == 503 for o in answered),
        "every 503 with Retry-After": all(o.retry_after for o in answered if o.status == 503),
        "server exited with 0": server.returncode == 0,
        f"no warning in the server log {forbidden}": not forbidden,
        f"incomplete responses ({incomplete}) only cut short by a deadline mid-commit "
        f"({cut_short})": incomplete <= cut_short,
        f"no unexpected traceback {unexpected[:5]}": not unexpected,
        "no password in the log or a response": (
            password not in log and not any(password.encode() in o.body for o in run.outcomes)
        ),
    }
    failed = [name for name, passed in checks.items() if not passed]
    table = figures_table(run, reconciled)
    table += "\n  checks: " + (f"FAILED: {'; '.join(failed)}" if failed else "all passed")
    with capsys.disabled():
        print(table)
    if variant.report:
        await anyio.Path(variant.report).write_text(table + "\n")
        await anyio.Path(variant.report + ".server.log").write_text(log)
    assert failed == [], table


# -- the failover drill ------------------------------------------------------------------
#
# The same app, with a URL naming a primary and its streaming standby
# (``target_session_attrs=read-write``).  Plain writes from many clients; half-way the
# primary is stopped (``pg_ctl stop -m fast``) and the standby promoted.  The same audit
# as above; answers may only be 2xx or 503 with Retry-After, and the app must serve the
# new primary without a restart.  The pool has a connection per client, so that every
# 503 is the failover's, not the pool's.  ``SOAK_FAILOVER_REQUESTS`` (default 300) and
# ``SOAK_FAILOVER_CONCURRENCY`` (default 20) size it; ``make soak`` runs a long one.

FAILOVER_VARIANTS = [
    Variant(
        "failover",
        "tests.apps.soak_app:app",
        os.environ.get("SOAK_DRIVER", "asyncpg"),
        _size("SOAK_FAILOVER_REQUESTS", 300),
        _size("SOAK_FAILOVER_CONCURRENCY", 20),
    ),
    Variant(
        "failover-sync",
        "tests.apps.soak_sync_app:app",
        os.environ.get("SOAK_SYNC_DRIVER", "psycopg"),
        _size("SOAK_FAILOVER_REQUESTS", 300),
        _size("SOAK_FAILOVER_CONCURRENCY", 20),
    ),
]


@dataclass
class Failover:
    """What the drill did, and when (``time.monotonic()``)."""

    stopped: float = 0.0
    promoted: float = 0.0
    #: When each request was sent, and when its answer arrived, by key.
    sent: dict[str, float] = field(default_factory=dict)
    answered: dict[str, float] = field(default_factory=dict)

    def met(self, key: str) -> bool:
        """Whether the request was under way while the primary stopped or the standby rose."""
        return self.sent[key] < self.promoted and self.answered[key] > self.stopped


async def fail_over_mid_run(
    server: Server, pg: DedicatedPostgres, standby: _postgres.StreamingReplica, variant: Variant
) -> tuple[Run, Failover]:
    """``variant.requests`` plain writes; the primary stopped and the standby promoted half-way."""
    pool_size = server_pool(server)["size"]
    outcomes: list[Outcome] = []
    failover = Failover()
    switch_due = anyio.Event()
    requests = [
        Request("none", f"{n:06d}-failover", {"fault": "none"}) for n in range(variant.requests)
    ]
    send_requests, receive_requests = anyio.create_memory_object_stream[Request](len(requests))
    for request in requests:
        send_requests.send_nowait(request)
    send_requests.close()
    limits = httpx.Limits(max_connections=variant.concurrency * 2, max_keepalive_connections=0)

    async def worker(client: httpx.AsyncClient) -> None:
        async for request in receive_requests:
            failover.sent[request.key] = time.monotonic()
            outcome = await send_httpx(client, request)
            failover.answered[request.key] = time.monotonic()
            outcomes.append(outcome)
            if len(outcomes) >= variant.requests // 2:
                switch_due.set()

    async def switch() -> None:
        await switch_due.wait()
        failover.stopped = time.monotonic()
        await anyio.to_thread.run_sync(pg.stop, "fast")
        await anyio.to_thread.run_sync(standby.promote)
        failover.promoted = time.monotonic()

    began = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client,
        receive_requests,
        anyio.create_task_group() as group,
    ):
        group.start_soon(switch)
        for _ in range(variant.concurrency):
            group.start_soon(worker, client)
    run = Run(outcomes, Injected(), time.monotonic() - began, pool_size, variant)
    return run, failover


#: The middleware's log lines for a 503, by why the database was unavailable.
UNAVAILABLE_LINES = {
    "pool timeout": "No database connection was free within the pool timeout;",
    "unreachable": "The database could not be reached;",
    "read-only": "The database server is read-only;",
    "COMMIT lost": "was sent a 503 response",
}


#: The log lines of ``confirm_lost_commits``, by what the new primary said.
CONFIRMATION_LINES = {
    "committed (201)": "committed (asked a new connection",
    "did not commit (503)": "did not commit (asked a new connection",
    "wrote nothing": "the transaction had written nothing",
    "unknown (503)": "could not be learnt within",
}


def failover_table(run: Run, failover: Failover, reconciled: Reconciled, log: str) -> str:
    told = collections.Counter(_told(o) for o in run.outcomes)
    why = ", ".join(f"{name} x{log.count(line)}" for name, line in UNAVAILABLE_LINES.items())
    asked = ", ".join(f"{name} x{log.count(line)}" for name, line in CONFIRMATION_LINES.items())
    refused = [failover.answered[o.request.key] for o in run.outcomes if o.status != 201]
    window = max(refused) - min(refused) if refused else 0.0
    met = [o for o in run.outcomes if failover.met(o.request.key)]
    waits = [failover.answered[k] - failover.sent[k] for k in failover.sent]
    variant = run.variant
    return "\n".join(
        [
            "",
            f"Failover drill ({variant.name}): {len(run.outcomes)} requests, "
            f"{variant.concurrency} concurrent clients, pool of {run.pool_size}, "
            f"driver {variant.driver}, {run.seconds:.1f} s",
            f"  told: {', '.join(f'{k} x{v}' for k, v in sorted(told.items()))}",
            f"  503s logged: {why}",
            f"  COMMITs cut off, asked about: {asked}",
            f"  primary stopped and standby promoted in "
            f"{failover.promoted - failover.stopped:.2f} s; answers other than 201 "
            f"over {window:.2f} s; {len(met)} requests under way meanwhile "
            f"({sum(o.status == 201 for o in met)} answered 201); slowest answer "
            f"{max(waits):.2f} s",
            f"  lies (non-2xx with a committed row):  {len(reconciled.lies)}",
            f"  lost commits (2xx without its row):   {len(reconciled.lost)}",
            f"  leaked connections (pool afterwards): {reconciled.leaked}",
        ]
    )


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(
            variant, id=variant.name, marks=pytest.mark.timeout(60 + variant.requests // 10)
        )
        for variant in FAILOVER_VARIANTS
    ],
)
async def test_a_failover_mid_run_is_answered_503_and_loses_no_commit(
    pg: DedicatedPostgres, capsys: pytest.CaptureFixture[str], variant: Variant
) -> None:
    """The app (async, or its sync twin) on a primary and its promoted standby."""
    password = secrets.token_hex(16)
    database = pg.add_password_role("soak", password)  # before the copy: the standby has it
    standby = _postgres.StreamingReplica(pg.cluster.bindir, pg.admin)
    try:
        standby.start()
        hosts = (f"{database.host}:{database.port}", f"{database.host}:{standby.port}")
        url = database.set(
            drivername=f"postgresql+{variant.driver}",
            host=None,
            port=None,
            query={"host": hosts, "target_session_attrs": "read-write"},
        ).render_as_string(hide_password=False)
        # A connection for every client: the 503s are the failover's, not the pool's.
        env = {
            "DATABASE_URL": url,
            "PYTHONWARNINGS": WARNINGS_AS_ERRORS,
            "SOAK_POOL_SIZE": str(variant.concurrency),
        }
        with serve(variant.app, "uvicorn", env=env, ready_path="/health") as server:
            run, failover = await fail_over_mid_run(server, pg, standby, variant)
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                after = [
                    await client.post("/write", params={"key": f"after-{n}"}) for n in range(10)
                ]
            eventually(lambda: server_pool(server)["checked_out"] == 0, seconds=10)
            leaked = server_pool(server)["checked_out"]
        new_primary = database.set(port=standby.port)
        rows = committed_keys(new_primary)
        with _postgres.connect(new_primary) as conn:
            open_transactions = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'soak' "
                "AND state LIKE 'idle in transaction%'"
            ).fetchone()
    finally:
        standby.stop()
    log = server.log
    reconciled = reconcile(run, rows, leaked, log)
    answered = [o for o in run.outcomes if o.status is not None]
    unexpected = [e for e in traceback_exceptions(log) if not EXPECTED_EXCEPTIONS.match(e)]
    forbidden = [marker for marker in FORBIDDEN_IN_LOG if marker in log]
    checks = {
        "no lies": not reconciled.lies,
        "no lost commits": not reconciled.lost,
        "no leaked connections": leaked == 0,
        "no transaction left open": open_transactions == (0,),
        "every request answered": len(answered) == len(run.outcomes) == variant.requests,
        "only 201 or 503": {o.status for o in answered} <= {201, 503},
        "requests under way during the switch": any(
            failover.met(o.request.key) for o in run.outcomes
        ),
        "every 503 with Retry-After": all(o.retry_after for o in answered if o.status == 503),
        "10 plain writes after the run: 201, committed": (
            [r.status_code for r in after] == [201] * 10
            and {f"after-{n}" for n in range(10)} <= rows
        ),
        "server exited with 0": server.returncode == 0,
        f"no warning in the server log {forbidden}": not forbidden,
        f"no unexpected traceback {unexpected[:5]}": not unexpected,
        "no password in the log or a response": (
            password not in log and not any(password.encode() in o.body for o in run.outcomes)
        ),
    }
    failed = [name for name, passed in checks.items() if not passed]
    table = failover_table(run, failover, reconciled, log)
    table += "\n  checks: " + (f"FAILED: {'; '.join(failed)}" if failed else "all passed")
    with capsys.disabled():
        print(table)
    if variant.report:
        await anyio.Path(variant.report).write_text(table + "\n")
        await anyio.Path(variant.report + ".server.log").write_text(log)
    assert failed == [], table


# -- the restart drill --------------------------------------------------------------------
#
# The same app without ``pool_pre_ping``, and a connection per client (so that no 503 is
# the pool's).  Plain writes from many clients; half-way the clients pause, the database
# restarts (``pg_ctl restart -m fast``) and they go on: every request must be answered
# 201, although the pool holds only dead connections then, which no failed statement
# has told it: the first statement of a transaction that meets one runs again on a new
# connection (``asgi_sqla/_reconnect.py``).  A restart that kills statements under way
# (the soak's) makes SQLAlchemy renew the pool by itself; those requests get a 503.
# ``SOAK_RESTART_REQUESTS`` (default 300) and ``SOAK_RESTART_CONCURRENCY`` (default 20)
# size it.

RESTART_VARIANTS = [
    Variant(
        "restart",
        "tests.apps.soak_app:app",
        os.environ.get("SOAK_DRIVER", "asyncpg"),
        _size("SOAK_RESTART_REQUESTS", 300),
        _size("SOAK_RESTART_CONCURRENCY", 20),
    ),
    Variant(
        "restart-sync",
        "tests.apps.soak_sync_app:app",
        os.environ.get("SOAK_SYNC_DRIVER", "psycopg"),
        _size("SOAK_RESTART_REQUESTS", 300),
        _size("SOAK_RESTART_CONCURRENCY", 20),
    ),
]


async def restart_mid_run(
    server: Server, pg: DedicatedPostgres, variant: Variant
) -> tuple[Run, Failover]:
    """``variant.requests`` plain writes; the database restarted half-way, while idle.

    Half-way the clients finish the requests under way and wait; the database restarts
    (every pooled connection dies, and none is in use: no statement meets the restart,
    so the pool cannot know); then they go on.  The times of the restart are kept in a
    ``Failover`` (``stopped``: it began; ``promoted``: the database was back).
    """
    pool_size = server_pool(server)["size"]
    outcomes: list[Outcome] = []
    restart = Failover()
    restart_due, idle, back = anyio.Event(), anyio.Event(), anyio.Event()
    under_way = 0
    requests = [
        Request("none", f"{n:06d}-restart", {"fault": "none"}) for n in range(variant.requests)
    ]
    send_requests, receive_requests = anyio.create_memory_object_stream[Request](len(requests))
    for request in requests:
        send_requests.send_nowait(request)
    send_requests.close()
    limits = httpx.Limits(max_connections=variant.concurrency * 2, max_keepalive_connections=0)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal under_way
        async for request in receive_requests:
            if restart_due.is_set():
                await back.wait()
            under_way += 1
            restart.sent[request.key] = time.monotonic()
            outcome = await send_httpx(client, request)
            restart.answered[request.key] = time.monotonic()
            under_way -= 1
            outcomes.append(outcome)
            if len(outcomes) >= variant.requests // 2:
                restart_due.set()
            if restart_due.is_set() and under_way == 0:
                idle.set()

    async def restarter() -> None:
        await idle.wait()
        restart.stopped = time.monotonic()
        await anyio.to_thread.run_sync(pg.restart)
        restart.promoted = time.monotonic()
        back.set()

    began = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client,
        receive_requests,
        anyio.create_task_group() as group,
    ):
        group.start_soon(restarter)
        for _ in range(variant.concurrency):
            group.start_soon(worker, client)
    run = Run(outcomes, Injected(), time.monotonic() - began, pool_size, variant)
    return run, restart


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(
            variant, id=variant.name, marks=pytest.mark.timeout(60 + variant.requests // 10)
        )
        for variant in RESTART_VARIANTS
    ],
)
async def test_after_a_restart_without_pre_ping_no_request_fails(
    pg: DedicatedPostgres, capsys: pytest.CaptureFixture[str], variant: Variant
) -> None:
    """The app (async, or its sync twin) with ``SOAK_PRE_PING=0``, restarted mid-run."""
    password = secrets.token_hex(16)
    database = pg.add_password_role("soak", password)
    url = database.set(drivername=f"postgresql+{variant.driver}").render_as_string(
        hide_password=False
    )
    env = {
        "DATABASE_URL": url,
        "PYTHONWARNINGS": WARNINGS_AS_ERRORS,
        "SOAK_POOL_SIZE": str(variant.concurrency),
        "SOAK_PRE_PING": "0",
    }
    with serve(variant.app, "uvicorn", env=env, ready_path="/health") as server:
        run, restart = await restart_mid_run(server, pg, variant)
        eventually(lambda: server_pool(server)["checked_out"] == 0, seconds=10)
        leaked = server_pool(server)["checked_out"]
    rows = committed_keys(database)
    log = server.log
    reconciled = reconcile(run, rows, leaked, log)
    answered = [o for o in run.outcomes if o.status is not None]
    after = [o for o in answered if restart.sent[o.request.key] > restart.promoted]
    failed_after = [o for o in after if o.status != 201]
    unexpected = [e for e in traceback_exceptions(log) if not EXPECTED_EXCEPTIONS.match(e)]
    forbidden = [marker for marker in FORBIDDEN_IN_LOG if marker in log]
    checks = {
        "no lies": not reconciled.lies,
        "no lost commits": not reconciled.lost,
        "no leaked connections": leaked == 0,
        "every request answered": len(answered) == len(run.outcomes) == variant.requests,
        "requests sent after the restart": len(after) >= variant.requests // 3,
        f"no request sent after the restart failed ({len(failed_after)} did)": not failed_after,
        "every request answered 201": {o.status for o in answered} == {201},
        "the dead pool was logged once": log.count("pooled database connections were dead") == 1,
        "server exited with 0": server.returncode == 0,
        f"no warning in the server log {forbidden}": not forbidden,
        f"no unexpected traceback {unexpected[:5]}": not unexpected,
        "no password in the log or a response": (
            password not in log and not any(password.encode() in o.body for o in run.outcomes)
        ),
    }
    failed = [name for name, passed in checks.items() if not passed]
    told = collections.Counter(_told(o) for o in run.outcomes)
    table = "\n".join(
        [
            "",
            f"Restart drill ({variant.name}): {len(run.outcomes)} requests, "
            f"{variant.concurrency} concurrent clients, pool of {run.pool_size} (no "
            f"pool_pre_ping), driver {variant.driver}, {run.seconds:.1f} s",
            f"  told: {', '.join(f'{k} x{v}' for k, v in sorted(told.items()))}",
            f"  restart took {restart.promoted - restart.stopped:.2f} s; "
            f"{len(after)} requests sent after it, {len(failed_after)} failed",
            f"  lies {len(reconciled.lies)}, lost commits {len(reconciled.lost)}, "
            f"leaked connections {reconciled.leaked}",
            "  checks: " + (f"FAILED: {'; '.join(failed)}" if failed else "all passed"),
        ]
    )
    with capsys.disabled():
        print(table)
    if variant.report:
        await anyio.Path(variant.report).write_text(table + "\n")
        await anyio.Path(variant.report + ".server.log").write_text(log)
    assert failed == [], table
