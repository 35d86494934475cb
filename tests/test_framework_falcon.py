"""Falcon's ASGI app (``falcon.asgi.App``) in real servers: the example and the promises.

The shared tests are in ``tests/_any_asgi.py``; the example app is
``examples/falcon_app.py``, the probe ``tests/apps/probe_falcon.py``.  The page
``docs/frameworks/falcon.md`` shows the example whole; its code block is checked here
to be the file itself.
"""

from __future__ import annotations

from _any_asgi import NotesContract, Promises


class TestFalconExample(NotesContract):
    target = "examples.falcon_app:app"


class TestFalconPromises(Promises):
    target = "tests.apps.probe_falcon:app"
