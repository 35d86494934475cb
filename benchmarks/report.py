"""Turn a run's results into ``results.md`` (the tables), ``results.json`` and ``results.png``.

The main table has one row per system and one column per scenario; each cell holds
the median and, in parentheses, the ratio to the scenario's reference (the bare app
for the no-database scenario, the hand-written baseline for the others).  A system
or scenario that could not be measured shows ``n/a`` and the reason.

Wall-clock time is what the issue asks for, but on a shared machine it also measures
the other processes; so a second table gives the CPU time per request (this
process's for the in-process scenarios, the uvicorn process's for the real server),
which they hardly disturb.  Then the middleware alone on a bare ASGI app, and the
issue's bar: each criterion, the figure measured, met or not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.app import LABELS, SYSTEMS

__all__ = ["bar", "render_markdown", "write"]

Result = dict[str, Any]

#: The multiplication sign, written as an escape (ruff's RUF001 flags the literal).
X = "\u00d7"

#: How far ahead of a peer that holds its connection during the body counts as "far".
FAR_AHEAD = 2.0


def _scenario(document: Result, name: str) -> Result:
    scenario: Result = document["scenarios"].get(name, {})
    return scenario


def _entry(scenario: Result, system: str, route: str | None = None) -> Result | None:
    systems: Result = scenario.get("systems", {})
    if route is not None:
        systems = systems.get(route, {})
    entry: Result | None = systems.get(system)
    return entry


def _why_missing(scenario: Result, system: str) -> str:
    if "error" in scenario:
        return str(scenario["error"])
    reason = scenario.get("failures", {}).get(system)
    return str(reason) if reason else "n/a: not run"


def _ratio(value: object) -> str:
    return f"{value:.2f}{X}" if isinstance(value, float) else "—"


def _time(scenario: Result, system: str, *, cpu: bool = False, route: str | None = None) -> str:
    """The cell of a time per request, wall or CPU: median (+added µs, ratio)."""
    entry = _entry(scenario, system, route)
    key = "cpu_" if cpu else ""
    if entry is None or f"{key}median" not in entry:
        return _why_missing(scenario, system) if entry is None else "—"
    median = entry[f"{key}median"]
    if system == scenario.get("reference"):
        return f"{median:.1f} (reference)"
    added = entry.get(f"{key}added")
    extra = f"{added:+.1f} µs, " if isinstance(added, float) else ""
    return f"{median:.1f} ({extra}{_ratio(entry.get(f'{key}ratio'))})"


def _rate(scenario: Result, system: str, route: str | None = None) -> str:
    """The cell of a rate: median req/s (ratio, and failures if any)."""
    entry = _entry(scenario, system, route)
    if entry is None:
        return _why_missing(scenario, system)
    errors = f", {entry['errors']} failed" if entry.get("errors") else ""
    ratio = "reference" if system == scenario.get("reference") else _ratio(entry.get("ratio"))
    return f"{entry['median']:.0f} ({ratio}{errors})"


def _server(scenario: Result, route: str, system: str) -> str:
    entry = _entry(scenario, system, route)
    if entry is None:
        return _why_missing(scenario, system)
    return f"{_rate(scenario, system, route)} · {entry['p50_ms']:.1f} / {entry['p99_ms']:.1f}"


def _held(scenario: Result, system: str) -> str:
    entry = _entry(scenario, system)
    if entry is None:
        return "—"
    held = entry.get("holds_transaction_during_body")
    return "?" if held is None else ("**yes**" if held else "no")


def _failing(scenario: Result, system: str) -> str:
    entry = _entry(scenario, system)
    if entry is None:
        return _why_missing(scenario, system)
    statuses = ", ".join(sorted({str(s) for s in entry["statuses"]}))
    shown = f"{entry['count_2xx']}/{entry['requests']}"
    return f"**{shown}** ({statuses})" if entry["count_2xx"] else f"{shown} ({statuses})"


def bar(document: Result) -> list[Result]:
    """The issue's bar: each criterion, the figure measured for asgi_sqla, met or not.

    The in-process criteria are judged on wall-clock medians, as the issue states
    them; the CPU-time figure is shown beside them.
    """
    criteria: list[Result] = []

    def add(criterion: str, target: str, met: bool | None, measured: str) -> None:
        criteria.append({"criterion": criterion, "target": target, "met": met, "text": measured})

    entry = _entry(_scenario(document, "no_db"), "asgi_sqla")
    if entry and "added" in entry:
        add(
            "Overhead, no database (Starlette app, in-process)",
            "within 1 µs/request of the bare app",
            entry["added"] <= 1.0,
            f"wall {entry['added']:+.2f} µs ({entry['ratio']:.3f}{X}); "
            f"CPU {entry.get('cpu_added', math.nan):+.2f} µs",
        )
    else:
        add("Overhead, no database", "within 1 µs/request", None, "not measured")
    for name, label in (("one_query_sqlite", "SQLite"), ("one_query_postgresql", "PostgreSQL")):
        entry = _entry(_scenario(document, name), "asgi_sqla")
        if entry and "ratio" in entry:
            add(
                f"Overhead, one query ({label}, in-process)",
                f"within 3% of the hand-written baseline (≤ 1.03{X})",
                entry["ratio"] <= 1.03,
                f"wall {entry['ratio']:.3f}{X} ({entry['added']:+.1f} µs); "
                f"CPU {entry.get('cpu_ratio', math.nan):.3f}{X} "
                f"({entry.get('cpu_added', math.nan):+.1f} µs)",
            )
        else:
            add(f"Overhead, one query ({label})", f"≤ 1.03{X}", None, "not measured")
    slow = _scenario(document, "slow_clients").get("systems", {})
    mine = slow.get("asgi_sqla")
    if mine and "ratio" in mine:
        add(
            "Slow clients, pool of 2",
            f"at least 95% of the baseline's throughput (≥ 0.95{X})",
            mine["ratio"] >= 0.95,
            f"{mine['ratio']:.3f}{X} ({mine['median']:.0f} req/s)",
        )
        holders = {
            system: entry
            for system, entry in slow.items()
            if entry.get("holds_transaction_during_body") and system != "asgi_sqla"
        }
        if holders:
            lead = min(mine["median"] / entry["median"] for entry in holders.values())
            names = ", ".join(LABELS[s] for s in holders)
            add(
                "Slow clients: far ahead of every peer that holds the connection during the body",
                f"≥ {FAR_AHEAD:.0f}{X} each of them ({names})",
                lead >= FAR_AHEAD,
                f"{lead:.1f}{X} the best of them",
            )
        else:
            add(
                "Slow clients: far ahead of the peers that hold the connection",
                f"≥ {FAR_AHEAD:.0f}{X}",
                None,
                "no peer was seen holding a transaction during the body",
            )
    else:
        add("Slow clients, pool of 2", f"≥ 0.95{X}", None, "not measured")
    _sync_bar(document, add)
    failing = _entry(_scenario(document, "failing_commit"), "asgi_sqla")
    if failing:
        add(
            "Failing commit",
            "zero 2xx",
            failing["count_2xx"] == 0,
            f"{failing['count_2xx']} of {failing['requests']} answered 2xx "
            f"(statuses {', '.join(str(s) for s in sorted(set(failing['statuses'])))})",
        )
    else:
        add("Failing commit", "zero 2xx", None, "not measured")
    return criteria


def _sync_part(document: Result, part: str) -> Result:
    """A part of the sync scenario (``real_server``, ``slow_clients``), or why it is missing."""
    sync = _scenario(document, "sync")
    if "error" in sync:
        return {"error": sync["error"]}
    found: Result = sync.get(part, {})
    return found


def _sync_bar(document: Result, add: Callable[[str, str, bool | None, str], None]) -> None:
    """The sync scenario's criteria: asgi_sqla against FastAPI's SQL tutorial."""
    server = _sync_part(document, "real_server")
    for route, label in (("read", "read (1 SELECT)"), ("write", "write (1 INSERT)")):
        mine = _entry(server, "asgi_sqla", route)
        theirs = _entry(server, "by_hand", route)
        criterion = f"Sync: FastAPI `def` endpoints under uvicorn, psycopg 3, {label}"
        target = f"at least 97% of the SQL tutorial's throughput (≥ 0.97{X})"
        if mine and theirs and "ratio" in mine:
            add(
                criterion,
                target,
                mine["ratio"] >= 0.97,
                f"{mine['ratio']:.3f}{X} ({mine['median']:.0f} against {theirs['median']:.0f} "
                f"req/s); threads per request {_hops(mine)} against {_hops(theirs)}; CPU "
                f"{mine.get('cpu_ratio', math.nan):.2f}{X}",
            )
        else:
            add(criterion, f"≥ 0.97{X}", None, "not measured")
    slow = _sync_part(document, "slow_clients").get("systems", {})
    mine = slow.get("asgi_sqla")
    criterion = "Sync: slow clients, pool of 2 (`def` endpoint, in-process)"
    if mine and "ratio" in mine:
        tutorial = slow["by_hand"]["median"]
        add(
            criterion,
            f"at least 95% of the SQL tutorial's throughput (≥ 0.95{X})",
            mine["ratio"] >= 0.95,
            f"{mine['ratio']:.1f}{X} ({mine['median']:.0f} against {tutorial:.0f} req/s)",
        )
        scoped = slow.get("by_hand_function_scope")
        if scoped and "median" in scoped:
            ratio = mine["median"] / scoped["median"]
            add(
                "Sync: slow clients, against the tutorial's dependency with "
                '`scope="function"` (closed before the response)',
                f"≥ 0.95{X} (ratio of the medians)",
                ratio >= 0.95,
                f"{ratio:.2f}{X} ({mine['median']:.0f} against {scoped['median']:.0f} req/s)",
            )
    else:
        add(criterion, f"≥ 0.95{X}", None, "not measured")


def _hops(entry: Result) -> str:
    """Worker-thread hops per request: total (framework + asgi_sqla's pool)."""
    hops = entry.get("threads_per_request")
    if not hops:
        return "?"
    return f"{hops['total']:g} ({hops['framework']:g} + {hops['package']:g})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(document: Result) -> str:
    """The tables, the bar, and how the run was made, as Markdown."""
    meta = document["meta"]
    versions = meta["systems"]
    no_db = _scenario(document, "no_db")
    sqlite = _scenario(document, "one_query_sqlite")
    postgres = _scenario(document, "one_query_postgresql")
    slow = _scenario(document, "slow_clients")
    failing = _scenario(document, "failing_commit")
    server = _scenario(document, "real_server")

    main = _table(
        [
            "system",
            "version",
            "no DB: µs/request",
            "1 SELECT, SQLite: µs/request",
            "1 SELECT, PostgreSQL: µs/request",
            f"slow clients, pool of {slow.get('pool_size', 2)}: req/s",
            "transaction open while the body is sent",
            "failing COMMIT: 2xx answers (statuses)",
            "uvicorn, read: req/s · p50 / p99 ms",
            "uvicorn, write: req/s · p50 / p99 ms",
        ],
        [
            [
                LABELS[system],
                versions.get(system, "?"),
                _time(no_db, system),
                _time(sqlite, system),
                _time(postgres, system),
                _rate(slow, system),
                _held(slow, system),
                _failing(failing, system),
                _server(server, "read", system),
                _server(server, "write", system),
            ]
            for system in SYSTEMS
        ],
    )
    cpu = _table(
        [
            "system",
            "no DB (in-process)",
            "1 SELECT, SQLite (in-process, with aiosqlite's thread)",
            "1 SELECT, PostgreSQL (in-process, the app's side)",
            "uvicorn, read (server process)",
            "uvicorn, write (server process)",
        ],
        [
            [
                LABELS[system],
                _time(no_db, system, cpu=True),
                _time(sqlite, system, cpu=True),
                _time(postgres, system, cpu=True),
                _time(server, system, cpu=True, route="read"),
                _time(server, system, cpu=True, route="write"),
            ]
            for system in SYSTEMS
        ],
    )
    out = ["## Results", "", *main, ""]
    out += [
        "Each cell: the median, then (in parentheses) the ratio to the reference measured "
        "beside it — the bare app for *no DB* (the hand-written app serves "
        "`/ping` with no middleware), the hand-written baseline elsewhere. Times are "
        "wall-clock; lower is better. Requests per second: higher is better.",
        "",
        "### CPU time per request, µs",
        "",
        "The same runs, counted in CPU time, which the other processes of a busy machine "
        "hardly disturb.",
        "",
        *cpu,
        "",
    ]
    pure = no_db.get("pure_asgi", {})
    if pure:
        out += [
            "### The middleware alone",
            "",
            "Around an ASGI app that does nothing (`benchmarks/overhead.py`), beside the "
            "cheapest middlewares there can be, the floor that any middleware pays.",
            "",
        ]
        rows = []
        for name, entry in pure.items():
            reference = name == "bare ASGI app"
            rows.append(
                [
                    name,
                    f"{entry['median']:.2f}",
                    "—" if reference else f"{entry['added']:+.2f}",
                    f"{entry['cpu_median']:.2f}",
                    "—" if reference else f"{entry['cpu_added']:+.2f}",
                ]
            )
        out += _table(["app", "wall µs/request", "added", "CPU µs/request", "added"], rows)
        out.append("")
    if failing.get("systems"):
        out += [
            "### The failing COMMIT",
            "",
            f"Rows committed, all systems together: {failing.get('rows_committed')} — the "
            "commit fails for everyone; what differs is what the client was told. "
            "What reached the server (the client's status was already sent where it is 2xx):",
            "",
        ]
        for system, entry in failing["systems"].items():
            raised = entry["raised_to_server"]
            said = f"`{raised[0]}`" if raised else "nothing (the failure was not raised)"
            out.append(f"- {LABELS[system]}: {said}")
        out.append("")

    out += _sync_section(document)
    out += _latency_section(document)
    out += ["## The bar", ""]
    out += _table(
        ["criterion", "target", "measured (asgi_sqla)", "met"],
        [
            [
                c["criterion"],
                c["target"],
                c["text"],
                "n/a" if c["met"] is None else ("yes" if c["met"] else "**no**"),
            ]
            for c in document.get("bar", [])
        ],
    )
    out += ["", "## How it was measured", "", *_method(meta), *_sync_method(document)]
    return "\n".join(out) + "\n"


#: The latency scenario's extra rows (``benchmarks.run.PRE_PING_ROWS``) and their labels.
LATENCY_LABELS: dict[str, str] = {
    "by_hand_pre_ping": "by hand, `pool_pre_ping=True`",
    "asgi_sqla_pre_ping": "asgi_sqla, `pool_pre_ping=True`",
}


def _latency_cell(scenario: Result, row: str, kind: str) -> str:
    """Round trips per request · median / p99 ms (ratio to the hand-written app)."""
    entry = scenario.get("systems", {}).get(row, {}).get(kind)
    if entry is None:
        return _why_missing(scenario, row)
    low, high = entry["round_trips_range"]
    trips = f"{entry['round_trips']:g}" if low == high else f"{low:g} to {high:g}"
    ratio = "" if row == scenario.get("reference") else f" ({_ratio(entry.get('ratio'))})"
    return f"**{trips}** · {entry['median_ms']:.2f} / {entry['p99_ms']:.1f}{ratio}"


def _latency_section(document: Result) -> list[str]:
    """The latency scenario: the database behind the delaying proxy (benchmarks/proxy.py)."""
    scenario = _scenario(document, "latency")
    if not scenario:
        return []
    out = ["### Latency: the database 0.5 ms away", ""]
    if "error" in scenario:
        return [*out, str(scenario["error"]), ""]
    versions = scenario.get("versions") or document["meta"]["systems"]
    kinds: dict[str, str] = scenario["kinds"]
    rows = [*SYSTEMS, *LATENCY_LABELS]
    out += _table(
        ["system", "version", *(f"{kind} (`{route}`)" for kind, route in kinds.items())],
        [
            [
                LATENCY_LABELS.get(row) or LABELS[row],
                versions.get(row.removesuffix("_pre_ping"), "?"),
                *(_latency_cell(scenario, row, kind) for kind in kinds),
            ]
            for row in rows
        ],
    )
    floor = scenario["floor"]
    hold = scenario["hold_ms"]
    out += [
        "",
        "Each cell: **round trips per request** (counted at the proxy; a range if they "
        "differed between rounds) · median / p99 latency in ms (ratio of the medians to "
        "the hand-written app's, median over rounds). PostgreSQL (asyncpg) is reached "
        f"through `benchmarks/proxy.py`, which holds everything {scenario['delay_ms']:g} ms "
        "each way (measured on the last batch: median hold "
        f"{hold['to_server'].get('median', math.nan):.3f} ms to the server, "
        f"{hold['to_client'].get('median', math.nan):.3f} ms back); the app is called "
        f"in-process, one request at a time, {scenario['requests_per_batch']} requests "
        f"per system and kind in each of {scenario['rounds']} rounds, the systems in an "
        "order that rotates every round, on a pool warmed by every route first. "
        f"One round trip alone (asyncpg, autocommit, a prepared `SELECT 1`): "
        f"{floor['median_ms']:.2f} ms median, {floor['p99_ms']:.1f} ms p99: the physical "
        f"floor of a request that needs one. Python {scenario.get('python', '?')}; load "
        f"average at the start {scenario.get('load_average_at_start', '?')}.",
        "",
    ]
    return out


def _sync_section(document: Result) -> list[str]:
    """The sync scenario: FastAPI ``def`` endpoints, the SQL tutorial against SyncDatabase."""
    sync = _scenario(document, "sync")
    if not sync:
        return []
    # Imported here: it imports FastAPI, which the other scenarios do not need.
    from benchmarks.sync_app import SYNC_LABELS, SYNC_SYSTEMS

    server = _sync_part(document, "real_server")
    slow = _sync_part(document, "slow_clients")
    versions = sync.get("versions", {})
    out = [
        "## Sync: FastAPI `def` endpoints on psycopg 3",
        "",
        "The same small app as a FastAPI app with `def` endpoints (FastAPI runs them in "
        "anyio's worker threads), on PostgreSQL through `postgresql+psycopg://` used "
        "synchronously. *By hand* is FastAPI's SQL tutorial: "
        "`def get_session(): with Session(engine) as session: yield session`, "
        "`SessionDep = Annotated[Session, Depends(get_session)]`, and the write endpoint "
        "calls `session.commit()`. *asgi_sqla*: the same endpoints with "
        "`SessionDep = Annotated[Session, Depends(session_dependency(db))]` on a "
        "`SyncDatabase` and `app.add_middleware(SQLAlchemyMiddleware, db)`; nothing "
        "commits in the endpoint, the middleware does before the status line is sent. "
        "Same engine options for both.",
        "",
    ]
    if "error" in sync:
        return [*out, f"Not measured: {sync['error']}", ""]
    systems = server.get("systems", {}).get("read", {})
    rows = []
    for system in ("by_hand", "asgi_sqla"):
        label = SYNC_LABELS[system]
        if system not in systems:
            rows.append([label, _why_missing(server, system), "", "", "", "", ""])
            continue
        rows.append(
            [
                label,
                _server(server, "read", system),
                _server(server, "write", system),
                _hops(_entry(server, system, "read") or {}),
                _hops(_entry(server, system, "write") or {}),
                _time(server, system, cpu=True, route="read"),
                _time(server, system, cpu=True, route="write"),
            ]
        )
    out += [
        f"### Under uvicorn, {server.get('connections', '?')} connections, "
        f"pool_size={server.get('pool_size', '?')}",
        "",
        *_table(
            [
                "system",
                "read: req/s · p50 / p99 ms",
                "write: req/s · p50 / p99 ms",
                "threads/request, read",
                "threads/request, write",
                "CPU µs/request, read",
                "CPU µs/request, write",
            ],
            rows,
        ),
        "",
        "Threads per request: the calls to a worker-thread entry point per request, as "
        "*total (the framework's `to_thread.run_sync` + asgi_sqla's)*, counted in the "
        "server process. The tutorial takes three: its `def` dependency is entered in a "
        "thread and exited in another, around the endpoint's. asgi_sqla takes two: "
        "the endpoint's, and one to commit and close, in anyio's threads under a limiter "
        "of its own (none for a session "
        "that opened no transaction); its dependency is an `async def` that takes no "
        "thread. CPU: the uvicorn process's (all threads), per request it served. "
        "`python -m benchmarks.sync_profile` measures the same requests in-process, with "
        "CPU time per request at 1 and 16 concurrent clients.",
        "",
    ]
    slow_systems = slow.get("systems", {})
    out += [
        f"### Slow clients, pool of {slow.get('pool_size', 2)}",
        "",
        *_table(
            ["system", "req/s", "transaction open while the body is sent"],
            [
                [SYNC_LABELS[system], _rate(slow, system), _held(slow, system)]
                for system in SYNC_SYSTEMS
            ],
        ),
        "",
    ]
    tutorial = slow_systems.get("by_hand", {})
    held = tutorial.get("holds_transaction_during_body")
    if held is not None:
        fastapi = versions.get("fastapi", "?")
        seen = (
            "The probe saw the tutorial's transaction open while the body went out: its "
            "session holds a connection until the body has gone out."
            if held
            else "Yet the probe saw no transaction of the tutorial's open while the body went out."
        )
        out += [
            f"FastAPI {fastapi}: the code after a `yield` dependency's `yield` (here, "
            "closing the session) runs once the response has been sent, streamed body "
            "included (`fastapi.routing.request_response` exits the dependencies' stack "
            "after `await response(...)`). The endpoint is the tutorial's create: "
            "`INSERT`, `session.commit()`, then the row read back (its "
            "`session.refresh(hero)`), which begins a new transaction. " + seen + " With "
            '`Depends(get_session, scope="function")` (FastAPI 0.121+) the session is '
            "closed when the endpoint returns, before the response; asgi_sqla commits and "
            "returns the connection when the response starts.",
            "",
        ]
    return out


def _sync_method(document: Result) -> list[str]:
    sync = _scenario(document, "sync")
    server = sync.get("real_server")
    slow = sync.get("slow_clients")
    if not server or not slow:
        return []
    versions = ", ".join(f"{k} {v}" for k, v in sync.get("versions", {}).items())
    return [
        f"- Sync: measured {sync.get('date', '?')} ({versions}); load average at its start "
        f"{sync.get('load_average_at_start')}. Under uvicorn: one worker per system, "
        f"{server['connections']} keep-alive connections ({server['generator']}), "
        f"{server['duration_s']:.0f} s per run, {server['rounds']} rounds in rotating "
        f"order, pool_size={server['pool_size']}; threads and CPU per request from the "
        "server's counters and `/proc/PID/stat` read before and after each run, divided "
        "by the requests the server finished meanwhile. Slow clients: "
        f"{slow['clients']} concurrent `GET /stream`, {slow['chunks']} chunks of "
        f"{slow['chunk_delay_s'] * 1000:.0f} ms each, in-process, "
        f"pool_size={slow['pool_size']}, max_overflow=0, {slow['rounds']} rounds, "
        "paired with the tutorial as in the async scenario.",
    ]


def _method(meta: Result) -> list[str]:
    machine = meta["machine"]
    settings = meta["settings"]
    libraries = ", ".join(f"{k} {v}" for k, v in meta["libraries"].items())
    updates = [
        f"- Measured again since, the other figures left as they were: "
        f"{', '.join(u['scenarios'])} on {u['date']} (`{u['command']}`, {u['seconds']:.0f} s)."
        for u in meta.get("updates", [])
    ]
    return [
        *updates,
        f"- Date: {meta['date']}; `{meta['command']}` ran for {meta['seconds']:.0f} s "
        "(set-up not included).",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"{machine['os']}; load average at the start {machine['load_average_at_start']}.",
        f"- Python {meta['python']}; {libraries}; PostgreSQL {meta['postgresql']} "
        f"(throwaway cluster: fsync and synchronous_commit off); SQLite {meta['sqlite']}; "
        f"load generator: {meta['load_generator']}.",
        "- Every system runs once per round, in an order that rotates every round; figures "
        "are medians over rounds. In-process (slow clients included), each system's "
        "batch is run right beside a fresh batch of the reference (before or after it, "
        "alternately) and ratios are the medians of these pairs' ratios; under uvicorn, "
        "the medians of the per-round ratios.",
        f"- No DB: {settings['no_db_rounds']} rounds of `GET /ping`, in-process, one at a "
        f"time, each system's batch sized to last about "
        f"{settings['no_db_batch_seconds'] * 1000:.0f} ms. One SELECT: "
        f"{settings['query_rounds']} rounds of `GET /item` likewise, batches of about "
        f"{settings['query_batch_seconds'] * 1000:.0f} ms.",
        f"- Slow clients: {settings['slow_clients']} concurrent `GET /stream` (an INSERT, "
        f"then {settings['slow_chunks']} chunks, each taking the client "
        f"{settings['slow_chunk_delay'] * 1000:.0f} ms), in-process, PostgreSQL, "
        f"pool_size={settings['slow_pool']}, max_overflow=0, {settings['slow_rounds']} "
        "rounds. 'Transaction open' is what `pg_stat_activity` shows when the first body "
        "chunk of a lone request reaches the client.",
        f"- Failing COMMIT: {settings['failing_requests']} `POST /orphans` per system "
        "(PostgreSQL; the row breaks a DEFERRABLE INITIALLY DEFERRED foreign key).",
        f"- uvicorn: one worker (uvloop, httptools) per system, all started at once; "
        f"{settings['server_connections']} keep-alive connections, "
        f"{settings['server_duration']:.0f} s per run, {settings['server_rounds']} rounds, "
        f"pool_size={settings['server_pool']}; read = `GET /item`, write = `POST /items`, "
        "PostgreSQL; server CPU from `/proc/PID/stat`.",
    ]


#: Shorter names for the chart's axes.
SHORT_LABELS: dict[str, str] = {
    "by_hand": "by hand",
    "asgi_sqla": "asgi_sqla",
    "context_async_sqlalchemy": "context-async (Starlette mw)",
    "context_async_sqlalchemy_asgi": "context-async (ASGI mw)",
    "fastapi_async_sqlalchemy": "fastapi-async-sqlalchemy",
    "advanced_alchemy": "advanced-alchemy",
    "asgi_sqlalchemy": "asgi-sqlalchemy",
}


def _panel(
    ax: Any,
    title: str,
    values: list[float],
    colours: list[str],
    fmt: Callable[[float], str],
) -> None:
    labels = [SHORT_LABELS.get(s, s) for s in SYSTEMS]
    ax.barh(labels, [0 if math.isnan(v) else v for v in values], color=colours)
    for y, value in enumerate(values):
        text = " n/a" if math.isnan(value) else f" {fmt(value)}"
        ax.text(0 if math.isnan(value) else value, y, text, va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.25)


def _plot(document: Result, path: Path) -> None:
    """One horizontal bar chart per scenario, a bar per system; asgi_sqla red, baseline grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def medians(name: str, key: str = "median", route: str | None = None) -> list[float]:
        scenario = _scenario(document, name)
        values = []
        for system in SYSTEMS:
            entry = _entry(scenario, system, route)
            values.append(float(entry[key]) if entry and key in entry else math.nan)
        return values

    def number(value: float) -> str:
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}"

    colours = [
        "#9e9e9e" if s == "by_hand" else "#d62728" if s == "asgi_sqla" else "#1f77b4"
        for s in SYSTEMS
    ]
    failing = _scenario(document, "failing_commit")
    panels: list[tuple[str, list[float]]] = [
        ("No database: µs/request\n(lower is better)", medians("no_db")),
        ("1 SELECT, SQLite: µs/request", medians("one_query_sqlite")),
        ("1 SELECT, PostgreSQL: µs/request", medians("one_query_postgresql")),
        ("Slow clients, pool of 2: req/s\n(higher is better)", medians("slow_clients")),
        ("uvicorn, read route: req/s", medians("real_server", route="read")),
        ("uvicorn, write route: req/s", medians("real_server", route="write")),
        (
            f"Failing COMMIT: 2xx answers of {failing.get('requests', '?')}\n(0 is right)",
            medians("failing_commit", key="count_2xx"),
        ),
    ]
    figure, axes = plt.subplots(2, 4, figsize=(20, 9), sharey=True, constrained_layout=True)
    flat = list(axes.flat)
    for index, (ax, (title, values)) in enumerate(zip(flat, panels, strict=False)):
        counts = index == len(panels) - 1  # the failing-commit panel counts answers
        _panel(ax, title, values, colours, (lambda v: f"{v:.0f}") if counts else number)
    flat[0].invert_yaxis()  # shared: the first system on top in every panel
    notes = flat[-1]
    notes.axis("off")
    meta = document["meta"]
    notes.text(
        0.02,
        0.98,
        "\n".join(
            [
                meta["date"],
                f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores (shared)",
                f"Python {meta['python']}",
                f"PostgreSQL {meta['postgresql']}",
                f"load: {meta['load_generator']}",
                "",
                "grey: by hand (baseline, bare app)",
                "red: asgi_sqla",
                "medians of interleaved rounds",
                f"reproduce: {meta['command']}",
            ]
        ),
        transform=notes.transAxes,
        va="top",
        fontsize=9,
        family="monospace",
    )
    figure.suptitle("asgi_sqla and its peers: the same Starlette app, the same SQL", fontsize=13)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def write(document: Result, directory: Path) -> str:
    """Write results.md, results.json and results.png into ``directory``; return the Markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(document)
    (directory / "results.md").write_text(markdown)
    (directory / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    _plot(document, directory / "results.png")
    return markdown
