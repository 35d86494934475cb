"""Per-route control: read-only and manual-commit routes, and retry on conflict.

Routes are chosen by the middleware's path patterns or by decorators on handlers.
The retry tests make two requests conflict deliberately under SERIALIZABLE.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import anyio
import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_sqla import (
    ConfigurationError,
    Database,
    RollbackOnlyError,
    SQLAlchemyMiddleware,
    manual_commit,
    read_only,
)
from asgi_sqla.types import ASGIApp, Receive, Scope, Send

from _helpers import (
    add_key,
    call_http,
    checked_out,
    create_tables,
    items,
    keys,
    plain_response,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await create_tables(database)
    try:
        yield database
    finally:
        await database.dispose()


def writer(db: Database) -> ASGIApp:
    """An app that writes its path as a key (a refused write is ignored) and answers 200."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await add_key(db, scope["path"])
        except DBAPIError:  # PostgreSQL refuses the write in a READ ONLY transaction
            await db.rollback()
        await plain_response(send, 200)

    return app


# -- read-only -----------------------------------------------------------------------------


async def test_a_read_only_route_never_commits_and_other_routes_do(db: Database) -> None:
    app = SQLAlchemyMiddleware(writer(db), db, read_only=["/reports/*"])

    recorders = [await call_http(app, path) for path in ("/reports/daily", "/orders")]

    assert [r.status for r in recorders] == [200, 200]
    assert await keys(db) == {"/orders"}
    assert checked_out(db) == 0


async def test_a_write_in_a_read_only_route_fails_at_once_on_postgresql(
    postgresql_url: str,
) -> None:
    db = Database(postgresql_url)
    await create_tables(db)
    failures: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await db.session.scalar(select(func.count()).select_from(items))) == 0
        try:
            await add_key(db, "refused")
        except DBAPIError as exc:
            failures.append(exc)
        await plain_response(send, 200)

    try:
        recorder = await call_http(SQLAlchemyMiddleware(app, db, read_only=["/*"]))
    finally:
        await db.dispose()

    assert recorder.status == 200
    [failure] = failures
    assert getattr(getattr(failure, "orig", None), "sqlstate", None) == "25006"  # read only


async def test_an_explicit_commit_in_a_read_only_route_raises(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await db.session.execute(text("SELECT 1"))
        with pytest.raises(RollbackOnlyError, match="read-only"):
            await db.commit()
        await plain_response(send, 200)

    recorder = await call_http(SQLAlchemyMiddleware(app, db, read_only=["/"]))

    assert recorder.status == 200


async def test_the_read_only_decorator_covers_the_sessions_its_handler_opens(
    db: Database,
) -> None:
    refused: list[bool] = []

    @read_only
    async def report(request: Request) -> JSONResponse:
        count = await db.session.scalar(select(func.count()).select_from(items))
        try:
            await db.session.execute(insert(items).values(key="sneaky"))
        except DBAPIError:  # PostgreSQL: the READ ONLY transaction refuses it
            refused.append(True)
        return JSONResponse({"count": count})

    app = SQLAlchemyMiddleware(Starlette(routes=[Route("/report", report)]), db)

    recorder = await call_http(app, "/report")

    assert json.loads(recorder.body) == {"count": 0}
    assert refused == ([True] if db.engine.dialect.name == "postgresql" else [])
    assert await keys(db) == set()  # SQLite took the write, but it is never committed


# -- manual commit -------------------------------------------------------------------------


async def test_a_manual_commit_route_keeps_only_what_it_committed(db: Database) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await add_key(db, "committed")
        await db.commit()
        await add_key(db, "left open")
        await plain_response(send, 200)

    await call_http(SQLAlchemyMiddleware(app, db, manual_commit=["/imports/*"]), "/imports/1")

    assert await keys(db) == {"committed"}


async def test_the_manual_commit_decorator_turns_automatic_commit_off(db: Database) -> None:
    @manual_commit
    async def endpoint(request: Request) -> JSONResponse:
        await add_key(db, "not committed")
        return JSONResponse({}, status_code=201)

    app = SQLAlchemyMiddleware(Starlette(routes=[Route("/", endpoint)]), db)

    recorder = await call_http(app)

    assert recorder.status == 201
    assert await keys(db) == set()


@pytest.mark.parametrize(
    ("option", "value"),
    [("read_only", "/reports/*"), ("manual_commit", ["reports"]), ("retry", [3])],
)
def test_path_patterns_are_lists_of_absolute_paths(option: str, value: object) -> None:
    db = Database("sqlite+aiosqlite://")
    with pytest.raises(ConfigurationError, match=option):
        SQLAlchemyMiddleware(writer(db), db, **{option: value})  # type: ignore[arg-type]


# -- retry on conflict ---------------------------------------------------------------------


class Conflict:
    """Two requests that each count the rows, then insert one, under SERIALIZABLE.

    Their first attempts both count before either writes (a barrier), so one of them
    must fail with a serialization failure, at its INSERT or at COMMIT.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.attempts: dict[str, int] = {}
        self._counted = 0
        self._both_counted = anyio.Event()

    async def handle(self, key: str, body: bytes) -> int:
        self.attempts[key] = self.attempts.get(key, 0) + 1
        count = await self.db.session.scalar(select(func.count()).select_from(items))
        if self.attempts[key] == 1:
            self._counted += 1
            if self._counted == 2:
                self._both_counted.set()
            with anyio.fail_after(5):
                await self._both_counted.wait()
        await add_key(self.db, f"{key}:{count}:{body.decode()}")
        return int(count or 0)


@pytest.fixture
async def serializable(postgresql_url: str) -> AsyncIterator[Database]:
    database = Database(postgresql_url, isolation_level="SERIALIZABLE")
    await create_tables(database)
    try:
        yield database
    finally:
        await database.dispose()


def conflict_app(conflict: Conflict) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        await conflict.handle(scope["path"].strip("/"), message.get("body", b""))
        await plain_response(send, 201)

    return app


async def run_both(app: SQLAlchemyMiddleware) -> list[int | str]:
    """Both requests at once; each gives its status, or "raised" if the app raised."""
    statuses: dict[str, int | str] = {}

    async def one(key: str) -> None:
        try:
            recorder = await call_http(app, f"/{key}", method="POST", body=key.encode())
        except DBAPIError:
            statuses[key] = "raised"
        else:
            statuses[key] = recorder.status

    async with anyio.create_task_group() as group:
        group.start_soon(one, "a")
        group.start_soon(one, "b")
    return [statuses["a"], statuses["b"]]


async def test_without_retry_one_of_two_conflicting_requests_gets_500(
    serializable: Database,
) -> None:
    conflict = Conflict(serializable)
    app = SQLAlchemyMiddleware(conflict_app(conflict), serializable)

    statuses = await run_both(app)

    # The loser fails at its INSERT (the app raises) or at COMMIT (500).
    assert sorted(map(str, statuses)) in (["201", "500"], ["201", "raised"]), statuses
    assert len(await keys(serializable)) == 1


async def test_two_conflicting_requests_on_a_retry_route_both_succeed_with_both_writes(
    serializable: Database, caplog: pytest.LogCaptureFixture
) -> None:
    conflict = Conflict(serializable)
    app = SQLAlchemyMiddleware(conflict_app(conflict), serializable, retry=["/*"])

    with caplog.at_level(logging.INFO, logger="asgi_sqla"):
        statuses = await run_both(app)

    assert statuses == [201, 201]
    written = await keys(serializable)
    assert {k.split(":")[0] for k in written} == {"a", "b"}
    assert sorted(k.split(":")[1] for k in written) == ["0", "1"]  # the re-run saw the other row
    assert {k.split(":")[2] for k in written} == {"a", "b"}  # each replay had its own body
    assert sorted(conflict.attempts.values()) == [1, 2]
    assert any("running the request again" in r.getMessage() for r in caplog.records)
    assert checked_out(serializable) == 0


async def test_a_conflict_the_framework_turned_into_a_500_is_retried_too(
    serializable: Database,
) -> None:
    conflict = Conflict(serializable)

    async def endpoint(request: Request) -> JSONResponse:
        await conflict.handle(request.url.path.strip("/"), await request.body())
        return JSONResponse({}, status_code=201)

    # Wrapping the whole Starlette app: its ServerErrorMiddleware answers 500 first.
    starlette = Starlette(routes=[Route("/{key}", endpoint, methods=["POST"])])
    app = SQLAlchemyMiddleware(starlette, serializable, retry=["/*"])

    statuses = await run_both(app)

    assert statuses == [201, 201]
    assert {k.split(":")[0] for k in await keys(serializable)} == {"a", "b"}


async def test_a_body_over_the_limit_is_not_retried(serializable: Database) -> None:
    conflict = Conflict(serializable)
    app = SQLAlchemyMiddleware(
        conflict_app(conflict), serializable, retry=["/*"], retry_body_limit=0
    )

    statuses = await run_both(app)

    assert sorted(map(str, statuses)) in (["201", "500"], ["201", "raised"]), statuses
    assert sorted(conflict.attempts.values()) == [1, 1]


async def test_retries_stop_after_retry_attempts(serializable: Database) -> None:
    attempts: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        attempts.append(1)
        await serializable.session.execute(
            text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
        )
        await plain_response(send, 200)

    wrapped = SQLAlchemyMiddleware(app, serializable, retry=["/*"], retry_attempts=2)

    with pytest.raises(DBAPIError):
        await call_http(wrapped)

    assert len(attempts) == 3
    assert checked_out(serializable) == 0
