"""The uvicorn target of the sync scenario: ``benchmarks.sync_server:app``.

The system comes from ``BENCH_SYSTEM`` (one of ``benchmarks.sync_app.SYNC_SYSTEMS``),
the database and pool from the variables :meth:`benchmarks.app.AppConfig.from_env`
reads.  The app counts its requests and worker-thread hops (``GET /_counters``).
"""

from __future__ import annotations

from benchmarks.sync_app import from_env

app = from_env()
