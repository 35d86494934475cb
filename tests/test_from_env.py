"""``Database.from_env()``, ``SyncDatabase.from_env()``: URL and options from the environment.

Every variable is set through the process environment (``monkeypatch.setenv``) and read
back from the engine the database makes, which connects to nothing until used; a few
tests then use it on SQLite.  The guide, docs/guides/configuration.md, is run as written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from typing_extensions import assert_type

from asgi_sqla import ConfigurationError, Database, SQLAlchemyMiddleware, SyncDatabase

pytestmark = pytest.mark.anyio

GUIDE = Path(__file__).resolve().parent.parent / "docs/guides/configuration.md"
PASSWORD = "s3cr3t-Pa55"
#: Every variable from_env reads, after the prefix: cleared before each test.
SUFFIXES = (
    "URL",
    "POOL_SIZE",
    "MAX_OVERFLOW",
    "POOL_TIMEOUT",
    "POOL_RECYCLE",
    "POOL_PRE_PING",
    "ECHO",
    "REPLICAS",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for prefix in ("", "ANALYTICS_", "analytics_", "REPORTS_"):
        for suffix in SUFFIXES:
            monkeypatch.delenv(f"{prefix}DATABASE_{suffix}", raising=False)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"


def pool_settings(db: Database | SyncDatabase) -> dict[str, Any]:
    """What the engine the database made was configured with (it connects to nothing)."""
    engine = db.engine
    pool: Any = engine.pool
    return {
        "pool_size": pool.size(),
        "max_overflow": pool._max_overflow,
        "pool_timeout": pool.timeout(),
        "pool_recycle": pool._recycle,
        "pool_pre_ping": pool._pre_ping,
        "echo": engine.echo,
    }


DEFAULTS = {
    "pool_size": 5,
    "max_overflow": 10,
    "pool_timeout": 30,
    "pool_recycle": -1,
    "pool_pre_ping": False,
    "echo": None,  # the engine's own default: no logging set up by the engine
}


# -- the URL ---------------------------------------------------------------------------


async def test_without_a_prefix_it_reads_database_url(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    db = Database.from_env()
    assert_type(db, Database[AsyncSession])
    try:
        async with db.scope() as session:
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        assert str(db.engine.url) == sqlite_url
        assert pool_settings(db) == DEFAULTS
    finally:
        await db.dispose()


async def test_a_prefix_reads_its_own_variables_and_not_the_default_ones(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'default.db'}")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "1")
    monkeypatch.setenv("ANALYTICS_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("ANALYTICS_DATABASE_POOL_SIZE", "7")

    db = Database.from_env("ANALYTICS")

    assert str(db.engine.url) == sqlite_url
    assert pool_settings(db)["pool_size"] == 7
    await db.dispose()


def test_whitespace_around_the_url_is_ignored(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    # As when the value comes from a file that ends with a newline: $(cat secret-file).
    monkeypatch.setenv("DATABASE_URL", f" {sqlite_url}\n")

    assert str(Database.from_env().engine.url) == sqlite_url


def test_the_prefix_is_used_as_written(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    monkeypatch.setenv("analytics_DATABASE_URL", sqlite_url)

    assert str(Database.from_env("analytics").engine.url) == sqlite_url
    with pytest.raises(ConfigurationError, match=r"^ANALYTICS_DATABASE_URL is not set"):
        Database.from_env("ANALYTICS")


@pytest.mark.parametrize("prefix", ["", "1ST", "ANALYTICS-DB", "ANALYTICS DB", "É", "A$B", "_"])
def test_a_prefix_that_cannot_start_a_variable_name_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^The prefix of from_env\(\) must be") as info:
        Database.from_env(prefix)

    assert repr(prefix) in str(info.value)


def test_a_prefix_with_the_underscore_names_the_fix() -> None:
    with pytest.raises(ConfigurationError) as info:
        Database.from_env("ANALYTICS_")

    assert str(info.value).endswith(
        "not 'ANALYTICS_': the underscore is added, from_env('ANALYTICS')."
    )


def test_an_empty_prefix_names_the_default() -> None:
    with pytest.raises(ConfigurationError, match=r"without a prefix reads DATABASE_URL\.$"):
        Database.from_env("")


def test_a_prefix_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="not 3"):
        Database.from_env(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, "", " \n"])
@pytest.mark.parametrize(
    ("prefix", "variable"), [(None, "DATABASE_URL"), ("ANALYTICS", "ANALYTICS_DATABASE_URL")]
)
def test_a_missing_url_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, prefix: str | None, variable: str, value: str | None
) -> None:
    if value is not None:
        monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as info:
        Database.from_env(prefix)

    assert str(info.value) == (
        f"{variable} is not set: set it to the database's URL, e.g. "
        f"{variable}=postgresql+asyncpg://user:password@host/dbname."
    )


def test_a_malformed_url_names_its_variable_and_hides_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "ANALYTICS_DATABASE_URL", f"postgresql+asyncpg://user:{PASSWORD}@host:port/db"
    )

    with pytest.raises(ConfigurationError) as info:
        Database.from_env("ANALYTICS")

    assert str(info.value) == (
        "ANALYTICS_DATABASE_URL is not a valid SQLAlchemy URL; the expected form is "
        "dialect+driver://user:password@host:port/dbname."
    )
    assert PASSWORD not in repr(info.value.__context__) + repr(info.value.__cause__)


def test_a_url_of_the_wrong_kind_is_refused_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql+psycopg2://user:{PASSWORD}@host/db")

    with pytest.raises(ConfigurationError, match="names a synchronous driver") as info:
        Database.from_env()

    assert PASSWORD not in str(info.value)
    assert "***" in str(info.value)


@pytest.mark.parametrize("keyword", ["url", "engine"])
def test_a_url_or_engine_given_to_from_env_is_refused(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str, keyword: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)

    with pytest.raises(ConfigurationError, match=r"from_env\(\) reads the URL from DATABASE_URL"):
        Database.from_env(**{keyword: sqlite_url})


# -- the engine options ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "value", "setting", "expected"),
    [
        ("POOL_SIZE", "12", "pool_size", 12),
        ("POOL_SIZE", " 3 ", "pool_size", 3),
        ("MAX_OVERFLOW", "3", "max_overflow", 3),
        ("MAX_OVERFLOW", "-1", "max_overflow", -1),
        ("POOL_TIMEOUT", "2.5", "pool_timeout", 2.5),
        ("POOL_TIMEOUT", "0", "pool_timeout", 0),
        ("POOL_RECYCLE", "1800", "pool_recycle", 1800),
        ("POOL_RECYCLE", "-1", "pool_recycle", -1),
        ("POOL_PRE_PING", "true", "pool_pre_ping", True),
        ("POOL_PRE_PING", "On", "pool_pre_ping", True),
        ("POOL_PRE_PING", "1", "pool_pre_ping", True),
        ("POOL_PRE_PING", "yes", "pool_pre_ping", True),
        ("POOL_PRE_PING", "FALSE", "pool_pre_ping", False),
        ("POOL_PRE_PING", "off", "pool_pre_ping", False),
        ("ECHO", "true", "echo", True),
        ("ECHO", "0", "echo", False),
        ("ECHO", "Debug", "echo", "debug"),
    ],
)
@pytest.mark.parametrize("database", [Database, SyncDatabase])
async def test_every_engine_variable_reaches_the_engine(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    database: type[Database] | type[SyncDatabase],
    suffix: str,
    value: str,
    setting: str,
    expected: object,
) -> None:
    driver = "sqlite" if database is SyncDatabase else "sqlite+aiosqlite"
    monkeypatch.setenv("ANALYTICS_DATABASE_URL", f"{driver}:///{tmp_path / 'app.db'}")
    monkeypatch.setenv(f"ANALYTICS_DATABASE_{suffix}", value)

    db = database.from_env("ANALYTICS")

    assert pool_settings(db) == {**DEFAULTS, setting: expected}


async def test_the_options_are_used_by_a_real_connection(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    for suffix, value in [
        ("URL", sqlite_url),
        ("POOL_SIZE", "2"),
        ("MAX_OVERFLOW", "0"),
        ("POOL_TIMEOUT", "1.5"),
        ("POOL_RECYCLE", "60"),
        ("POOL_PRE_PING", "true"),
    ]:
        monkeypatch.setenv(f"DATABASE_{suffix}", value)
    db = Database.from_env()
    try:
        async with db.scope() as session:
            await session.execute(text("CREATE TABLE t (x INTEGER)"))
            await session.execute(text("INSERT INTO t VALUES (1)"))
        async with db.scope() as session:
            assert (await session.execute(text("SELECT x FROM t"))).scalar_one() == 1
        status = db.pool_status()
        assert (status.size, status.checked_out) == (2, 0)
    finally:
        await db.dispose()


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_option_variable_counts_as_unset(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str, value: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    for suffix in SUFFIXES[1:]:
        monkeypatch.setenv(f"DATABASE_{suffix}", value)

    db = Database.from_env()

    assert pool_settings(db) == DEFAULTS
    assert db.replica_engines == ()


@pytest.mark.parametrize(
    ("suffix", "value", "form", "example"),
    [
        ("POOL_SIZE", "five", "a whole number >= 0", "5"),
        ("POOL_SIZE", "-1", "a whole number >= 0", "5"),
        ("POOL_SIZE", "2.5", "a whole number >= 0", "5"),
        ("MAX_OVERFLOW", "-2", "a whole number >= -1", "10"),
        ("MAX_OVERFLOW", "ten", "a whole number >= -1", "10"),
        ("POOL_TIMEOUT", "soon", "a number of seconds >= 0", "30"),
        ("POOL_TIMEOUT", "-0.5", "a finite number of seconds >= 0", "30"),
        ("POOL_TIMEOUT", "inf", "a finite number of seconds >= 0", "30"),
        ("POOL_TIMEOUT", "nan", "a finite number of seconds >= 0", "30"),
        ("POOL_RECYCLE", "-2", "a finite number of seconds >= -1", "3600"),
        ("POOL_RECYCLE", "1h", "a number of seconds >= -1", "3600"),
        ("POOL_PRE_PING", "maybe", "true or false (or 1/0, yes/no, on/off)", "true"),
        ("POOL_PRE_PING", "2", "true or false (or 1/0, yes/no, on/off)", "true"),
        ("ECHO", "loud", "true, false or debug", "false"),
    ],
)
def test_a_malformed_value_names_the_variable_and_the_form(
    monkeypatch: pytest.MonkeyPatch,
    sqlite_url: str,
    suffix: str,
    value: str,
    form: str,
    example: str,
) -> None:
    monkeypatch.setenv("ANALYTICS_DATABASE_URL", sqlite_url)
    monkeypatch.setenv(f"ANALYTICS_DATABASE_{suffix}", value)

    with pytest.raises(ConfigurationError) as info:
        Database.from_env("ANALYTICS")

    variable = f"ANALYTICS_DATABASE_{suffix}"
    assert str(info.value) == f"{variable}={value!r} is not {form}; set e.g. {variable}={example}."


def test_the_brief_example_reads_as_promised(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    monkeypatch.setenv("ANALYTICS_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("ANALYTICS_DATABASE_POOL_SIZE", "five")

    with pytest.raises(
        ConfigurationError, match=r"^ANALYTICS_DATABASE_POOL_SIZE='five' is not a whole number"
    ):
        Database.from_env("ANALYTICS")


# -- precedence ------------------------------------------------------------------------


async def test_options_given_by_the_caller_win_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("DATABASE_POOL_SIZE", "7")
    monkeypatch.setenv("DATABASE_ECHO", "true")

    db = Database.from_env(pool_size=3, stats=True)

    assert pool_settings(db) == {**DEFAULTS, "pool_size": 3, "echo": True}
    async with db.scope():
        assert db.stats is not None  # a keyword of Database, passed through
    await db.dispose()


def test_a_variable_the_caller_overrides_is_not_read(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("DATABASE_POOL_SIZE", "five")

    db = Database.from_env(pool_size=3)

    assert pool_settings(db)["pool_size"] == 3


def test_options_from_the_environment_are_checked_like_the_constructors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SQLite in memory has a single-connection pool, without pool_size.
    monkeypatch.setenv("DATABASE_URL", "sqlite+aiosqlite://")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "5")

    with pytest.raises(ConfigurationError, match="does not take 'pool_size'"):
        Database.from_env()


def test_database_without_a_url_still_reads_only_database_url(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("DATABASE_POOL_SIZE", "7")

    db = Database()

    assert str(db.engine.url) == sqlite_url
    assert pool_settings(db)["pool_size"] == 5  # the options are from_env's


# -- replicas --------------------------------------------------------------------------


def test_replicas_are_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite_url: str
) -> None:
    replicas = [f"sqlite+aiosqlite:///{tmp_path / name}" for name in ("r1.db", "r2.db")]
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("DATABASE_REPLICAS", f" {replicas[0]} ,{replicas[1]}")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "4")

    db = Database.from_env()

    engines = db.replica_engines
    assert [str(engine.url) for engine in engines] == replicas
    # The replicas' engines are made with the same options.
    assert [engine.pool.size() for engine in engines] == [4, 4]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            f"postgresql+asyncpg://u:{PASSWORD}@r1/db,postgresql+asyncpg://u:{PASSWORD}@r2:port/db",
            "URL 2 of 2 in DATABASE_REPLICAS is not a valid SQLAlchemy URL; the expected "
            "form is dialect+driver://user:password@host:port/dbname.",
        ),
        (
            f"postgresql+asyncpg://u:{PASSWORD}@r1/db,,postgresql+asyncpg://u:{PASSWORD}@r2/db",
            "URL 2 of 3 in DATABASE_REPLICAS is empty: separate the URLs with single commas "
            "(a comma in a password is written %2C).",
        ),
    ],
)
def test_a_malformed_replica_list_names_the_entry_and_hides_the_passwords(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str, value: str, message: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("DATABASE_REPLICAS", value)

    with pytest.raises(ConfigurationError) as info:
        Database.from_env()

    assert str(info.value) == message


def test_a_comma_in_a_replicas_password_is_written_percent_encoded(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("DATABASE_REPLICAS", "postgresql+asyncpg://u:a%2Cb@r1/db")

    (engine,) = Database.from_env().replica_engines

    assert engine.url.password == "a,b"


def test_a_sync_database_refuses_the_replicas_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REPORTS_DATABASE_URL", f"sqlite:///{tmp_path / 'app.db'}")
    monkeypatch.setenv("REPORTS_DATABASE_REPLICAS", "sqlite:///replica.db")

    with pytest.raises(ConfigurationError) as info:
        SyncDatabase.from_env("REPORTS")

    assert str(info.value) == (
        "REPORTS_DATABASE_REPLICAS is set, and read replicas are supported by the async "
        "Database only: unset it, or use Database.from_env()."
    )


# -- the synchronous variant -----------------------------------------------------------


def test_sync_database_from_env_is_a_sync_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REPORTS_DATABASE_URL", f"sqlite:///{tmp_path / 'app.db'}")
    monkeypatch.setenv("REPORTS_DATABASE_POOL_SIZE", "3")

    db = SyncDatabase.from_env("REPORTS", block_event_loop=True)
    assert_type(db, SyncDatabase[Session])

    assert type(db) is SyncDatabase
    assert pool_settings(db)["pool_size"] == 3
    with db.scope() as session:
        assert session.execute(text("SELECT 1")).scalar_one() == 1
    db.dispose()


def test_a_missing_sync_url_suggests_a_synchronous_driver() -> None:
    with pytest.raises(ConfigurationError) as info:
        SyncDatabase.from_env("REPORTS")

    assert str(info.value).endswith(
        "REPORTS_DATABASE_URL=postgresql+psycopg://user:password@host/dbname."
    )


def test_a_subclass_gets_an_instance_of_itself(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    class AppDatabase(Database):
        pass

    monkeypatch.setenv("DATABASE_URL", sqlite_url)

    db = AppDatabase.from_env()

    assert_type(db, AppDatabase)
    assert type(db) is AppDatabase


# -- the guide, docs/configuration.md ----------------------------------------------------


def guide_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.DOTALL)


@pytest.fixture
def guide_environment(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The guide's environment (its ``sh`` block), set in this process."""
    (block,) = guide_blocks("sh")
    environment = dict(line.split("=", 1) for line in block.splitlines())
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return environment


def run_guide_block(name: str) -> dict[str, Any]:
    """Run the guide's ``python`` block that starts with ``# NAME.py``; its globals."""
    blocks = {block.splitlines()[0]: block for block in guide_blocks("python")}
    assert sorted(blocks) == ["# app.py", "# precedence.py"]
    namespace: dict[str, Any] = {"__name__": name}
    exec(compile(blocks[f"# {name}.py"], f"{GUIDE}:{name}", "exec"), namespace)
    return namespace


def test_the_guides_app_is_configured_as_it_says(guide_environment: dict[str, str]) -> None:
    app = run_guide_block("app")

    db, analytics, reports = app["db"], app["analytics"], app["reports"]
    assert isinstance(app["app"], SQLAlchemyMiddleware)
    assert type(db) is Database
    assert type(analytics) is Database
    assert type(reports) is SyncDatabase
    assert pool_settings(db) == {
        **DEFAULTS,
        "pool_size": 10,
        "max_overflow": 5,
        "pool_pre_ping": True,
    }
    assert [engine.url.host for engine in db.replica_engines] == [
        "replica-1.internal",
        "replica-2.internal",
    ]
    assert [engine.pool.size() for engine in db.replica_engines] == [10, 10]  # type: ignore[attr-defined]
    assert pool_settings(analytics) == {**DEFAULTS, "pool_recycle": 1800}
    assert analytics.engine.url.drivername == "postgresql+psycopg"
    assert pool_settings(reports) == {**DEFAULTS, "echo": "debug"}
    assert "secret" not in repr(db) + repr(analytics) + repr(reports)


def test_the_guides_precedence_example_wins_over_the_environment(
    guide_environment: dict[str, str],
) -> None:
    assert guide_environment["DATABASE_POOL_SIZE"] == "10"

    db = run_guide_block("precedence")["db"]

    assert pool_settings(db)["pool_size"] == 20


def test_the_guides_error_messages_are_the_real_ones(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str, tmp_path: Path
) -> None:
    (block,) = guide_blocks("text")
    shown = block.splitlines()

    def message(
        prefix: str | None,
        database: type[Database] | type[SyncDatabase] = Database,
        **environment: str,
    ) -> str:
        with monkeypatch.context() as patch:
            for name, value in environment.items():
                patch.setenv(name, value)
            with pytest.raises(ConfigurationError) as info:
                database.from_env(prefix)
        return str(info.value)

    replica = "postgresql+asyncpg://u:p@r/db"
    assert shown == [
        message("ANALYTICS"),
        message(
            "ANALYTICS", ANALYTICS_DATABASE_URL=sqlite_url, ANALYTICS_DATABASE_POOL_SIZE="five"
        ),
        message(
            "ANALYTICS", ANALYTICS_DATABASE_URL=sqlite_url, ANALYTICS_DATABASE_POOL_PRE_PING="maybe"
        ),
        message(None, DATABASE_URL=sqlite_url, DATABASE_REPLICAS=f"{replica},,{replica}"),
        message(
            "REPORTS",
            SyncDatabase,
            REPORTS_DATABASE_URL=f"sqlite:///{tmp_path / 'r.db'}",
            REPORTS_DATABASE_REPLICAS=replica,
        ),
    ]
