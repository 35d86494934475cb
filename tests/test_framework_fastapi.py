"""FastAPI: the ``asgi_sqla.fastapi`` dependency and sync code, in-process.

``examples/fastapi_app.py`` in real servers is tested with the other examples in
``tests/test_frameworks.py``.  Here small FastAPI apps around ``database_url``, driven
with the raw ASGI recorder to see exactly what is sent and when, check the
``asgi_sqla.fastapi`` dependency, sync ``def`` endpoints and dependencies (run in
FastAPI's thread pool), and dependencies with ``yield``.
"""

# No `from __future__ import annotations`: FastAPI reads the annotations of endpoints
# defined inside the tests, which name local variables.
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import anyio
import anyio.from_thread
import pytest
from fastapi import Depends, FastAPI, WebSocket
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from asgi_sqla import ConfigurationError, Database, SessionEndedError, SQLAlchemyMiddleware
from asgi_sqla.fastapi import session_dependency
from asgi_sqla.types import Message

from _helpers import (
    ASGIRecorder,
    PoolEvents,
    add_key,
    call_http,
    checked_out,
    items,
    keys,
    release,
    websocket_scope,
)
from _servers import ROOT

pytestmark = pytest.mark.anyio


# --- The dependency, in-process --------------------------------------------------------


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
FASTAPI_VERSION = release("fastapi")
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
