r"""A small notes service on Quart, with asgi_sqla managing engine and sessions.

Run it with ``make run FRAMEWORK=quart`` (SQLite in ``./example.db``), or point it at
PostgreSQL::

    DATABASE_URL=postgresql+asyncpg://user:password@127.0.0.1/notes make run FRAMEWORK=quart

Then::

    curl -s -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": "hello"}'
    curl -s localhost:8000/notes
    curl -s -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": " "}'
    curl -s -X POST localhost:8000/notes -H 'content-type: application/json' \
        -d '{"text": "re", "parent_id": 999}'
    curl -s -X POST localhost:8000/notes/batch -H 'content-type: application/json' \
        -d '[{"text": "a"}, {"text": "b"}]'
    curl -s localhost:8000/notes/999
    curl -s localhost:8000/notes/events
    curl -s localhost:8000/notes/export

The third request answers 400 (``abort(400)``) after the note was inserted: the row is
rolled back, because the transaction ends before the status line is sent and a status
of 400 or more never commits.  The fourth answers 500, not 201: a reply's
``parent_id`` is a foreign key checked at COMMIT (``DEFERRABLE INITIALLY DEFERRED``, so
that related notes can be written in any order in one transaction), and note 999 does
not exist.  The INSERT passes, the commit fails, and asgi_sqla sends a 500 in place of
the 201 and logs why.  A batch is one transaction: a note longer than 500 characters
fails the database's CHECK constraint halfway, the ``IntegrityError`` reaches Quart's
error handling (500) and the notes before it are rolled back.  ``/notes/999`` answers
404 (``abort(404)``).  Every note that is created schedules a background task that
records it in ``/notes/events``; the task runs after the response, and only if the
note was committed, so none of the failed requests above leaves an event.  The export
streams every note as JSON lines; its body is produced after the response started,
so it reads with a new session.  ``websocat ws://localhost:8000/ws`` saves each JSON
message it receives (``{"text": "..."}``) as a note, one transaction per message.

``app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)`` is how Quart mounts ASGI
middleware: ``asgi_app`` is Quart's ASGI entry point (``Quart.__call__`` calls it), so
wrapping it puts the middleware around everything Quart does, lifespan included,
while ``app`` stays a ``Quart`` object, for ``app.route``, ``app.test_client()`` and
the ``quart`` command.  The server serves ``app``: ``make run FRAMEWORK=quart`` runs
``uvicorn examples.quart_app:app``.  ``init_app(app)`` from ``asgi_sqla.quart`` then
makes Quart's background tasks wait for the commit and commits each websocket
message when the handler waits for the next one (see that module for why Quart needs
it).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

from quart import Quart, abort, request, websocket
from sqlalchemy import CheckConstraint, ForeignKey, Text, event, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.quart import add_background_task, init_app

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./example.db")


def _enable_sqlite_foreign_keys(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def create_engine() -> AsyncEngine:
    engine = create_async_engine(DATABASE_URL)
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
    __table_args__ = (CheckConstraint("length(text) <= 500", name="note_text_length"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    # Checked at COMMIT: a reply to a missing note fails the commit, not the INSERT.
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("notes.id", deferrable=True, initially="DEFERRED")
    )

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "parent_id": self.parent_id}


class Event(Base):
    """What happened, written by background work after the response."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    message: Mapped[str] = mapped_column(Text)


app = Quart(__name__)
app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
init_app(app)


async def add_note(payload: dict[str, Any]) -> Note:
    note = Note(text=str(payload.get("text", "")), parent_id=payload.get("parent_id"))
    db.session.add(note)
    await db.session.flush()  # assigns note.id inside the request's transaction
    # Held back until the transaction has committed; dropped if it rolls back.
    add_background_task(record_event, f"created note {note.id}: {note.text[:100]}")
    return note


async def record_event(message: str) -> None:
    # A background task of its own, after the commit: db.session is a new session,
    # committed when this returns.
    db.session.add(Event(message=message))


@app.post("/notes")
async def create_note() -> tuple[dict[str, Any], int]:
    note = await add_note(await request.get_json())
    if not note.text.strip():
        # The row was written, but 400 >= 400: it is rolled back before the status goes out.
        abort(400, "text must not be empty")
    return note.to_dict(), 201


@app.post("/notes/batch")
async def create_notes() -> tuple[list[dict[str, Any]], int]:
    # One transaction for the whole list: a note that breaks the CHECK constraint
    # raises IntegrityError halfway, and the notes already inserted are rolled back.
    notes = [await add_note(payload) for payload in await request.get_json()]
    return [note.to_dict() for note in notes], 201


@app.get("/notes")
async def list_notes() -> list[dict[str, Any]]:
    notes = await db.session.scalars(select(Note).order_by(Note.id))
    return [note.to_dict() for note in notes]


@app.get("/notes/<int:note_id>")
async def get_note(note_id: int) -> dict[str, Any]:
    note = await db.session.get(Note, note_id)
    if note is None:
        abort(404, f"note {note_id} does not exist")
    return note.to_dict()


@app.get("/notes/events")
async def list_events() -> list[str]:
    return list(await db.session.scalars(select(Event.message).order_by(Event.id)))


@app.get("/notes/export")
async def export_notes() -> tuple[AsyncIterator[str], int, dict[str, str]]:
    async def lines() -> AsyncIterator[str]:
        # The body is sent after the response started: db.session is a new session
        # here, committed when the app returns (the export is recorded with it).
        exported = 0
        async for note in await db.session.stream_scalars(select(Note).order_by(Note.id)):
            exported += 1
            yield json.dumps(note.to_dict()) + "\n"
        db.session.add(Event(message=f"exported {exported} notes"))

    return lines(), 200, {"content-type": "application/x-ndjson"}


@app.websocket("/ws")
async def notes_socket() -> None:
    while True:
        # With init_app, receive() first commits the previous message's note and
        # returns the connection to the pool: an idle socket holds nothing.
        note = await add_note(await websocket.receive_json())
        await websocket.send_json(note.to_dict())


@app.before_serving
async def create_tables() -> None:
    # asgi_sqla has started the engine before this runs, and disposes it after.
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
