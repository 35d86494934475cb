"""Falcon's ASGI app (``falcon.asgi.App``) in real servers: the example and the promises.

The shared tests are in ``tests/_any_asgi.py``; the example app is
``examples/falcon_app.py``, the probe ``tests/apps/probe_falcon.py``.  The page
``docs/frameworks/falcon.md`` shows the example whole; its code block is checked here
to be the file itself.
"""

from __future__ import annotations

import httpx

from _any_asgi import (
    NotesContract,
    PromisesTests,
    Served,
    StopsLast,
    committed,
    example_code,
    page_blocks,
)
from _framework import unique
from _helpers import eventually


class TestFalconExample(NotesContract):
    target = "examples.falcon_app:app"


class ScheduledWork(Served):
    """``resp.schedule``: Falcon runs the callback as a task of its own after the response.

    The request is over by then (the app has returned), so ``db.session`` there raises
    ``SessionEndedError``, which names the fix: ``async with db.scope():``.
    """

    def scheduled(self, client: httpx.Client, key: str) -> str | None:
        outcome: str | None = client.get(f"/scheduled/{key}").json()["outcome"]
        return outcome

    def test_scheduled_work_in_db_scope_commits_after_the_response(
        self, client: httpx.Client, database_url: str
    ) -> None:
        key = unique("scheduled")

        response = client.post(f"/schedules/{key}", params={"scoped": "yes"})

        assert response.status_code == 202
        assert eventually(lambda: self.scheduled(client, key) is not None)
        assert self.scheduled(client, key) == "written"
        assert committed(database_url, "items", "key", key) == 1
        assert client.get("/pool").json()["checked_out"] == 0

    def test_scheduled_work_on_db_session_alone_is_refused_with_the_fix(
        self, client: httpx.Client, database_url: str
    ) -> None:
        key = unique("unscoped")

        response = client.post(f"/schedules/{key}", params={"scoped": "no"})

        assert response.status_code == 202
        assert eventually(lambda: self.scheduled(client, key) is not None)
        outcome = self.scheduled(client, key)
        assert outcome is not None
        assert outcome.startswith("SessionEndedError: The request has finished")
        assert "async with db.scope():" in outcome
        assert committed(database_url, "items", "key", key) == 0
        assert client.get("/pool").json()["checked_out"] == 0


class TestFalconPromises(StopsLast, ScheduledWork, PromisesTests):
    target = "tests.apps.probe_falcon:app"


def test_the_page_shows_the_example_as_it_is_tested() -> None:
    # docs/frameworks/falcon.md: its Python blocks are run here, as the example files.
    assert page_blocks("frameworks/falcon.md") == {"falcon_app": example_code("falcon_app")}
