r"""A small notes service on BlackSheep, with asgi_sqla managing engine and sessions.

Run it with ``make run FRAMEWORK=blacksheep`` (SQLite in ``./blacksheep_example.db``),
or point ``DATABASE_URL`` at PostgreSQL (``postgresql+asyncpg://user:password@host/notes``).
Then::

    curl -s -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": "hello"}'
    curl -s localhost:8000/notes
    curl -s localhost:8000/notes/count
    curl -s localhost:8000/notes/1
    curl -s -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": ""}'

The last answers 422: the note was inserted, and rolled back because a status of 400
or more never commits; the transaction ends before the status line is sent.

The BlackSheep application is wrapped whole: ``SQLAlchemyMiddleware(blacksheep_app, db)``.
The request's session reaches the handlers through BlackSheep's dependency injection:
a handler parameter annotated ``AsyncSession`` gets ``db.session``.  BlackSheep
answers an unhandled exception with its own 500, so the middleware sees a 500 and
rolls back; its ``on_start`` event runs after the engine has started.
"""

from __future__ import annotations

import os
from typing import Any

from blacksheep import Application, Request, Response, json
from blacksheep.exceptions import BadRequest
from rodi import Container
from sqlalchemy import Text, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_sqla import Database, SQLAlchemyMiddleware

db = Database(os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./blacksheep_example.db"))


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text}


def request_session() -> AsyncSession:
    """The request's session, for BlackSheep's container (resolved inside the request)."""
    return db.session


services = Container()
# Transient: the factory runs for each handler call, in the request's context.
services.add_transient_by_factory(request_session, AsyncSession)
blacksheep_app = Application(services=services)
get, post = blacksheep_app.router.get, blacksheep_app.router.post


@blacksheep_app.on_start
async def create_tables(application: Application) -> None:
    # asgi_sqla has started the engine before BlackSheep fires on_start.
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


@get("/notes")
async def list_notes(session: AsyncSession) -> Response:
    notes = await session.scalars(select(Note).order_by(Note.id))
    return json([note.to_dict() for note in notes])


@post("/notes")
async def create_note(request: Request, session: AsyncSession) -> Response:
    try:
        payload = await request.json()
    except BadRequest:  # BlackSheep's BadRequestFormat: the body is not JSON
        return json({"error": "the body must be a JSON object"}, status=400)
    if not isinstance(payload, dict):  # no body at all reads as None
        return json({"error": "the body must be a JSON object"}, status=400)
    note = Note(text=str(payload.get("text") or ""))
    session.add(note)
    await session.flush()  # the row is written inside the request's transaction
    if not note.text.strip():
        # 422 >= 400: the row is rolled back before the status goes out.
        return json({"error": "text must not be empty"}, status=422)
    return json(note.to_dict(), status=201)


@get("/notes/count")
async def count_notes(session: AsyncSession) -> Response:
    return json({"count": await session.scalar(select(func.count()).select_from(Note))})


@get("/notes/{note_id}")
async def get_note(note_id: int, session: AsyncSession) -> Response:
    note = await session.get(Note, note_id)
    if note is None:
        return json({"error": "no such note"}, status=404)
    return json(note.to_dict())


app = SQLAlchemyMiddleware(blacksheep_app, db)
