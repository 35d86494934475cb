r"""A small notes service on Falcon's ASGI app, with asgi_sqla managing engine and sessions.

Run it with ``make run FRAMEWORK=falcon`` (SQLite in ``./falcon_example.db``), or
point ``DATABASE_URL`` at PostgreSQL (``postgresql+asyncpg://user:password@host/notes``).
Then::

    curl -s -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": "hello"}'
    curl -s localhost:8000/notes
    curl -s localhost:8000/notes/count
    curl -s localhost:8000/notes/1
    curl -s -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": ""}'

The last answers 422: the note was inserted, and rolled back because a status of 400
or more never commits; the transaction ends before the status line is sent.

``falcon.asgi.App`` is wrapped whole: ``SQLAlchemyMiddleware(falcon_app, db)``.  Falcon
answers an unhandled exception with its own 500, so the middleware sees a 500 and
rolls back; its lifespan events run ``process_startup`` after the engine has started.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import falcon
import falcon.asgi
from sqlalchemy import Text, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_sqla import Database, SQLAlchemyMiddleware

db = Database(os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./falcon_example.db"))


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text}


class CreateTables:
    """A Falcon middleware component: its ``process_startup`` is Falcon's lifespan startup."""

    async def process_startup(self, scope: Mapping[str, Any], event: Mapping[str, Any]) -> None:
        # asgi_sqla has started the engine before Falcon runs this.
        async with db.engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)


class Notes:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        notes = await db.session.scalars(select(Note).order_by(Note.id))
        resp.media = [note.to_dict() for note in notes]

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        try:
            payload = await req.get_media()
        except (falcon.MediaMalformedError, falcon.MediaNotFoundError):
            # Falcon's own answer would be 400 with {"title": ...}; same status, our body.
            resp.status, resp.media = 400, {"error": "the body must be a JSON object"}
            return
        if not isinstance(payload, dict):
            resp.status, resp.media = 400, {"error": "the body must be a JSON object"}
            return
        note = Note(text=str(payload.get("text") or ""))
        db.session.add(note)
        await db.session.flush()  # the row is written inside the request's transaction
        if not note.text.strip():
            # 422 >= 400: the row is rolled back before the status goes out.
            resp.status, resp.media = 422, {"error": "text must not be empty"}
            return
        resp.status, resp.media = 201, note.to_dict()


class NoteCount:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = {"count": await db.session.scalar(select(func.count()).select_from(Note))}


class OneNote:
    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, note_id: int
    ) -> None:
        note = await db.session.get(Note, note_id)
        if note is None:
            resp.status, resp.media = 404, {"error": "no such note"}
            return
        resp.media = note.to_dict()


falcon_app = falcon.asgi.App(middleware=[CreateTables()])
falcon_app.add_route("/notes", Notes())
falcon_app.add_route("/notes/count", NoteCount())
falcon_app.add_route("/notes/{note_id:int}", OneNote())

app = SQLAlchemyMiddleware(falcon_app, db)
