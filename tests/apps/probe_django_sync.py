"""Django's ASGI handler with the routes of ``probe_common``: ``def`` views, ``SyncDatabase``.

Django runs a ``def`` view with ``sync_to_async(thread_sensitive=True)``; inside
``ASGIHandler`` every request has a ``ThreadSensitiveContext``, so a thread of its own,
and asgiref copies the request's context into it: ``db.session`` is the request's
``Session``.  ``/meets`` shows two requests at once in two threads with two sessions;
a single shared thread would deadlock it (and ``/releases``, a ``def`` view too, could
not release a waiting view).  Served bare: Django refuses lifespan, the middleware
answers it and still disposes the engine at shutdown.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import path
from sqlalchemy import text

from asgi_sqla import SQLAlchemyMiddleware

from .probe_common import DJANGO_LOGGING, RELEASE_TIMEOUT, RaisedOnPurpose, identity
from .sync_common import app_parts, write_item, write_orphan

settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1"],
    SECRET_KEY="only-for-the-tests",
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    LOGGING=DJANGO_LOGGING,
)

db, counter, _ = app_parts()


class ThreadGates:
    """Waits released by another request, and pairs that meet, across Django's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._released: dict[str, threading.Event] = {}
        self._pairs: dict[str, threading.Barrier] = {}

    def _event(self, key: str) -> threading.Event:
        with self._lock:
            return self._released.setdefault(key, threading.Event())

    def wait(self, key: str) -> bool:
        return self._event(key).wait(RELEASE_TIMEOUT)

    def release(self, key: str) -> None:
        self._event(key).set()

    def meet(self, pair: str) -> bool:
        with self._lock:
            barrier = self._pairs.setdefault(pair, threading.Barrier(2))
        try:
            barrier.wait(RELEASE_TIMEOUT)
        except threading.BrokenBarrierError:
            return False
        return True


gates = ThreadGates()


def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"connections_in_use": db.pool_status().checked_out})


def pool(request: HttpRequest) -> HttpResponse:
    return JsonResponse(counter.report())


def create_item(request: HttpRequest, key: str, status: int) -> HttpResponse:
    write_item(db.session, key)
    return HttpResponse(key, status=status)


def create_orphan(request: HttpRequest, key: str) -> HttpResponse:
    write_orphan(db.session, key)
    return HttpResponse("written", status=201)


def raise_after_writing(request: HttpRequest, key: str) -> HttpResponse:
    write_item(db.session, key)
    raise RaisedOnPurpose(key)


def stream(request: HttpRequest, key: str) -> StreamingHttpResponse:
    write_item(db.session, key)

    # An async iterator, even from a `def` view: under ASGI, Django reads a synchronous
    # one to its end (in a thread) before it sends the first chunk, with a Warning
    # ("StreamingHttpResponse must consume synchronous iterators...").
    async def body() -> AsyncIterator[bytes]:
        yield b"written\n"
        released = await sync_to_async(gates.wait, thread_sensitive=False)(key)
        yield b"released\n" if released else b"timed out\n"

    return StreamingHttpResponse(body(), content_type="text/plain")


def wait(request: HttpRequest, key: str) -> HttpResponse:
    write_item(db.session, key)
    if gates.wait(key):
        # After the wait, which outlives a client that left (the thread runs on).
        write_item(db.session, f"{key}-late")
        return HttpResponse("released", status=201)
    return HttpResponse("late", status=504)


def release(request: HttpRequest, key: str) -> HttpResponse:
    gates.release(key)
    return HttpResponse("released")


def meet(request: HttpRequest, pair: str) -> HttpResponse:
    session = db.session
    session.execute(text("SELECT 1"))
    return JsonResponse(identity(session, gates.meet(pair)), status=201)


urlpatterns = [
    path("health", health),
    path("pool", pool),
    path("items/<str:key>/<int:status>", create_item),
    path("orphans/<str:key>", create_orphan),
    path("raises/<str:key>", raise_after_writing),
    path("streams/<str:key>", stream),
    path("waits/<str:key>", wait),
    path("releases/<str:key>", release),
    path("meets/<str:pair>", meet),
]

app = SQLAlchemyMiddleware(get_asgi_application(), db)
