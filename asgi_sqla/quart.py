"""Quart integration: background tasks that wait for the commit, and websocket transactions.

Mount the middleware as Quart's documentation mounts ASGI middleware, on the app's
``asgi_app`` attribute (``app`` stays a ``Quart`` object, for ``app.route``, the CLI
and the test client), then let :func:`init_app` adjust what Quart does differently::

    from quart import Quart, websocket

    from asgi_sqla import Database, SQLAlchemyMiddleware
    from asgi_sqla.quart import add_background_task, init_app

    db = Database("postgresql+asyncpg://app@db/app")
    app = Quart(__name__)
    app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)
    init_app(app)

    @app.post("/users")
    async def create_user():
        db.session.add(user := User(...))
        add_background_task(send_welcome_mail, user.id)   # after the commit, if any
        return {"id": user.id}, 201

Four things Quart does on its own would otherwise break the package's promises, and
``init_app`` puts them right.  Without it the rest works unchanged (``db.session``,
commit before the status line, streaming bodies, lifespan).

* ``app.add_background_task`` starts the task at once, while the request is still
  running: the task shares the request's session (two tasks on one session), its
  writes commit or roll back with the request's status, and once the request has
  ended ``db.session`` raises ``SessionEndedError`` there.  :func:`add_background_task`
  holds the task back until the response was sent and runs it only if the request's
  transaction was committed then (the status passed ``commit_on``; never after a
  failed commit), with sessions of its own: ``db.session`` in the task opens one,
  committed when the task returns, rolled back if it raises.
* Quart reads websocket messages ahead, in a task of its own, so the middleware's
  "commit while the app waits in ``receive()``" would only happen when the *next*
  message arrives: an idle socket would keep its transaction open.  After ``init_app``,
  ``websocket.receive()`` (and ``receive_json()``) commits and closes the current
  session first, as the middleware does for frameworks that wait in ``receive()``; if
  that commit fails the socket is closed with 1011 and ``CommitFailedError`` is raised
  into the handler.
* When a websocket handler raises, Quart logs the error and closes the socket
  normally (1000), and when the client disconnects it cancels the handler and returns
  normally: either way the middleware would commit the half-done message.
  ``init_app`` rolls it back first.
* Since Quart 0.23 its ASGI call returns only once the server sends ``http.disconnect``
  (at once after a whole response; uvicorn, hypercorn and granian do).  When Quart's
  ``RESPONSE_TIMEOUT`` cuts a streamed body short, that is when the client gives up,
  and the body's session would stay open, idle in transaction, until then.
  ``init_app`` rolls it back as soon as Quart stops sending.

This module imports Quart; it is imported only by apps that use it, never by the rest
of the package.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent
from quart import Quart, current_app, has_request_context, has_websocket_context
from quart import request as quart_request
from quart import websocket as quart_websocket
from quart.asgi import ASGIHTTPConnection, ASGIWebsocketConnection
from quart.signals import got_websocket_exception
from quart.wrappers import Request, Websocket

from ._database import BaseDatabase
from ._errors import CommitFailedError, ConfigurationError
from ._http import unwinds_failure
from ._log import logger
from ._middleware import SQLAlchemyMiddleware
from ._unit import RECEIVE_WAITED, REQUEST_FINISHED, SCOPE_KEY, SessionContext
from .types import Scope

__all__ = ["add_background_task", "init_app"]


#: Where ``init_app`` keeps the databases: ``app.extensions[EXTENSION_KEY]``.
EXTENSION_KEY = "asgi_sqla"
#: Key, in the ASGI scope of each connection, of its held-back background tasks.
_TASKS_KEY = "asgi_sqla.quart.tasks"

_TASK_FINISHED = "The background task that owned this session has finished."
_COMMIT_FAILED = (
    "The transaction failed to commit when the websocket handler waited for the next "
    "message, so the socket was closed with 1011; the handler's later messages are "
    "discarded."
)
_NO_DATABASES = (
    "init_app(app) found no databases: app.asgi_app is not a SQLAlchemyMiddleware. "
    "Mount it first (app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, db)), or name "
    "the databases: init_app(app, db)."
)
_NOT_INITIALISED = (
    "add_background_task() needs init_app(app) to know when the request's transaction "
    "has committed: call asgi_sqla.quart.init_app(app) after mounting the middleware."
)
_FOREIGN_CLASS = (
    "app.{attribute} is {cls!r}, which does not derive from Quart's {base}; init_app "
    "can only extend Quart's own classes."
)

_Task = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def init_app(app: Quart, *databases: BaseDatabase) -> None:
    """Make ``app``'s background tasks and websockets follow the middleware's transactions.

    Call it once, after ``app.asgi_app = SQLAlchemyMiddleware(app.asgi_app, ...)``.  The
    databases default to those of that middleware; name them when ``app.asgi_app`` is
    wrapped further.  It replaces ``app.asgi_http_class``, ``app.asgi_websocket_class``
    and ``app.websocket_class`` with subclasses of the classes the app uses, and stores
    the databases in ``app.extensions["asgi_sqla"]``.

    :param app: The ``Quart`` application.
    :param databases: The ``Database`` and ``SyncDatabase`` objects given to the middleware.
    """
    if not databases:
        middleware = app.asgi_app
        if not isinstance(middleware, SQLAlchemyMiddleware):
            raise ConfigurationError(_NO_DATABASES)
        databases = middleware.databases
    for db in databases:
        if not isinstance(db, BaseDatabase):
            raise ConfigurationError(
                "init_app(app, *databases) takes Database or SyncDatabase objects, not "
                f"{type(db).__name__}."
            )
    app.extensions[EXTENSION_KEY] = tuple(databases)
    app.asgi_http_class = _extend(app.asgi_http_class, _HTTPConnection, "asgi_http_class")
    app.asgi_websocket_class = _extend(
        app.asgi_websocket_class, _WebsocketConnection, "asgi_websocket_class"
    )
    app.websocket_class = _extend(app.websocket_class, _Websocket, "websocket_class")
    got_websocket_exception.connect(_roll_back_failed_websocket, app)


def add_background_task(func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run ``func(*args, **kwargs)`` after the current transaction has committed.

    Use it instead of ``app.add_background_task`` in request and websocket handlers.
    In a request the task starts once the response was sent, and only if the request's
    transaction was committed when it started (``commit_on(status)``, by default a
    status below 400), never after a failed commit.  In a websocket it starts once the
    current message's transaction committed (at the next ``receive()``, or at the
    close), and never if the handler raised or the client went away first.  Elsewhere
    (startup code, a task of your own) it starts at once.

    The task runs as a Quart background task (Quart waits for it at shutdown and logs
    its exceptions), with sessions of its own: ``db.session`` inside it opens one,
    committed when ``func`` returns, rolled back if it raises.  ``func`` may be a
    coroutine function or, as with Quart, a plain function run in a worker thread
    (where a ``SyncDatabase``'s session is used, and an ``AsyncSession`` cannot be).

    :param func: The function to run.
    :param args: Its positional arguments.
    :param kwargs: Its keyword arguments.
    """
    app: Quart = current_app._get_current_object()  # type: ignore[attr-defined]
    scope: Scope | None = None
    if has_request_context():
        scope = _scope(quart_request.scope)
    elif has_websocket_context():
        scope = _scope(quart_websocket.scope)
    if scope is None:
        _start(app, _databases(app), (func, args, kwargs))
        return
    tasks = scope.get(_TASKS_KEY)
    if not isinstance(tasks, _HeldTasks):
        raise ConfigurationError(_NOT_INITIALISED)
    tasks.add((func, args, kwargs))


class _HeldTasks:
    """One connection's background tasks, held back until its transaction commits."""

    __slots__ = ("app", "databases", "done", "failed", "tasks")

    def __init__(self, app: Quart) -> None:
        self.app = app
        self.databases = _databases(app)
        self.tasks: list[_Task] = []
        self.done = False  # the connection is over: later tasks start or drop at once
        self.failed = False  # dropped: the transaction rolled back or failed to commit

    def add(self, task: _Task) -> None:
        if not self.done:
            self.tasks.append(task)
        elif not self.failed:
            _start(self.app, self.databases, task)
        else:
            logger.debug("Dropped background task %r: its request did not commit.", task[0])

    def release(self, *, committed: bool = True) -> None:
        """Start the tasks held so far if their transaction ``committed``, else drop them."""
        tasks, self.tasks = self.tasks, []
        if not committed:
            if tasks:
                logger.debug("Dropped %d background task(s): not committed.", len(tasks))
            return
        for task in tasks:
            _start(self.app, self.databases, task)

    def finish(self, *, committed: bool) -> None:
        """End the connection's holding: start the tasks if ``committed``, else drop them."""
        if self.done:
            return
        self.done = True
        if committed:
            self.release()
        else:
            self.failed = True
            if self.tasks:
                logger.debug(
                    "Dropped %d background task(s): the transaction did not commit.",
                    len(self.tasks),
                )
            self.tasks = []


class _HTTPConnection(ASGIHTTPConnection):
    """Quart's HTTP connection, holding background tasks until the response was sent."""

    async def handle_request(self, request: Request, send: ASGISendCallable) -> None:
        scope = _scope(self.scope)
        tasks = scope[_TASKS_KEY] = _HeldTasks(self.app)
        unit = SessionContext.from_scope(scope)
        succeeded = complete = False

        async def send_and_watch(message: ASGISendEvent) -> None:
            nonlocal succeeded, complete
            event = cast(Mapping[str, Any], message)
            # The middleware ends the transaction before it forwards the start; if the
            # commit fails, this raises CommitFailedError and the tasks are dropped.
            await send(message)
            if event["type"] == "http.response.start":
                succeeded = unit.would_commit(int(event["status"]))
            elif event["type"] == "http.response.body" and not event.get("more_body", False):
                complete = True

        def decide() -> None:
            # Once the middleware has closed the unit, after the app returned: work done
            # while the body streamed commits only then.  The tasks run only if the
            # response went out whole with a status that commits, and every transaction
            # of the request committed (a rollback-only 200, db.release(commit=False)
            # or a failed commit of the streamed body's work drops them).
            tasks.finish(committed=succeeded and complete and unit.committed_all)

        try:
            await super().handle_request(request, send_and_watch)
        finally:
            unit.after_close(decide)
        if not complete and unit.has_sessions:
            # Quart gave up on the response (its RESPONSE_TIMEOUT cut the body short)
            # and sends nothing more.  Since 0.23 Quart returns from its ASGI call only
            # once the client disconnects (its asyncio.TaskGroup waits for the reader of
            # http.disconnect too): the body's sessions are rolled back now, not then.
            await unit.close(reason=REQUEST_FINISHED, failed=True)


class _WebsocketConnection(ASGIWebsocketConnection):
    """Quart's websocket connection, rolling back what a failed or cancelled handler left."""

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        scope = _scope(self.scope)
        tasks = scope[_TASKS_KEY] = _HeldTasks(self.app)
        # Quart reads messages ahead in a task of its own: the middleware's receive()
        # runs while the handler is still busy with the previous message, and ending
        # the transaction there would split that message's work in two.  The handler's
        # own receive() (``_Websocket``) ends it instead.
        SessionContext.from_scope(scope).ends_on_receive = False

        async def send_and_watch(message: ASGISendEvent) -> None:
            await send(message)  # a close or a denial ends the transaction first
            event = cast(Mapping[str, Any], message)
            if event["type"] == "websocket.close" or (
                event["type"] == "websocket.http.response.body" and not event.get("more_body")
            ):
                tasks.finish(committed=not tasks.failed)

        try:
            await super().__call__(receive, send_and_watch)
        except Exception as exc:
            # The CommitFailedError our own receive() raised after a failed commit, which
            # Quart re-raises when PROPAGATE_EXCEPTIONS is True outside debug and testing
            # (those answer with a traceback page); since 0.23 inside an ExceptionGroup,
            # from the asyncio.TaskGroup that runs the handler.  It is logged and the
            # client has its 1011 close: the server is told nothing.
            if not (tasks.failed and unwinds_failure(exc)):
                raise
        finally:
            tasks.finish(committed=False)

    async def handle_websocket(self, websocket: Websocket, send: ASGISendCallable) -> None:
        try:
            await super().handle_websocket(websocket, send)
        except asyncio.CancelledError:
            # The client went away and Quart cancelled the handler; Quart then returns
            # normally, which the middleware would take for success.
            await _roll_back(_scope(self.scope))
            raise


class _Websocket(Websocket):
    """Quart's websocket object; ``receive()`` commits the current message's transaction first."""

    async def receive(self) -> str | bytes:
        scope = _scope(self.scope)
        context = SessionContext.from_scope(scope)
        tasks = scope.get(_TASKS_KEY)
        committed = True
        if context.has_sessions:
            outcome = await context.end(None, reason=RECEIVE_WAITED)
            if outcome.failed:
                if isinstance(tasks, _HeldTasks):
                    tasks.finish(committed=False)
                logger.error(_COMMIT_FAILED, exc_info=outcome.error)
                try:
                    await self.close(1011)
                except Exception:  # the socket is already closed: nothing more to say
                    logger.debug("Could not close the websocket after a failed commit.")
                raise CommitFailedError(_COMMIT_FAILED) from outcome.error
            committed = outcome.all_committed
        if isinstance(tasks, _HeldTasks):
            tasks.release(committed=committed)
        return await super().receive()


async def _roll_back_failed_websocket(sender: Quart, *, exception: Exception, **extra: Any) -> None:
    """``got_websocket_exception`` receiver: roll back before Quart closes with 1000."""
    await _roll_back(_scope(quart_websocket.scope))


async def _roll_back(scope: Scope) -> None:
    tasks = scope.get(_TASKS_KEY)
    if isinstance(tasks, _HeldTasks):
        tasks.finish(committed=False)
    context = scope.get(SCOPE_KEY)
    if isinstance(context, SessionContext) and context.has_sessions:
        await context.end(reason=REQUEST_FINISHED, failed=True)


def _start(app: Quart, databases: tuple[BaseDatabase, ...], task: _Task) -> None:
    func, args, kwargs = task
    app.add_background_task(_run_with_sessions, app, databases, func, args, kwargs)


async def _run_with_sessions(
    app: Quart,
    databases: tuple[BaseDatabase, ...],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Run ``func`` with a context of its own, committed on return, rolled back on error."""
    context = SessionContext(databases)
    with context.bind():
        async with context.closing(_TASK_FINISHED):
            await app.ensure_async(func)(*args, **kwargs)


def _scope(scope: object) -> Scope:
    """Quart's TypedDict scope as the plain mapping it is (it holds the package's keys too)."""
    return cast(Scope, scope)


def _databases(app: Quart) -> tuple[BaseDatabase, ...]:
    databases = app.extensions.get(EXTENSION_KEY)
    if databases is None:
        raise ConfigurationError(_NOT_INITIALISED)
    return cast(tuple[BaseDatabase, ...], databases)


def _extend(cls: type[Any], extension: type[Any], attribute: str) -> Any:
    """``cls`` with ``extension`` mixed in (``extension`` derives from ``cls``'s Quart base)."""
    base = extension.__bases__[0]
    if issubclass(cls, extension):
        return cls
    if not issubclass(cls, base):
        raise ConfigurationError(
            _FOREIGN_CLASS.format(attribute=attribute, cls=cls, base=base.__name__)
        )
    if cls is base:
        return extension
    return type(f"AsgiSqla{cls.__name__}", (extension, cls), {})
