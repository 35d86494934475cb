"""Django's ASGI handler with the routes of ``probe_common``: ``async def`` views.

Served bare, as ``SQLAlchemyMiddleware(get_asgi_application(), db)``: Django raises
for the ``lifespan`` scope, and the middleware answers the server's lifespan itself,
starting the engine and disposing it at shutdown.  An exception in a view becomes
Django's own 500 (logged by ``django.request``, sent to stderr below); Django cancels
the view when the client disconnects.
"""

from __future__ import annotations

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import path

from asgi_sqla import SQLAlchemyMiddleware

from .probe_common import (
    DJANGO_LOGGING,
    RaisedOnPurpose,
    async_probe,
    identity,
    read,
    write_item,
    write_orphan,
)

settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1"],
    SECRET_KEY="only-for-the-tests",
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    LOGGING=DJANGO_LOGGING,
)

db, checkouts, gates = async_probe()


async def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"connections_in_use": db.pool_status().checked_out})


async def pool(request: HttpRequest) -> HttpResponse:
    return JsonResponse(checkouts.report())


async def create_item(request: HttpRequest, key: str, status: int) -> HttpResponse:
    await write_item(db, key)
    return HttpResponse(key, status=status)


async def create_orphan(request: HttpRequest, key: str) -> HttpResponse:
    await write_orphan(db, key)
    return HttpResponse("written", status=201)


async def raise_after_writing(request: HttpRequest, key: str) -> HttpResponse:
    await write_item(db, key)
    raise RaisedOnPurpose(key)


async def stream(request: HttpRequest, key: str) -> StreamingHttpResponse:
    await write_item(db, key)
    return StreamingHttpResponse(gates.body(key), content_type="text/plain")


async def wait(request: HttpRequest, key: str) -> HttpResponse:
    await write_item(db, key)
    if await gates.wait(key):
        await write_item(db, f"{key}-late")
        return HttpResponse("released", status=201)
    return HttpResponse("late", status=504)


async def release(request: HttpRequest, key: str) -> HttpResponse:
    gates.release(key)
    return HttpResponse("released")


async def meet(request: HttpRequest, pair: str) -> HttpResponse:
    await read(db)
    return JsonResponse(identity(db.session, await gates.meet(pair)), status=201)


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
