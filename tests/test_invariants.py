"""The middleware's promises as invariants, explored by a Hypothesis state machine.

Each example drives one to three HTTP connections through ``SQLAlchemyMiddleware(app, db)``
in-process, against a real database (an SQLite file; PostgreSQL through asyncpg).  The
app is a script: it runs as a task and waits on a queue for its next instruction, so the
machine decides, step by step, what the app does (read, write, commit, release, send the
status line, send body chunks, raise, return...), what the client does (disconnect), what
the server does (cancel the request's task, or its anyio cancel scope) and which faults
strike (a COMMIT that fails on a deferred foreign key, a pool with no free connection, a
backend killed under its session).  Nothing sleeps to synchronise: every step waits for
the app to report back.

The same machine runs for a ``SyncDatabase`` (an SQLite file; PostgreSQL through psycopg
used synchronously): every database action of the app is ``def`` code run in a worker
thread, as frameworks run it (``anyio.to_thread.run_sync``, which copies the context).
Threads add what tasks cannot do (``ThreadedInvariantMachine``, ``_invariants_sync``):
an app thread the machine pauses inside a statement or between two, while it cancels
the request (through its scope, the cancellation waits for the thread; through its task,
the ending must cancel the thread's statement, and a thread paused between statements
goes on after its request ended), or while a second thread uses the same session.

The model follows every write (a unique ``items.key`` per action) to its *fate*: it must
be committed (the server received a 2xx for its transaction, ``db.commit()`` or
``db.release()`` returned, the app returned normally after its whole response went
out), or it
must never be (a non-2xx, a rollback, a failed commit, an exception, a cancellation), or
nothing can be said (the app caught a failure of its own write).  After every step:

1. **A 2xx status line is true.**  When the server receives a 2xx, every write its
   transaction owes is already committed (read on another connection at that moment),
   and its ``on_commit`` callbacks have run; a transaction whose COMMIT must fail is never
   answered 2xx; when ``send()`` of a 2xx raised ``CommitFailedError`` the server got 500,
   or 503 with ``Retry-After`` if the COMMIT's connection was lost (a killed backend).
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
6. **One thread at a time** (``SyncDatabase``).  While an app thread is inside a
   statement, a second thread's call on the same session (a read, a write,
   ``db.commit()``, ``db.rollback()``) raises ``ConcurrentSessionUseError`` and changes
   nothing (what the other invariants then see).

``make test`` runs a bounded, derandomized profile (with more examples for the threaded
machine, whose interleavings take more steps: a pause, the machine's move, the thread
going on); ``ASGI_SQLA_HYPOTHESIS=long`` (set by ``make soak``) explores both much
further.  Violations the machine found are kept at the end of this module as ordinary
tests, each naming the promise it broke; each failed before its fix:

* PostgreSQL, a statement error the app caught, then a commit: the server had aborted
  the transaction and answered COMMIT with a silent ROLLBACK, so a 2xx (or a returning
  ``db.commit()``) claimed lost writes, and ``on_commit`` callbacks ran;
* SQLite, a ``db.commit()`` whose COMMIT failed returned its connection to the pool
  with the failed transaction (and the write lock) still open;
* an ``on_commit`` callback registered before any statement survived ``db.rollback()``;
* ``SyncDatabase`` (and ``Database`` alike): a thread that outlived its cancelled
  request called ``db.commit()`` (or ``db.release()``) after the middleware had rolled
  its write back, and the call returned as if it had committed the write;
* ``SyncDatabase`` (and ``Database`` alike): a ``db.commit()`` refused with
  ``ConcurrentSessionUseError`` (another thread was inside a statement) dropped that
  transaction's ``on_commit`` callbacks, so it then committed without running them;
* ``SyncDatabase``, SQLite: as for ``Database`` above, a ``db.commit()`` whose COMMIT
  failed returned its connection to the pool with the failed transaction (its rows, and
  the write lock) still open: the next request inherited both.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import itertools
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from _invariants_sync import Pause, PostgresWaits, SQLiteWaits, WaitingStatements
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
from sqlalchemy import URL, event, make_url, select, text
from sqlalchemy import Connection as SyncConnection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from asgi_sqla import (
    CommitFailedError,
    ConcurrentSessionUseError,
    Database,
    RollbackOnlyError,
    SessionEndedError,
    SQLAlchemyMiddleware,
    SyncDatabase,
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
    open_sync_database,
    orphan_child,
    plain_response,
    sync_checked_out,
    sync_keys,
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


#: Examples of the bounded profile for the threaded machine (SyncDatabase): its
#: interleavings need a pause, then the machine's move, then the thread going on.
THREADED_EXAMPLES = 150


def machine_settings(*, threaded: bool = False) -> settings:
    name = os.environ.get(PROFILE_VARIABLE, "bounded")
    profile = settings.get_profile(f"asgi_sqla-{name}")
    if threaded and name == "bounded":
        return settings(profile, max_examples=THREADED_EXAMPLES)
    return profile


#: pytest-timeout for one run of the machine: none for the long profile.  The threaded
#: machine's failing runs shrink slowly (each replay starts threads, and waits for pool
#: and lock timeouts): its limit leaves time to report a shrunk example.
MACHINE_TIMEOUT = 0 if os.environ.get(PROFILE_VARIABLE) == "long" else 180
THREADED_MACHINE_TIMEOUT = 0 if os.environ.get(PROFILE_VARIABLE) == "long" else 600


#: ``application_name`` of the middleware's PostgreSQL connections: what a kill targets.
APP_NAME = "asgi_sqla_machine"
#: A key committed before every example: inserting it again is a statement that fails.
TAKEN = "taken"
#: Seconds a statement waits for a pooled connection (or SQLite for its lock).
POOL_TIMEOUT = 0.1
#: Seconds between two looks at ``pg_stat_activity`` while killed backends go away.
KILL_POLL_INTERVAL = 0.002
#: Seconds one step may take before the machine calls it a hang.
STEP_LIMIT = 20.0
STATUSES = (200, 201, 204, 400, 404, 422, 500, 503)


def answers_a_failed_commit(
    start: Message, error: CommitFailedError, *, retry_is_safe: bool
) -> bool:
    """Whether ``start`` tells the truth of a commit that failed: a 500, or a 503 with
    ``Retry-After`` when the COMMIT's connection was lost (the database unavailable) and
    no earlier commit of the request wrote anything (so that a retry writes nothing twice)."""
    if start["status"] == 500:
        return True
    cause = error.__cause__
    lost = isinstance(cause, DBAPIError) and cause.connection_invalidated
    retry_after = any(name.lower() == b"retry-after" for name, _ in start["headers"])
    return start["status"] == 503 and lost and retry_after and retry_is_safe


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
ENDINGS = ("the app returns", "the app raises", "the app re-raises its last error")
#: How the server cancels a request: ``task.cancel()`` (as uvicorn at shutdown or an
#: asyncio timeout do), or an anyio cancel scope around it (as hypercorn's task groups do).
CANCELLATIONS = ("through its task", "through its cancel scope")
#: Where an app thread pauses (SyncDatabase), and what it does once it goes on:
#: nothing more, another write, or ``db.commit()``.
PAUSES = tuple(
    f"{where}, then {then}"
    for where in ("inside a statement", "between statements")
    for then in ("nothing", "write", "commit")
)


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
        self.committed_writes = False  # db.commit() or db.release() committed writes
        #: SyncDatabase: the app's thread the machine has paused, if any (it may outlive
        #: the request: a cancellation does not stop a thread).
        self.paused: Pause | None = None
        #: The server's cancel scope around the request (see ``the_server_cancels_the_request``).
        self.scope = anyio.CancelScope()
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self.serve(), name=f"request-{number}"
        )

    def __repr__(self) -> str:
        return f"request {self.number}"

    @property
    def ready(self) -> bool:
        """The app waits for its next instruction (it is not awaiting a paused thread)."""
        return not self.ended and self.paused is None

    async def serve(self) -> None:
        with self.scope:
            await SQLAlchemyMiddleware(self.app, self.db)(
                http_scope(f"/c{self.number}", method="POST"), self.receive, self.send
            )

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

    def give(self, name: str, *args: Any) -> asyncio.Future[str]:
        """Give the app its next instruction; the future says what came of it."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.instructions.put_nowait(Instruction(name, args, done))
        return done

    async def step(self, name: str, *args: Any) -> str:
        """Have the app carry out one instruction; return what came of it."""
        return await self.result_of(self.give(name, *args), name, args)

    async def result_of(self, done: asyncio.Future[str], name: str, args: Any = ()) -> str:
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
        elif self.scope.cancelled_caught:
            self.outcome = "cancelled by its scope"
        else:
            self.outcome = "returned"

    def session(self) -> Any:
        """``db.session``, followed by the model (in the thread where the app's code runs)."""
        ref = self.db.session
        if self.ended:  # a thread of a cancelled request, going on
            self.machine.violation(4, f"db.session opened a session after {self} ended")
        current = self.current
        if current is None or current.ref is not ref:
            if current is not None:
                self.machine.violation(4, f"{self}: db.session changed without an end")
            current = self.current = Session(ref)
            self.sessions.append(current)
        return ref

    def statement_begins(self) -> Session:
        """Read ``db.session``: its next statement may check out a connection, even if it fails."""
        self.session()
        model = self.current
        assert model is not None
        model.checked_out = model.tx.began = True
        return model

    def insert(self, key: str) -> Any:
        """``INSERT`` ``key`` through ``db.session``: a coroutine (Database), or done (sync)."""
        return self.db.session.execute(items.insert().values(key=key))

    async def app_code(self, code: Callable[[], Any]) -> Any:
        """Run ``code`` as the app would (see ``InvariantMachine.app_code``)."""
        return await self.machine.app_code(code)

    async def do_read(self) -> str:
        await self.app_code(self.statement_begins)
        value = await self.app_code(lambda: self.db.session.scalar(select(items.c.id).limit(1)))
        return f"read {value}"

    async def do_write(self) -> str:
        key = self.machine.new_key(self)
        model = await self.app_code(self.statement_begins)
        await self.app_code(lambda: self.insert(key))
        model.tx.writes.append(key)
        return f"wrote {key}"

    async def do_write_orphan(self) -> str:
        model = await self.app_code(self.statement_begins)
        child = next(self.machine.counter)
        await self.app_code(
            lambda: self.db.session.execute(
                text("INSERT INTO children (id, parent_id) VALUES (:id, 999)"), {"id": child}
            )
        )
        model.tx.poisoned = True
        return f"orphan {child}"

    async def do_fail_statement(self) -> str:
        model = await self.app_code(self.statement_begins)
        try:
            await self.app_code(lambda: self.insert(TAKEN))
        except IntegrityError:
            if self.machine.postgresql:
                model.tx.poisoned = True
            raise
        raise AssertionError("inserting a taken key succeeded")

    async def do_commit(self) -> str:
        model = self.current
        pending = list(model.tx.writes) if model is not None else []
        try:
            await self.app_code(self.db.commit)
        except Exception as exc:
            self.commit_failed(model, exc)
            raise
        self.commit_returned(model, pending)
        return "committed"

    def commit_failed(self, model: Session | None, exc: Exception) -> None:
        if model is not None and not isinstance(exc, RollbackOnlyError):
            self.machine.decide(model.tx, NEVER)
            model.tx = Tx()

    def commit_returned(self, model: Session | None, pending: list[str]) -> None:
        """``db.commit()`` returned: ``pending``, written before it, must be committed."""
        if model is None:
            return
        if model.rollback_only:
            self.machine.violation(2, f"{self}: db.commit() of a rollback-only session")
        if model.tx.poisoned:
            self.machine.violation(1, f"{self}: db.commit() of a doomed transaction returned")
        self.committed_writes = self.committed_writes or bool(pending)
        for key in pending:  # what the app was told, even if an ending decided otherwise
            self.machine.fates[key] = MUST_COMMIT
        self.machine.decide(model.tx, MUST_COMMIT)
        model.tx = Tx()

    async def do_rollback(self) -> str:
        model = self.current
        try:
            await self.app_code(self.db.rollback)
        finally:
            if model is not None:
                self.machine.decide(model.tx, NEVER)
                model.tx = Tx()
        return "rolled back"

    async def do_release(self, how: str) -> str:
        commit = how == "commit"
        model, self.current = self.current, None
        try:
            await self.app_code(functools.partial(self.db.release, commit=commit))
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
            self.committed_writes = self.committed_writes or (commits and bool(tx.writes))
            self.machine.decide(tx, MUST_COMMIT if commits else NEVER)
        return "released"

    async def do_rollback_only(self) -> str:
        def mark() -> None:
            self.db.set_rollback_only()
            self.session()

        await self.app_code(mark)
        assert self.current is not None
        self.current.rollback_only = True
        return "marked rollback-only"

    async def do_on_commit(self) -> str:
        return f"registered {await self.app_code(self.on_commit_here)}"

    def on_commit_here(self) -> str:
        """Register an ``on_commit`` callback the model follows, in the calling thread."""
        callback = Callback(f"callback-{next(self.machine.counter)}")

        def ran() -> None:
            callback.ran += 1

        self.db.on_commit(ran)
        self.session()
        assert self.current is not None
        self.current.tx.callbacks.append(callback)
        self.machine.callbacks.append(callback)
        return callback.name

    def write_here(self) -> str:
        """``do_write`` in the calling thread, for a ``SyncDatabase`` (a paused thread's work)."""
        key = self.machine.new_key(self)
        model = self.statement_begins()
        self.insert(key)
        model.tx.writes.append(key)
        return key

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
        except CommitFailedError as exc:
            starts = [m for m in self.forwarded if m["type"] == "http.response.start"]
            if len(starts) != 1 or not answers_a_failed_commit(
                starts[0], exc, retry_is_safe=not self.committed_writes
            ):
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

    # -- a thread the machine pauses (SyncDatabase) --

    async def do_pause(self, pause: Pause) -> str:
        """Run ``pause``'s work in a worker thread, as a framework runs a ``def`` endpoint."""
        pause.context = contextvars.copy_context()  # for a second thread, later
        result: str = await anyio.to_thread.run_sync(self.paused_work, pause)
        return result

    def paused_work(self, pause: Pause) -> str:
        """In the app's thread: pause where the machine said, then go on as it said."""
        try:
            result = self._pause_then_go_on(pause)
        except BaseException as exc:
            pause.finish(f"{type(exc).__name__}: {str(exc)[:80]}")
            raise
        pause.finish(result)
        return result

    def _pause_then_go_on(self, pause: Pause) -> str:
        # A `def` endpoint's work: write, have a mail sent once that commits, then wait
        # for something (a long query, another service) before going on.
        self.write_here()
        self.on_commit_here()
        model = pause.model = self.current
        assert model is not None
        pause.pending = list(model.tx.writes)
        if pause.inside:
            try:
                self.db.session.execute(pause.waits.statement(pause.number))
            except DBAPIError:
                if self.machine.postgresql:
                    model.tx.poisoned = True  # a failed statement aborts the transaction
                raise
        else:
            pause.signal_entered()
            if not pause.resume.wait(STEP_LIMIT):
                raise AssertionError(f"{self}'s thread was never let go on")
        if pause.then == "write":
            # Once the request has ended, db.session raises SessionEndedError.
            return f"went on and wrote {self.write_here()}"
        if pause.then == "commit":
            try:
                self.db.commit()
            except Exception as exc:
                self.commit_failed(pause.model, exc)
                raise
            self.commit_returned(pause.model, pause.pending)
            return "went on and committed"
        return "went on"

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


#: The async driver the machine's audit engine uses to read a SyncDatabase's database.
AUDIT_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


@dataclass
class Target:
    """The database one run of the machine uses (set by the test before it runs).

    A URL with a synchronous driver (``sqlite://``, ``postgresql+psycopg://``) makes the
    machine drive a ``SyncDatabase``, whose app code runs in worker threads.
    """

    url: str
    admin: Any = None  # PostgreSQL: a sync autocommit psycopg connection

    @property
    def sync(self) -> bool:
        return not make_url(self.url).get_dialect().is_async

    @property
    def audit_url(self) -> str:
        """The same database through an async driver, for the machine's own reads."""
        url = make_url(self.url)
        if not self.sync:
            return self.url
        audit = url.set(drivername=AUDIT_DRIVERS[url.get_backend_name()])
        return audit.render_as_string(hide_password=False)


class InvariantMachine(RuleBasedStateMachine):
    target: Target  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.postgresql = self.target.url.startswith("postgresql")
        self.sync = self.target.sync
        self.counter = itertools.count(1)
        self.connections: list[Connection] = []
        self.callbacks: list[Callback] = []
        self.fates: dict[str, str] = {}  # key -> MUST_COMMIT | NEVER
        self.violations: list[str] = []
        self.held: AsyncConnection | SyncConnection | None = None
        self.db: Database | SyncDatabase
        self.audit: AsyncEngine
        #: SyncDatabase: every app thread the machine paused, by number.
        self.pauses: dict[int, Pause] = {}
        self.waits: WaitingStatements
        self.pool_size: int

    # -- plumbing --

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def app_code(self, code: Callable[[], Any]) -> Any:
        """Run ``code``, the app's own, where a framework would run it.

        A ``Database``'s app is ``async def`` code: ``code`` runs on the event loop and
        what it returns is awaited.  A ``SyncDatabase``'s app is ``def`` code, which
        frameworks run in a worker thread (``anyio.to_thread.run_sync``, which copies
        the context, so that ``db.session`` finds the request there).
        """
        if self.sync:
            return await anyio.to_thread.run_sync(code)
        result = code()
        return await result if inspect.isawaitable(result) else result

    def checked_out(self) -> int:
        """Connections checked out of the pool (a ``QueuePool``, which counts them)."""
        db = self.db
        return sync_checked_out(db) if isinstance(db, SyncDatabase) else checked_out(db)

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
        before = self.checked_out()
        try:
            await self.app_code(lambda: session.ref.execute(text("SELECT 1")))
        except SessionEndedError:
            result = "SessionEndedError"
        else:
            self.violation(4, f"{who} used an ended session")
            result = "the ended session worked"
        if self.checked_out() > before:
            self.violation(4, f"{who} checked out a connection through an ended session")
        return result

    def live(self) -> list[Connection]:
        return [c for c in self.connections if not c.ended]

    def ready(self) -> list[Connection]:
        return [c for c in self.connections if c.ready]

    def using_connections(self) -> list[Connection]:
        """The live requests whose session may hold a connection."""
        return [c for c in self.live() if c.current is not None and c.current.checked_out]

    def may_hold(self) -> int:
        held = 1 if self.held is not None else 0
        return held + len(self.using_connections())

    def check_pool_bound(self, when: str) -> None:
        checked_out = self.checked_out()
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
        self.pool_size = pool_size
        options: dict[str, Any] = {
            "pool_size": pool_size,
            "max_overflow": 0,
            "pool_timeout": POOL_TIMEOUT,
        }
        if self.postgresql:
            options["connect_args"] = (
                {"application_name": APP_NAME}  # psycopg
                if self.sync
                else {"server_settings": {"application_name": APP_NAME}}  # asyncpg
            )
            audit_options: dict[str, Any] = {}
            self.kill_backends()  # what an earlier, failed example may have left
            if url in _schemas:
                self.target.admin.execute("TRUNCATE items, children, parents")
        else:
            # A writer waits this long for SQLite's lock, then gets "database is locked".
            options["connect_args"] = {"timeout": POOL_TIMEOUT}
            audit_options = {"connect_args": {"timeout": 0.5}}
        self.audit = create_async_engine(self.target.audit_url, **audit_options)
        if self.sync:
            db = self.db = await asyncio.to_thread(open_sync_database_once, url, **options)
            if self.postgresql:
                self.waits = PostgresWaits(self.target.admin, APP_NAME)
            else:
                self.waits = SQLiteWaits(db.engine, self.pauses)

            def taken() -> None:
                with db.scope() as session:
                    session.execute(items.insert().values(key=TAKEN))

            await asyncio.to_thread(taken)  # a scope is refused on the event loop
        else:
            self.db = await open_database_once(url, **options)
            async with self.db.scope():
                await add_key(self.db, TAKEN)
        await self._arrive()  # every example has at least one request

    def teardown(self) -> None:
        try:
            if hasattr(self, "db"):
                self.run(self._teardown())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    async def _teardown(self) -> None:
        try:
            for connection in self.live():
                await self._cancel(connection)
            for connection in self.connections:
                if connection.paused is not None:  # a thread its cancelled request left
                    await self._go_on(connection)
                for child in connection.children:
                    child.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*connection.children, return_exceptions=True)
            await self._release_held()
            await self._check()
        finally:
            if self.pauses:  # after a failure: no thread may outlive the example
                for pause in self.pauses.values():
                    pause.resume.set()
                self.waits.let_all_go()
                finished = [pause.finished for pause in self.pauses.values()]
                await asyncio.wait(finished, timeout=STEP_LIMIT)
            db = self.db
            if isinstance(db, SyncDatabase):
                await asyncio.to_thread(db.dispose)
            else:
                await db.dispose()
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

    # The app takes an instruction only while it waits for one (``Connection.ready``): not
    # while it awaits a thread the machine paused.

    @precondition(lambda self: self.ready())
    @rule(index=st.integers(0, 1), action=st.sampled_from(APP_ACTIONS))
    def app_does(self, index: int, action: str) -> None:
        name, *args = action.split()
        self.run(self._step(self.pick(index, lambda c: c.ready), name, *args))

    @precondition(lambda self: any(not c.app_sent_start for c in self.ready()))
    @rule(index=st.integers(0, 1), status=st.sampled_from(STATUSES))
    def app_sends_the_status_line(self, index: int, status: int) -> None:
        connection = self.pick(index, lambda c: c.ready and not c.app_sent_start)
        self.run(self._step(connection, "start", status))

    @precondition(
        lambda self: any(c.app_sent_start and not c.app_sent_final_body for c in self.ready())
    )
    @rule(index=st.integers(0, 1), more_body=st.booleans())
    def app_sends_a_body_chunk(self, index: int, more_body: bool) -> None:
        connection = self.pick(
            index, lambda c: c.ready and c.app_sent_start and not c.app_sent_final_body
        )
        self.run(self._step(connection, "body", more_body))

    @precondition(lambda self: any(not c.body_read or c.disconnected for c in self.ready()))
    @rule(index=st.integers(0, 1))
    def app_receives(self, index: int) -> None:
        connection = self.pick(index, lambda c: c.ready and (not c.body_read or c.disconnected))
        self.run(self._step(connection, "receive"))

    @precondition(lambda self: any(any(s.ended for s in c.sessions) for c in self.ready()))
    @rule(index=st.integers(0, 1), which=st.integers(0, 3))
    def app_uses_a_session_that_ended(self, index: int, which: int) -> None:
        connection = self.pick(index, lambda c: c.ready and any(s.ended for s in c.sessions))
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
    @rule(index=st.integers(0, 1), how=st.sampled_from(CANCELLATIONS))
    def the_server_cancels_the_request(self, index: int, how: str) -> None:
        """The server cancels the request, whatever its app is doing (see ``_cancel``)."""
        connection = self.pick(index, lambda c: True)
        self.run(self._cancel(connection, by_its_scope=how == "through its cancel scope"))

    @precondition(lambda self: self.ready())
    @rule(index=st.integers(0, 1), how=st.sampled_from(ENDINGS))
    def the_app_ends_the_request(self, index: int, how: str) -> None:
        """The app returns or raises."""
        connection = self.pick(index, lambda c: c.ready)
        if how == "the app re-raises its last error":
            self.run(self._step(connection, "raise", connection.last_error))
        else:
            self.run(
                self._step(connection, "return" if how == "the app returns" else "raise", None)
            )

    async def _cancel(self, connection: Connection, *, by_its_scope: bool = False) -> None:
        """Cancel the request: its task (as uvicorn does), or its anyio cancel scope.

        An app thread is not cancelled.  Inside a call on the session, it holds the
        session's lock, and the middleware's ending waits for it.  Through a scope, the
        app's ``await`` of the thread is shielded (``anyio.to_thread.run_sync``): the
        cancellation waits for the thread, which the machine lets go on.  Through the
        task, the ending must cancel the thread's statement (the ending rolls back)
        instead of waiting for it; a thread paused between statements goes on later.
        """
        pause = connection.paused
        if by_its_scope:
            connection.scope.cancel()
            if pause is not None:
                await self._go_on(connection)
        else:
            connection.task.cancel()
            if pause is not None and pause.inside:
                await asyncio.wait({connection.task}, timeout=STEP_LIMIT)
                if not connection.task.done():
                    self.violation(
                        3,
                        f"cancelled {connection} waited for its thread's statement "
                        "instead of cancelling it",
                    )
                await self._go_on(connection)
        if not connection.ended:
            await connection.wait_for_the_end()
            connection.end()

    async def _go_on(self, connection: Connection) -> None:
        """Let ``connection``'s paused thread go on; wait for it, and for its app if live."""
        pause = connection.paused
        assert pause is not None
        pause.let_go()
        await asyncio.wait({pause.finished}, timeout=STEP_LIMIT)
        if not pause.finished.done():
            raise AssertionError(f"the paused thread of {connection} did not finish")
        connection.paused = None
        if not connection.ended:
            assert pause.done is not None
            await connection.result_of(pause.done, "pause")
            if connection.task.done():
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
        db = self.db
        if self.checked_out() >= self.pool_size:
            return  # nothing is free: the attempt would only wait for the pool timeout
        with contextlib.suppress(Exception):  # a fault of the database's: fine
            if isinstance(db, SyncDatabase):
                self.held = await asyncio.to_thread(db.engine.connect)
            else:
                self.held = await db.engine.connect()

    async def _release_held(self) -> None:
        held, self.held = self.held, None
        with contextlib.suppress(Exception):  # its backend may have been killed
            if isinstance(held, SyncConnection):
                await asyncio.to_thread(held.close)
            elif held is not None:
                await held.close()

    @precondition(lambda self: self.postgresql and self.using_connections())
    @rule()
    def database_kills_the_apps_backends(self) -> None:
        """PostgreSQL terminates the app's backends while a request may be using one.

        (Idle pooled connections die with them.)
        """
        for connection in self.using_connections():
            assert connection.current is not None
            connection.current.tx.killed = True
        self.kill_backends()
        self.run(self._after_the_kill())

    async def _after_the_kill(self) -> None:
        # A thread paused inside a statement gets its error now: it is paused no more.
        for connection in self.live():
            if connection.paused is not None and connection.paused.inside:
                await self._go_on(connection)

    def kill_backends(self) -> None:
        """Terminate every backend of the middleware's engine, and wait until they are gone.

        (``pg_terminate_backend(pid, timeout)`` would wait too, but it looks only every
        100 ms; the server is another process, polled here with a deadline.)
        """
        admin = self.target.admin
        killed = [
            pid
            for (pid,) in admin.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s",
                (APP_NAME,),
            )
        ]
        # A statement of its own: in one WHERE clause, nothing says the filter runs first.
        admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (killed,))
        deadline = time.monotonic() + STEP_LIMIT
        while (
            killed
            and admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (killed,)
            ).fetchone()
        ):
            if time.monotonic() > deadline:
                raise AssertionError(f"backends {killed} outlived pg_terminate_backend")
            time.sleep(KILL_POLL_INTERVAL)  # polling the server, bounded by the deadline

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
        committed, orphans = await self.committed_and_orphans()
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
        if orphans:
            self.violation(2, f"{orphans} orphan rows committed (their COMMIT had to fail)")
        self.check_pool_bound("after the step")
        if not self.live() and self.held is None:
            checked_out = self.checked_out()
            if checked_out:
                self.violation(3, f"{checked_out} connections checked out after every request")
            if open_transactions := await self.open_transactions():
                self.violation(3, f"transactions left open: {open_transactions}")
        if self.violations:
            raise Violations("\n".join(self.violations))

    async def committed_and_orphans(self) -> tuple[set[str], int]:
        """The committed keys, and how many orphan rows are committed: one connection."""
        async with self.audit.connect() as connection:
            committed = set((await connection.execute(select(items.c.key))).scalars())
            orphans = await connection.scalar(text("SELECT count(*) FROM children"))
        return committed, int(orphans or 0)

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


class ThreadedInvariantMachine(InvariantMachine):
    """The machine for a ``SyncDatabase``: its app runs ``def`` code in worker threads.

    Every rule of :class:`InvariantMachine` applies (each database action of the app
    runs in a thread of its own, as ``app_code`` says), and these add what only threads
    can do: an app thread that is still at work while the machine acts.  The machine
    pauses a thread inside a statement or between two (``_invariants_sync``), then
    lets it go on, cancels the request meanwhile, or has a second thread use the
    session meanwhile.  A thread that outlives its cancelled request goes on too, and
    must find that request's session ended.
    """

    @precondition(lambda self: any(self.may_pause(c) for c in self.connections))
    @rule(index=st.integers(0, 1), how=st.sampled_from(PAUSES))
    def the_apps_thread_pauses(self, index: int, how: str) -> None:
        """The app's thread writes (and registers an on_commit callback), then stops."""
        where, then = how.split(", then ")
        connection = self.pick(index, self.may_pause)
        self.run(self._pause(connection, where == "inside a statement", then))

    def may_pause(self, connection: Connection) -> bool:
        """Whether ``connection``'s app can start a thread that gets as far as its pause.

        Its first statement needs a connection: with none free, it would only wait for
        the pool timeout, as ``app_does`` explores already.
        """
        holds = connection.current is not None and connection.current.checked_out
        return connection.ready and (holds or self.checked_out() < self.pool_size)

    async def _pause(self, connection: Connection, inside: bool, then: str) -> None:
        pause = Pause.new(next(self.counter), inside, then, self.waits)
        self.pauses[pause.number] = pause
        if inside:
            self.waits.hold(pause.number)
        connection.paused = pause
        pause.done = connection.give("pause", pause)
        await pause.until_paused(STEP_LIMIT)
        if pause.finished.done():  # it never paused: one of its statements failed first
            await self._go_on(connection)

    @precondition(lambda self: any(c.paused is not None for c in self.connections))
    @rule(index=st.integers(0, 1))
    def the_paused_thread_goes_on(self, index: int) -> None:
        """The machine lets a paused thread go on (its request may have ended meanwhile)."""
        paused = [c for c in self.connections if c.paused is not None]
        self.run(self._go_on(paused[index % len(paused)]))

    @precondition(lambda self: any(c.paused is not None and c.paused.inside for c in self.live()))
    @rule(index=st.integers(0, 1))
    def a_second_thread_uses_the_session_meanwhile(self, index: int) -> None:
        """While one thread is inside a statement, another tries each call on its session.

        Each must raise ``ConcurrentSessionUseError`` before anything happens, and
        change nothing: the invariants that follow see whether it did.
        """
        connection = self.pick(index, lambda c: c.paused is not None and c.paused.inside)
        self.run(self._second_thread(connection))

    async def _second_thread(self, connection: Connection) -> None:
        pause = connection.paused
        assert pause is not None
        assert pause.context is not None
        key = self.new_key(connection)
        self.fates[key] = NEVER  # refused: it must never be committed
        calls: dict[str, Callable[[], object]] = {
            "read": lambda: self.db.session.scalar(select(items.c.id).limit(1)),
            "write": lambda: connection.insert(key),
            "db.commit()": self.db.commit,
            "db.rollback()": self.db.rollback,
        }

        def each_call() -> dict[str, Exception | None]:
            errors: dict[str, Exception | None] = {}
            for call, code in calls.items():
                try:
                    code()
                except Exception as exc:
                    errors[call] = exc
                else:
                    errors[call] = None
            return errors

        errors = await anyio.to_thread.run_sync(pause.context.run, each_call)
        for call, error in errors.items():
            if error is None:
                self.violation(
                    6, f"a second thread's {call} ran while {connection}'s thread was inside one"
                )
            elif not isinstance(error, ConcurrentSessionUseError):
                self.violation(
                    6,
                    f"a second thread's {call} on {connection}'s session raised {error!r}, "
                    "not ConcurrentSessionUseError",
                )


#: PostgreSQL databases whose tables exist (SQLite files are made anew for each example).
_schemas: set[str] = set()


async def open_database_once(url: str, **options: Any) -> Database:
    """``open_database`` (its tables and the deferred foreign key) once per PostgreSQL database."""
    if url in _schemas:
        return Database(url, **options)
    if url.startswith("postgresql"):
        _schemas.add(url)
    return await open_database(url, **options)


def open_sync_database_once(url: str, **options: Any) -> SyncDatabase:
    """``open_sync_database``, once per PostgreSQL database, as ``open_database_once``."""
    if url in _schemas:
        return SyncDatabase(url, **options)
    if url.startswith("postgresql"):
        _schemas.add(url)
    return open_sync_database(url, **options)


# -- the tests ---------------------------------------------------------------------------


@contextlib.contextmanager
def targeting(target: Target) -> Iterator[None]:
    InvariantMachine.target = target
    try:
        yield
    finally:
        del InvariantMachine.target


def run_machine(target: Target) -> None:
    """Run the machine for ``target``'s kind of database: async, or sync in threads."""
    machine = ThreadedInvariantMachine if target.sync else InvariantMachine
    with targeting(target):
        run_state_machine_as_test(machine, settings=machine_settings(threaded=target.sync))


#: The two kinds of database, by the driver each test gives them.
FLAVOURS = pytest.mark.parametrize(
    "sync",
    [
        pytest.param(False, id="Database", marks=pytest.mark.timeout(MACHINE_TIMEOUT)),
        pytest.param(True, id="SyncDatabase", marks=pytest.mark.timeout(THREADED_MACHINE_TIMEOUT)),
    ],
)


@FLAVOURS
def test_the_promises_hold_in_every_explored_interleaving_on_sqlite(
    tmp_path: Path, sync: bool
) -> None:
    driver = "sqlite" if sync else "sqlite+aiosqlite"
    run_machine(Target(f"{driver}:///{tmp_path / 'machine.db'}"))


@FLAVOURS
@pytest.mark.postgresql
def test_the_promises_hold_in_every_explored_interleaving_on_postgresql(
    postgres_database: URL, pg_admin: Any, sync: bool
) -> None:
    # psycopg 3 used synchronously for the SyncDatabase.
    url = postgres_database.set(drivername="postgresql+psycopg" if sync else "postgresql+asyncpg")
    run_machine(Target(url.render_as_string(hide_password=False), pg_admin))


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


# -- what the machine found for SyncDatabase (and what the same code does for Database) ----


@pytest.mark.anyio
@pytest.mark.parametrize("call", ["commit", "release"])
async def test_a_thread_that_outlived_its_cancelled_request_cannot_report_a_commit(
    sync_db: SyncDatabase, call: str
) -> None:
    # A `def` endpoint writes, then waits for something else; a deadline cancels the
    # request meanwhile (task.cancel(): its thread runs on), and the middleware rolls
    # the write back.  When the thread goes on, its db.commit() used to return as if it
    # had committed the write.
    db = sync_db
    paused, go_on, finished = threading.Event(), threading.Event(), threading.Event()
    outcome: list[str] = []

    def endpoint() -> None:
        try:
            db.session.execute(items.insert().values(key="written"))
            paused.set()
            go_on.wait(STEP_LIMIT)
            try:
                db.commit() if call == "commit" else db.release()
            except SessionEndedError:
                outcome.append("SessionEndedError")
            else:
                outcome.append("returned")
        finally:
            finished.set()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(endpoint)
        await plain_response(send, 201)

    request = asyncio.ensure_future(call_http(SQLAlchemyMiddleware(app, db)))
    assert await anyio.to_thread.run_sync(paused.wait, STEP_LIMIT)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    go_on.set()
    assert await anyio.to_thread.run_sync(finished.wait, STEP_LIMIT)

    assert outcome == ["SessionEndedError"], "db.commit() claimed a write that was rolled back"
    assert sync_keys(db) == set()
    assert sync_checked_out(db) == 0


@pytest.mark.anyio
async def test_a_task_that_outlived_its_request_cannot_report_a_commit(database_url: str) -> None:
    # The same for a Database: a child task the app did not wait for writes in the
    # request's session; the app fails, the write is rolled back, and the task's
    # db.commit() used to return.
    db = await open_database(database_url)
    written, go_on = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []

    async def child() -> None:
        await add_key(db, "written")
        written.set()
        await go_on.wait()
        try:
            await db.commit()
        except SessionEndedError:
            outcome.append("SessionEndedError")
        else:
            outcome.append("returned")

    children: list[asyncio.Task[None]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        children.append(asyncio.create_task(child()))
        await written.wait()
        raise RuntimeError("the app fails")

    try:
        with pytest.raises(RuntimeError, match="the app fails"):
            await call_http(SQLAlchemyMiddleware(app, db))
        go_on.set()
        await children[0]

        assert outcome == ["SessionEndedError"], "db.commit() claimed a rolled-back write"
        assert "written" not in await keys(db)
    finally:
        await db.dispose()


@pytest.mark.anyio
async def test_a_commit_refused_to_a_second_thread_keeps_the_on_commit_callbacks(
    sync_db: SyncDatabase,
) -> None:
    # One thread writes, registers an on_commit callback and is inside a statement
    # when a second thread calls db.commit(): refused (ConcurrentSessionUseError), as
    # it must be.  The refusal used to drop the first thread's callbacks, so its
    # transaction then committed without them.
    db = sync_db
    inside, go_on = threading.Event(), threading.Event()
    calls: list[str] = []

    @event.listens_for(db.engine, "before_cursor_execute")
    def wait_inside(*args: Any) -> None:  # in the first thread, holding the session's lock
        if "waits_inside" in args[2]:
            inside.set()
            go_on.wait(STEP_LIMIT)

    def first() -> None:
        db.session.execute(items.insert().values(key="written"))
        db.on_commit(lambda: calls.append("mail sent"))
        db.session.execute(text("SELECT 1 AS waits_inside"))

    def second() -> None:
        try:
            assert inside.wait(STEP_LIMIT)
            with pytest.raises(ConcurrentSessionUseError):
                db.commit()
        finally:
            go_on.set()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as threads:
            threads.start_soon(anyio.to_thread.run_sync, first)
            threads.start_soon(anyio.to_thread.run_sync, second)
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert (recorder.status, sync_keys(db)) == (200, {"written"})
    assert calls == ["mail sent"], "the refused commit dropped the callbacks"


@pytest.mark.anyio
async def test_a_commit_refused_to_a_second_task_keeps_the_on_commit_callbacks(
    database_url: str,
) -> None:
    # The same for a Database: a second task's db.commit() while the first is inside a
    # statement on the session.
    db = await open_database(database_url)
    inside = asyncio.Event()
    calls: list[str] = []

    @event.listens_for(db.engine.sync_engine, "before_cursor_execute")
    def mark_inside(*args: Any) -> None:  # the driver's await follows, in the same call
        if "waits_inside" in args[2]:
            inside.set()

    async def first() -> None:
        await add_key(db, "written")
        db.on_commit(lambda: calls.append("mail sent"))
        await db.session.execute(text("SELECT 1 AS waits_inside"))

    async def second() -> None:
        await inside.wait()
        with pytest.raises(ConcurrentSessionUseError):
            await db.commit()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.gather(first(), second())
        await plain_response(send, 200)

    try:
        recorder = await call_http(SQLAlchemyMiddleware(app, db))

        assert (recorder.status, await keys(db)) == (200, {"written"})
        assert calls == ["mail sent"], "the refused commit dropped the callbacks"
    finally:
        await db.dispose()


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["db.commit()", "db.session.commit()"])
async def test_a_failed_explicit_commit_of_a_sync_session_on_sqlite_leaves_no_transaction_open(
    tmp_path: Path, how: str
) -> None:
    # As test_a_failed_explicit_commit_on_sqlite_leaves_its_transaction_open_in_the_pool,
    # for a SyncDatabase: SQLite keeps a transaction whose COMMIT failed open, with the
    # write lock; the session's connection went back to the pool that way, and every
    # later writer got "database is locked".
    db = open_sync_database(
        f"sqlite:///{tmp_path / 'test.db'}",
        pool_size=1,
        max_overflow=0,
        connect_args={"timeout": POOL_TIMEOUT},
    )
    try:

        def fails_to_commit() -> None:
            db.session.execute(text("INSERT INTO children (id, parent_id) VALUES (1, 999)"))
            with pytest.raises(IntegrityError):
                db.commit() if how == "db.commit()" else db.session.commit()

        def writes() -> None:
            db.session.execute(items.insert().values(key="valid"))

        first = await call_http(SQLAlchemyMiddleware(threaded_app(fails_to_commit, 400), db))
        assert (first.status, sync_checked_out(db)) == (400, 0)

        second = await call_http(SQLAlchemyMiddleware(threaded_app(writes, 201), db))

        assert (second.status, sync_keys(db)) == (201, {"valid"})
    finally:
        db.dispose()


def threaded_app(work: Callable[[], object], status: int) -> Callable[..., Any]:
    """A raw ASGI app that runs ``work`` in a worker thread, then answers ``status``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.to_thread.run_sync(work)
        await plain_response(send, status)

    return app
