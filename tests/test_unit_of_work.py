"""The unit of work as the public API shows it: ``SessionContext.state`` and ``.outcome``.

A request's unit is OPEN while the app runs, ENDING_ROUND while the response start
ends its transactions (then OPEN again, for a streaming body), CLOSING while the
request's last sessions end, and CLOSED after.  Each ending returns an ``Outcome``:
one ``Result`` per database, a reason for each, and the first error.  The last test
is a Hypothesis state machine that drives a unit through random sequences of writes,
endings, releases and closes, checking the states, the pool and the rows after each.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import make_url

from asgi_sqla import (
    AsgiSqlaError,
    CommitFailedError,
    Database,
    Outcome,
    Result,
    SessionContext,
    SessionEndedError,
    SQLAlchemyMiddleware,
    State,
)
from asgi_sqla.types import Receive, Scope, Send

import _postgres
from _helpers import (
    add_key,
    call_http,
    checked_out,
    keys,
    open_database,
    orphan_child,
    plain_response,
)

pytestmark = pytest.mark.anyio

T = TypeVar("T")


@pytest.fixture
def other_database_url(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path
) -> Iterator[str]:
    """A second database on the same backend (and driver) as ``database_url``."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"
        return
    factory: _postgres.DatabaseFactory = request.getfixturevalue("_postgres_databases")
    database = factory.create()
    try:
        yield database.set(drivername=url.drivername).render_as_string(hide_password=False)
    finally:
        factory.drop(database)


@pytest.fixture
async def other_db(other_database_url: str) -> AsyncIterator[Database]:
    database = await open_database(other_database_url)
    try:
        yield database
    finally:
        await database.dispose()


async def test_a_unit_is_open_again_after_the_response_start_and_closed_at_the_end(
    db: Database,
) -> None:
    units: list[SessionContext] = []
    states: dict[str, State] = {}

    def note(moment: str) -> Callable[[], None]:
        def callback() -> None:
            states[moment] = units[0].state

        return callback

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        unit = SessionContext.from_scope(scope)
        units.append(unit)
        states["before any session"] = unit.state
        await add_key(db, "before the start")
        db.on_commit(note("while the response start ends the transaction"))
        await send({"type": "http.response.start", "status": 201, "headers": []})
        states["after the response start"] = unit.state
        await add_key(db, "in the body")  # a new session, ended when the app returns
        db.on_commit(note("while the request closes"))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    assert recorder.status == 201
    assert states == {
        "before any session": State.OPEN,
        "while the response start ends the transaction": State.ENDING_ROUND,
        "after the response start": State.OPEN,
        "while the request closes": State.CLOSING,
    }
    assert units[0].state is State.CLOSED
    assert units[0].ended
    assert await keys(db) == {"before the start", "in the body"}
    assert checked_out(db) == 0


async def test_after_a_201_the_outcome_says_the_database_committed(db: Database) -> None:
    units: list[SessionContext] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        units.append(SessionContext.from_scope(scope))
        assert units[0].outcome is None  # nothing has ended yet
        await add_key(db, "created")
        await plain_response(send, 201)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    outcome = units[0].outcome
    assert recorder.status == 201
    assert isinstance(outcome, Outcome)
    assert outcome.results == {db: Result.COMMITTED}
    assert outcome.all_committed
    assert outcome.committed
    assert not outcome.failed
    assert outcome.error is None
    assert "201" in outcome.reasons[db]
    assert await keys(db) == {"created"}


async def test_after_set_rollback_only_and_a_200_the_outcome_says_rolled_back_and_why(
    db: Database,
) -> None:
    units: list[SessionContext] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        units.append(SessionContext.from_scope(scope))
        await add_key(db, "marked")
        db.set_rollback_only()
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db))

    outcome = units[0].outcome
    assert recorder.status == 200
    assert isinstance(outcome, Outcome)
    assert outcome.results == {db: Result.ROLLED_BACK}
    assert "rollback-only" in outcome.reasons[db]
    assert not outcome.all_committed
    assert not outcome.committed
    assert not outcome.failed
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_when_the_second_database_fails_to_commit_the_first_committed_while_another_failed(
    db: Database, other_db: Database
) -> None:
    units: list[SessionContext] = []
    raised: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        units.append(SessionContext.from_scope(scope))
        await add_key(db, "first")  # used first: committed first
        await add_key(other_db, "second")
        await orphan_child(other_db)  # its COMMIT fails (a deferred foreign key)
        try:
            await plain_response(send, 201)
        except CommitFailedError as exc:
            raised.append(exc)

    recorder = await call_http(SQLAlchemyMiddleware(app, db, other_db))

    outcome = units[0].outcome
    assert recorder.status == 500
    assert len(raised) == 1
    assert isinstance(outcome, Outcome)
    assert list(outcome.results.items()) == [
        (db, Result.COMMITTED_WHILE_ANOTHER_FAILED),
        (other_db, Result.FAILED),
    ]
    assert outcome.failed
    assert outcome.error is not None
    assert raised[0].__cause__ is outcome.error
    assert outcome.committed
    assert not outcome.all_committed
    assert await keys(db) == {"first"}
    assert await keys(other_db) == set()
    assert checked_out(db) == 0
    assert checked_out(other_db) == 0


# --- The state machine, driven by a machine -----------------------------------------------


class UnitOfWorkMachine(RuleBasedStateMachine):
    """Random sequences of what a connection does to its unit, against a model.

    The unit is driven through its public surface (``db.session`` where it is bound,
    ``end``, ``release``, ``close``, ``db.set_rollback_only()``) on a SQLite file, in
    an event loop of the machine's own.  After every step: the unit is OPEN or CLOSED
    (never caught halfway through an ending), a connection is checked out exactly
    while a session that ran a statement is open, and the committed rows are the
    model's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = tempfile.TemporaryDirectory()
        url = f"sqlite+aiosqlite:///{Path(self.directory.name) / 'machine.db'}"
        self.db = self.run(open_database(url))
        self.unit = SessionContext((self.db,))
        self.keys = itertools.count()
        self.committed: set[str] = set()
        self.pending: set[str] = set()  # written in the open session
        self.session_open = False
        self.connection_held = False
        self.rollback_only = False
        self.closed = False

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)

    def teardown(self) -> None:
        try:
            self.run(self.unit.close(reason="the machine stopped", failed=True))
            self.run(self.db.dispose())
        finally:
            self.loop.close()
            self.directory.cleanup()

    def _ended(self, outcome: Outcome, commit: bool) -> None:
        """Check ``outcome`` of an ending that ``commit``s (or not), and update the model."""
        if not self.session_open:
            assert outcome.results == {}
            return
        commits = commit and not self.rollback_only
        expected = Result.COMMITTED if commits else Result.ROLLED_BACK
        assert outcome.results == {self.db: expected}
        assert not outcome.failed
        if commits:
            self.committed |= self.pending
        self.pending = set()
        self.session_open = self.connection_held = self.rollback_only = False

    @rule()
    def write(self) -> None:
        key = f"k{next(self.keys)}"

        async def write() -> None:
            with self.unit.bind():
                await add_key(self.db, key)

        if self.closed:
            with pytest.raises(SessionEndedError):
                self.run(write())
            return
        self.run(write())
        self.pending.add(key)
        self.session_open = self.connection_held = True

    @rule()
    def set_rollback_only(self) -> None:
        async def mark() -> None:
            with self.unit.bind():
                self.db.set_rollback_only()  # opens a session object, takes no connection

        if self.closed:
            with pytest.raises(SessionEndedError):
                self.run(mark())
            return
        self.run(mark())
        self.session_open = True
        self.rollback_only = True

    @precondition(lambda self: not self.closed)
    @rule(status=st.sampled_from([None, 200, 201, 404, 500]), failed=st.booleans())
    def end_round(self, status: int | None, failed: bool) -> None:
        outcome = self.run(self.unit.end(status, reason="a round ended", failed=failed))
        self._ended(outcome, not failed and (status is None or status < 400))

    @precondition(lambda self: not self.closed)
    @rule(commit=st.booleans())
    def release(self, commit: bool) -> None:
        outcome = self.run(self.unit.release(self.db, commit=commit))
        self._ended(outcome, commit)

    @rule(status=st.sampled_from([None, 200, 409]), failed=st.booleans())
    def close(self, status: int | None, failed: bool) -> None:
        outcome = self.run(self.unit.close(status, reason="closed", failed=failed))
        if self.closed:
            assert outcome.results == {}  # ending twice ends nothing
            return
        self._ended(outcome, not failed and (status is None or status < 400))
        self.closed = True

    @invariant()
    def the_unit_is_never_caught_halfway_through_an_ending(self) -> None:
        assert self.unit.state is (State.CLOSED if self.closed else State.OPEN)
        assert self.unit.ended is self.closed
        assert self.unit.has_sessions is self.session_open

    @invariant()
    def a_connection_is_held_exactly_while_a_used_session_is_open(self) -> None:
        assert checked_out(self.db) == (1 if self.connection_held else 0)

    @invariant()
    def the_committed_rows_are_the_models(self) -> None:
        assert self.run(keys(self.db)) == self.committed


UnitOfWorkMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=12, deadline=None, database=None
)
test_the_unit_of_work_machine = UnitOfWorkMachine.TestCase


@pytest.mark.parametrize("end", ["end", "close"])
async def test_a_closed_unit_refuses_to_end_a_round_and_names_the_state(
    db: Database, end: str
) -> None:
    unit = SessionContext((db,))
    await unit.close(reason="the connection is over")

    assert unit.state is State.CLOSED
    if end == "close":  # closing twice ends nothing
        assert (await unit.close(reason="again")).results == {}
        return
    with pytest.raises(AsgiSqlaError, match="closed cannot take the event") as raised:
        await unit.end(reason="a round after the close")
    assert isinstance(raised.value, RuntimeError)
    assert unit.state is State.CLOSED
