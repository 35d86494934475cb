"""Django's ASGI handler in real servers: ``async def`` views, and ``def`` views.

The shared tests are in ``tests/_any_asgi.py``; the examples are
``examples/django_app.py`` (a ``Database``) and ``examples/django_sync_app.py`` (a
``SyncDatabase``), the probes ``tests/apps/probe_django.py`` and
``tests/apps/probe_django_sync.py``, served bare: Django raises for the lifespan
scope, and the middleware answers the server's lifespan itself.
"""

from __future__ import annotations

from _any_asgi import NotesContract, Promises, example_code, page_blocks


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


def test_the_page_shows_the_example_as_it_is_tested() -> None:
    # docs/frameworks/django.md: its Python blocks are run here, as the example files.
    assert page_blocks("frameworks/django.md") == {
        "django_app": example_code("django_app"),
        "django_sync_app": example_code("django_sync_app"),
    }
