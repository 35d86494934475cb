r"""A small notes service as a hand-written ASGI app, with asgi_sqla managing engine and sessions.

No framework: ``raw_app`` routes on the scope's method and path and sends the ASGI
messages itself; ``app = SQLAlchemyMiddleware(raw_app, db)`` wraps it.  Run it with
``make run FRAMEWORK=asgi`` (SQLite in ``./asgi_example.db``), or point it at
PostgreSQL::

    DATABASE_URL=postgresql+asyncpg://user:password@127.0.0.1/notes make run FRAMEWORK=asgi

Every example serves the same notes API (``docs/guides/examples.md`` has the curl lines
and their replies): ``GET /notes``, ``POST /notes``, ``GET /notes/count`` and
``GET /notes/{id}``.  ``POST /notes`` with an empty or missing ``text`` answers 422:
the row it inserted is rolled back, because the transaction ends before the status
line is sent and a status of 400 or more never commits.  A body that is not a JSON
object answers 400.  ``{"text": "re", "parent_id": 999}`` answers 500, not 201:
``parent_id`` is a foreign key checked at COMMIT (``DEFERRABLE INITIALLY DEFERRED``, so
that related notes can be written in any order in one transaction), and note 999 does
not exist.  The INSERT passes, the commit fails inside ``send(http.response.start)``:
asgi_sqla sends a 500 in place of the 201, logs why and raises ``CommitFailedError``
out of ``send()``, so the event the app records after its response is never written.

What this example shows besides: ``POST /notes/batch`` is one transaction (a note
longer than 500 characters fails the database's CHECK constraint halfway, the app
raises, the middleware rolls back the notes before it and re-raises, and the server
answers 500); ``GET /notes/export`` streams every note as JSON lines, its body sent
after the response started, so it reads with a new session; ``websocat
ws://localhost:8000/ws`` saves each JSON message it receives (``{"text": "..."}``) as a
note, one transaction per message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, String, Text, event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_sqla import Database, SQLAlchemyMiddleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Where the notes are kept unless ``DATABASE_URL`` says otherwise: a file of this
#: example's own, next to where the server runs.
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./asgi_example.db"
NOT_AN_OBJECT = "the body must be a JSON object with a text field"


def _enable_sqlite_foreign_keys(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def create_engine() -> AsyncEngine:
    # Read at startup, not import: each start (a test's too) uses the URL of its time.
    engine = create_async_engine(os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL)
    if engine.dialect.name == "sqlite":
        # SQLite checks foreign keys only when each connection asks it to.
        event.listen(engine.sync_engine, "connect", _enable_sqlite_foreign_keys)
    return engine


# The factory runs at startup; asgi_sqla disposes the engine at shutdown.
db = Database(engine=create_engine)


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    # The database is the authority on the length: a CHECK, which SQLite enforces
    # too (it ignores VARCHAR lengths).
    __table_args__ = (CheckConstraint("length(text) <= 500", name="note_text_length"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    # Checked at COMMIT: a reply to a missing note fails the commit, not the INSERT.
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("notes.id", deferrable=True, initially="DEFERRED")
    )

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text}


class Event(Base):
    """What happened, written after the response was sent."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    message: Mapped[str] = mapped_column(String(200))


async def add_note(text: str, parent_id: int | None = None) -> Note:
    note = Note(text=text, parent_id=parent_id)
    db.session.add(note)
    await db.session.flush()  # assigns note.id inside the request's transaction
    return note


async def read_json(receive: Receive) -> Any:
    """The request's body, parsed as JSON (``ValueError`` if it is not JSON)."""
    body, more_body = b"", True
    while more_body:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("the client left before sending its request body")
        body += message.get("body", b"")
        more_body = message.get("more_body", False)
    return json.loads(body)


async def respond(send: Send, status: int, data: Any) -> None:
    # Compact, as the frameworks' JSON responses are.
    body = json.dumps(data, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    # asgi_sqla commits (status < 400) or rolls back inside this first send.
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def create_note(receive: Receive, send: Send) -> None:
    try:
        payload = await read_json(receive)
    except ValueError:
        payload = None
    if not isinstance(payload, dict) or not isinstance(payload.get("text", ""), str):
        await respond(send, 400, {"error": NOT_AN_OBJECT})
        return
    note = await add_note(payload.get("text", ""), payload.get("parent_id"))
    if not note.text.strip():
        # The row was written, but 422 >= 400: it is rolled back before the status goes out.
        await respond(send, 422, {"error": "text must not be empty"})
        return
    await respond(send, 201, note.to_dict())
    # After the response: a new session, committed when the app returns.  If the
    # commit above failed, send() raised CommitFailedError and this never runs.
    db.session.add(Event(message=f"created note {note.id}: {note.text[:100]}"))


async def create_notes(receive: Receive, send: Send) -> None:
    # One transaction for the whole list: a note that breaks the CHECK constraint
    # raises IntegrityError halfway, and the notes already inserted are rolled back.
    notes = [await add_note(str(item["text"])) for item in await read_json(receive)]
    await respond(send, 201, [note.to_dict() for note in notes])


async def list_notes(send: Send) -> None:
    notes = await db.session.scalars(select(Note).order_by(Note.id))
    await respond(send, 200, [note.to_dict() for note in notes])


async def count_notes(send: Send) -> None:
    count = await db.session.scalar(select(func.count()).select_from(Note))
    await respond(send, 200, {"count": count})


async def get_note(send: Send, note_id: int) -> None:
    note = await db.session.get(Note, note_id)
    if note is None:
        await respond(send, 404, {"error": "no such note"})
        return
    await respond(send, 200, note.to_dict())


async def export_notes(send: Send) -> None:
    headers = [(b"content-type", b"application/x-ndjson")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    # The response has started: db.session is a new session from here on, committed
    # when the app returns (the export is recorded with it).
    exported = 0
    async for note in await db.session.stream_scalars(select(Note).order_by(Note.id)):
        exported += 1
        line = json.dumps(note.to_dict(), separators=(",", ":")) + "\n"
        await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b""})
    db.session.add(Event(message=f"exported {exported} notes"))


async def http(scope: Scope, receive: Receive, send: Send) -> None:
    route = (scope["method"], scope["path"])
    note_id = re.fullmatch(r"/notes/([0-9]+)", scope["path"])
    if route == ("POST", "/notes"):
        await create_note(receive, send)
    elif route == ("GET", "/notes"):
        await list_notes(send)
    elif route == ("POST", "/notes/batch"):
        await create_notes(receive, send)
    elif route == ("GET", "/notes/count"):
        await count_notes(send)
    elif route == ("GET", "/notes/export"):
        await export_notes(send)
    elif scope["method"] == "GET" and note_id:
        await get_note(send, int(note_id[1]))
    else:
        await respond(send, 404, {"error": "not found"})


async def notes_socket(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["path"] != "/ws":
        await send({"type": "websocket.close", "code": 1000})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        # While this waits, the previous message's note is committed and the
        # connection is back in the pool: an idle socket holds nothing.
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        payload = json.loads(message.get("text") or message.get("bytes") or b"{}")
        note = await add_note(str(payload["text"]), payload.get("parent_id"))
        reply = json.dumps(note.to_dict(), separators=(",", ":"))
        await send({"type": "websocket.send", "text": reply})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            # asgi_sqla has started the engine before handing this message on, and
            # disposes it after the shutdown below.
            async with db.engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await http(scope, receive, send)
    elif scope["type"] == "websocket":
        await notes_socket(scope, receive, send)
    elif scope["type"] == "lifespan":
        await lifespan(receive, send)


app = SQLAlchemyMiddleware(raw_app, db)
