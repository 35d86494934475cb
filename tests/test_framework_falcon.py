"""Falcon's ASGI app (``falcon.asgi.App``) in real servers: the example and the promises.

The shared tests are in ``tests/_any_asgi.py``; the example app is
``examples/falcon_app.py``, the probe ``tests/apps/probe_falcon.py``.  The page
``docs/frameworks/falcon.md`` shows the example whole; its code block is checked here
to be the file itself.
"""

from __future__ import annotations

from _any_asgi import NotesContract, Promises, example_code, page_blocks


class TestFalconExample(NotesContract):
    target = "examples.falcon_app:app"


class TestFalconPromises(Promises):
    target = "tests.apps.probe_falcon:app"


def test_the_page_shows_the_example_as_it_is_tested() -> None:
    # docs/frameworks/falcon.md: its Python blocks are run here, as the example files.
    assert page_blocks("frameworks/falcon.md") == {"falcon_app": example_code("falcon_app")}
