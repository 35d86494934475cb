"""The migration pages' code runs: every asgi_sqla block of ``docs/migrating/*.md``.

Each ```python block of a page is either asgi_sqla's side, whose first line names a
file (``# app.py``), or the peer's, whose first line is ``# <peer> (not run here)``
(the peers are not installed).  The named blocks of a page are written to a directory
as modules, with ``DATABASE_URL`` pointing at a fresh SQLite file, and run: an app is
served in-process (lifespan included) and answers a few requests, whose rows are then
read on a connection of their own; a test file runs under pytester and must leave no
row behind; a script's ``main()`` runs; a helper is called.  Each block has its check
below, and a page gaining a block without one fails here.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import URL, MetaData, create_engine, make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from _helpers import query

DOCS = Path(__file__).resolve().parent.parent / "docs" / "migrating"

#: One page per peer, named after it: the peer's blocks say ``# <page> (not run here)``.
PAGES = sorted(path.stem for path in DOCS.glob("*.md") if path.stem != "index")

NAMED = re.compile(r"# (\w+)\.py")
PEERS = re.compile(r"# (\S+) \(not run here\)")

INNER_INI = """\
[pytest]
addopts = -p no:cacheprovider
filterwarnings = error
"""


def python_blocks(page: str) -> list[str]:
    markdown = (DOCS / f"{page}.md").read_text()
    return re.findall(r"```python\n(.*?)```", markdown, re.DOTALL)


def code_files(page: str) -> dict[str, str]:
    """The page's asgi_sqla blocks, by module name (``# app.py`` gives ``app``)."""
    files: dict[str, str] = {}
    for block in python_blocks(page):
        named = NAMED.fullmatch(block.splitlines()[0])
        if named:
            assert named[1] not in files, f"{page}: two blocks named {named[1]}.py"
            files[named[1]] = block
    return files


def test_there_is_a_page_per_peer_and_an_index() -> None:
    assert PAGES == [
        "advanced-alchemy",
        "asgi-sqlalchemy",
        "context-async-sqlalchemy",
        "fastapi-async-sqlalchemy",
        "fastapi-sqla",
    ]
    index = (DOCS / "index.md").read_text()
    for page in PAGES:
        assert f"({page}.md)" in index


@pytest.mark.parametrize("page", [*PAGES, "index"])
def test_every_python_block_is_run_or_marked_as_the_peers(page: str) -> None:
    for block in python_blocks(page):
        first_line = block.splitlines()[0]
        peer = PEERS.fullmatch(first_line)
        assert NAMED.fullmatch(first_line) or (peer and peer[1] == page), (
            f"{page}: a python block must start with `# name.py` (run by this module) or "
            f"`# {page} (not run here)`; this one starts with {first_line!r}"
        )


# -- running the blocks ---------------------------------------------------------------


class Page:
    """A page's asgi_sqla blocks, written as modules to a directory and importable."""

    def __init__(
        self, name: str, directory: Path, url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.name = name
        self.directory = directory
        self.url = url
        self.monkeypatch = monkeypatch
        self.files = code_files(name)
        for module, code in self.files.items():
            (directory / f"{module}.py").write_text(code)

    def load(self, module: str) -> ModuleType:
        return importlib.import_module(module)

    async def create_schema(self, metadata: MetaData) -> None:
        if make_url(self.url).get_dialect().is_async:
            engine = create_async_engine(self.url)
            async with engine.begin() as connection:
                await connection.run_sync(metadata.create_all)
            await engine.dispose()
        else:
            sync_engine = create_engine(self.url)
            metadata.create_all(sync_engine)
            sync_engine.dispose()

    def rows(self, statement: str) -> list[tuple[Any, ...]]:
        return query(self.url, statement)

    def insert_notes(self, *texts: str) -> None:
        database = make_url(self.url).database
        assert database
        with contextlib.closing(sqlite3.connect(database)) as connection, connection:
            connection.executemany("INSERT INTO notes (text) VALUES (?)", [(t,) for t in texts])


@pytest.fixture
def open_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Page]]:
    """Write a page's blocks to ``tmp_path`` and make them importable, on a fresh SQLite."""
    names: list[str] = []

    def open_page(name: str, *, sync: bool = False, url: str | None = None) -> Page:
        driver = "sqlite" if sync else "sqlite+aiosqlite"
        page = Page(name, tmp_path, url or f"{driver}:///{tmp_path / 'notes.db'}", monkeypatch)
        names.extend(page.files)
        monkeypatch.setenv("DATABASE_URL", page.url)
        monkeypatch.chdir(tmp_path)
        monkeypatch.syspath_prepend(str(tmp_path))
        return page

    yield open_page
    # Every page names its app module ``app``: forget them, for the next page's.
    for name in names:
        sys.modules.pop(name, None)


def with_state_copies(app: Any) -> Any:
    """``app``, given a shallow copy of the lifespan state per request, as ASGI requires.

    asgi-lifespan 2.1 hands every request the state dict itself, and Litestar keeps a
    request's parsed body in it: the next request would read the previous one's body.
    """

    async def copying(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan" and "state" in scope:
            scope["state"] = dict(scope["state"])
        await app(scope, receive, send)

    return copying


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app``, whose lifespan runs around the requests."""
    async with LifespanManager(with_state_copies(app)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def check_notes_app(page: Page, module: str = "app") -> None:
    """The notes app every page builds: a 201 commits, a 422 after the INSERT does not."""
    app = page.load(module)
    await page.create_schema(app.Base.metadata)

    async with serving(app.app) as client:
        created = await client.post("/notes", json={"text": "hello"})
        refused = await client.post("/notes", json={"text": " "})
        listed = await client.get("/notes")

    assert created.status_code == 201, created.text
    assert refused.status_code == 422, refused.text
    assert listed.status_code == 200, listed.text
    assert listed.json() == ["hello"]
    assert page.rows("SELECT text FROM notes") == [("hello",)]


async def seed_notes(page: Page, *texts: str) -> ModuleType:
    """Import the page's ``app``, create its tables and commit ``texts`` as notes."""
    app = page.load("app")
    await page.create_schema(app.Base.metadata)
    page.insert_notes(*texts)
    return app


def run_test_file(page: Page, pytester: pytest.Pytester, test_file: str, passed: int) -> None:
    """Run the page's test file under pytester: it passes and leaves no row."""
    anyio.run(seed_notes, page)
    pytester.makefile(".ini", pytest=INNER_INI)
    pytester.makepyfile(**page.files)
    # Without the plugins the test files do not use: loading them took 4 s per run here.
    result = pytester.runpytest(f"{test_file}.py", "-p", "no:faker", "-p", "no:hypothesispytest")
    result.assert_outcomes(passed=passed)
    assert page.rows("SELECT count(*) FROM notes") == [(0,)]


# -- the checks, block by block ----------------------------------------------------------

#: A check is a coroutine function, run in an event loop of its own, or a plain function
#: for the test files: pytester's in-process run starts the inner tests' event loops,
#: which cannot start inside a running one.
Check = Callable[[Page, pytest.Pytester], Awaitable[None] | None]
#: page -> block -> check; ``PAGE_OPTIONS`` says how the page's database is opened.
CHECKS: dict[str, dict[str, Check]] = {}
PAGE_OPTIONS: dict[str, dict[str, Any]] = {"fastapi-sqla": {"sync": True}}
MARKS: dict[tuple[str, str], tuple[pytest.MarkDecorator, ...]] = {
    # PostgreSQL's WAL position: the block runs on PostgreSQL (through asyncpg).
    ("context-async-sqlalchemy", "lsn_app"): (pytest.mark.postgresql,),
}


def check(page: str, block: str) -> Callable[[Check], Check]:
    def register(function: Check) -> Check:
        CHECKS.setdefault(page, {})[block] = function
        return function

    return register


# fastapi-async-sqlalchemy


@check("fastapi-async-sqlalchemy", "app")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    await check_notes_app(page)


@check("fastapi-async-sqlalchemy", "per_task_app")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    await seed_notes(page, "apple", "apricot", "banana")
    per_task = page.load("per_task_app")

    async with serving(per_task.app) as client:
        response = await client.get("/counts", params={"words": "ap,an,cherry"})

    assert response.status_code == 200, response.text
    assert response.json() == [2, 1, 0]


@check("fastapi-async-sqlalchemy", "counting")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    app = await seed_notes(page, "apple", "apricot", "banana")
    counting = page.load("counting")

    assert await counting.counts("ap", "an", "cherry") == [2, 1, 0]
    await app.db.dispose()


@check("fastapi-async-sqlalchemy", "purge")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    await seed_notes(page, "", "kept", "")

    await page.load("purge").main()

    assert page.rows("SELECT text FROM notes") == [("kept",)]


@check("fastapi-async-sqlalchemy", "test_app")
def _(page: Page, pytester: pytest.Pytester) -> None:
    run_test_file(page, pytester, "test_app", passed=2)


# context-async-sqlalchemy


@check("context-async-sqlalchemy", "app")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    await check_notes_app(page)


@check("context-async-sqlalchemy", "lsn_app")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    app = page.load("app")
    await page.create_schema(app.Base.metadata)
    lsn_app = page.load("lsn_app")

    async with serving(lsn_app.app) as client:
        response = await client.post("/notes", json={"text": "hello"})

    assert response.status_code == 201, response.text
    assert re.fullmatch(r"wal-lsn=[0-9A-F]+/[0-9A-F]+; .*", response.headers["set-cookie"])
    assert page.rows("SELECT text FROM notes") == [("hello",)]


@check("context-async-sqlalchemy", "counting")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    app = await seed_notes(page, "apple", "apricot", "banana")
    counting = page.load("counting")

    assert await counting.counts("ap", "an", "cherry") == [2, 1, 0]
    await app.db.dispose()


@check("context-async-sqlalchemy", "purge")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    await seed_notes(page, "", "kept", "")

    await page.load("purge").main()

    assert page.rows("SELECT text FROM notes") == [("kept",)]


@check("context-async-sqlalchemy", "test_app")
def _(page: Page, pytester: pytest.Pytester) -> None:
    run_test_file(page, pytester, "test_app", passed=2)


# asgi-sqlalchemy


@check("asgi-sqlalchemy", "app")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    await check_notes_app(page)


@check("asgi-sqlalchemy", "fastapi_app")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    await check_notes_app(page, "fastapi_app")


@check("asgi-sqlalchemy", "counting")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    app = await seed_notes(page, "apple", "apricot", "banana")
    counting = page.load("counting")

    assert await counting.counts("ap", "an", "cherry") == [2, 1, 0]
    await app.db.dispose()


@check("asgi-sqlalchemy", "purge")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    await seed_notes(page, "", "kept", "")

    await page.load("purge").main()

    assert page.rows("SELECT text FROM notes") == [("kept",)]


@check("asgi-sqlalchemy", "test_app")
def _(page: Page, pytester: pytest.Pytester) -> None:
    run_test_file(page, pytester, "test_app", passed=2)


# advanced-alchemy


@check("advanced-alchemy", "app")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    await check_notes_app(page)


@check("advanced-alchemy", "counting")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    app = await seed_notes(page, "apple", "apricot", "banana")
    counting = page.load("counting")

    assert await counting.counts("ap", "an", "cherry") == [2, 1, 0]
    await app.db.dispose()


@check("advanced-alchemy", "purge")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    await seed_notes(page, "", "kept", "")

    await page.load("purge").main()

    assert page.rows("SELECT text FROM notes") == [("kept",)]


@check("advanced-alchemy", "test_app")
def _(page: Page, pytester: pytest.Pytester) -> None:
    run_test_file(page, pytester, "test_app", passed=2)


# fastapi-sqla: a SyncDatabase, `def` endpoints


@check("fastapi-sqla", "app")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    await check_notes_app(page)


@check("fastapi-sqla", "read_only")
async def _(page: Page, pytester: pytest.Pytester) -> None:
    page.monkeypatch.setenv("READ_ONLY_DATABASE_URL", f"sqlite+aiosqlite:///{page.directory}/ro.db")
    page.monkeypatch.setenv("READ_ONLY_DATABASE_POOL_SIZE", "3")
    read_only = page.load("read_only")

    async with read_only.read_only_db.scope() as session:
        assert await session.scalar(text("SELECT 1")) == 1
    assert read_only.read_only_db.engine.pool.size() == 3
    await read_only.read_only_db.dispose()


@check("fastapi-sqla", "counting")
def _(page: Page, pytester: pytest.Pytester) -> None:
    app = anyio.run(seed_notes, page, "apple", "apricot", "banana")
    counting = page.load("counting")

    assert counting.counts("ap", "an", "cherry") == [2, 1, 0]
    app.db.dispose()


@check("fastapi-sqla", "purge")
def _(page: Page, pytester: pytest.Pytester) -> None:
    anyio.run(seed_notes, page, "", "kept", "")

    page.load("purge").main()

    assert page.rows("SELECT text FROM notes") == [("kept",)]


@check("fastapi-sqla", "test_app")
def _(page: Page, pytester: pytest.Pytester) -> None:
    run_test_file(page, pytester, "test_app", passed=2)


def block_cases() -> Iterator[Any]:
    for page in PAGES:
        for block in code_files(page):
            yield pytest.param(
                page, block, id=f"{page}:{block}", marks=MARKS.get((page, block), ())
            )


def test_every_block_has_a_check() -> None:
    assert {page: sorted(code_files(page)) for page in PAGES} == {
        page: sorted(CHECKS.get(page, {})) for page in PAGES
    }


@pytest.mark.parametrize(("page", "block"), list(block_cases()))
def test_the_block_runs(
    page: str,
    block: str,
    open_page: Callable[..., Page],
    pytester: pytest.Pytester,
    request: pytest.FixtureRequest,
) -> None:
    run = CHECKS[page][block]
    options = dict(PAGE_OPTIONS.get(page, {}))
    if request.node.get_closest_marker("postgresql"):
        database: URL = request.getfixturevalue("postgres_database")
        options["url"] = database.set(drivername="postgresql+asyncpg").render_as_string(
            hide_password=False
        )
    opened = open_page(page, **options)
    if inspect.iscoroutinefunction(run):
        anyio.run(run, opened, pytester)
    else:
        run(opened, pytester)
