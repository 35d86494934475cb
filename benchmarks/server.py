"""The uvicorn target of the real-server scenario: ``benchmarks.server:app``.

The system comes from ``BENCH_SYSTEM``, the database and pool from the variables
:meth:`benchmarks.app.AppConfig.from_env` reads.
"""

from __future__ import annotations

import os

from benchmarks.app import AppConfig, build_app

app = build_app(os.environ["BENCH_SYSTEM"], AppConfig.from_env())
