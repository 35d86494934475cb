"""The Python block of ``docs/guides/latency.md`` runs as written.

The block names its file on its first line (``# round_trips_app.py``); it is loaded as a
module with ``DATABASE_URL`` set to the test's PostgreSQL database, and its app is
called.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]

PAGE = Path(__file__).resolve().parent.parent / "docs/guides/latency.md"


def code_files(markdown: Path) -> dict[str, str]:
    """The ``python`` blocks of ``markdown``, by the file their first line names."""
    files: dict[str, str] = {}
    for block in re.findall(r"```python\n(.*?)```", markdown.read_text(), re.DOTALL):
        first_line = block.splitlines()[0]
        assert re.fullmatch(r"# \w+\.py", first_line), f"{markdown.name}: {first_line!r}"
        files[first_line[2:-3]] = block
    return files


BLOCKS = code_files(PAGE)


def test_every_python_block_of_the_page_is_run_below() -> None:
    assert sorted(BLOCKS) == ["round_trips_app"]


async def test_round_trips_app(postgresql_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", postgresql_url)
    module = types.ModuleType("round_trips_app")
    exec(compile(BLOCKS["round_trips_app"], "docs/round_trips_app.py", "exec"), module.__dict__)
    try:
        transport = httpx.ASGITransport(app=module.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/item")
    finally:
        await module.db.dispose()

    assert response.json() == {"statements": 1, "round_trips": 2}  # BEGIN, SELECT
    assert re.fullmatch(
        r'db;dur=[\d.]+;desc="1 query, 3 round trips"', response.headers["server-timing"]
    )
