"""Every ``python`` block of README.md and docs/**/*.md runs, and every curl line answers.

A page's ```` ```python ```` blocks run in order, in one module (named by the first
block's ``# name.py`` line, else ``docs_page``, and put in ``sys.modules`` as an app
file would be), with ``cwd`` a fresh temporary directory and ``DATABASE_URL`` a fresh
SQLite database in it.  A block may ``await`` at top level: it then runs on the page's
event loop.  Blocks fenced as ``text``, ``console``, ``toml``, ``ini``… are not run.

A ```` ```console ```` block whose lines start ``$ curl`` is a conversation with the
page's ``app`` as it stands at that point: the app is started (its lifespan included,
with asgi-lifespan's ``LifespanManager``), each curl line is sent to it through
httpx's ``ASGITransport``, and the lines under it must be what the app answers (equal
as JSON when they are JSON), with the status named by a trailing ``# 201`` comment.

A page whose blocks need more (a PostgreSQL server, a pytest run of its own, a
framework server) is run by its own test module instead, listed in
``PAGES_RUN_ELSEWHERE``; the test below checks that the module exists and names the
page.  The site itself is built by ``make docs`` (``mkdocs build --strict``).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import re
import shlex
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import MetaData
from sqlmodel import SQLModel

from asgi_sqla import Database, SyncDatabase

ROOT = Path(__file__).resolve().parent.parent

#: Pages whose blocks another test module runs, by that module (paths from the root).
PAGES_RUN_ELSEWHERE: dict[str, str] = {
    "docs/guides/autocommit-reads.md": "tests/test_autocommit_reads.py",
    "docs/guides/concurrency.md": "tests/test_docs_concurrency.py",
    "docs/guides/configuration.md": "tests/test_from_env.py",
    "docs/guides/credentials.md": "tests/test_credentials.py",
    "docs/guides/examples.md": "examples/test_make_run.py",
    "docs/frameworks/blacksheep.md": "tests/test_framework_blacksheep.py",
    "docs/frameworks/django.md": "tests/test_framework_django.py",
    "docs/frameworks/falcon.md": "tests/test_framework_falcon.py",
    "docs/guides/failover.md": "tests/test_failover.py",
    "docs/guides/hooks.md": "tests/test_docs_concurrency.py",
    "docs/guides/latency.md": "tests/test_docs_latency.py",
    "docs/guides/load-shedding.md": "tests/test_load_shedding.py",
    "docs/guides/mysql.md": "tests/test_mariadb.py",
    "docs/guides/restarts.md": "tests/test_reconnect.py",
    "docs/guides/testing.md": "tests/test_pytest_plugin.py",
    "docs/migrating/advanced-alchemy.md": "tests/test_migration_docs.py",
    "docs/migrating/asgi-sqlalchemy.md": "tests/test_migration_docs.py",
    "docs/migrating/context-async-sqlalchemy.md": "tests/test_migration_docs.py",
    "docs/migrating/fastapi-async-sqlalchemy.md": "tests/test_migration_docs.py",
    "docs/migrating/fastapi-sqla.md": "tests/test_migration_docs.py",
    # The pages of the MariaDB, frameworks and version-matrix work, each run by its own
    # module (a MariaDB server, a framework server, nox): docs/guides/mysql.md,
    # docs/frameworks/falcon.md, docs/frameworks/blacksheep.md, docs/frameworks/django.md,
    # docs/versions.md.
}

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.M | re.S,
)


@dataclass(frozen=True)
class Block:
    lang: str
    line: int
    code: str


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, dedented (a block may sit in a list item)."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("body")) + 1
        found.append(Block(match["lang"], line, textwrap.dedent(match["body"])))
    return found


def pages() -> list[str]:
    """README.md and every page of the site, as paths from the root."""
    found = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [str(path.relative_to(ROOT)) for path in found]


def pages_run_here() -> list[str]:
    return [
        page
        for page in pages()
        if page not in PAGES_RUN_ELSEWHERE
        and any(block.lang == "python" for block in blocks(ROOT / page))
    ]


# -- curl lines ---------------------------------------------------------------------------


@dataclass
class Exchange:
    command: str
    method: str
    url: str
    headers: dict[str, str]
    data: str | None
    status: int | None
    reply: str


def exchanges(console: str) -> list[Exchange]:
    """The ``$ curl`` lines of a console block, each with the lines under it."""
    found: list[Exchange] = []
    for line in console.splitlines():
        if line.startswith("$ "):
            command = line[2:]
            if not command.startswith("curl "):
                continue
            words = shlex.split(command, comments=True)
            status = re.search(r"#\s*(\d{3})\b", command)
            method, url, headers, data = "GET", "", {}, None
            index = 1
            while index < len(words):
                word = words[index]
                if word == "-X":
                    method, index = words[index + 1], index + 1
                elif word == "-H":
                    name, _, value = words[index + 1].partition(":")
                    headers[name.strip()] = value.strip()
                    index += 1
                elif word in ("-d", "--data"):
                    data, index = words[index + 1], index + 1
                    method = "POST" if method == "GET" else method
                elif not word.startswith("-"):
                    url = word
                index += 1
            url = url if "://" in url else f"http://{url}"
            found.append(
                Exchange(
                    command, method, url, headers, data, int(status[1]) if status else None, ""
                )
            )
        elif found and line.strip():
            found[-1].reply += line + "\n"
    return found


def same_reply(expected: str, body: str) -> bool:
    try:
        return bool(json.loads(expected) == json.loads(body))
    except ValueError:
        return expected.strip() == body.strip()


async def converse(app: Any, talk: list[Exchange], where: str) -> None:
    """Start ``app`` with its lifespan and check each exchange's status and reply."""
    async with LifespanManager(app):
        # The app itself, not the manager's wrapper: that one hands every request the
        # same lifespan state dict, where Litestar caches each request's parsed body.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport) as client:
            for exchange in talk:
                response = await client.request(
                    exchange.method,
                    exchange.url,
                    headers=exchange.headers,
                    content=exchange.data.encode() if exchange.data is not None else None,
                )
                answer = f"{response.status_code} {response.text!r}"
                said = f"{where}: `{exchange.command}` answered {answer}"
                if exchange.status is not None:
                    assert response.status_code == exchange.status, said
                assert same_reply(exchange.reply, response.text), said


# -- running a page -----------------------------------------------------------------------


def run(
    code: str, filename: str, namespace: dict[str, Any], loop: asyncio.AbstractEventLoop
) -> None:
    compiled = compile(code, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if compiled.co_flags & inspect.CO_COROUTINE:
        loop.run_until_complete(eval(compiled, namespace))
    else:
        exec(compiled, namespace)


def dispose_all(namespace: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
    for value in list(namespace.values()):
        if isinstance(value, Database):
            loop.run_until_complete(value.dispose())
        elif isinstance(value, SyncDatabase):
            value.dispose()


@pytest.fixture
def page_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'docs.db'}")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = types.ModuleType("docs_page")
    # A page runs as if in a process of its own: SQLModel's table classes register in
    # one MetaData shared by the whole process, where the examples' ``Hero`` already is.
    monkeypatch.setattr(SQLModel, "metadata", MetaData())
    # In sys.modules, as an app file would be: SQLAlchemy resolves the annotations of a
    # mapped class, and Litestar a handler's, through the module.
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


@pytest.mark.parametrize("page", pages_run_here())
def test_the_python_blocks_of_the_page_run_and_its_curl_lines_answer_as_shown(
    page: str, page_module: types.ModuleType
) -> None:
    found = blocks(ROOT / page)
    first = next(block for block in found if block.lang == "python")
    named = re.fullmatch(r"# (\w+)\.py", first.code.splitlines()[0])
    module = types.ModuleType(named[1]) if named else page_module
    previous = sys.modules.get(module.__name__)
    sys.modules[module.__name__] = module
    loop = asyncio.new_event_loop()
    try:
        for block in found:
            where = f"{page}:{block.line}"
            if block.lang == "python":
                run(block.code, where, module.__dict__, loop)
            elif block.lang == "console" and (talk := exchanges(block.code)):
                loop.run_until_complete(converse(module.__dict__["app"], talk, where))
        dispose_all(module.__dict__, loop)
    finally:
        loop.close()
        if previous is None:
            del sys.modules[module.__name__]
        else:
            sys.modules[module.__name__] = previous


def test_every_page_with_python_blocks_is_run() -> None:
    """Each page is run above or by a module that exists and names it."""
    for page, module in PAGES_RUN_ELSEWHERE.items():
        assert (ROOT / page).is_file(), f"{page} is listed in PAGES_RUN_ELSEWHERE but missing"
        assert (ROOT / module).is_file(), f"{page}: {module} does not exist"
        text = (ROOT / module).read_text()
        folder = f"{Path(page).parent}/"
        assert page in text or (folder in text and folder.endswith("migrating/")), (
            f"{module} does not name {page}"
        )
    assert {"README.md", "docs/quickstart/fastapi.md"} <= set(pages_run_here())


def test_the_quick_starts_talk_to_their_app() -> None:
    """Every quick start shows curl lines with replies, checked by the test above."""
    quick_starts = sorted((ROOT / "docs" / "quickstart").glob("*.md"))
    assert [path.stem for path in quick_starts] == [
        "asgi",
        "fastapi",
        "litestar",
        "quart",
        "starlette",
    ]
    for path in [ROOT / "README.md", *quick_starts]:
        talks = [exchanges(b.code) for b in blocks(path) if b.lang == "console"]
        replies = [e for talk in talks for e in talk]
        assert len(replies) >= 3, f"{path.name}: no curl lines with replies"
        assert all(e.reply and e.status for e in replies), (
            f"{path.name}: a curl line lacks its reply or status"
        )


def test_with_lifespan_off_the_quick_start_creates_no_table(
    page_module: types.ModuleType,
) -> None:
    """What docs/guides/lifespan.md says: without lifespan the app's startup never runs."""
    code = next(b.code for b in blocks(ROOT / "docs/quickstart/starlette.md") if b.lang == "python")
    exec(compile(code, "docs/quickstart/starlette.md", "exec"), page_module.__dict__)
    app = page_module.__dict__["app"]

    async def without_lifespan() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/notes")
        await page_module.__dict__["db"].dispose()
        return response

    assert asyncio.run(without_lifespan()).status_code == 500
