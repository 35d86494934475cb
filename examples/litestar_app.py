r"""A small notes service on Litestar, with asgi_sqla managing engine and sessions.

Run it with ``make run FRAMEWORK=litestar`` (SQLite in ``./litestar_example.db``), or point
it at PostgreSQL::

    DATABASE_URL=postgresql+asyncpg://user:password@127.0.0.1/notes make run FRAMEWORK=litestar

Every example serves the same notes API (``docs/guides/examples.md`` has the curl lines
and their replies): ``GET /notes``, ``POST /notes``, ``GET /notes/count`` and
``GET /notes/{id}``.  ``POST /notes`` with an empty or missing ``text`` answers 422:
the row it inserted is rolled back, because the transaction ends before the status
line is sent and a status of 400 or more never commits.  A body that is not a JSON
object answers 400 (Litestar refuses it before the handler runs; the handler of its
400s below words it as every example does).  ``{"text": "re", "parent_id": 999}``
answers 500, not 201: ``parent_id`` is a foreign key checked at COMMIT (``DEFERRABLE
INITIALLY DEFERRED``, so that related notes can be written in any order in one
transaction), and note 999 does not exist.  The INSERT passes, the commit fails, and
asgi_sqla sends a 500 in place of the 201 and logs why; the background task that would
have recorded the note never runs.

What this example shows besides: ``POST /notes/batch`` is one transaction (a note
longer than 500 characters fails the database's CHECK constraint halfway, the
``IntegrityError`` propagates, Litestar answers 500 and the notes before it are rolled
back); ``GET /notes/export`` streams every note as JSON lines, its body produced after
the response started, so it reads with a new session; ``websocat
ws://localhost:8000/ws`` saves each JSON message it receives (``{"text": "..."}``) as a
note, one transaction per message.

The middleware wraps the ``Litestar`` application object: ``app`` below is
``SQLAlchemyMiddleware(Litestar(...), db)``.  Middleware given to
``Litestar(middleware=[...])`` runs per route, for HTTP and websocket connections only,
and never sees ``lifespan``: wrapping the application object is how the engine is
created and checked at startup and disposed at shutdown, around Litestar's own
``on_startup`` and ``on_shutdown``.  Litestar's exception handling runs inside it, so
the status of the response Litestar makes from an exception (``HTTPException`` and
its subclasses, validation errors as 400, anything else as 500) decides the outcome.
``app`` is the object to serve: ``make run FRAMEWORK=litestar`` serves
``examples.litestar_app:app`` with uvicorn (hypercorn and granian serve it the same
way).  ``litestar run`` looks for a ``Litestar`` instance, so use an ASGI server.

Handlers take the session as a parameter (``session: DBSession``, that is
``NamedDependency[AsyncSession]``, provided by ``asgi_sqla.litestar.provide_session``):
it is ``db.session``, the same session, one per request.  Work that runs after the
response started (background tasks, the streaming body) and each websocket message
read ``db.session`` again: the injected session ended with the response start.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.handlers import websocket_listener
from litestar.logging import LoggingConfig
from litestar.params import FromPath, JSONBody
from litestar.response import Stream
from litestar.serialization import encode_json
from sqlalchemy import CheckConstraint, ForeignKey, Text, event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_sqla import Database, SQLAlchemyMiddleware
from asgi_sqla.litestar import provide_session

#: Where the notes are kept unless ``DATABASE_URL`` says otherwise: a file of this
#: example's own, next to where the server runs.
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./litestar_example.db"
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


#: The handler parameter the ``session`` dependency fills: ``db.session``, one per request.
DBSession = NamedDependency[AsyncSession]


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


@dataclass
class NoteIn:
    # Missing is the same as empty: the handler inserts it, then refuses it with 422.
    text: str = ""
    parent_id: int | None = None


def error(status_code: int, message: str) -> Response[dict[str, str]]:
    return Response({"error": message}, status_code=status_code)


def refuse_malformed_body(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # Litestar's 400s: a body it cannot read as JSON (ClientException) or as a NoteIn
    # (ValidationException, text not a string).  The status decides the outcome: 400,
    # so nothing the request wrote is committed.
    return error(400, NOT_AN_OBJECT)


async def add_note(session: AsyncSession, note_in: NoteIn) -> Note:
    note = Note(text=note_in.text, parent_id=note_in.parent_id)
    session.add(note)
    await session.flush()  # assigns note.id inside the request's transaction
    return note


async def record_event(message: str) -> None:
    # A background task runs after the response was sent, so this is a new session,
    # committed when the app returns.  It never runs if the request's commit failed.
    db.session.add(Event(message=message))


@post("/notes")
async def create_note(data: JSONBody[NoteIn], session: DBSession) -> Response[dict[str, Any]]:
    note = await add_note(session, data)
    if not note.text.strip():
        # The row was written, but 422 >= 400: it is rolled back before the status goes out.
        return error(422, "text must not be empty")
    return Response(
        note.to_dict(),
        status_code=201,
        background=BackgroundTask(record_event, f"created note {note.id}: {note.text[:100]}"),
    )


@post("/notes/batch")
async def create_notes(data: JSONBody[list[NoteIn]], session: DBSession) -> list[dict[str, Any]]:
    # One transaction for the whole list: a note that breaks the CHECK constraint
    # raises IntegrityError halfway, and the notes already inserted are rolled back.
    return [(await add_note(session, note_in)).to_dict() for note_in in data]


@get("/notes")
async def list_notes(session: DBSession) -> list[dict[str, Any]]:
    notes = await session.scalars(select(Note).order_by(Note.id))
    return [note.to_dict() for note in notes]


@get("/notes/count")
async def count_notes(session: DBSession) -> dict[str, int]:
    count = await session.scalar(select(func.count()).select_from(Note))
    return {"count": count or 0}


@get("/notes/{note_id:int}")
async def get_note(note_id: FromPath[int], session: DBSession) -> Response[dict[str, Any]]:
    note = await session.get(Note, note_id)
    if note is None:
        return error(404, "no such note")
    return Response(note.to_dict())


@get("/notes/export")
async def export_notes() -> Stream:
    async def lines() -> AsyncIterator[bytes]:
        # The body is sent after the response started: db.session is a new session
        # here, committed when the app returns (the export is recorded with it).
        exported = 0
        async for note in await db.session.stream_scalars(select(Note).order_by(Note.id)):
            exported += 1
            yield encode_json(note.to_dict()) + b"\n"
        db.session.add(Event(message=f"exported {exported} notes"))

    return Stream(lines(), media_type="application/x-ndjson")


@websocket_listener("/ws")
async def notes_socket(data: dict[str, Any]) -> dict[str, Any]:
    # Litestar reads the next message once this returns; while it waits, this
    # message's note is committed and the connection is back in the pool.
    note = await add_note(db.session, NoteIn(str(data["text"]), data.get("parent_id")))
    return note.to_dict()


async def create_tables() -> None:
    # asgi_sqla has started the engine before this runs, and disposes it after.
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


app = SQLAlchemyMiddleware(
    Litestar(
        route_handlers=[
            create_note,
            create_notes,
            list_notes,
            count_notes,
            get_note,
            export_notes,
            notes_socket,
        ],
        dependencies={"session": provide_session(db)},
        exception_handlers={400: refuse_malformed_body},
        on_startup=[create_tables],
        # Litestar's own loggers only: the root logger (where asgi_sqla's records go)
        # stays the server's, or the host application's, to configure.
        logging_config=LoggingConfig(configure_root_logger=False),
    ),
    db,
)
