"""BlackSheep in real servers: the example and the promises, the session through its DI.

The shared tests are in ``tests/_any_asgi.py``; the example app is
``examples/blacksheep_app.py``, the probe ``tests/apps/probe_blacksheep.py``.
"""

from __future__ import annotations

from _any_asgi import NotesContract, Promises


class TestBlackSheepExample(NotesContract):
    target = "examples.blacksheep_app:app"


class TestBlackSheepPromises(Promises):
    target = "tests.apps.probe_blacksheep:app"
