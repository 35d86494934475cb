"""Django's ASGI handler in real servers: ``async def`` views, and ``def`` views.

The shared tests are in ``tests/_any_asgi.py``; the examples are
``examples/django_app.py`` (a ``Database``) and ``examples/django_sync_app.py`` (a
``SyncDatabase``), the probes ``tests/apps/probe_django.py`` and
``tests/apps/probe_django_sync.py``, served bare: Django raises for the lifespan
scope, and the middleware answers the server's lifespan itself.
"""

from __future__ import annotations

from _any_asgi import NotesContract, Promises


class TestDjangoExample(NotesContract):
    target = "examples.django_app:app"


class TestDjangoSyncExample(NotesContract):
    target = "examples.django_sync_app:app"
    sync = True


class TestDjangoPromises(Promises):
    target = "tests.apps.probe_django:app"
    stops_on_disconnect = True
    rolls_back_on_disconnect = True


class TestDjangoSyncPromises(Promises):
    target = "tests.apps.probe_django_sync:app"
    sync = True
    rolls_back_on_disconnect = True
