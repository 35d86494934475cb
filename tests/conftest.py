"""Shared fixtures: an anyio backend, and SQLite/PostgreSQL databases, fresh for every test.

PostgreSQL comes from ``TEST_DATABASE_URL`` (e.g. ``postgresql://user:pw@host:5432/db``; the
user needs CREATEDB) or else from a throwaway cluster started for the session with the
server binaries found on this machine (``TEST_POSTGRES_BINDIR`` picks a directory).

Without PostgreSQL, its tests are skipped, with the reason shown in the summary; but when
``CI`` is ``true`` or ``1`` they fail instead, so CI cannot pass without PostgreSQL.

Every test that uses PostgreSQL gets the ``postgresql`` marker (``-m "not postgresql"``
deselects them).

MariaDB likewise: ``TEST_MARIADB_URL`` (``mysql://root:pw@host:3306``), or else a
throwaway server (``tests/_mariadb.py``) started the first time a test asks for one, so
a run without MariaDB tests never starts it.  Its tests get the ``mariadb`` marker, are
skipped without a server, and fail instead under ``CI``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
from psycopg.rows import TupleRow
from sqlalchemy import URL

from asgi_sqla import Database, SyncDatabase

import _mariadb
import _postgres
from _helpers import open_database, open_sync_database

pytest_plugins = ["pytester"]

ASYNC_DRIVERS = {"asyncpg": "postgresql+asyncpg", "psycopg": "postgresql+psycopg"}
_POSTGRES_PARAMS = [
    pytest.param(driver, marks=pytest.mark.postgresql, id=driver) for driver in ASYNC_DRIVERS
]
#: Synchronous drivers for ``SyncDatabase`` (psycopg 3 used synchronously, and psycopg 2).
SYNC_DRIVERS = {"psycopg": "postgresql+psycopg", "psycopg2": "postgresql+psycopg2"}
_SYNC_POSTGRES_PARAMS = [
    pytest.param(driver, marks=pytest.mark.postgresql, id=f"sync-{driver}")
    for driver in SYNC_DRIVERS
]

#: The async MySQL drivers, each under one of the two spellings SQLAlchemy accepts for
#: MariaDB: ``mariadb+`` (the MariaDB dialect) and ``mysql+`` (the MySQL dialect, which
#: finds out at connect that the server is MariaDB).
MARIADB_DRIVERS = {"aiomysql": "mariadb+aiomysql", "asyncmy": "mysql+asyncmy"}
_MARIADB_PARAMS = [
    pytest.param(driver, marks=pytest.mark.mariadb, id=f"mariadb-{driver}")
    for driver in MARIADB_DRIVERS
]


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so this conftest works on its own.
    config.addinivalue_line(
        "markers",
        "postgresql: needs a PostgreSQL server (started by the test run, or TEST_DATABASE_URL)",
    )
    config.addinivalue_line(
        "markers",
        "frameworks(*names): run a tests/test_frameworks.py test for these example apps only",
    )
    config.addinivalue_line(
        "markers", "mariadb: needs a MariaDB server (started by the test run, or TEST_MARIADB_URL)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses_server = "postgres_server" in getattr(item, "fixturenames", ())
        if uses_server and item.get_closest_marker("postgresql") is None:
            item.add_marker(pytest.mark.postgresql)
        uses_mariadb = "mariadb_server" in getattr(item, "fixturenames", ())
        if uses_mariadb and item.get_closest_marker("mariadb") is None:
            item.add_marker(pytest.mark.mariadb)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def _postgres_unavailable(reason: str) -> NoReturn:
    if _ci():
        pytest.fail(f"{reason}; CI is set, so PostgreSQL tests must not be skipped", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


def _mariadb_unavailable(reason: str) -> NoReturn:
    if _ci():
        pytest.fail(f"{reason}; CI is set, so MariaDB tests must not be skipped", pytrace=False)
    pytest.skip(f"MariaDB unavailable: {reason}")


def _async_url(database: URL, driver: str) -> str:
    return database.set(drivername=ASYNC_DRIVERS[driver]).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The anyio pytest plugin's backend: ``"asyncio"`` (a module may override it)."""
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[URL]:
    """Driver-less ``sqlalchemy.URL`` of the admin database of the session's PostgreSQL server.

    ``TEST_DATABASE_URL`` if set, otherwise a throwaway cluster on a free 127.0.0.1 port,
    e.g. ``postgresql://postgres@127.0.0.1:PORT/postgres``, stopped and deleted at the end of
    the session.  Skips (or fails, under ``CI``) when no PostgreSQL is available.
    """
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield _postgres.server_url_from_env(external)
        return
    bindir = _postgres.find_bindir()
    if bindir is None:
        where = os.environ.get(_postgres.BINDIR_VARIABLE) or (
            "pg_config --bindir, /usr/lib/postgresql/*/bin or PATH"
        )
        _postgres_unavailable(
            f"no server binaries (initdb, pg_ctl, postgres) in {where}, no TEST_DATABASE_URL"
        )
    try:
        cluster = _postgres.TemporaryCluster(bindir)
    except _postgres.PostgresUnavailable as exc:
        _postgres_unavailable(str(exc))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def _postgres_databases(postgres_server: URL) -> Iterator[_postgres.DatabaseFactory]:
    """Creates and drops the per-test databases over one admin connection."""
    factory = _postgres.DatabaseFactory(postgres_server)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def postgres_database(_postgres_databases: _postgres.DatabaseFactory) -> Iterator[URL]:
    """Driver-less ``sqlalchemy.URL`` of a new, empty PostgreSQL database for this test.

    Created as ``t_<uuid hex>`` from ``template0`` and dropped ``WITH (FORCE)`` afterwards.
    ``postgresql_url``, ``database_url`` (PostgreSQL params) and ``pg_admin`` of one test all
    use this same database.
    """
    url = _postgres_databases.create()
    try:
        yield url
    finally:
        _postgres_databases.drop(url)


@pytest.fixture(params=["sqlite", *_POSTGRES_PARAMS])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Async SQLAlchemy URL string of a fresh, empty database; one test per backend/driver.

    ids: ``sqlite`` -> ``sqlite+aiosqlite:///<tmp_path>/test.db``;
    ``asyncpg`` -> ``postgresql+asyncpg://...``; ``psycopg`` -> ``postgresql+psycopg://...``
    (these two carry the ``postgresql`` marker and use ``postgres_database``).
    """
    driver: str = request.param
    if driver == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    database: URL = request.getfixturevalue("postgres_database")
    return _async_url(database, driver)


@pytest.fixture(params=[pytest.param("sqlite", id="sync-sqlite"), *_SYNC_POSTGRES_PARAMS])
def sync_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Synchronous SQLAlchemy URL string of a fresh, empty database, for ``SyncDatabase``.

    ids: ``sync-sqlite`` -> ``sqlite:///<tmp_path>/test.db``; ``sync-psycopg`` ->
    ``postgresql+psycopg://...``; ``sync-psycopg2`` -> ``postgresql+psycopg2://...``.
    """
    driver: str = request.param
    if driver == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    database: URL = request.getfixturevalue("postgres_database")
    return database.set(drivername=SYNC_DRIVERS[driver]).render_as_string(hide_password=False)


@pytest.fixture(params=_SYNC_POSTGRES_PARAMS)
def sync_postgresql_url(request: pytest.FixtureRequest, postgres_database: URL) -> str:
    """Like ``sync_database_url``, PostgreSQL only (ids ``sync-psycopg``, ``sync-psycopg2``)."""
    driver: str = request.param
    return postgres_database.set(drivername=SYNC_DRIVERS[driver]).render_as_string(
        hide_password=False
    )


@pytest.fixture
def sync_db(sync_database_url: str, db_options: dict[str, Any]) -> Iterator[SyncDatabase]:
    """A ``SyncDatabase`` on ``sync_database_url``, with the tables of ``open_sync_database``.

    Disposed after the test.  ``db_options`` are passed on, as for ``db``.
    """
    database = open_sync_database(sync_database_url, **db_options)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture(params=["sqlite", _POSTGRES_PARAMS[0]])
def sqlite_or_asyncpg_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Like ``database_url`` without psycopg (ids ``sqlite``, ``asyncpg``).

    For tests of how a framework calls the app, where two backends are enough: a
    module overrides ``database_url`` with this one.
    """
    driver: str = request.param
    if driver == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    database: URL = request.getfixturevalue("postgres_database")
    return _async_url(database, driver)


@pytest.fixture(params=_POSTGRES_PARAMS)
def postgresql_url(request: pytest.FixtureRequest, postgres_database: URL) -> str:
    """Like ``database_url`` but PostgreSQL only (ids ``asyncpg``, ``psycopg``).

    For tests that need PostgreSQL semantics: deferred constraints, ``pg_stat_activity``,
    ``pg_terminate_backend``...
    """
    driver: str = request.param
    return _async_url(postgres_database, driver)


@pytest.fixture
def pg_admin(postgres_database: URL) -> Iterator[psycopg.Connection[TupleRow]]:
    """Synchronous autocommit psycopg connection (superuser on the throwaway cluster) to this
    test's PostgreSQL database, the one behind ``postgresql_url``/``database_url``.

    For looking behind the code under test: ``pg_stat_activity``, ``pg_locks``,
    ``pg_terminate_backend(pid)``...  Closed before the database is dropped.
    """
    conn = _postgres.connect(postgres_database)
    try:
        yield conn
    finally:
        conn.close()  # unlike leaving a `with` block, fine if the test killed its backend


@pytest.fixture(scope="module")
def module_database_owner() -> str:
    """What ``module_database_url``'s database belongs to: by default, the module.

    A module whose tests need a new database for each value of one of its parameters
    (``tests/test_frameworks.py``: each example app makes tables of its own) overrides
    this fixture to request that parameter: a new value then tears the database down.
    """
    return ""


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("asyncpg", marks=pytest.mark.postgresql, id="asyncpg")],
)
def module_database_url(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    module_database_owner: str,
) -> Iterator[str]:
    """Like ``database_url``, but one database for a whole module (ids ``sqlite``, ``asyncpg``).

    For modules that start a server process once and send it many requests: the tests
    share the database, so each must write rows it can tell apart (unique keys).
    ``sqlite`` -> a file in a module temp directory; ``asyncpg`` -> a new PostgreSQL
    database, dropped ``WITH (FORCE)`` after the module.
    """
    driver: str = request.param
    if driver == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('module-db') / 'test.db'}"
        return
    factory: _postgres.DatabaseFactory = request.getfixturevalue("_postgres_databases")
    database = factory.create()
    try:
        yield _async_url(database, driver)
    finally:
        factory.drop(database)


@pytest.fixture
def aiomysql_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import aiomysql`` fail as if it were not installed, for the tests of the
    message that names a missing driver's extra (the dev group installs aiomysql, for
    ``tests/test_mariadb.py``): a ``None`` in ``sys.modules`` makes the import raise
    ``ImportError``."""
    monkeypatch.setitem(sys.modules, "aiomysql", None)


@pytest.fixture
def db_options() -> dict[str, Any]:
    """Keyword arguments for ``db``'s ``Database``: none, unless a module overrides this.

    E.g. ``{"stats": True}``, or pool sizes that depend on ``database_url``.
    """
    return {}


@pytest.fixture
async def db(database_url: str, db_options: dict[str, Any]) -> AsyncIterator[Database]:
    """A ``Database`` on ``database_url`` (``db_options`` passed on), disposed after the test.

    Its database has the ``items`` table of ``tests/_helpers.py`` and a deferred foreign
    key to break at COMMIT (``_helpers.open_database``).  A module that needs another
    backend overrides ``database_url``; one that needs other options, ``db_options``.
    """
    database = await open_database(database_url, **db_options)
    try:
        yield database
    finally:
        await database.dispose()


# -- MariaDB ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[URL]:
    """Driver-less ``sqlalchemy.URL`` of the session's MariaDB server (no database named).

    ``TEST_MARIADB_URL`` if set, otherwise a throwaway server on a free 127.0.0.1 port,
    e.g. ``mysql://root@127.0.0.1:PORT``, killed and deleted at the end of the session.
    Skips (or fails, under ``CI``) when no MariaDB is available.
    """
    external = os.environ.get(_mariadb.URL_VARIABLE)
    if external:
        yield _mariadb.server_url_from_env(external)
        return
    found = _mariadb.find_server()
    if found is None:
        where = os.environ.get(_mariadb.BINDIR_VARIABLE) or "PATH, /usr/sbin or /usr/bin"
        _mariadb_unavailable(
            f"no mariadbd (or mysqld) and mariadb-install-db in {where}, no TEST_MARIADB_URL"
        )
    try:
        server = _mariadb.TemporaryServer(*found)
    except _mariadb.MariaDBUnavailable as exc:
        _mariadb_unavailable(str(exc))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mariadb_databases(mariadb_server: URL) -> Iterator[_mariadb.DatabaseFactory]:
    """Creates and drops the per-test databases over one admin connection (root).

    Its ``execute()`` runs a statement as the server's administrator: ``KILL``,
    ``SET GLOBAL``, ``CREATE USER``.
    """
    factory = _mariadb.DatabaseFactory(mariadb_server)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def mariadb_database(mariadb_databases: _mariadb.DatabaseFactory) -> Iterator[URL]:
    """Driver-less ``sqlalchemy.URL`` of a new, empty MariaDB database for this test.

    Created as ``t_<uuid hex>`` and dropped afterwards; ``mariadb_url``,
    ``sync_mariadb_url`` and ``mariadb_admin`` of one test all use this same database.
    """
    url = mariadb_databases.create()
    try:
        yield url
    finally:
        mariadb_databases.drop(url)


def _mariadb_url(database: URL, drivername: str) -> str:
    url = database.set(drivername=drivername, query={"charset": "utf8mb4"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(params=_MARIADB_PARAMS)
def mariadb_url(request: pytest.FixtureRequest, mariadb_database: URL) -> str:
    """Async SQLAlchemy URL string of a fresh MariaDB database, once per async driver.

    ids: ``mariadb-aiomysql`` -> ``mariadb+aiomysql://...``; ``mariadb-asyncmy`` ->
    ``mysql+asyncmy://...`` (both spellings of the dialect are run).
    """
    driver: str = request.param
    return _mariadb_url(mariadb_database, MARIADB_DRIVERS[driver])


@pytest.fixture(params=[pytest.param("pymysql", marks=pytest.mark.mariadb, id="mariadb-pymysql")])
def sync_mariadb_url(request: pytest.FixtureRequest, mariadb_database: URL) -> str:
    """Synchronous URL string of a fresh MariaDB database, for ``SyncDatabase`` (PyMySQL)."""
    return _mariadb_url(mariadb_database, "mariadb+pymysql")


@pytest.fixture
def mariadb_admin(mariadb_database: URL) -> Iterator[Any]:
    """Synchronous autocommit PyMySQL connection (root) to this test's MariaDB database.

    For looking behind the code under test: ``information_schema.processlist``,
    ``KILL CONNECTION``...  Closed before the database is dropped.
    """
    conn = _mariadb.connect(mariadb_database)
    try:
        yield conn
    finally:
        conn.close()
