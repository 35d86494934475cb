"""The latency scenario's delaying proxy (benchmarks/proxy.py), against a real PostgreSQL.

The proxy is the measuring instrument of the round trips the package and the benchmarks
report: these tests pin its count to what the protocol does (one round trip per
statement in autocommit, a pipeline as one) and its delay to what was asked.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import URL

from benchmarks.proxy import DelayingProxy

pytestmark = [pytest.mark.postgresql]

DELAY = 0.0005
#: How far above 2 * DELAY the median round trip through the proxy may be, beyond the
#: direct one: the holds' overshoot (about 12 µs each way measured with a 1 ns timer
#: slack) and the relay's four thread hand-overs (about 40 µs, measured with no delay),
#: with room for a shared, noisy machine.
TOLERANCE = 0.0004


def connect(database: URL, port: int) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host="127.0.0.1",
        port=port,
        user=database.username,
        dbname=database.database,
        autocommit=True,
    )


@pytest.fixture
def proxy(postgres_database: URL) -> Iterator[DelayingProxy]:
    assert postgres_database.host is not None
    assert postgres_database.port is not None
    with DelayingProxy(postgres_database.host, postgres_database.port, delay=DELAY) as proxy:
        yield proxy


def test_a_select_in_autocommit_is_one_round_trip(
    postgres_database: URL, proxy: DelayingProxy
) -> None:
    with connect(postgres_database, proxy.port) as conn:
        assert proxy.round_trips >= 1  # the connection's start-up
        proxy.reset()
        assert conn.execute("SELECT 1").fetchall() == [(1,)]
        assert proxy.round_trips == 1


def test_begin_select_commit_as_three_statements_are_three_round_trips(
    postgres_database: URL, proxy: DelayingProxy
) -> None:
    with connect(postgres_database, proxy.port) as conn:
        proxy.reset()
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        conn.execute("COMMIT")
        assert proxy.round_trips == 3


def test_a_pipeline_is_one_round_trip(postgres_database: URL, proxy: DelayingProxy) -> None:
    """Messages sent before any answer is read are one round trip, however many statements."""
    with connect(postgres_database, proxy.port) as conn:
        proxy.reset()
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int", (n,)) for n in range(3)]
        assert [c.fetchone() for c in cursors] == [(0,), (1,), (2,)]
        assert proxy.round_trips == 1


def test_round_trips_are_counted_per_connection(
    postgres_database: URL, proxy: DelayingProxy
) -> None:
    with (
        connect(postgres_database, proxy.port) as one,
        connect(postgres_database, proxy.port) as two,
    ):
        proxy.reset()
        one.execute("SELECT 1")
        for _ in range(2):
            two.execute("SELECT 1")
        assert proxy.connection_round_trips() == [1, 2]
        assert proxy.round_trips == 3


def median_round_trip(conn: psycopg.Connection[tuple[object, ...]], n: int = 200) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        conn.execute("SELECT 1").fetchall()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def test_each_round_trip_is_delayed_twice_the_delay(
    postgres_database: URL, proxy: DelayingProxy
) -> None:
    assert postgres_database.port is not None
    with (
        connect(postgres_database, postgres_database.port) as direct,
        connect(postgres_database, proxy.port) as proxied,
    ):
        proxy.reset()
        added = median_round_trip(proxied) - median_round_trip(direct)
        holds = proxy.stats()["hold"]
    assert 2 * DELAY <= added <= 2 * DELAY + TOLERANCE, f"{added * 1e6:.0f} µs added"
    for direction in ("to_server", "to_client"):
        assert DELAY <= holds[direction]["median"] <= DELAY + TOLERANCE / 2, holds


def test_dropped_connections_fail_on_their_next_statement(
    postgres_database: URL, proxy: DelayingProxy
) -> None:
    with connect(postgres_database, proxy.port) as conn:
        conn.execute("SELECT 1")
        proxy.drop_connections()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
