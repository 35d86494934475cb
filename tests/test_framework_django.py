"""Django's ASGI handler in real servers: ``async def`` views, and ``def`` views.

The shared tests are in ``tests/_any_asgi.py``; the examples are
``examples/django_app.py`` (a ``Database``) and ``examples/django_sync_app.py`` (a
``SyncDatabase``), the probes ``tests/apps/probe_django.py`` and
``tests/apps/probe_django_sync.py``, served bare: Django raises for the lifespan
scope, and the middleware answers the server's lifespan itself.
"""

from __future__ import annotations

import re

import pytest

from _any_asgi import NotesContract, Promises, example_code, page_blocks
from _framework import STARTUP_FAILURE_EXIT_CODES
from _servers import free_port, serve


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


def test_bare_django_refuses_lifespan_yet_a_database_that_does_not_answer_stops_startup() -> None:
    # Django's ASGIHandler raises for the lifespan scope before reading a message: the
    # middleware answers the server's lifespan itself, and still starts the engine.
    url = f"postgresql+asyncpg://app:pa55word@127.0.0.1:{free_port()}/notes"

    with (
        pytest.raises(RuntimeError, match="exited with") as stopped,
        serve("tests.apps.probe_django:app", "uvicorn", env={"DATABASE_URL": url}),
    ):
        pass  # pragma: no cover - the server never becomes ready

    report = str(stopped.value)
    match = re.search(r"exited with (-?\d+) before it was ready", report)
    assert match is not None, report
    assert int(match.group(1)) == STARTUP_FAILURE_EXIT_CODES["uvicorn"], report
    assert "did not answer at startup" in report
    assert "pa55word" not in report
