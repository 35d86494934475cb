"""The package's engine listeners are on every engine it makes, whatever address it gets.

SQLAlchemy's ``event.contains()`` is keyed by ``id(engine)`` and forgets a registration
only when the dialect's listeners are collected: a new engine at the address of a dead
one whose dialect is still referenced (by a traceback, a log record, a pool) looks
registered while it is not.  A "once per engine" check built on it left such an engine
without its ``handle_error`` listener (a write on a read-only server answered 500, not
503) and without its statement count, and showed up as rare failures in long runs.
"""

from __future__ import annotations

import gc
from typing import Any

from sqlalchemy import text

from asgi_sqla import SyncDatabase

ENGINES = 1500


def test_every_engine_the_package_makes_gets_its_listeners_even_at_a_reused_address() -> None:
    kept: list[Any] = []  # the dialects, alive after their engines: as a traceback keeps one
    addresses: set[int] = set()
    reused = 0
    for number in range(ENGINES):
        db = SyncDatabase("sqlite://")
        with db.scope():
            db.session.execute(text("SELECT 1"))
        engine = db.engine
        dispatch = engine.dialect.dispatch
        assert len(dispatch.handle_error) >= 1, f"engine {number}: no handle_error listener"
        assert len(dispatch.do_execute) >= 1, f"engine {number}: no do_execute listener"
        if id(engine) in addresses:
            reused += 1
        addresses.add(id(engine))
        kept.append(engine.dialect)
        db.dispose()
        del db, engine, dispatch
        if number % 50 == 0:
            gc.collect()
    # The case this test is about happened, or it proved nothing.
    assert reused > 0
