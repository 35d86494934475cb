"""FastAPI: ``examples/fastapi_app.py`` in real servers; the dependency and sync code in-process.

The example runs once per (database, server) pair: ``module_database_url`` (SQLite,
PostgreSQL through asyncpg) times uvicorn, hypercorn and granian, in a process started
by ``tests/_servers.py``.  The tests talk to it over HTTP and websockets and read the
committed rows through a connection of their own.  They share the database, so each
writes texts no other test writes.  The last server test stops the server.

The in-process tests build small FastAPI apps around ``database_url`` and drive them
with the raw ASGI recorder, to see exactly what is sent and when: the
``asgi_sqla.fastapi`` dependency, sync ``def`` endpoints and dependencies (run in
FastAPI's thread pool), and dependencies with ``yield``.
"""

# No `from __future__ import annotations`: FastAPI reads the annotations of endpoints
# defined inside the tests, which name local variables.
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import anyio
import anyio.from_thread
import fastapi
import httpx
import pytest
from fastapi import Depends, FastAPI, WebSocket
from fastapi.responses import Response
from httpx_ws import connect_ws
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_sqla import ConfigurationError, Database, SessionEndedError, SQLAlchemyMiddleware
from asgi_sqla.fastapi import session_dependency
from asgi_sqla.types import Message

from _framework import (
    COMMIT_FAILED,
    POOL_DISPOSED,
    client_fixture,
    events,
    example_server_fixture,
    no_transaction_left_open,
    notes_with_text,
    server_name_fixture,
    unique,
)
from _helpers import (
    ASGIRecorder,
    PoolEvents,
    add_key,
    call_http,
    checked_out,
    create_tables,
    eventually,
    items,
    keys,
    server_backends,
    server_reported_an_app_error,
    websocket_scope,
)
from _servers import ROOT, Server

pytestmark = pytest.mark.anyio

TARGET = "examples.fastapi_app:app"


server_name = server_name_fixture()
server = example_server_fixture(TARGET)
client = client_fixture()


# --- The example in real servers -------------------------------------------------------


def test_a_note_created_through_the_dependency_is_committed_before_its_201_arrives(
    client: httpx.Client, module_database_url: str
) -> None:
    text = unique("created")

    response = client.post("/notes", json={"text": text})

    assert response.status_code == 201, response.text
    assert response.json()["text"] == text
    assert notes_with_text(module_database_url, text) == 1
    assert no_transaction_left_open(module_database_url)


def test_background_tasks_record_the_note_with_their_own_session_after_the_response(
    client: httpx.Client, module_database_url: str
) -> None:
    text = unique("background")

    response = client.post("/notes", json={"text": text})

    assert response.status_code == 201
    expected = f"created note {response.json()['id']}: {text}"
    assert eventually(lambda: expected in events(module_database_url))
    assert no_transaction_left_open(module_database_url)


def test_an_http_exception_after_the_insert_answers_422_and_rolls_it_back(
    client: httpx.Client, module_database_url: str
) -> None:
    response = client.post("/notes", json={"text": ""})

    assert response.status_code == 422
    assert response.json() == {"detail": "text must not be empty"}
    assert notes_with_text(module_database_url, "") == 0
    assert no_transaction_left_open(module_database_url)


def test_a_reply_to_a_missing_note_fails_at_commit_and_the_client_gets_500_not_201(
    client: httpx.Client, server: Server, module_database_url: str
) -> None:
    failed, after = unique("orphan"), unique("after-orphan")
    log_start = len(server.log)

    response = client.post("/notes", json={"text": failed, "parent_id": 999_999_999})

    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert notes_with_text(module_database_url, failed) == 0
    log = server.log[log_start:]
    assert COMMIT_FAILED in log
    assert "instead of the app's 201 response" in log
    assert "IntegrityError" in log or "ForeignKeyViolation" in log
    # The next note's background task runs; the failed one's never did (it would
    # have run right after the 500 was sent, before this request).
    assert client.post("/notes", json={"text": after}).status_code == 201
    assert eventually(lambda: any(after in event for event in events(module_database_url)))
    assert not any(failed in event for event in events(module_database_url))
    # The server saw a valid message sequence and no exception: it reports nothing.
    assert not server_reported_an_app_error(server.log[log_start:]), server.log[log_start:]
    assert no_transaction_left_open(module_database_url)


def test_a_batch_failing_halfway_answers_500_and_rolls_back_the_notes_before_it(
    client: httpx.Client, server: Server, module_database_url: str
) -> None:
    first, second = unique("batch-first"), unique("batch-second")
    log_start = len(server.log)

    # The third note breaks the CHECK constraint: its INSERT raises IntegrityError.
    batch = [{"text": first}, {"text": second}, {"text": "x" * 501}]
    response = client.post("/notes/batch", json=batch)

    assert response.status_code == 500
    assert notes_with_text(module_database_url, first) == 0
    assert notes_with_text(module_database_url, second) == 0
    # FastAPI's ServerErrorMiddleware answered, then re-raised for the server to log.
    assert eventually(lambda: server_reported_an_app_error(server.log[log_start:]))
    assert "note_text_length" in server.log[log_start:]
    assert no_transaction_left_open(module_database_url)


def test_a_valid_batch_commits_every_note(client: httpx.Client, module_database_url: str) -> None:
    first, second = unique("batch-ok-1"), unique("batch-ok-2")

    response = client.post("/notes/batch", json=[{"text": first}, {"text": second}])

    assert response.status_code == 201
    assert [note["text"] for note in response.json()] == [first, second]
    assert notes_with_text(module_database_url, first) == 1
    assert notes_with_text(module_database_url, second) == 1


def test_the_streamed_export_reads_and_writes_with_a_session_opened_after_the_start(
    client: httpx.Client, module_database_url: str
) -> None:
    text = unique("exported")
    assert client.post("/notes", json={"text": text}).status_code == 201

    with client.stream("GET", "/notes/export") as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]

    assert text in [line["text"] for line in lines]
    expected = f"exported {len(lines)} notes"
    assert eventually(lambda: expected in events(module_database_url))
    assert no_transaction_left_open(module_database_url)


def test_a_websocket_commits_each_message_while_it_waits_for_the_next(
    client: httpx.Client, server: Server, module_database_url: str
) -> None:
    first, second = unique("ws-1"), unique("ws-2")

    with connect_ws(f"{server.url}/ws", client) as websocket:
        websocket.send_text(first)
        assert websocket.receive_json()["text"] == first
        websocket.send_text(second)
        assert websocket.receive_json()["text"] == second
        assert notes_with_text(module_database_url, first) == 1
        assert eventually(lambda: notes_with_text(module_database_url, second) == 1)
        assert no_transaction_left_open(module_database_url)


def test_sigint_stops_the_server_cleanly_after_disposing_the_engine(
    server: Server, module_database_url: str
) -> None:
    # Keep this test last among the server tests: it stops the module's server.
    server.process.send_signal(signal.SIGINT)
    returncode = server.process.wait(timeout=20)
    log = server.log

    assert returncode == 0, log
    # Logged by the pool itself (see server_logging_env): disposed, not merely dropped.
    assert POOL_DISPOSED in log, log
    if module_database_url.startswith("postgresql"):
        assert eventually(lambda: server_backends(module_database_url) == [])


# --- The dependency, in-process --------------------------------------------------------


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await create_tables(database)
    yield database
    await database.dispose()


def fastapi_app(db: Database) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SQLAlchemyMiddleware, db)
    return app


def json_body(sent: list[Message]) -> Any:
    return json.loads(b"".join(m.get("body", b"") for m in sent if m["type"].endswith("body")))


async def test_the_dependency_and_db_session_are_one_session_per_request(db: Database) -> None:
    DBSession = Annotated[AsyncSession, Depends(session_dependency(db))]

    async def repository(session: DBSession) -> AsyncSession:
        return session

    app = fastapi_app(db)

    @app.post("/same")
    async def same(
        session: DBSession, repository_session: Annotated[AsyncSession, Depends(repository)]
    ) -> dict[str, bool]:
        await session.execute(items.insert().values(key="via-dependency"))
        return {
            "dependency_is_db_session": session is db.session,
            "sub_dependency_is_db_session": repository_session is db.session,
        }

    recorder = await call_http(app, "/same", method="POST")

    assert recorder.status == 200
    assert json.loads(recorder.body) == {
        "dependency_is_db_session": True,
        "sub_dependency_is_db_session": True,
    }
    assert await keys(db) == {"via-dependency"}
    assert checked_out(db) == 0


async def test_a_request_that_declares_the_dependency_but_runs_nothing_connects_to_nothing(
    db: Database,
) -> None:
    app = fastapi_app(db)
    pool = PoolEvents(db)

    @app.get("/idle")
    async def idle(session: Annotated[AsyncSession, Depends(session_dependency(db))]) -> str:
        return "ok"

    recorder = await call_http(app, "/idle")

    assert recorder.status == 200
    assert pool.checkouts == 0


async def test_the_dependency_is_one_function_per_database_so_it_can_be_overridden(
    db: Database, database_url: str
) -> None:
    other = Database(database_url)
    assert session_dependency(db) is session_dependency(db)
    assert session_dependency(db) is not session_dependency(other)

    app = fastapi_app(db)

    @app.get("/which")
    async def which(session: Annotated[AsyncSession, Depends(session_dependency(db))]) -> str:
        return type(session).__name__

    async def fake_session() -> Any:
        return "a stand-in session"

    app.dependency_overrides[session_dependency(db)] = fake_session
    recorder = await call_http(app, "/which")

    assert json.loads(recorder.body) == "str"


def test_importing_asgi_sqla_fastapi_imports_no_web_framework() -> None:
    code = (
        "import sys, asgi_sqla, asgi_sqla.fastapi\n"
        "loaded = sorted({'fastapi', 'starlette', 'pydantic'} & set(sys.modules))\n"
        "print(','.join(loaded))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == ""


async def test_an_unhandled_error_after_a_write_rolls_back_before_fastapi_answers_500(
    db: Database,
) -> None:
    app = fastapi_app(db)
    sent: list[Message] = []

    @app.post("/fails")
    async def fails() -> None:
        await add_key(db, "written-then-raised")
        raise LookupError("a bug after the write")

    with pytest.raises(LookupError, match="a bug after the write"):
        await call_http(app, "/fails", method="POST", on_send=sent.append)

    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 500
    assert await keys(db) == set()
    assert checked_out(db) == 0


async def test_in_a_websocket_the_injected_session_ends_at_accept_which_reads_the_connect(
    db: Database,
) -> None:
    # Starlette's accept() first receives websocket.connect, and the middleware ends
    # the open session whenever the app waits in receive(): the injected session is
    # for work before accept() (an authorisation check); later, read db.session.
    app = fastapi_app(db)
    seen: dict[str, Any] = {}

    @app.websocket("/ws")
    async def socket(
        websocket: WebSocket, session: Annotated[AsyncSession, Depends(session_dependency(db))]
    ) -> None:
        await session.execute(items.insert().values(key="before-accept"))
        await websocket.accept()
        seen["same_after_accept"] = session is db.session
        try:
            await session.execute(items.insert().values(key="stale"))
        except SessionEndedError as exc:
            seen["stale_session"] = str(exc)
        key = await websocket.receive_text()
        await add_key(db, key)  # db.session: this message's own session
        await websocket.close()

    recorder = ASGIRecorder(
        [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "fresh"}]
    )
    await recorder(app, websocket_scope("/ws"))

    assert recorder.types() == ["websocket.accept", "websocket.close"]
    assert seen["same_after_accept"] is False
    assert "waited for the next message" in seen["stale_session"]
    assert await keys(db) == {"before-accept", "fresh"}
    assert checked_out(db) == 0


# --- Sync endpoints and dependencies, in-process ---------------------------------------


def sync_app(db: Database, kind: str) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SQLAlchemyMiddleware, db)

    def sync_dependency() -> AsyncSession:
        return db.session

    def sync_yield_dependency() -> Iterator[AsyncSession]:
        yield db.session

    if kind == "endpoint":

        @app.get("/sync")
        def endpoint() -> str:
            db.session  # noqa: B018 - the read is the point
            return "unreachable"

    elif kind == "dependency":

        @app.get("/sync")
        async def with_dependency(session: Annotated[Any, Depends(sync_dependency)]) -> str:
            return "unreachable"

    else:

        @app.get("/sync")
        async def with_yield_dependency(
            session: Annotated[Any, Depends(sync_yield_dependency)],
        ) -> str:
            return "unreachable"

    return app


@pytest.mark.parametrize("kind", ["endpoint", "dependency", "yield-dependency"])
async def test_a_sync_def_reading_db_session_gets_a_clear_error_and_a_500_at_once(
    db: Database, kind: str
) -> None:
    sent: list[Message] = []

    with anyio.fail_after(10), pytest.raises(ConfigurationError) as raised:
        await call_http(sync_app(db, kind), "/sync", on_send=sent.append)

    message = str(raised.value)
    assert "synchronous `def` endpoint or dependency" in message
    assert "make it `async def`" in message
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 500
    assert checked_out(db) == 0


async def test_a_sync_endpoint_gets_the_same_clear_error_after_an_async_dependency_opened_it(
    db: Database,
) -> None:
    # An async dependency has already opened the request's session; the sync endpoint,
    # in a worker thread, reads db.session.  It cannot await anything on that session,
    # so it should fail as clearly as when no session was open yet.
    app = fastapi_app(db)
    sent: list[Message] = []

    @app.post("/sync-after-async")
    def endpoint(session: Annotated[AsyncSession, Depends(session_dependency(db))]) -> str:
        db.session.add  # noqa: B018 - reading db.session in the worker thread is the point
        return "the session was handed to a worker thread"

    with anyio.fail_after(10), pytest.raises(ConfigurationError, match="`def` endpoint"):
        await call_http(app, "/sync-after-async", method="POST", on_send=sent.append)

    assert sent[0]["status"] == 500


async def test_a_sync_endpoint_can_use_the_session_on_the_event_loop_through_from_thread(
    db: Database,
) -> None:
    app = fastapi_app(db)

    @app.post("/from-thread", status_code=201)
    def endpoint() -> str:
        anyio.from_thread.run(add_key, db, "from-thread")
        return "stored"

    with anyio.fail_after(10):
        recorder = await call_http(app, "/from-thread", method="POST")

    assert recorder.status == 201
    assert await keys(db) == {"from-thread"}
    assert checked_out(db) == 0


# --- Dependencies with yield, in-process -----------------------------------------------


#: FastAPI 0.106 to 0.117 ran the code after ``yield`` before sending the response;
#: 0.118 moved it back to after the response; 0.121 added ``Depends(scope=...)``,
#: where ``scope="function"`` exits before the response.
FASTAPI_VERSION = tuple(int(part) for part in fastapi.__version__.split(".")[:2])
EXITS_AFTER_THE_RESPONSE = FASTAPI_VERSION >= (0, 118)
needs_dependency_scope = pytest.mark.skipif(
    FASTAPI_VERSION < (0, 121), reason="Depends(scope=...) is new in FastAPI 0.121"
)


@pytest.mark.skipif(not EXITS_AFTER_THE_RESPONSE, reason="FastAPI < 0.118 exits before")
@pytest.mark.parametrize(
    ("status", "committed"),
    [
        # The request's session followed its status; the code after yield ran once
        # the response was sent, in a new session committed when the app returned.
        (200, {"request", "after-yield"}),
        (400, {"after-yield"}),
    ],
)
async def test_the_code_after_yield_runs_after_the_response_with_a_new_session(
    db: Database, status: int, committed: set[str]
) -> None:
    sent: list[Message] = []
    seen: dict[str, Any] = {}

    async def audited() -> AsyncIterator[AsyncSession]:
        session = db.session
        yield session
        seen["sent_before_exit"] = [m["type"] for m in sent]
        seen["same_session"] = db.session is session
        await add_key(db, "after-yield")

    app = fastapi_app(db)

    @app.post("/write")
    async def write(session: Annotated[AsyncSession, Depends(audited)]) -> Response:
        await add_key(db, "request")
        return Response(status_code=status)

    recorder = await call_http(app, "/write", method="POST", on_send=sent.append)

    assert recorder.status == status
    assert seen["sent_before_exit"] == ["http.response.start", "http.response.body"]
    assert seen["same_session"] is False
    assert await keys(db) == committed
    assert checked_out(db) == 0


@needs_dependency_scope
@pytest.mark.parametrize(("status", "committed"), [(200, {"request", "after-yield"}), (400, set())])
async def test_the_code_after_yield_of_a_function_scoped_dependency_shares_the_request_session(
    db: Database, status: int, committed: set[str]
) -> None:
    sent: list[Message] = []
    seen: dict[str, Any] = {}

    async def audited() -> AsyncIterator[AsyncSession]:
        session = db.session
        yield session
        seen["sent_before_exit"] = [m["type"] for m in sent]
        seen["same_session"] = db.session is session
        await add_key(db, "after-yield")

    app = fastapi_app(db)

    @app.post("/write")
    async def write(
        session: Annotated[AsyncSession, Depends(audited, scope="function")],
    ) -> Response:
        await add_key(db, "request")
        return Response(status_code=status)

    recorder = await call_http(app, "/write", method="POST", on_send=sent.append)

    # It ran before the response started, in the request's session, so its write
    # shares the request's fate.
    assert recorder.status == status
    assert seen["sent_before_exit"] == []
    assert seen["same_session"] is True
    assert await keys(db) == committed
    assert checked_out(db) == 0


@pytest.mark.skipif(not EXITS_AFTER_THE_RESPONSE, reason="FastAPI < 0.118 exits before")
async def test_a_yield_dependency_committing_its_session_after_yield_is_too_late(
    db: Database,
) -> None:
    # The classic "get_db" dependency: yield a session, commit it afterwards.  Under
    # the middleware the request's session was already committed at the response
    # start, so the late commit raises, after the client has its 200.
    sent: list[Message] = []

    async def get_db() -> AsyncIterator[AsyncSession]:
        session = db.session
        yield session
        await session.commit()

    app = fastapi_app(db)

    @app.post("/classic")
    async def classic(session: Annotated[AsyncSession, Depends(get_db)]) -> str:
        await add_key(db, "classic")
        return "ok"

    with pytest.raises(SessionEndedError, match="ended when the response started"):
        await call_http(app, "/classic", method="POST", on_send=sent.append)

    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    assert await keys(db) == {"classic"}
    assert checked_out(db) == 0
