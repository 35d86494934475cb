"""The unit of work as the public API shows it: ``SessionContext.state`` and ``.outcome``.

A request's unit is OPEN while the app runs, ENDING_ROUND while the response start
ends its transactions (then OPEN again, for a streaming body), CLOSING while the
request's last sessions end, and CLOSED after.  Each ending returns an ``Outcome``:
one ``Result`` per database, a reason for each, and the first error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url

from asgi_sqla import (
    CommitFailedError,
    Database,
    Outcome,
    Result,
    SessionContext,
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
