r"""A small notes service on FastAPI, with asgi_sqla managing engine and sessions.

Run it with ``make run FRAMEWORK=fastapi`` (SQLite in ``./fastapi_example.db``), or point
it at PostgreSQL::

    DATABASE_URL=postgresql+asyncpg://user:password@127.0.0.1/notes make run FRAMEWORK=fastapi

Every example serves the same notes API (``docs/guides/examples.md`` has the curl lines
and their replies): ``GET /notes``, ``POST /notes``, ``GET /notes/count`` and
``GET /notes/{id}``.  ``POST /notes`` with an empty or missing ``text`` answers 422:
the row it inserted is rolled back, because the transaction ends before the status
line is sent and a status of 400 or more never commits.  A body that is not a JSON
object answers 400 (the handler of ``RequestValidationError`` below, so that every
example answers alike; FastAPI's own answer is a 422).  ``{"text": "re", "parent_id":
999}`` answers 500, not 201: ``parent_id`` is a foreign key checked at COMMIT
(``DEFERRABLE INITIALLY DEFERRED``, so that related notes can be written in any order
in one transaction), and note 999 does not exist.  The INSERT passes, the commit fails,
and asgi_sqla sends a 500 in place of the 201 and logs why; the background task that
would have recorded the note never runs.

What this example shows besides: ``POST /notes/batch`` is one transaction (a note
longer than 500 characters fails the database's CHECK constraint halfway, the
``IntegrityError`` propagates, FastAPI answers 500 and the notes before it are rolled
back); ``GET /notes/export`` streams every note as JSON lines, its body produced after
the response started, so it reads with a new session; ``websocat
ws://localhost:8000/ws`` saves each JSON message it receives (``{"text": "..."}``) as a
note, one transaction per message.

``app.add_middleware(SQLAlchemyMiddleware, db)`` is how FastAPI users mount ASGI
middleware.  It puts the middleware inside FastAPI's ``ServerErrorMiddleware`` and
outside its ``ExceptionMiddleware``: a response made by an exception handler
(``HTTPException``, ``RequestValidationError``, your own handlers) decides the outcome
by its status, and an unhandled exception rolls back before ``ServerErrorMiddleware``
answers 500.  Handlers registered for ``Exception`` or 500 run in
``ServerErrorMiddleware``, outside: the transaction has been rolled back by then.

Endpoints take the session as a parameter (``DBSession``, from ``asgi_sqla.fastapi``):
it is ``db.session``, the same session, one per request.  Work that runs after the
response started (background tasks, the streaming body) reads ``db.session`` again:
the injected session ended with the response start.  So does the websocket endpoint:
an injected session would end at ``accept()``, which waits for the connect message.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.websockets import WebSocketDisconnect
from pydantic import BaseModel
from sqlalchemy import CheckConstraint, ForeignKey, String, Text, event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.fastapi import session_dependency

#: Where the notes are kept unless ``DATABASE_URL`` says otherwise: a file of this
#: example's own, next to where the server runs.
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./fastapi_example.db"
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
DBSession = Annotated[AsyncSession, Depends(session_dependency(db))]


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


class Event(Base):
    """What happened, written by background work after the response."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    message: Mapped[str] = mapped_column(String(200))


class NoteIn(BaseModel):
    # Missing is the same as empty: the handler inserts it, then refuses it with 422.
    text: str = ""
    parent_id: int | None = None


class NoteOut(BaseModel):
    id: int
    text: str

    @classmethod
    def of(cls, note: Note) -> NoteOut:
        return cls(id=note.id, text=note.text)


class Count(BaseModel):
    count: int


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # asgi_sqla has started the engine before this runs, and disposes it after.
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    yield


app = FastAPI(title="notes", lifespan=lifespan)
app.add_middleware(SQLAlchemyMiddleware, db)


def error(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code)


@app.exception_handler(RequestValidationError)
async def refuse_malformed_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    # A body FastAPI cannot read as a NoteIn (not JSON, or text not a string).  Its
    # status decides the outcome: 400, so nothing the request wrote is committed.
    return error(400, NOT_AN_OBJECT)


async def add_note(session: AsyncSession, note_in: NoteIn) -> Note:
    note = Note(text=note_in.text, parent_id=note_in.parent_id)
    session.add(note)
    await session.flush()  # assigns note.id inside the request's transaction
    return note


async def record_event(message: str) -> None:
    # A background task runs after the response was sent, so db.session is a new
    # session here, committed when the app returns.  It never runs if the request's
    # commit failed.
    db.session.add(Event(message=message))


@app.post("/notes", status_code=201, response_model=NoteOut)
async def create_note(
    note_in: NoteIn, session: DBSession, background_tasks: BackgroundTasks
) -> NoteOut | JSONResponse:
    note = await add_note(session, note_in)
    if not note.text.strip():
        # The row was written, but 422 >= 400: it is rolled back before the status goes out.
        return error(422, "text must not be empty")
    background_tasks.add_task(record_event, f"created note {note.id}: {note.text[:100]}")
    return NoteOut.of(note)


@app.post("/notes/batch", status_code=201)
async def create_notes(notes_in: list[NoteIn], session: DBSession) -> list[NoteOut]:
    # One transaction for the whole list, all or nothing.
    return [NoteOut.of(await add_note(session, note_in)) for note_in in notes_in]


@app.get("/notes")
async def list_notes(session: DBSession) -> list[NoteOut]:
    notes = await session.scalars(select(Note).order_by(Note.id))
    return [NoteOut.of(note) for note in notes]


@app.get("/notes/count")
async def count_notes(session: DBSession) -> Count:
    count = await session.scalar(select(func.count()).select_from(Note))
    return Count(count=count or 0)


@app.get("/notes/export")
async def export_notes() -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        # The body is sent after the response started: db.session is a new session
        # here, committed when the app returns (the export is recorded with it).
        exported = 0
        async for note in await db.session.stream_scalars(select(Note).order_by(Note.id)):
            exported += 1
            yield NoteOut.of(note).model_dump_json() + "\n"
        db.session.add(Event(message=f"exported {exported} notes"))

    return StreamingResponse(lines(), media_type="application/x-ndjson")


# `:int`, Starlette's path convertor: /notes/count and /notes/export never reach it.
@app.get("/notes/{note_id:int}", response_model=NoteOut)
async def get_note(note_id: int, session: DBSession) -> NoteOut | JSONResponse:
    note = await session.get(Note, note_id)
    if note is None:
        return error(404, "no such note")
    return NoteOut.of(note)


@app.websocket("/ws")
async def notes_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            # While this waits, the previous message's note is committed and the
            # connection is back in the pool: an idle socket holds nothing.
            note_in = NoteIn.model_validate(await websocket.receive_json())
            note = await add_note(db.session, note_in)
            await websocket.send_json(NoteOut.of(note).model_dump())
    except WebSocketDisconnect:
        pass
