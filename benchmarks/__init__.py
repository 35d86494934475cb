"""Benchmarks of asgi_sqla against its peers: ``python -m benchmarks`` (``make bench``).

One small Starlette app (same routes, same SQL) is built once per system in
:mod:`benchmarks.app`; :mod:`benchmarks.run` runs the scenarios, interleaving the
systems, and :mod:`benchmarks.report` writes ``results.md``, ``results.json`` and
``results.png`` beside this file.  The sync scenario (``make bench-sync``) builds a
FastAPI app with ``def`` endpoints on psycopg 3 in :mod:`benchmarks.sync_app` and runs
it from :mod:`benchmarks.sync`; :mod:`benchmarks.sync_profile` is its in-process
diagnostic (CPU per request, where the thread hand-overs cost).
"""
