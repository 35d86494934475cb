"""The OpenTelemetry recipe (docs/guides/observability.md) turns statements into spans.

The recipe instruments the engine the ``Database`` created, from the app's lifespan,
which runs after asgi_sqla has created the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_sqla import Database, SQLAlchemyMiddleware

from _helpers import call_http

pytestmark = pytest.mark.anyio


async def test_the_opentelemetry_recipe_turns_statements_into_spans(database_url: str) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    db = Database(database_url)

    # The recipe, as in docs/guides/observability.md.
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        SQLAlchemyInstrumentor().instrument(
            engine=db.engine.sync_engine,
            tracer_provider=tracer_provider,
            skip_dep_check=True,  # it declares SQLAlchemy < 2.1, and works with 2.1
        )
        yield
        SQLAlchemyInstrumentor().uninstrument()

    async def endpoint(request: Request) -> PlainTextResponse:
        await db.session.execute(text("SELECT 1"))
        await db.session.execute(text("SELECT 2"))
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[Middleware(SQLAlchemyMiddleware, db)],
        lifespan=lifespan,
    )
    try:
        async with lifespan(app):
            recorder = await call_http(app)
    finally:
        await db.dispose()
        tracer_provider.shutdown()

    assert recorder.status == 200
    spans = exporter.get_finished_spans()
    statements = [(span.attributes or {}).get("db.statement") for span in spans]
    assert [s for s in statements if s in ("SELECT 1", "SELECT 2")] == ["SELECT 1", "SELECT 2"]
