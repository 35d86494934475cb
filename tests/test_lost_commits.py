"""``confirm_lost_commits``: a COMMIT whose connection was lost is checked on PostgreSQL.

A TCP relay between the app and a real server cuts the connection at the COMMIT:

* *after* it passed the COMMIT on (the server commits; its reply never arrives): the
  commit is confirmed, the app's 201 is sent, its on_commit callbacks run;
* *before* (the server never sees the COMMIT, and aborts when its socket closes): the
  503 with ``Retry-After`` stands, and nothing is committed;
* after, with no new connection possible: the outcome is unknown, the 503 stands.

Without the option the first case is answered 503 although the row is committed: what
the option is for.  The extra statement is sent only at the package's own COMMIT.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import URL, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_sqla import (
    CommitFailedError,
    ConfigurationError,
    Database,
    SQLAlchemyMiddleware,
    SyncDatabase,
)
from asgi_sqla.types import ASGIApp, Message

import _postgres
from _helpers import PG_DRIVERS, ASGIRecorder, TcpRelay, http_scope, websocket_scope

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]

FLAVOURS = list(PG_DRIVERS)

#: What the package sends to learn the transaction's id (PostgreSQL 13 and later).
XID_SQL = "SELECT pg_current_xact_id_if_assigned()::text"
PROBE = XID_SQL.encode()


class CommitCutter(TcpRelay):
    """A TCP relay that cuts the connection at the next COMMIT after :meth:`cut`.

    ``"after"``: the COMMIT is passed on, then the client's side is closed, so the
    server commits and its reply is dropped.  ``"before"``: both sides are closed and
    the COMMIT is dropped.  With ``then_refuse``, every later connection is closed at
    once.  :attr:`sent` is everything the clients sent.
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._mode: str | None = None
        self._following = b""
        self._refuse_after_cut = False
        self._refusing = False
        self.cut_done = threading.Event()
        self.sent = bytearray()

    def cut(self, mode: str, *, then_refuse: bool = False, following: bytes = b"INSERT") -> None:
        """Cut at the next COMMIT sent on a connection after it sent ``following``:
        drivers commit statements of their own when they connect."""
        self._mode = mode
        self._refuse_after_cut = then_refuse
        self._following = following

    def serve(self, client: socket.socket, server: socket.socket) -> None:
        if self._refusing:
            _close(client, server)
            return
        dropping = threading.Event()  # the server's answers no longer reach the client
        answered = threading.Event()  # the server answered since (the COMMIT is done)
        for target in (self._up, self._down):
            threading.Thread(
                target=target, args=(client, server, dropping, answered), daemon=True
            ).start()

    def _up(
        self,
        client: socket.socket,
        server: socket.socket,
        dropping: threading.Event,
        answered: threading.Event,
    ) -> None:
        armed = False
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                self.sent += data
                mode = self._mode
                armed = armed or (mode is not None and self._following in data)
                if mode is not None and armed and b"COMMIT" in data:
                    self._mode = None
                    self._refusing = self._refuse_after_cut
                    # Set before the client can see the end of its connection.
                    if mode == "after":
                        # The server commits and answers; the client sees only the
                        # connection's end, once the COMMIT is done.
                        dropping.set()
                        server.sendall(data)
                        answered.wait(10)
                        self.cut_done.set()
                        _close(client)
                    else:
                        self.cut_done.set()
                        _close(client, server)
                    return
                server.sendall(data)
        _close(client, server)

    def _down(
        self,
        client: socket.socket,
        server: socket.socket,
        dropping: threading.Event,
        answered: threading.Event,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if dropping.is_set():
                    answered.set()
                else:
                    client.sendall(data)
        _close(client, server)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


@pytest.fixture
def cutter(postgres_database: URL) -> Iterator[CommitCutter]:
    with _postgres.connect(postgres_database) as conn:
        conn.execute("CREATE TABLE items (key text PRIMARY KEY)")
    assert postgres_database.host is not None
    assert postgres_database.port is not None
    relay = CommitCutter(postgres_database.host, postgres_database.port)
    try:
        yield relay
    finally:
        relay.close()


@dataclass
class App:
    db: Database | SyncDatabase
    app: ASGIApp
    called_back: list[str] = field(default_factory=list)


def make_app(flavour: str, url: str, **options: Any) -> App:
    """``POST /write?key=K`` inserts K (201) with an on_commit callback; ``GET /read``
    reads, and so do ``GET /auto``, in autocommit, and ``GET /ro``, read-only; ``POST
    /own`` inserts and commits by itself; ``GET /`` uses no database."""
    insert = text("INSERT INTO items (key) VALUES (:key)")
    called_back: list[str] = []
    db: Database | SyncDatabase
    if flavour.startswith("sync-"):
        sync_db = db = SyncDatabase(url, pool_size=2, max_overflow=0, **options)

        def write(request: Request) -> Response:
            key = request.query_params["key"]
            sync_db.session.execute(insert, {"key": key})
            sync_db.on_commit(lambda: called_back.append(key))
            return PlainTextResponse("created", status_code=201)

        def read(request: Request) -> Response:
            count = sync_db.session.execute(text("SELECT count(*) FROM items")).scalar_one()
            return PlainTextResponse(str(count))

        def own(request: Request) -> Response:
            sync_db.session.execute(text("INSERT INTO items VALUES ('own')"))
            sync_db.session.commit()  # the app's own COMMIT: not watched
            return PlainTextResponse("created", status_code=201)

        routes = [
            Route("/write", write, methods=["POST"]),
            Route("/read", read),
            Route("/auto", read),
            Route("/ro", read),
            Route("/own", own, methods=["POST"]),
        ]
    else:
        async_db = db = Database(url, pool_size=2, max_overflow=0, **options)

        async def write_async(request: Request) -> Response:
            key = request.query_params["key"]
            await async_db.session.execute(insert, {"key": key})
            async_db.on_commit(lambda: called_back.append(key))
            return PlainTextResponse("created", status_code=201)

        async def read_async(request: Request) -> Response:
            result = await async_db.session.execute(text("SELECT count(*) FROM items"))
            return PlainTextResponse(str(result.scalar_one()))

        async def own_async(request: Request) -> Response:
            await async_db.session.execute(text("INSERT INTO items VALUES ('own')"))
            await async_db.session.commit()  # the app's own COMMIT: not watched
            return PlainTextResponse("created", status_code=201)

        routes = [
            Route("/write", write_async, methods=["POST"]),
            Route("/read", read_async),
            Route("/auto", read_async),
            Route("/ro", read_async),
            Route("/own", own_async, methods=["POST"]),
        ]
    routes.append(Route("/", lambda request: PlainTextResponse("no database")))
    app = SQLAlchemyMiddleware(
        Starlette(routes=routes), db, retry_after=2, autocommit_reads=["/auto"], read_only=["/ro"]
    )
    return App(db, app, called_back)


def relayed(postgres_database: URL, cutter: CommitCutter, flavour: str) -> str:
    url = postgres_database.set(drivername=PG_DRIVERS[flavour], host="127.0.0.1", port=cutter.port)
    return url.render_as_string(hide_password=False)


async def call(app: ASGIApp, path: str, method: str = "GET") -> tuple[int | None, Any]:
    recorder = ASGIRecorder([{"type": "http.request", "body": b"", "more_body": False}])
    with contextlib.suppress(Exception):  # reaching the server: a 500
        path, _, query = path.partition("?")
        await recorder(app, http_scope(path, method=method, query_string=query.encode()))
    starts = [m for m in recorder.sent if m["type"] == "http.response.start"]
    if not starts:
        return None, None
    return starts[0]["status"], dict(starts[0]["headers"]).get(b"retry-after")


def rows(url: URL) -> set[str]:
    with _postgres.connect(url) as conn:
        return {key for (key,) in conn.execute("SELECT key FROM items")}


async def dispose(db: Database | SyncDatabase) -> None:
    if isinstance(db, Database):
        await db.dispose()
    else:
        db.dispose()


async def run(app: App, *paths: tuple[str, str]) -> list[tuple[int | None, Any]]:
    try:
        answers = [await call(app.app, path, method) for method, path in paths]
        assert app.db.pool_status().checked_out == 0
    finally:
        await dispose(app.db)
    return answers


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_commit_whose_reply_was_lost_is_confirmed_and_the_apps_201_is_sent(
    postgres_database: URL,
    cutter: CommitCutter,
    flavour: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(flavour, relayed(postgres_database, cutter, flavour), confirm_lost_commits=5)
    cutter.cut("after")
    with caplog.at_level(logging.INFO, logger="asgi_sqla"):
        cut, after = await run(app, ("POST", "/write?key=cut"), ("POST", "/write?key=after"))
    assert cutter.cut_done.is_set()
    assert cut == (201, None)
    assert after == (201, None)
    assert rows(postgres_database) == {"cut", "after"}
    assert app.called_back == ["cut", "after"]
    assert "confirms that transaction" in caplog.text
    assert "committed (asked a new connection" in caplog.text


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_commit_cut_before_the_server_saw_it_is_confirmed_aborted_and_stays_503(
    postgres_database: URL,
    cutter: CommitCutter,
    flavour: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(flavour, relayed(postgres_database, cutter, flavour), confirm_lost_commits=5)
    cutter.cut("before")
    with caplog.at_level(logging.INFO, logger="asgi_sqla"):
        cut, after = await run(app, ("POST", "/write?key=cut"), ("POST", "/write?key=after"))
    assert cut == (503, b"2")
    assert after == (201, None)
    assert rows(postgres_database) == {"after"}
    assert app.called_back == ["after"]
    assert "did not commit (asked a new connection" in caplog.text


@pytest.mark.parametrize("flavour", ["asyncpg", "sync-psycopg"])
async def test_without_the_option_a_lost_commit_that_committed_is_answered_503(
    postgres_database: URL, cutter: CommitCutter, flavour: str
) -> None:
    """The window the option closes: the row is there, the answer says it is not."""
    app = make_app(flavour, relayed(postgres_database, cutter, flavour))
    cutter.cut("after")
    (cut,) = await run(app, ("POST", "/write?key=cut"))
    assert cut == (503, b"2")
    assert rows(postgres_database) == {"cut"}
    assert app.called_back == []
    assert PROBE not in cutter.sent


@pytest.mark.parametrize("flavour", ["asyncpg", "sync-psycopg"])
async def test_when_no_connection_can_ask_in_time_the_503_stands_and_the_log_says_unknown(
    postgres_database: URL,
    cutter: CommitCutter,
    flavour: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = relayed(postgres_database, cutter, flavour)
    app = make_app(flavour, url, confirm_lost_commits=0.3)
    cutter.cut("after", then_refuse=True)
    with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
        (cut,) = await run(app, ("POST", "/write?key=cut"))
    assert cut == (503, b"2")
    assert rows(postgres_database) == {"cut"}  # the unknown outcome: it did commit
    assert app.called_back == []
    assert "could not be learnt within confirm_lost_commits=0.3 s" in caplog.text


@pytest.mark.parametrize("flavour", ["asyncpg", "sync-psycopg"])
async def test_a_lost_commit_of_a_transaction_that_wrote_nothing_sends_the_apps_answer(
    postgres_database: URL,
    cutter: CommitCutter,
    flavour: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(flavour, relayed(postgres_database, cutter, flavour), confirm_lost_commits=5)
    # Nothing to ask: no new connection is needed.
    cutter.cut("after", then_refuse=True, following=b"SELECT count(*)")
    with caplog.at_level(logging.WARNING, logger="asgi_sqla"):
        (read,) = await run(app, ("GET", "/read"))
    assert read == (200, None)
    assert "the transaction had written nothing" in caplog.text


@pytest.mark.parametrize("flavour", ["asyncpg", "sync-psycopg"])
async def test_the_id_is_asked_once_per_package_commit_and_never_for_the_apps_own(
    postgres_database: URL, cutter: CommitCutter, flavour: str
) -> None:
    app = make_app(flavour, relayed(postgres_database, cutter, flavour), confirm_lost_commits=5)
    engine = app.db.engine
    sent: list[str] = []
    event.listen(
        engine.sync_engine if isinstance(engine, AsyncEngine) else engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *args: sent.append(statement),
    )
    answers = await run(
        app,
        ("POST", "/write?key=a"),
        ("GET", "/read"),
        ("GET", "/auto"),
        ("GET", "/ro"),
        ("POST", "/own"),
        ("GET", "/"),
    )
    assert [status for status, _ in answers] == [201, 200, 200, 200, 201, 200]
    # /write and /read end with the package's COMMIT; /auto read in autocommit, /ro
    # rolled back, /own committed itself and left nothing to commit, / used no database.
    assert [s for s in sent if "xact_id" in s] == [XID_SQL, XID_SQL]
    # INSERT, probe; SELECT, probe; SELECT; SET TRANSACTION READ ONLY, SELECT; INSERT
    assert len(sent) == 8, sent
    assert rows(postgres_database) == {"a", "own"}


@pytest.mark.parametrize("confirm", [5, None], ids=["confirmed", "without"])
@pytest.mark.parametrize("flavour", ["asyncpg", "psycopg"])
async def test_a_websocket_round_whose_commit_was_cut_after_the_server_committed_goes_on(
    postgres_database: URL, cutter: CommitCutter, flavour: str, confirm: float | None
) -> None:
    """The round's COMMIT, when the app waits for the next message, loses its reply:
    confirmed, the socket goes on; without the option it is closed with 1011."""
    db = Database(relayed(postgres_database, cutter, flavour), confirm_lost_commits=confirm)
    raised: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await receive()
        await db.session.execute(text("INSERT INTO items VALUES ('ws')"))
        try:
            await receive()  # the round ends: its COMMIT is cut
        except CommitFailedError as exc:
            raised.append(exc)
            raise
        await send({"type": "websocket.send", "text": "next round"})
        await receive()  # websocket.disconnect

    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "write"},
        {"type": "websocket.receive", "text": "next"},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    recorder = ASGIRecorder(incoming)
    cutter.cut("after")
    try:
        with contextlib.suppress(CommitFailedError):
            await recorder(SQLAlchemyMiddleware(app, db), websocket_scope())
        assert db.pool_status().checked_out == 0
    finally:
        await db.dispose()
    assert cutter.cut_done.is_set()
    assert rows(postgres_database) == {"ws"}
    if confirm is not None:
        assert recorder.types() == ["websocket.accept", "websocket.send"]
        assert raised == []
    else:
        assert recorder.sent[-1] == {"type": "websocket.close", "code": 1011, "reason": ""}
        assert [type(e) for e in raised] == [CommitFailedError]


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [-1, True, "5", float("nan")])
def test_confirm_lost_commits_must_be_a_number_of_seconds(seconds: object) -> None:
    with pytest.raises(ConfigurationError, match=r"confirm_lost_commits must be a finite"):
        Database("postgresql+asyncpg://app@db/app", confirm_lost_commits=seconds)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [Database, SyncDatabase])
def test_confirm_lost_commits_is_refused_for_a_database_that_cannot_answer(cls: Any) -> None:
    url = "sqlite+aiosqlite://" if cls is Database else "sqlite://"
    with pytest.raises(ConfigurationError, match=r"a sqlite database cannot say"):
        cls(url, confirm_lost_commits=5)


async def test_an_engine_factory_for_another_database_is_refused_when_it_is_made() -> None:
    made: list[AsyncEngine] = []

    def factory() -> AsyncEngine:
        made.append(create_async_engine("sqlite+aiosqlite://"))
        return made[-1]

    db = Database(engine=factory, confirm_lost_commits=5)  # accepted: the factory runs later
    try:
        with pytest.raises(ConfigurationError, match=r"a sqlite database cannot say"):
            _ = db.engine
    finally:
        for engine in made:
            await engine.dispose()
