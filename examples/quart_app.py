r"""A small notes service on Quart, with asgi_sqla managing engine and sessions.

Run it with ``make run FRAMEWORK=quart`` (SQLite in ``./quart_example.db``), or point it
at PostgreSQL::

    DATABASE_URL=postgresql+asyncpg://user:password@127.0.0.1/notes make run FRAMEWORK=quart

Every example serves the same notes API (``docs/guides/examples.md`` has the curl lines
and their replies): ``GET /notes``, ``POST /notes``, ``GET /notes/count`` and
``GET /notes/{id}``.  ``POST /notes`` with an empty or missing ``text`` answers 422:
the row it inserted is rolled back, because the transaction ends before the status
line is sent and a status of 400 or more never commits.  A body that is not a JSON
object answers 400.  ``{"text": "re", "parent_id": 999}`` answers 500, not 201:
``parent_id`` is a foreign key checked at COMMIT (``DEFERRABLE INITIALLY DEFERRED``, so
that related notes can be written in any order in one transaction), and note 999 does
not exist.  The INSERT passes, the commit fails, and asgi_sqla sends a 500 in place of
the 201 and logs why.

What this example shows besides: every note that is created schedules a background
task that records it in ``GET /notes/events``; the task runs after the response, and
only if the note was committed, so none of the failed requests above leaves an event.
``POST /notes/batch`` is one transaction (a note longer than 500 characters fails the
database's CHECK constraint halfway, the ``IntegrityError`` reaches Quart's error
handling, which answers 500, and the notes before it are rolled back);
``GET /notes/export`` streams every note as JSON lines, its body produced after the
response started, so it reads with a new session; ``websocat ws://localhost:8000/ws``
saves each JSON message it receives (``{"text": "..."}``) as a note, one transaction
per message.

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

from quart import Quart, request, websocket
from sqlalchemy import CheckConstraint, ForeignKey, Text, event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.quart import add_background_task, init_app

#: Where the notes are kept unless ``DATABASE_URL`` says otherwise: a file of this
#: example's own, next to where the server runs.
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./quart_example.db"
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
    """What happened, written by background work after the response."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    message: Mapped[str] = mapped_column(Text)


app = Quart(__name__)
app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)  # type: ignore[method-assign]
init_app(app)


async def add_note(payload: dict[str, Any]) -> Note:
    note = Note(text=payload.get("text", ""), parent_id=payload.get("parent_id"))
    db.session.add(note)
    await db.session.flush()  # assigns note.id inside the request's transaction
    # Held back until the transaction has committed; dropped if it rolls back.
    add_background_task(record_event, f"created note {note.id}: {note.text[:100]}")
    return note


async def record_event(message: str) -> None:
    # A background task of its own, after the commit: db.session is a new session,
    # committed when this returns.
    db.session.add(Event(message=message))


def error(status_code: int, message: str) -> tuple[dict[str, str], int]:
    return {"error": message}, status_code


@app.post("/notes")
async def create_note() -> tuple[dict[str, Any], int]:
    # force: whatever the content type; silent: None, not Quart's HTML 400, if not JSON.
    payload = await request.get_json(force=True, silent=True)
    if not isinstance(payload, dict) or not isinstance(payload.get("text", ""), str):
        return error(400, NOT_AN_OBJECT)
    note = await add_note(payload)
    if not note.text.strip():
        # The row was written, but 422 >= 400: it is rolled back before the status goes out.
        return error(422, "text must not be empty")
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


@app.get("/notes/count")
async def count_notes() -> dict[str, int]:
    count = await db.session.scalar(select(func.count()).select_from(Note))
    return {"count": count or 0}


@app.get("/notes/<int:note_id>")
async def get_note(note_id: int) -> tuple[dict[str, Any], int]:
    note = await db.session.get(Note, note_id)
    if note is None:
        return error(404, "no such note")
    return note.to_dict(), 200


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
