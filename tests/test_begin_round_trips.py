"""``BEGIN`` sent with the first statement: the round trips behind the decision not to.

``docs/round-trips.md`` explains why the package leaves ``BEGIN`` as a round trip of its
own (issue 13, "Fewer round trips", item 3).  These tests count, at
``benchmarks/proxy.py`` in front of a real PostgreSQL, the facts it rests on, with the
ways of ``benchmarks/round_trips.py`` that produced its table: a one-statement request
costs ``BEGIN``, the statement and ``COMMIT`` on both drivers; asyncpg prepares a
statement on its first use on a connection; psycopg's pipeline mode does not put
``BEGIN`` with the first statement (a psycopg that did would fail
``test_psycopg_pipeline_mode_still_sends_begin_alone``: then revisit the decision); only
a connection in autocommit with ``BEGIN`` queued by hand saves the round trip; asyncpg
cannot send a second message before the first's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import pytest
from sqlalchemy import URL

from benchmarks.proxy import DelayingProxy
from benchmarks.round_trips import KINDS, WAYS, create_table, round_trips_of

pytestmark = [pytest.mark.anyio, pytest.mark.postgresql]

#: Transactions counted per test, each on its own.
COUNT = 3
WAYS_BY_NAME = {way.name: way for way in WAYS}


@pytest.fixture(scope="module")
def proxy(postgres_server: URL) -> Iterator[DelayingProxy]:
    """The round-trip-counting relay to the tests' server, with no delay: only the count."""
    assert postgres_server.host is not None
    assert postgres_server.port is not None
    with DelayingProxy(postgres_server.host, postgres_server.port, delay=0.0) as proxy:
        yield proxy


async def counts(way: str, kind: str, proxy: DelayingProxy, database: URL) -> list[int]:
    await create_table(database)
    found, _ = await round_trips_of(WAYS_BY_NAME[way], proxy, database, kind, COUNT)
    return found


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_one_statement_request_costs_begin_the_statement_and_commit(
    driver: str, kind: str, proxy: DelayingProxy, postgres_database: URL
) -> None:
    found = await counts(f"package, {driver}", kind, proxy, postgres_database)
    assert found == [3] * COUNT


@pytest.mark.parametrize("kind", KINDS)
async def test_asyncpg_prepares_a_statement_on_its_first_use_on_a_connection(
    kind: str, proxy: DelayingProxy, postgres_database: URL
) -> None:
    found = await counts("package, asyncpg, first use", kind, proxy, postgres_database)
    assert found == [4] * COUNT


@pytest.mark.parametrize("kind", KINDS)
async def test_psycopg_parses_a_new_statement_in_the_round_trip_that_runs_it(
    kind: str, proxy: DelayingProxy, postgres_database: URL
) -> None:
    found = await counts("package, psycopg, first use", kind, proxy, postgres_database)
    assert found == [3] * COUNT


@pytest.mark.parametrize("kind", KINDS)
async def test_psycopg_pipeline_mode_still_sends_begin_alone(
    kind: str, proxy: DelayingProxy, postgres_database: URL
) -> None:
    # psycopg syncs the pipeline after the BEGIN it adds (psycopg/psycopg#401, 3.1.3):
    # BEGIN, then the statement, then COMMIT, as without a pipeline.
    found = await counts("psycopg, pipeline mode", kind, proxy, postgres_database)
    assert found == [3] * COUNT


@pytest.mark.parametrize("kind", KINDS)
async def test_begin_queued_by_hand_with_the_first_statement_saves_one_round_trip(
    kind: str, proxy: DelayingProxy, postgres_database: URL
) -> None:
    found = await counts("psycopg, BEGIN queued by hand", kind, proxy, postgres_database)
    assert found == [2] * COUNT


async def test_asyncpg_refuses_a_second_operation_before_the_first_is_answered(
    postgres_database: URL,
) -> None:
    # What pipelining BEGIN through asyncpg's API would need: a second message on the
    # wire before the first's answer.  asyncpg has no pipeline (MagicStack/asyncpg#839).
    conn = await asyncpg.connect(postgres_database.render_as_string(hide_password=False))
    try:
        results = await asyncio.gather(
            conn.execute("BEGIN"), conn.fetch("SELECT 1"), return_exceptions=True
        )
        assert isinstance(results[1], asyncpg.InterfaceError), results
        assert "another operation is in progress" in str(results[1])
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("way", "expected"),
    [
        ("package, asyncpg, PgBouncer settings", 4),  # an unnamed statement parsed each time
        ("package, psycopg, PgBouncer settings", 3),
        ("asyncpg, transaction()", 3),
    ],
)
async def test_the_pages_other_figures(
    way: str, expected: int, proxy: DelayingProxy, postgres_database: URL
) -> None:
    for kind in KINDS:
        assert await counts(way, kind, proxy, postgres_database) == [expected] * COUNT


def test_every_way_of_the_page_is_counted_here() -> None:
    counted = {
        *(
            f"package, {driver}{what}"
            for driver in ("asyncpg", "psycopg")
            for what in ("", ", first use", ", PgBouncer settings")
        ),
        "psycopg, pipeline mode",
        "psycopg, BEGIN queued by hand",
        "asyncpg, transaction()",
    }
    assert {way.name for way in WAYS} == counted
