"""Path patterns match every spelling of a path that the frameworks route alike.

Litestar and Quart route ``//reports/1``, ``/reports/1/`` and ``///reports//1`` to the
handler of ``/reports/{id}``; Starlette and Litestar route the path without the
``root_path`` that uvicorn puts in front of it; BlackSheep routes ``/REPORTS/1`` there
too (``tests/test_framework_blacksheep.py`` shows it through BlackSheep).  A
``read_only`` or ``manual_commit`` route must not be writable through any of them.  A
scope without a ``path`` is read-only on a middleware with ``read_only`` patterns, and
never retried.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest
from psycopg.rows import TupleRow
from sqlalchemy import URL, text
from sqlalchemy.exc import DBAPIError

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla._routes import PathPatterns
from asgi_sqla.types import ASGIApp, Receive, Scope, Send

from _helpers import (
    ASGIRecorder,
    add_key,
    call_http,
    checked_out,
    create_tables,
    http_scope,
    keys,
    plain_response,
)
from _servers import Server, serve, server_available

pytestmark = pytest.mark.anyio

CONFLICT = "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"


def scope_of(path: str, root_path: str = "") -> Scope:
    return http_scope(path, root_path=root_path)


# -- the matching rule -----------------------------------------------------------------------

REPORTS = PathPatterns("read_only", ["/reports/*", "/imports"])


@pytest.mark.parametrize(
    ("path", "root_path"),
    [
        ("/reports/1", ""),
        ("//reports/1", ""),
        ("/reports//1", ""),
        ("/reports/1/", ""),
        ("///reports///1///", ""),
        ("reports/1", ""),  # no leading slash: Litestar's normalize_path adds one
        ("/imports", ""),
        ("//imports", ""),
        ("/imports/", ""),
        ("///imports", ""),
        ("/reports/", ""),  # as sent, as before paths were normalised
        # uvicorn puts root_path in front of the path; Starlette and Litestar take it off.
        ("/api/reports/1", "/api"),
        ("/api//reports/1/", "/api"),
        ("/api/imports/", "/api"),
        # hypercorn does not put root_path in front: the path is the route's already.
        ("/reports/1", "/api"),
        # Litestar cuts the path at the first occurrence of root_path, wherever it is.
        ("/v1/api/reports/1", "/api"),
        # BlackSheep routes in any letter case.
        ("/REPORTS/1", ""),
        ("/Reports//1/", ""),
        ("/IMPORTS", ""),
        ("/api/Imports", "/api"),
    ],
)
def test_a_pattern_matches_every_spelling_of_its_route(path: str, root_path: str) -> None:
    assert REPORTS.match(scope_of(path, root_path))


@pytest.mark.parametrize(
    ("path", "root_path"),
    [
        ("/", ""),
        ("/orders", ""),
        # Not under /reports/*: only its spelling /reports/ matches, as sent.
        ("/reports", ""),
        ("/reportsx/1", ""),
        ("/imports/1", ""),
        ("/importsx", ""),
        ("/api/orders", "/api"),
        ("/api", "/api"),
        ("/api/", "/api"),
    ],
)
def test_a_pattern_matches_no_other_route(path: str, root_path: str) -> None:
    assert not REPORTS.match(scope_of(path, root_path))


@pytest.mark.parametrize(("option", "matches"), [("manual_commit", True), ("retry", False)])
def test_a_policy_that_must_not_be_escaped_matches_any_case_and_retry_only_its_own(
    option: str, matches: bool
) -> None:
    patterns = PathPatterns(option, ["/imports/*"])

    assert patterns.match(scope_of("/imports/1"))
    assert patterns.match(scope_of("/Imports/1")) is matches


def test_patterns_are_normalised_like_paths() -> None:
    patterns = PathPatterns("manual_commit", ["//imports/", "/reports//*/"])

    assert patterns.match(scope_of("/imports"))
    assert patterns.match(scope_of("/reports/1"))
    assert not patterns.match(scope_of("/orders"))


@pytest.mark.parametrize(
    ("option", "matches"), [("read_only", True), ("manual_commit", True), ("retry", False)]
)
def test_a_scope_without_a_path_is_read_only_and_manual_but_never_retried(
    option: str, matches: bool
) -> None:
    scope = http_scope()
    del scope["path"]

    assert PathPatterns(option, ["/reports/*"]).match(scope) is matches
    assert not PathPatterns(option, []).match(scope)  # no patterns: no policy at all


# -- in-process, through the middleware --------------------------------------------------------


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await create_tables(database)
    try:
        yield database
    finally:
        await database.dispose()


def writer(db: Database) -> ASGIApp:
    """Writes the path it was given (a refused write is ignored) and answers 200."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await add_key(db, scope.get("path", "no path"))
        except DBAPIError:  # PostgreSQL refuses the write in a READ ONLY transaction
            await db.rollback()
        await plain_response(send, 200)

    return app


@pytest.mark.parametrize(
    ("path", "root_path"),
    [
        ("//reports/1", ""),
        ("/reports/1/", ""),
        ("///reports//1", ""),
        ("/api/reports/1", "/api"),
        ("//imports", ""),
        ("/imports/", ""),
    ],
)
async def test_no_spelling_of_a_protected_path_commits_a_write(
    db: Database, path: str, root_path: str
) -> None:
    app = SQLAlchemyMiddleware(writer(db), db, read_only=["/reports/*"], manual_commit=["/imports"])
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])

    await recorder(app, http_scope(path, root_path=root_path))

    assert recorder.status == 200
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_other_paths_still_commit(db: Database) -> None:
    app = SQLAlchemyMiddleware(writer(db), db, read_only=["/reports/*"], manual_commit=["/imports"])

    for path in ("/orders/1", "//orders//2/"):
        assert (await call_http(app, path)).status == 200

    assert await keys(db) == {"/orders/1", "//orders//2/"}


async def test_a_scope_without_a_path_is_served_read_only(db: Database) -> None:
    app = SQLAlchemyMiddleware(writer(db), db, read_only=["/reports/*"])
    scope = http_scope()
    del scope["path"]
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])

    await recorder(app, scope)

    assert recorder.status == 200
    assert await keys(db) == set()


async def test_a_scope_without_a_path_is_served_and_committed_but_not_retried(
    db: Database,
) -> None:
    app = SQLAlchemyMiddleware(writer(db), db, retry=["/*"])
    scope = http_scope()
    del scope["path"]
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])

    await recorder(app, scope)

    assert recorder.status == 200
    assert await keys(db) == {"no path"}


async def test_a_retry_route_is_retried_through_another_spelling_of_its_path(
    postgresql_url: str,
) -> None:
    db = Database(postgresql_url)
    attempts: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        attempts.append(scope["path"])
        if len(attempts) == 1:
            await db.session.execute(text(CONFLICT))
        await plain_response(send, 201)

    try:
        recorder = await call_http(SQLAlchemyMiddleware(app, db, retry=["/pay"]), "//pay/")
    finally:
        await db.dispose()

    assert recorder.status == 201
    assert attempts == ["//pay/", "//pay/"]


# -- Litestar under uvicorn, over loopback -----------------------------------------------------


@pytest.fixture
def litestar_server(postgres_database: URL) -> Iterator[Server]:
    if not server_available("uvicorn"):
        pytest.skip("uvicorn is not installed")
    url = postgres_database.set(drivername="postgresql+asyncpg")
    env = {"DATABASE_URL": url.render_as_string(hide_password=False)}
    with serve("tests.apps.litestar_routes_app:app", "uvicorn", env=env) as server:
        yield server


def test_litestar_under_uvicorn_refuses_a_write_through_every_spelling_of_a_read_only_route(
    litestar_server: Server, pg_admin: psycopg.Connection[TupleRow]
) -> None:
    spellings = ["/reports/1", "//reports/1", "/reports/1/", "///reports//1"]
    answers = {}

    with httpx.Client(base_url=litestar_server.url, timeout=10) as client:
        for spelling in spellings:
            # Not client.get(spelling): httpx reads "//reports/1" as a host name.
            url = client.base_url.copy_with(path=spelling, params={"key": f"via {spelling}"})
            answers[spelling] = client.get(url)
        unprotected = client.get("/orders/1", params={"key": "order"})

    assert {s: (r.status_code, r.json()) for s, r in answers.items()} == {
        s: (200, {"raw_path": s, "written": False}) for s in spellings
    }
    assert unprotected.json() == {"raw_path": "/orders/1", "written": True}
    assert [key for (key,) in pg_admin.execute("SELECT key FROM items")] == ["order"]
