r"""FastAPI's SQL tutorial (the "heroes" app, with SQLModel), sessions managed by asgi_sqla.

The models and the endpoints are the tutorial's, ``def`` endpoints and all.  What
differs: the tutorial's ``engine`` and its ``get_session`` dependency (a ``yield``
opening ``Session(engine)``) are replaced by a ``SyncDatabase`` and its session
dependency, the app is wrapped in ``SQLAlchemyMiddleware``, the tables are created in
a lifespan, and ``create_hero`` flushes where the tutorial commits.  Added: the notes
API every example serves (``GET /notes``, ``POST /notes``, ``GET /notes/count``,
``GET /notes/{id}``: ``docs/guides/examples.md`` has its curl lines and their replies),
here with ``def`` endpoints, ``/heroes/{id}/birthday``, with a ``def`` dependency with
``yield``, and ``/health``.  Run it with ``make run FRAMEWORK=sqlmodel`` (SQLite in
``./sqlmodel_example.db``, through the standard library's ``sqlite3``: a
``SyncDatabase`` needs a synchronous driver), or point it at PostgreSQL with a
synchronous driver::

    DATABASE_URL=postgresql+psycopg://user:password@127.0.0.1/heroes make run FRAMEWORK=sqlmodel

Then::

    curl -s -X POST localhost:8000/heroes/ -H 'content-type: application/json' \
        -d '{"name": "Deadpond", "secret_name": "Dive Wilson", "age": 30}'
    curl -s 'localhost:8000/heroes/?offset=0&limit=10'
    curl -s localhost:8000/heroes/1
    curl -s -X PATCH localhost:8000/heroes/1 -H 'content-type: application/json' \
        -d '{"age": 31}'
    curl -s -X POST localhost:8000/heroes/1/birthday
    curl -s localhost:8000/health
    curl -s -X DELETE localhost:8000/heroes/1

What changes with the middleware:

* The transaction ends **before the status line is sent**: committed for a status
  below 400, rolled back otherwise, and a commit that fails becomes a 500 instead of
  a 200 for a write that never happened.  (With the tutorial's ``get_session``, a
  write the endpoint did not commit by hand is rolled back when the session closes,
  after the client got its 200.)  So ``create_hero`` needs no ``session.commit()``;
  the tutorial's explicit commits, kept in ``update_hero`` and ``delete_hero``, still
  work, each committing at once.
* The session is **lazy**: it checks out a connection at its first statement, and
  gives it back when the response starts, before the body is sent.  ``/health``
  never touches the database and holds no connection.
* The engine lives as long as the app: created and checked at startup, disposed at
  shutdown.

``session_dependency(db)`` gives ``db.session``, the request's one session, whatever
the number of dependencies that ask for it.  The endpoints and the ``def``
dependencies run in FastAPI's worker threads, where a synchronous session belongs;
an ``async def`` endpoint must not use it (its calls raise ``BlockingCallError``: they
would stop the event loop while the database answers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import sqlmodel
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import CheckConstraint, Column, Engine, ForeignKey, event, func
from sqlmodel import Field, Session, SQLModel, select

from asgi_sqla import SQLAlchemyMiddleware, SyncDatabase
from asgi_sqla.fastapi import session_dependency

logger = logging.getLogger(__name__)

#: Where the heroes and notes are kept unless ``DATABASE_URL`` says otherwise: a file of
#: this example's own, next to where the server runs.
DEFAULT_DATABASE_URL = "sqlite:///./sqlmodel_example.db"
NOT_AN_OBJECT = "the body must be a JSON object with a text field"


class HeroBase(SQLModel):
    name: str = Field(index=True)
    age: int | None = Field(default=None, index=True)


class Hero(HeroBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    secret_name: str


class HeroPublic(HeroBase):
    id: int


class HeroCreate(HeroBase):
    secret_name: str


class HeroUpdate(SQLModel):
    name: str | None = None
    age: int | None = None
    secret_name: str | None = None


class Note(SQLModel, table=True):
    """A note of the API every example serves."""

    __tablename__ = "notes"
    # The database is the authority on the length: a CHECK, which SQLite enforces too.
    __table_args__ = (CheckConstraint("length(text) <= 500", name="note_text_length"),)

    id: int | None = Field(default=None, primary_key=True)
    text: str
    # Checked at COMMIT: a reply to a missing note fails the commit, not the INSERT.
    parent_id: int | None = Field(
        default=None,
        sa_column=Column(ForeignKey("notes.id", deferrable=True, initially="DEFERRED")),
    )


class NoteCreate(SQLModel):
    # Missing is the same as empty: the endpoint inserts it, then refuses it with 422.
    text: str = ""
    parent_id: int | None = None


class NotePublic(SQLModel):
    id: int
    text: str


def _enable_sqlite_foreign_keys(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


# In place of the tutorial's `engine = create_engine(sqlite_url, connect_args=...)`: a
# factory the middleware calls at startup (it disposes the engine at shutdown), reading
# DATABASE_URL then, a synchronous driver's URL.  SQLAlchemy lets SQLite file databases
# be shared between threads already, so no `check_same_thread`.
def create_engine() -> Engine:
    engine = sqlmodel.create_engine(os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL)
    if engine.dialect.name == "sqlite":
        # SQLite checks foreign keys only when each connection asks it to.
        event.listen(engine, "connect", _enable_sqlite_foreign_keys)
    return engine


db = SyncDatabase(engine=create_engine, session_class=sqlmodel.Session)


def create_db_and_tables() -> None:
    SQLModel.metadata.create_all(db.engine)


# In place of the tutorial's `get_session`: the request's session, committed or rolled
# back by the middleware before the status line is sent.
SessionDep = Annotated[Session, Depends(session_dependency(db))]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The middleware has created the engine and checked that the database answers
    # before this runs.  Creating the tables blocks the event loop, as in the tutorial:
    # harmless at startup, before any request is served.
    create_db_and_tables()
    yield


app = FastAPI(lifespan=lifespan)
app.add_middleware(SQLAlchemyMiddleware, db)


def error(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code)


@app.exception_handler(RequestValidationError)
async def refuse_malformed_note(request: Request, exc: RequestValidationError) -> Response:
    # A body the notes API cannot read answers 400, as in every example; the tutorial's
    # routes keep FastAPI's 422.  Either status rolls back what the request wrote.
    if request.url.path.startswith("/notes"):
        return error(400, NOT_AN_OBJECT)
    return await request_validation_exception_handler(request, exc)


@app.post("/notes", status_code=201, response_model=NotePublic)
def create_note(note_in: NoteCreate, session: SessionDep) -> Note | JSONResponse:
    note = Note.model_validate(note_in)
    session.add(note)
    session.flush()  # assigns note.id inside the request's transaction
    if not note.text.strip():
        # The row was written, but 422 >= 400: it is rolled back before the status goes out.
        return error(422, "text must not be empty")
    return note


@app.get("/notes", response_model=list[NotePublic])
def list_notes(session: SessionDep) -> Sequence[Note]:
    return session.exec(select(Note).order_by(Note.id)).all()  # type: ignore[arg-type]


@app.get("/notes/count")
def count_notes(session: SessionDep) -> dict[str, int]:
    return {"count": session.exec(select(func.count()).select_from(Note)).one()}


@app.get("/notes/{note_id:int}", response_model=NotePublic)
def get_note(note_id: int, session: SessionDep) -> Note | JSONResponse:
    note = session.get(Note, note_id)
    if note is None:
        return error(404, "no such note")
    return note


@app.post("/heroes/", response_model=HeroPublic)
def create_hero(hero: HeroCreate, session: SessionDep) -> Hero:
    db_hero = Hero.model_validate(hero)
    session.add(db_hero)
    # The tutorial commits and refreshes here.  The middleware commits before the
    # status line is sent (a failed commit answers 500), so a flush, which sends the
    # INSERT and sets db_hero.id, is enough; `session.commit()` would work too.
    session.flush()
    return db_hero


@app.get("/heroes/", response_model=list[HeroPublic])
def read_heroes(
    session: SessionDep,
    offset: int = 0,
    limit: Annotated[int, Query(le=100)] = 100,
) -> Sequence[Hero]:
    heroes = session.exec(select(Hero).offset(offset).limit(limit)).all()
    return heroes


@app.get("/heroes/{hero_id}", response_model=HeroPublic)
def read_hero(hero_id: int, session: SessionDep) -> Hero:
    hero = session.get(Hero, hero_id)
    if not hero:
        raise HTTPException(status_code=404, detail="Hero not found")
    return hero


@app.patch("/heroes/{hero_id}", response_model=HeroPublic)
def update_hero(hero_id: int, hero: HeroUpdate, session: SessionDep) -> Hero:
    hero_db = session.get(Hero, hero_id)
    if not hero_db:
        raise HTTPException(status_code=404, detail="Hero not found")
    hero_data = hero.model_dump(exclude_unset=True)
    hero_db.sqlmodel_update(hero_data)
    session.add(hero_db)
    # The tutorial's explicit commit, kept: it commits now (db.session.commit() is
    # allowed), and the middleware commits whatever the request does after it.
    session.commit()
    session.refresh(hero_db)
    return hero_db


@app.delete("/heroes/{hero_id}")
def delete_hero(hero_id: int, session: SessionDep) -> dict[str, bool]:
    hero = session.get(Hero, hero_id)
    if not hero:
        raise HTTPException(status_code=404, detail="Hero not found")
    session.delete(hero)
    session.commit()
    return {"ok": True}


def hero_for_update(hero_id: int, session: SessionDep) -> Iterator[Hero]:
    """A ``def`` dependency with ``yield``: FastAPI runs it in a worker thread too.

    Before the ``yield`` it uses the request's session; the row stays locked (``FOR
    UPDATE`` on PostgreSQL; SQLite ignores it) until the middleware commits.  The
    code after the ``yield`` runs once the response was sent (FastAPI 0.118 and
    later): the transaction has ended by then, committed or not, so it must not use
    ``session`` (that raises ``SessionEndedError``).
    """
    hero = session.get(Hero, hero_id, with_for_update=True)
    if not hero:
        raise HTTPException(status_code=404, detail="Hero not found")
    yield hero
    logger.info("Hero %d updated.", hero_id)


@app.post("/heroes/{hero_id}/birthday", response_model=HeroPublic)
def celebrate_birthday(hero: Annotated[Hero, Depends(hero_for_update)]) -> Hero:
    # No add, no commit: the hero belongs to the request's session, which flushes the
    # change and commits it before the 200 is sent.
    hero.age = (hero.age or 0) + 1
    return hero


@app.get("/health")
async def health() -> dict[str, object]:
    # Never reads db.session, so it opens no session and holds no connection: the
    # count is of other requests' connections.  (An `async def` endpoint runs on the
    # event loop; pool_status() does no I/O.)
    return {"status": "ok", "connections_in_use": db.pool_status().checked_out}
