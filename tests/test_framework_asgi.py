"""A hand-written ASGI app, ``examples/asgi_app.py``: a server that cannot reach the database.

The example's API in real servers is tested with the other examples' in
``tests/test_frameworks.py``.  Here each server (uvicorn, hypercorn, granian) starts
the app against a database that does not answer, in a process of its own.
"""

from __future__ import annotations

import re

import pytest

from _framework import STARTUP_FAILURE_EXIT_CODES, server_name_fixture
from _servers import free_port, serve

TARGET = "examples.asgi_app:app"


server_name = server_name_fixture()


# --- Startup failure, one server process per server ------------------------------------


def test_a_database_that_does_not_answer_stops_the_server_at_startup_without_its_password(
    server_name: str,
) -> None:
    url = f"postgresql+asyncpg://app:pa55word@127.0.0.1:{free_port()}/notes"

    with (
        pytest.raises(RuntimeError, match="exited with") as stopped,
        serve(TARGET, server_name, env={"DATABASE_URL": url}, ready_path="/notes"),
    ):
        pass  # pragma: no cover - the server never becomes ready

    report = str(stopped.value)
    match = re.search(r"exited with (-?\d+) before it was ready", report)
    assert match is not None, report
    assert int(match.group(1)) == STARTUP_FAILURE_EXIT_CODES[server_name], report
    assert "Database('postgresql+asyncpg://app:***@127.0.0.1" in report
    assert "did not answer at startup" in report
    assert "pa55word" not in report
