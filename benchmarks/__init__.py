"""Benchmarks of asgi_sqla against its peers: ``python -m benchmarks`` (``make bench``).

One small Starlette app (same routes, same SQL) is built once per system in
:mod:`benchmarks.app`; :mod:`benchmarks.run` runs the scenarios, interleaving the
systems, and :mod:`benchmarks.report` writes ``results.md``, ``results.json`` and
``results.png`` beside this file.
"""
