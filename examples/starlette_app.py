r"""A small notes service on Starlette, with asgi_sqla managing engine and sessions.

Run it with ``make run`` (SQLite in ``./starlette_example.db``), or point it at
PostgreSQL::

    DATABASE_URL=postgresql+asyncpg://user:password@127.0.0.1/notes make run

Every example serves the same notes API (``docs/guides/examples.md`` has the curl lines
and their replies): ``GET /notes``, ``POST /notes``, ``GET /notes/count`` and
``GET /notes/{id}``.  ``POST /notes`` with an empty ``text`` answers 422: the row it
inserted is rolled back, because the transaction ends before the status line is sent
and a status of 400 or more never commits.  A body that is not a JSON object answers
400.  ``{"text": "re", "parent_id": 999}`` answers 500, not 201: ``parent_id`` is a
foreign key checked at COMMIT (``DEFERRABLE INITIALLY DEFERRED``, so that related notes
can be written in any order in one transaction), and note 999 does not exist.  The
INSERT passes, the commit fails, and asgi_sqla sends a 500 in place of the 201 and
logs why; the background task that would have recorded the note never runs.

What this example shows besides: ``POST /notes/batch`` is one transaction (a note
longer than 500 characters fails the database's CHECK constraint halfway, the
``IntegrityError`` propagates, Starlette answers 500 and the notes before it are
rolled back); ``GET /notes/export`` streams every note as JSON lines, its body
produced after the response started, so it reads with a new session;
``websocat ws://localhost:8000/ws`` saves each JSON message it receives
(``{"text": "..."}``) as a note, one transaction per message.

``Middleware(SQLAlchemyMiddleware, db)`` puts the middleware inside Starlette's
``ServerErrorMiddleware`` and outside its ``ExceptionMiddleware``: a response made by
an exception handler (``HTTPException``) decides the outcome by its status, and an
unhandled exception rolls back before ``ServerErrorMiddleware`` answers 500.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, String, Text, event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from asgi_sqla import Database, SQLAlchemyMiddleware

#: Where the notes are kept unless ``DATABASE_URL`` says otherwise: a file of this
#: example's own, next to where the server runs.
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./starlette_example.db"
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
    """What happened, written by background work after the response."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    message: Mapped[str] = mapped_column(String(200))


def error(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code)


async def add_note(text: str, parent_id: int | None = None) -> Note:
    note = Note(text=text, parent_id=parent_id)
    db.session.add(note)
    await db.session.flush()  # assigns note.id inside the request's transaction
    return note


async def record_event(message: str) -> None:
    # A background task runs after the response was sent, so this is a new session,
    # committed when the app returns.  It never runs if the request's commit failed.
    db.session.add(Event(message=message))


async def create_note(request: Request) -> JSONResponse:
    try:
        payload = await request.json()
    except ValueError:
        return error(400, NOT_AN_OBJECT)
    if not isinstance(payload, dict) or not isinstance(payload.get("text", ""), str):
        return error(400, NOT_AN_OBJECT)
    note = await add_note(payload.get("text", ""), payload.get("parent_id"))
    if not note.text.strip():
        # The row was written, but 422 >= 400: it is rolled back before the status goes out.
        return error(422, "text must not be empty")
    return JSONResponse(
        note.to_dict(),
        status_code=201,
        background=BackgroundTask(record_event, f"created note {note.id}: {note.text[:100]}"),
    )


async def create_notes(request: Request) -> JSONResponse:
    # One transaction for the whole list: a note that breaks the CHECK constraint
    # raises IntegrityError halfway, and the notes already inserted are rolled back.
    notes = [await add_note(str(item["text"])) for item in await request.json()]
    return JSONResponse([note.to_dict() for note in notes], status_code=201)


async def list_notes(request: Request) -> JSONResponse:
    notes = await db.session.scalars(select(Note).order_by(Note.id))
    return JSONResponse([note.to_dict() for note in notes])


async def count_notes(request: Request) -> JSONResponse:
    count = await db.session.scalar(select(func.count()).select_from(Note))
    return JSONResponse({"count": count})


async def get_note(request: Request) -> JSONResponse:
    note = await db.session.get(Note, request.path_params["note_id"])
    if note is None:
        return error(404, "no such note")
    return JSONResponse(note.to_dict())


async def export_notes(request: Request) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        # The body is sent after the response started: db.session is a new session
        # here, committed when the app returns (the export is recorded with it).
        exported = 0
        async for note in await db.session.stream_scalars(select(Note).order_by(Note.id)):
            exported += 1
            yield json.dumps(note.to_dict()) + "\n"
        db.session.add(Event(message=f"exported {exported} notes"))

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def notes_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            # While this waits, the previous message's note is committed and the
            # connection is back in the pool: an idle socket holds nothing.
            payload = await websocket.receive_json()
            note = await add_note(str(payload["text"]), payload.get("parent_id"))
            await websocket.send_json(note.to_dict())
    except WebSocketDisconnect:
        pass


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # asgi_sqla has started the engine before this runs, and disposes it after.
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    yield


app = Starlette(
    routes=[
        Route("/notes", create_note, methods=["POST"]),
        Route("/notes", list_notes, methods=["GET"]),
        Route("/notes/batch", create_notes, methods=["POST"]),
        Route("/notes/count", count_notes),
        Route("/notes/export", export_notes),
        Route("/notes/{note_id:int}", get_note),
        WebSocketRoute("/ws", notes_socket),
    ],
    middleware=[Middleware(SQLAlchemyMiddleware, db)],
    lifespan=lifespan,
)
