r"""A small notes service on Django's ASGI handler (``def`` views), with a ``SyncDatabase``.

Django is configured in this one file (``settings.configure``, no project); its ORM is
not used: the views use SQLAlchemy through ``db.session``.  Run it with
``make run FRAMEWORK=django_sync`` (SQLite in ``./django_sync_example.db``, through
the standard library's sqlite3), or point ``DATABASE_URL`` at PostgreSQL through a
synchronous driver (``postgresql+psycopg://user:password@host/notes``).
Then::

    curl -s -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": "hello"}'
    curl -s localhost:8000/notes
    curl -s localhost:8000/notes/count
    curl -s localhost:8000/notes/1
    curl -s -X POST localhost:8000/notes -H 'content-type: application/json' -d '{"text": ""}'

The last answers 422: the note was inserted, and rolled back because a status of 400
or more never commits; the transaction ends before the status line is sent.

Django runs each ``def`` view with ``sync_to_async(thread_sensitive=True)``; its
``ASGIHandler`` gives every request a thread of its own (``ThreadSensitiveContext``),
and asgiref copies the request's context into it, so ``db.session`` in the view is
the request's ``Session``.  The middleware commits it before the status goes out, in
a worker thread of its own.

Django's ``ASGIHandler`` serves HTTP only: it raises for a ``lifespan`` scope.  The
middleware then answers the server's lifespan itself (the engine still starts and is
disposed), but nothing of the app's would run at startup; so :func:`application`
answers lifespan here to create the tables, and hands HTTP to Django.  Django answers
an exception in a view with its own 500 (and cancels the view when the client
disconnects): the middleware sees a 500, or the cancellation, and rolls back.
"""

from __future__ import annotations

import json
import os
from typing import Any

import anyio.to_thread
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.urls import path
from sqlalchemy import Text, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_sqla import SQLAlchemyMiddleware, SyncDatabase
from asgi_sqla.types import AnyASGIApp, Receive, Scope, Send

settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "[::1]"],
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "only-for-the-example"),
    # No middleware: no CSRF check on the JSON POST (add Django's own as your app needs).
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
)

db = SyncDatabase(os.environ.get("DATABASE_URL", "sqlite:///./django_sync_example.db"))


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text}


def notes(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return create_note(request)
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET", "POST"])
    rows = db.session.scalars(select(Note).order_by(Note.id))
    return JsonResponse([note.to_dict() for note in rows], safe=False)


def create_note(request: HttpRequest) -> HttpResponse:
    try:
        payload = json.loads(request.body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return JsonResponse({"error": "the body must be a JSON object"}, status=400)
    note = Note(text=str(payload.get("text") or ""))
    db.session.add(note)
    db.session.flush()  # the row is written inside the request's transaction
    if not note.text.strip():
        # 422 >= 400: the row is rolled back before the status goes out.
        return JsonResponse({"error": "text must not be empty"}, status=422)
    return JsonResponse(note.to_dict(), status=201)


def count_notes(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"count": db.session.scalar(select(func.count()).select_from(Note))})


def get_note(request: HttpRequest, note_id: int) -> HttpResponse:
    note = db.session.get(Note, note_id)
    if note is None:
        return JsonResponse({"error": "no such note"}, status=404)
    return JsonResponse(note.to_dict())


urlpatterns = [
    path("notes", notes),
    path("notes/count", count_notes),
    path("notes/<int:note_id>", get_note),
]

# django.setup(), then Django's ASGIHandler (typed loosely: django-stubs types its scope as
# a dict, the package's aliases as a MutableMapping).
django_app: AnyASGIApp = get_asgi_application()


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    """Django for HTTP; the lifespan answered here, creating the tables at startup."""
    if scope["type"] != "lifespan":
        await django_app(scope, receive, send)
        return
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            # asgi_sqla started the engine when this message was read.
            # A synchronous engine: in a thread, so the event loop does not wait.
            await anyio.to_thread.run_sync(Base.metadata.create_all, db.engine)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


app = SQLAlchemyMiddleware(application, db)
