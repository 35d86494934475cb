"""A small notes service on Starlette, with asgi_sqla managing engine and sessions.

Run it with ``make run`` (SQLite in ``./example.db``), or point it at PostgreSQL::

    DATABASE_URL=postgresql+asyncpg://user:password@127.0.0.1/notes make run

Then::

    curl -s -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": "hello"}'
    curl -s localhost:8000/notes
    curl -s -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": ""}'
    curl -s localhost:8000/notes/count

The third request answers 422: the row it inserted is rolled back, because the
transaction ends before the status line is sent and a status of 400 or more never
commits.  ``websocat ws://localhost:8000/ws`` saves each message it receives as a
note, one transaction per message.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from asgi_sqla import Database, SQLAlchemyMiddleware

db = Database(os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./example.db"))


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(500))


async def create_note(request: Request) -> JSONResponse:
    payload = await request.json()
    note = Note(text=str(payload.get("text", "")))
    db.session.add(note)
    await db.session.flush()  # assigns note.id inside the request's transaction
    if not note.text.strip():
        # The row was written, but 422 >= 400: it is rolled back before the status goes out.
        return JSONResponse({"error": "text must not be empty"}, status_code=422)
    return JSONResponse({"id": note.id, "text": note.text}, status_code=201)


async def list_notes(request: Request) -> JSONResponse:
    notes = await db.session.scalars(select(Note).order_by(Note.id))
    return JSONResponse([{"id": n.id, "text": n.text} for n in notes])


async def count_notes(request: Request) -> PlainTextResponse:
    count = await db.session.scalar(select(func.count()).select_from(Note))
    return PlainTextResponse(f"{count}\n")


async def notes_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            # While this waits, the previous message's note is committed and the
            # connection is back in the pool: an idle socket holds nothing.
            text = await websocket.receive_text()
            note = Note(text=text)
            db.session.add(note)
            await db.session.flush()
            await websocket.send_json({"id": note.id, "text": note.text})
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
        Route("/notes/count", count_notes),
        WebSocketRoute("/ws", notes_socket),
    ],
    middleware=[Middleware(SQLAlchemyMiddleware, db)],
    lifespan=lifespan,
)
