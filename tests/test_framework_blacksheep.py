"""BlackSheep in real servers: the example and the promises, the session through its DI.

The shared tests are in ``tests/_any_asgi.py``; the example app is
``examples/blacksheep_app.py``, the probe ``tests/apps/probe_blacksheep.py``.  In
process: BlackSheep routes a path in any letter case, and a ``read_only`` route stays
read-only whatever the case of the path.
"""

from __future__ import annotations

import pytest
from blacksheep import Application, Request, Response, text
from blacksheep.server.routing import Router
from sqlalchemy.exc import DBAPIError

from asgi_sqla import Database, SQLAlchemyMiddleware

from _any_asgi import NotesContract, Promises, example_code, page_blocks
from _helpers import add_key, call_http, checked_out, keys


class TestBlackSheepExample(NotesContract):
    target = "examples.blacksheep_app:app"


class TestBlackSheepPromises(Promises):
    target = "tests.apps.probe_blacksheep:app"


def reports_app(db: Database) -> Application:
    """BlackSheep with one route, ``/reports/{id}``, which writes the path it was sent."""
    router = Router()

    @router.get("/reports/{report_id}")
    async def view_report(request: Request) -> Response:
        try:
            await add_key(db, request.url.path.decode())
        except DBAPIError:  # PostgreSQL refuses the write in a READ ONLY transaction
            await db.rollback()
        return text("reached")

    return Application(router=router)


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/REPORTS/1", "/Reports/1", "/reports/1"])
async def test_a_read_only_route_is_read_only_in_every_letter_case_blacksheep_routes(
    db: Database, path: str
) -> None:
    app = SQLAlchemyMiddleware(reports_app(db), db, read_only=["/reports/*"])

    recorder = await call_http(app, path)

    assert (recorder.status, recorder.body) == (200, b"reached")  # BlackSheep routed it
    assert await keys(db) == set()
    assert checked_out(db) == 0


def test_the_page_shows_the_example_as_it_is_tested() -> None:
    # docs/frameworks/blacksheep.md: its Python blocks are run here, as the example files.
    assert page_blocks("frameworks/blacksheep.md") == {
        "blacksheep_app": example_code("blacksheep_app")
    }
