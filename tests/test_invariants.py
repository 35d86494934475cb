"""The middleware's promises as invariants, explored by a Hypothesis state machine.

Each example drives one to three HTTP connections through ``SQLAlchemyMiddleware(app, db)``
in-process, against a real database (an SQLite file; PostgreSQL through asyncpg).  The
app is a script: it runs as a task and waits on a queue for its next instruction, so the
machine decides, step by step, what the app does (read, write, commit, release, send the
status line, send body chunks, raise, return...), what the client does (disconnect), what
the server does (cancel the request) and which faults strike (a COMMIT that fails on a
deferred foreign key, a pool with no free connection, a backend killed under its
session).  Nothing sleeps to synchronise: every step waits for the app to report back.

The model follows every write (a unique ``items.key`` per action) to its *fate*: it must
be committed (the server received a 2xx for its transaction, ``db.commit()`` or
``db.release()`` returned, the app returned normally after its whole response went
out), or it
must never be (a non-2xx, a rollback, a failed commit, an exception, a cancellation), or
nothing can be said (the app caught a failure of its own write).  After every step:

1. **A 2xx status line is true.**  When the server receives a 2xx, every write its
   transaction owes is already committed (read on another connection at that moment),
   and its ``on_commit`` callbacks have run; a transaction whose COMMIT must fail is never
   answered 2xx; when ``send()`` of a 2xx raised ``CommitFailedError`` the server got 500.
2. **Nothing committed is reported as failed.**  No write whose fate is "never" is ever
   committed, and no ``on_commit`` callback of such a transaction ever runs.
3. **Nothing leaks.**  Checked-out connections never exceed those the live requests may
   hold (none once a request's status line went out, until it reads ``db.session``
   again) plus the one the machine holds itself; once every connection has ended, zero
   are checked out and no transaction is open (PostgreSQL: no ``idle in transaction``
   backend; SQLite: ``BEGIN IMMEDIATE`` succeeds at once).
4. **An ended session is dead.**  A kept reference to a session that ended (at the
   status line, at ``release()``, at the end of the request) raises
   ``SessionEndedError`` on ``execute`` and checks out nothing; ``db.session`` read by a
   task that outlived its request raises ``SessionEndedError``.
5. **The server sees a valid response.**  At most one ``http.response.start``, body
   chunks only after it, nothing after the last chunk.

``make test`` runs a bounded, derandomized profile; ``ASGI_SQLA_HYPOTHESIS=long`` (set by
``make soak``) explores much further.  Violations the machine found are kept at the end
of this module as ordinary tests, each naming the promise it broke; each failed before
its fix:

* PostgreSQL, a statement error the app caught, then a commit: the server had aborted
  the transaction and answered COMMIT with a silent ROLLBACK, so a 2xx (or a returning
  ``db.commit()``) claimed lost writes, and ``on_commit`` callbacks ran;
* SQLite, a ``db.commit()`` whose COMMIT failed returned its connection to the pool
  with the failed transaction (and the write lock) still open;
* an ``on_commit`` callback registered before any statement survived ``db.rollback()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import URL, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from asgi_sqla import (
    CommitFailedError,
    Database,
    RollbackOnlyError,
    SessionEndedError,
    SQLAlchemyMiddleware,
)
from asgi_sqla.types import Message, Receive, Scope, Send

from _helpers import (
    add_key,
    call_http,
    checked_out,
    http_scope,
    items,
    keys,
    open_database,
    orphan_child,
    plain_response,
)

# -- settings --------------------------------------------------------------------------

#: Environment variable naming the Hypothesis profile: ``bounded`` (default) or ``long``.
PROFILE_VARIABLE = "ASGI_SQLA_HYPOTHESIS"

settings.register_profile(
    "asgi_sqla-bounded",
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,  # CI replays the same examples on every run
    database=None,  # ... and keeps no example database between runs
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "asgi_sqla-long",
    max_examples=1000,
    stateful_step_count=40,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def machine_settings() -> settings:
    name = os.environ.get(PROFILE_VARIABLE, "bounded")
    return settings.get_profile(f"asgi_sqla-{name}")


#: pytest-timeout for one run of the machine: none for the long profile.
MACHINE_TIMEOUT = 0 if os.environ.get(PROFILE_VARIABLE) == "long" else 180


#: ``application_name`` of the middleware's PostgreSQL connections: what a kill targets.
APP_NAME = "asgi_sqla_machine"
#: A key committed before every example: inserting it again is a statement that fails.
TAKEN = "taken"
#: Seconds a statement waits for a pooled connection (or SQLite for its lock).
POOL_TIMEOUT = 0.1
#: Seconds one step may take before the machine calls it a hang.
STEP_LIMIT = 20.0
STATUSES = (200, 201, 204, 400, 404, 422, 500, 503)
#: What ``app_does`` may do, by the name of the ``Connection.do_*`` method and its argument.
APP_ACTIONS = (
    "read",
    "write",
    "write",  # twice: writes are what the promises are about
    "write_orphan",
    "fail_statement",
    "commit",
    "rollback",
    "release commit",
    "release rollback",
    "rollback_only",
    "on_commit",
    "spawn_child",
)
ENDINGS = ("the app returns", "the app raises", "the app re-raises its last error", "cancelled")


# -- the model ---------------------------------------------------------------------------

MUST_COMMIT = "must commit"
NEVER = "never"


@dataclass
class Callback:
    """An ``on_commit`` callback: ``ran`` counts its calls."""

    name: str
    ran: int = 0
    #: Set when its transaction's fate is decided: whether the transaction wrote, and
    #: whether it ran a statement at all.
    fate: str | None = None
    wrote: bool = False


@dataclass
class Tx:
    """One transaction of a request's session, as the model sees it."""

    writes: list[str] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)
    #: Its COMMIT must fail: an orphan row was inserted, or (PostgreSQL) a statement
    #: failed in it, which aborts the whole transaction.
    poisoned: bool = False
    #: A statement ran in it (SQLAlchemy began a transaction on a connection).
    began: bool = False
    #: PostgreSQL: its backend was killed, so its COMMIT must fail.
    killed: bool = False


@dataclass
class Session:
    """One session of a request (``db.session`` between its creation and its end)."""

    ref: Any  # the AsyncSession object db.session returned
    tx: Tx = field(default_factory=Tx)
    rollback_only: bool = False
    ended: bool = False
    checked_out: bool = False  # a statement ran: it may hold a connection


class Violations(AssertionError):
    """Raised by the invariant check with every violation recorded so far."""


# -- one HTTP connection -----------------------------------------------------------------


@dataclass
class Instruction:
    name: str
    args: tuple[Any, ...]
    done: asyncio.Future[str]


class Connection:
    """One HTTP request through the middleware, its scripted app, and the server side."""

    def __init__(self, machine: InvariantMachine, number: int) -> None:
        self.machine = machine
        self.db = machine.db
        self.number = number
        self.instructions: asyncio.Queue[Instruction] = asyncio.Queue()
        self.forwarded: list[Message] = []  # what the middleware sent to the server
        self.sessions: list[Session] = []  # every session the app saw, for stale uses
        self.current: Session | None = None
        self.server_started = False  # the server received the status line
        self.server_completed = False  # ... and the last body chunk
        self.app_sent_start = False
        self.app_sent_final_body = False
        self.body_read = False
        self.disconnected = False
        self.send_raises = False  # after the disconnect, as ASGI spec 2.4 servers do
        self.ended = False  # the middleware returned, raised or was cancelled
        self.outcome = ""
        self.children: list[asyncio.Task[None]] = []
        self.child_go: list[asyncio.Event] = []
        self.child_result: list[asyncio.Future[str]] = []
        self.last_error: BaseException | None = None
        self.app_returned = False  # the app itself returned (not raised, not cancelled)
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            SQLAlchemyMiddleware(self.app, self.db)(
                http_scope(f"/c{number}", method="POST"), self.receive, self.send
            ),
            name=f"request-{number}",
        )

    def __repr__(self) -> str:
        return f"request {self.number}"

    # -- the server's side of the ASGI connection --

    async def receive(self) -> Message:
        if not self.body_read:
            self.body_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        assert self.disconnected, "the machine only lets the app receive when it won't block"
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        machine = self.machine
        self.forwarded.append(message)
        kind = message["type"]
        if kind == "http.response.start":
            if self.server_started:
                machine.violation(5, f"{self} forwarded a second status line: {self.forwarded}")
            self.server_started = True
            await self.transaction_ended_at_start(int(message["status"]))
        elif kind == "http.response.body":
            if not self.server_started:
                machine.violation(5, f"{self} forwarded a body before its status line")
            finals = [m for m in self.forwarded[:-1] if m["type"] == kind and not m["more_body"]]
            if finals:
                machine.violation(5, f"{self} forwarded a body chunk after the last one")
        if self.send_raises:
            raise OSError("the client has disconnected")
        if kind == "http.response.body" and not message["more_body"]:
            self.server_completed = True

    async def transaction_ended_at_start(self, status: int) -> None:
        """The middleware forwards the status line: the session it ended has a fate."""
        machine = self.machine
        session, self.current = self.current, None
        if session is not None:
            session.ended = True
            tx = session.tx
            commits = 200 <= status < 300 and not session.rollback_only
            if commits and tx.poisoned:
                machine.violation(1, f"{self} answered {status}; its COMMIT had to fail")
                commits = False
            if commits:
                committed = await machine.committed()
                missing = [key for key in tx.writes if key not in committed]
                if missing:
                    machine.violation(1, f"{self} answered {status}; {missing} not committed")
                for callback in tx.callbacks:
                    if tx.writes and not callback.ran:
                        machine.violation(
                            1, f"{self} answered {status} before on_commit {callback.name} ran"
                        )
            machine.decide(tx, MUST_COMMIT if commits else NEVER)
        # Promise 2: the connection is back in the pool before the status line goes out.
        machine.check_pool_bound(f"when {self} forwarded its status line")

    # -- the scripted app --

    async def app(self, scope: Scope, receive: Any, send: Any) -> None:
        self.asgi_receive, self.asgi_send = receive, send
        while True:
            instruction = await self.instructions.get()
            if instruction.name == "return":
                instruction.done.set_result("returned")
                self.app_returned = True
                return
            if instruction.name == "raise":
                instruction.done.set_result("raised")
                error = instruction.args[0]
                raise error if error is not None else RuntimeError("the app failed")
            try:
                result = await getattr(self, f"do_{instruction.name}")(*instruction.args)
            except Exception as exc:
                self.last_error = exc
                result = f"{type(exc).__name__}: {str(exc)[:80]}"
            instruction.done.set_result(result)

    async def step(self, name: str, *args: Any) -> str:
        """Have the app carry out one instruction; return what came of it."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.instructions.put_nowait(Instruction(name, args, done))
        waited: set[asyncio.Future[Any]] = {done, self.task}
        await asyncio.wait(waited, timeout=STEP_LIMIT, return_when=asyncio.FIRST_COMPLETED)
        if not done.done() and not self.task.done():
            raise AssertionError(f"{self} hung in step {name}{args}")
        if name in ("return", "raise"):
            await self.wait_for_the_end()
        return done.result() if done.done() else "the request ended"

    async def wait_for_the_end(self) -> None:
        await asyncio.wait({self.task}, timeout=STEP_LIMIT)
        if not self.task.done():
            raise AssertionError(f"the middleware of {self} did not return")
        if self.task.cancelled():
            self.outcome = "cancelled"
        elif self.task.exception() is not None:
            self.outcome = f"raised {type(self.task.exception()).__name__}"
        else:
            self.outcome = "returned"

    def session(self) -> Any:
        """``db.session``, followed by the model."""
        ref = self.db.session
        current = self.current
        if current is None or current.ref is not ref:
            if current is not None:
                self.machine.violation(4, f"{self}: db.session changed without an end")
            current = self.current = Session(ref)
            self.sessions.append(current)
        return ref

    async def do_read(self) -> str:
        session = self.session()
        assert self.current is not None
        self.current.checked_out = self.current.tx.began = True  # even if it fails
        value = await session.scalar(select(items.c.id).limit(1))
        return f"read {value}"

    async def do_write(self) -> str:
        key = self.machine.new_key(self)
        self.session()
        model = self.current
        assert model is not None
        model.checked_out = model.tx.began = True
        await add_key(self.db, key)
        model.tx.writes.append(key)
        return f"wrote {key}"

    async def do_write_orphan(self) -> str:
        self.session()
        model = self.current
        assert model is not None
        model.checked_out = model.tx.began = True
        child = next(self.machine.counter)
        await self.db.session.execute(
            text("INSERT INTO children (id, parent_id) VALUES (:id, 999)"), {"id": child}
        )
        model.tx.poisoned = True
        return f"orphan {child}"

    async def do_fail_statement(self) -> str:
        self.session()
        model = self.current
        assert model is not None
        model.checked_out = model.tx.began = True
        try:
            await add_key(self.db, TAKEN)
        except IntegrityError:
            if self.machine.postgresql:
                model.tx.poisoned = True
            raise
        raise AssertionError("inserting a taken key succeeded")

    async def do_commit(self) -> str:
        model = self.current
        try:
            await self.db.commit()
        except Exception as exc:
            if model is not None and not isinstance(exc, RollbackOnlyError):
                self.machine.decide(model.tx, NEVER)
                model.tx = Tx()
            raise
        if model is not None:
            if model.rollback_only:
                self.machine.violation(2, f"{self}: db.commit() of a rollback-only session")
            if model.tx.poisoned:
                self.machine.violation(1, f"{self}: db.commit() of a doomed transaction returned")
            self.machine.decide(model.tx, MUST_COMMIT)
            model.tx = Tx()
        return "committed"

    async def do_rollback(self) -> str:
        model = self.current
        try:
            await self.db.rollback()
        finally:
            if model is not None:
                self.machine.decide(model.tx, NEVER)
                model.tx = Tx()
        return "rolled back"

    async def do_release(self, how: str) -> str:
        commit = how == "commit"
        model, self.current = self.current, None
        try:
            await self.db.release(commit=commit)
        except Exception:
            if model is not None:
                model.ended = True
                self.machine.decide(model.tx, NEVER)
            raise
        if model is not None:
            model.ended = True
            tx = model.tx
            commits = commit and not model.rollback_only
            if commits and tx.poisoned:
                self.machine.violation(2, f"{self}: release() of a poisoned transaction returned")
            self.machine.decide(tx, MUST_COMMIT if commits else NEVER)
        return "released"

    async def do_rollback_only(self) -> str:
        self.db.set_rollback_only()
        self.session()
        assert self.current is not None
        self.current.rollback_only = True
        return "marked rollback-only"

    async def do_on_commit(self) -> str:
        name = f"callback-{next(self.machine.counter)}"
        callback = Callback(name)

        def ran() -> None:
            callback.ran += 1

        self.db.on_commit(ran)
        self.session()
        assert self.current is not None
        self.current.tx.callbacks.append(callback)
        self.machine.callbacks.append(callback)
        return f"registered {name}"

    async def do_stale(self, index: int) -> str:
        stale = [s for s in self.sessions if s.ended]
        return await self.machine.use_stale(stale[index % len(stale)], f"{self}'s app")

    async def do_spawn_child(self) -> str:
        go = asyncio.Event()
        result: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def child() -> None:
            await go.wait()
            try:
                result.set_result(await self.child_writes())
            except Exception as exc:
                result.set_result(f"{type(exc).__name__}")

        self.children.append(asyncio.create_task(child(), name=f"child-of-{self.number}"))
        self.child_go.append(go)
        self.child_result.append(result)
        return f"spawned child {len(self.children) - 1}"

    async def child_writes(self) -> str:
        if self.ended:
            try:
                self.db.session  # noqa: B018 - reading it is the test
            except SessionEndedError:
                return "SessionEndedError"
            self.machine.violation(4, f"a child of {self} read db.session after the request")
            return "opened a session after the request"
        return await self.do_write()

    async def do_start(self, status: int) -> str:
        self.app_sent_start = True
        try:
            await self.asgi_send({"type": "http.response.start", "status": status, "headers": []})
        except CommitFailedError:
            starts = [m for m in self.forwarded if m["type"] == "http.response.start"]
            if not starts or starts[0]["status"] != 500:
                self.machine.violation(1, f"{self}: the commit failed; the server got {starts}")
            raise
        return f"sent {status}"

    async def do_body(self, more_body: bool) -> str:
        self.app_sent_final_body = not more_body
        await plain_body(self.asgi_send, more_body)
        return "sent a body chunk"

    async def do_receive(self) -> str:
        message = await self.asgi_receive()
        return str(message["type"])

    def end(self) -> None:
        """The middleware returned: decide what the open session's transaction became."""
        self.ended = True
        session, self.current = self.current, None
        for each in self.sessions:
            each.ended = True
        if session is None:
            return
        tx = session.tx
        # Work after the status line commits only when the response went out whole.
        commits = (
            self.app_returned
            and self.server_completed
            and not session.rollback_only
            and not tx.poisoned
            and not tx.killed
        )
        self.machine.decide(tx, MUST_COMMIT if commits else NEVER)


async def plain_body(send: Any, more_body: bool) -> None:
    await send({"type": "http.response.body", "body": b"chunk", "more_body": more_body})


# -- the machine -------------------------------------------------------------------------


@dataclass
class Target:
    """The database one run of the machine uses (set by the test before it runs)."""

    url: str
    admin: Any = None  # PostgreSQL: a sync autocommit psycopg connection


class InvariantMachine(RuleBasedStateMachine):
    target: Target  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.postgresql = self.target.url.startswith("postgresql")
        self.counter = itertools.count(1)
        self.connections: list[Connection] = []
        self.callbacks: list[Callback] = []
        self.fates: dict[str, str] = {}  # key -> MUST_COMMIT | NEVER
        self.violations: list[str] = []
        self.held: AsyncConnection | None = None
        self.db: Database
        self.audit: AsyncEngine

    # -- plumbing --

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def violation(self, invariant: int, text: str) -> None:
        self.violations.append(f"invariant {invariant}: {text}")

    def new_key(self, connection: Connection) -> str:
        return f"r{connection.number}-{next(self.counter)}"

    def decide(self, tx: Tx, fate: str) -> None:
        """``tx`` ended: its writes and callbacks get ``fate``, checked from now on."""
        for key in tx.writes:
            self.fates[key] = fate
        for callback in tx.callbacks:
            callback.fate, callback.wrote = fate, bool(tx.writes)
        tx.writes, tx.callbacks = [], []

    async def committed(self) -> set[str]:
        async with self.audit.connect() as connection:
            return set((await connection.execute(select(items.c.key))).scalars())

    async def use_stale(self, session: Session, who: str) -> str:
        before = self.db.pool_status().checked_out
        try:
            await session.ref.execute(text("SELECT 1"))
        except SessionEndedError:
            result = "SessionEndedError"
        else:
            self.violation(4, f"{who} used an ended session")
            result = "the ended session worked"
        if self.db.pool_status().checked_out > before:
            self.violation(4, f"{who} checked out a connection through an ended session")
        return result

    def live(self) -> list[Connection]:
        return [c for c in self.connections if not c.ended]

    def may_hold(self) -> int:
        held = 1 if self.held is not None else 0
        return held + sum(1 for c in self.live() if c.current and c.current.checked_out)

    def check_pool_bound(self, when: str) -> None:
        checked_out = self.db.pool_status().checked_out
        if checked_out > self.may_hold():
            self.violation(
                3, f"{checked_out} connections checked out {when}; at most {self.may_hold()}"
            )

    def pick(self, index: int, condition: Callable[[Connection], bool]) -> Connection:
        eligible = [c for c in self.live() if condition(c)]
        return eligible[index % len(eligible)]

    # -- set-up and tear-down --

    @initialize(pool_size=st.sampled_from([1, 3]))
    def open_database(self, pool_size: int) -> None:
        if not self.postgresql:  # a new SQLite file for every example
            Path(self.target.url.split("///", 1)[1]).unlink(missing_ok=True)
        self.run(self._open(pool_size))

    async def _open(self, pool_size: int) -> None:
        url = self.target.url
        options: dict[str, Any] = {
            "pool_size": pool_size,
            "max_overflow": 0,
            "pool_timeout": POOL_TIMEOUT,
        }
        if self.postgresql:
            options["connect_args"] = {"server_settings": {"application_name": APP_NAME}}
            audit_options: dict[str, Any] = {}
            self.kill_backends()  # what an earlier, failed example may have left
            if url in _schemas:
                self.target.admin.execute("TRUNCATE items, children, parents")
        else:
            # A writer waits this long for SQLite's lock, then gets "database is locked".
            options["connect_args"] = {"timeout": POOL_TIMEOUT}
            audit_options = {"connect_args": {"timeout": 0.5}}
        self.db = await open_database_once(url, **options)
        self.audit = create_async_engine(url, **audit_options)
        async with self.db.scope():
            await add_key(self.db, TAKEN)
        await self._arrive()  # every example has at least one request

    def teardown(self) -> None:
        try:
            if hasattr(self, "db"):
                self.run(self._teardown())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _teardown(self) -> None:
        try:
            for connection in self.live():
                connection.task.cancel()
                await connection.wait_for_the_end()
                connection.end()
            for connection in self.connections:
                for child in connection.children:
                    child.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*connection.children, return_exceptions=True)
            await self._release_held()
            await self._check()
        finally:
            await self.db.dispose()
            await self.audit.dispose()

    # -- new connections --

    @precondition(lambda self: len(self.live()) < 2 and len(self.connections) < 4)
    @rule()
    def a_request_arrives(self) -> None:
        self.run(self._arrive())

    async def _arrive(self) -> None:
        self.connections.append(Connection(self, len(self.connections) + 1))

    async def _step(self, connection: Connection, name: str, *args: Any) -> None:
        await connection.step(name, *args)
        if connection.task.done() and not connection.ended:
            if not connection.outcome:
                await connection.wait_for_the_end()
            connection.end()

    # -- what the app does --

    @precondition(lambda self: self.live())
    @rule(index=st.integers(0, 1), action=st.sampled_from(APP_ACTIONS))
    def app_does(self, index: int, action: str) -> None:
        name, *args = action.split()
        self.run(self._step(self.pick(index, lambda c: True), name, *args))

    @precondition(lambda self: any(not c.app_sent_start for c in self.live()))
    @rule(index=st.integers(0, 1), status=st.sampled_from(STATUSES))
    def app_sends_the_status_line(self, index: int, status: int) -> None:
        connection = self.pick(index, lambda c: not c.app_sent_start)
        self.run(self._step(connection, "start", status))

    @precondition(
        lambda self: any(c.app_sent_start and not c.app_sent_final_body for c in self.live())
    )
    @rule(index=st.integers(0, 1), more_body=st.booleans())
    def app_sends_a_body_chunk(self, index: int, more_body: bool) -> None:
        connection = self.pick(index, lambda c: c.app_sent_start and not c.app_sent_final_body)
        self.run(self._step(connection, "body", more_body))

    @precondition(lambda self: any(not c.body_read or c.disconnected for c in self.live()))
    @rule(index=st.integers(0, 1))
    def app_receives(self, index: int) -> None:
        connection = self.pick(index, lambda c: not c.body_read or c.disconnected)
        self.run(self._step(connection, "receive"))

    @precondition(lambda self: any(any(s.ended for s in c.sessions) for c in self.live()))
    @rule(index=st.integers(0, 1), which=st.integers(0, 3))
    def app_uses_a_session_that_ended(self, index: int, which: int) -> None:
        connection = self.pick(index, lambda c: any(s.ended for s in c.sessions))
        self.run(self._step(connection, "stale", which))

    @precondition(lambda self: any(not go.is_set() for c in self.connections for go in c.child_go))
    @rule(index=st.integers(0, 3))
    def a_child_task_writes(self, index: int) -> None:
        waiting = [
            (c, i) for c in self.connections for i, go in enumerate(c.child_go) if not go.is_set()
        ]
        connection, i = waiting[index % len(waiting)]

        async def go() -> None:
            connection.child_go[i].set()
            await asyncio.wait({connection.child_result[i]}, timeout=STEP_LIMIT)
            if not connection.child_result[i].done():
                raise AssertionError(f"a child task of {connection} hung")

        self.run(go())

    @precondition(lambda self: self.live())
    @rule(index=st.integers(0, 1), how=st.sampled_from(ENDINGS))
    def the_request_ends(self, index: int, how: str) -> None:
        """The app returns or raises, or the server cancels the request."""
        connection = self.pick(index, lambda c: True)
        if how == "cancelled":
            self.run(self._cancel(connection))
        elif how == "the app re-raises its last error":
            self.run(self._step(connection, "raise", connection.last_error))
        else:
            self.run(
                self._step(connection, "return" if how == "the app returns" else "raise", None)
            )

    async def _cancel(self, connection: Connection) -> None:
        connection.task.cancel()
        await connection.wait_for_the_end()
        connection.end()

    # -- what the client does --

    @precondition(lambda self: any(not c.disconnected for c in self.live()))
    @rule(index=st.integers(0, 1), send_raises=st.booleans())
    def client_disconnects(self, index: int, send_raises: bool) -> None:
        """``receive()`` says ``http.disconnect`` from now on; ``send()`` may raise ``OSError``.

        Either way the middleware decided the transaction before forwarding the status
        line, so the model's fates stand (uvicorn, hypercorn and granian drop the
        messages silently; ASGI 2.4 lets a server raise).
        """
        connection = self.pick(index, lambda c: not c.disconnected)
        connection.disconnected, connection.send_raises = True, send_raises

    # -- faults --

    @rule()
    def machine_takes_or_gives_back_a_pooled_connection(self) -> None:
        """Hold a connection of the pool (so that requests time out), or give it back."""
        self.run(self._hold() if self.held is None else self._release_held())

    async def _hold(self) -> None:
        with contextlib.suppress(Exception):  # the pool may have none free: fine
            self.held = await self.db.engine.connect()

    async def _release_held(self) -> None:
        held, self.held = self.held, None
        if held is not None:
            with contextlib.suppress(Exception):  # its backend may have been killed
                await held.close()

    @precondition(lambda self: self.postgresql)
    @rule()
    def database_kills_the_apps_backends(self) -> None:
        for connection in self.live():
            if connection.current is not None and connection.current.checked_out:
                connection.current.tx.killed = True
        self.kill_backends()

    def kill_backends(self) -> None:
        """Terminate every backend of the middleware's engine, and wait until they are gone."""
        self.target.admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s",
            (APP_NAME,),
        )

    # -- ended sessions --

    @precondition(lambda self: any(c.sessions for c in self.connections if c.ended))
    @rule(which=st.integers(0, 7))
    def a_session_of_an_ended_request_is_used(self, which: int) -> None:
        stale = [s for c in self.connections if c.ended for s in c.sessions]
        self.run(self.use_stale(stale[which % len(stale)], "the machine"))

    # -- invariants --

    @invariant()
    def the_promises_hold(self) -> None:
        if hasattr(self, "db"):
            self.run(self._check())

    async def _check(self) -> None:
        committed = await self.committed()
        for key, fate in self.fates.items():
            if fate == NEVER and key in committed:
                self.violation(2, f"{key} is committed; its request was told it failed")
            if fate == MUST_COMMIT and key not in committed:
                self.violation(1, f"{key} is not committed; its commit was reported done")
        for callback in self.callbacks:
            if callback.ran > 1:
                self.violation(1, f"on_commit {callback.name} ran {callback.ran} times")
            if callback.ran and callback.fate == NEVER:
                self.violation(2, f"on_commit {callback.name} ran; its transaction did not commit")
            if callback.fate == MUST_COMMIT and callback.wrote and not callback.ran:
                self.violation(1, f"on_commit {callback.name} never ran; its writes committed")
        orphans = await self.count_orphans()
        if orphans:
            self.violation(2, f"{orphans} orphan rows committed (their COMMIT had to fail)")
        self.check_pool_bound("after the step")
        if not self.live() and self.held is None:
            checked_out = self.db.pool_status().checked_out
            if checked_out:
                self.violation(3, f"{checked_out} connections checked out after every request")
            if open_transactions := await self.open_transactions():
                self.violation(3, f"transactions left open: {open_transactions}")
        if self.violations:
            raise Violations("\n".join(self.violations))

    async def count_orphans(self) -> int:
        async with self.audit.connect() as connection:
            return int((await connection.scalar(text("SELECT count(*) FROM children"))) or 0)

    async def open_transactions(self) -> list[Any]:
        if self.postgresql:
            return list(
                self.target.admin.execute(
                    "SELECT pid, state, query FROM pg_stat_activity WHERE datname = "
                    "current_database() AND application_name = %s AND state LIKE 'idle in%%'",
                    (APP_NAME,),
                )
            )
        async with self.audit.connect() as connection:  # a writer would hold the lock
            try:
                await connection.exec_driver_sql("BEGIN IMMEDIATE")
            except Exception as exc:
                return [f"SQLite is locked by another writer: {exc}"]
            await connection.exec_driver_sql("ROLLBACK")
        return []


#: PostgreSQL databases whose tables exist (SQLite files are made anew for each example).
_schemas: set[str] = set()


async def open_database_once(url: str, **options: Any) -> Database:
    """``open_database`` (its tables and the deferred foreign key) once per PostgreSQL database."""
    if url in _schemas:
        return Database(url, **options)
    if url.startswith("postgresql"):
        _schemas.add(url)
    return await open_database(url, **options)


# -- the tests ---------------------------------------------------------------------------


@contextlib.contextmanager
def targeting(target: Target) -> Iterator[None]:
    InvariantMachine.target = target
    try:
        yield
    finally:
        del InvariantMachine.target


@pytest.mark.timeout(MACHINE_TIMEOUT)
def test_the_promises_hold_in_every_explored_interleaving_on_sqlite(tmp_path: Path) -> None:
    with targeting(Target(f"sqlite+aiosqlite:///{tmp_path / 'machine.db'}")):
        run_state_machine_as_test(InvariantMachine, settings=machine_settings())


@pytest.mark.postgresql
@pytest.mark.timeout(MACHINE_TIMEOUT)
def test_the_promises_hold_in_every_explored_interleaving_on_postgresql(
    postgres_database: URL, pg_admin: Any
) -> None:
    url = postgres_database.set(drivername="postgresql+asyncpg")
    with targeting(Target(url.render_as_string(hide_password=False), pg_admin)):
        run_state_machine_as_test(InvariantMachine, settings=machine_settings())


# -- what the machine found: each violation, shrunk, as a readable test --------------------
#
# Each failed against the code of the time it was found, and passes since the fix.


@pytest.fixture
async def taken(postgresql_url: str) -> AsyncIterator[Database]:
    """A PostgreSQL ``Database`` whose ``items`` already hold the key ``TAKEN``."""
    db = await open_database(postgresql_url)
    try:
        async with db.scope():
            await add_key(db, TAKEN)
        yield db
    finally:
        await db.dispose()


@pytest.mark.anyio
async def test_a_statement_error_the_app_swallowed_on_postgresql_turns_its_2xx_into_a_500(
    taken: Database,
) -> None:
    db = taken

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        with contextlib.suppress(IntegrityError):  # the app handles a duplicate key
            await add_key(db, TAKEN)
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    # PostgreSQL aborted the transaction at the failed statement: its COMMIT can only
    # roll back, so the 201 would have been a lie (it was, before the fix).
    assert recorder.status == 500
    assert "written" not in await keys(db)


@pytest.mark.anyio
async def test_db_commit_after_a_swallowed_statement_error_on_postgresql_raises(
    taken: Database,
) -> None:
    db = taken

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "written")
        with contextlib.suppress(IntegrityError):
            await add_key(db, TAKEN)
        with pytest.raises(DBAPIError, match="current transaction is aborted"):
            await db.commit()  # it used to return normally, the write lost
        await plain_response(send, 500)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 500
    assert "written" not in await keys(db)
    assert checked_out(db) == 0


@pytest.mark.anyio
async def test_on_commit_never_runs_for_a_commit_postgresql_turns_into_a_rollback(
    taken: Database,
) -> None:
    db = taken
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 1"))
        db.on_commit(lambda: calls.append("callback"))
        with contextlib.suppress(IntegrityError):
            await add_key(db, TAKEN)
        with contextlib.suppress(DBAPIError):  # the commit fails: see above
            await db.commit()
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, db))

    assert calls == [], "on_commit ran; PostgreSQL rolled the transaction back"


@pytest.mark.anyio
async def test_a_failed_explicit_commit_on_sqlite_leaves_its_transaction_open_in_the_pool(
    tmp_path: Path,
) -> None:
    db = await open_database(
        f"sqlite+aiosqlite:///{tmp_path / 'test.db'}",
        pool_size=1,
        max_overflow=0,
        connect_args={"timeout": POOL_TIMEOUT},
    )
    try:

        async def fails_to_commit(scope: Scope, receive: Receive, send: Send) -> None:
            await orphan_child(db)  # the COMMIT fails on a deferred foreign key
            with contextlib.suppress(IntegrityError):
                await db.commit()
            await plain_response(send, 400)

        async def writes(scope: Scope, receive: Receive, send: Send) -> None:
            await add_key(db, "valid")
            await plain_response(send, 201)

        first = await call_http(SQLAlchemyMiddleware(fails_to_commit, db))
        assert first.status == 400
        assert checked_out(db) == 0

        second = await call_http(SQLAlchemyMiddleware(writes, db))

        assert (second.status, await keys(db)) == (201, {"valid"})
    finally:
        await db.dispose()


@pytest.mark.anyio
async def test_on_commit_registered_before_any_statement_survives_a_rollback(
    database_url: str,
) -> None:
    db = await open_database(database_url)
    calls: list[str] = []
    try:

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            db.on_commit(lambda: calls.append("rolled-back transaction's callback"))
            await db.rollback()
            await add_key(db, "later")
            await plain_response(send, 201)

        recorder = await call_http(SQLAlchemyMiddleware(app, db))

        assert recorder.status == 201
        assert calls == [], "the callback of a rolled-back transaction ran"
    finally:
        await db.dispose()
