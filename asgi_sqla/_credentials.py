"""Rotating credentials: a password provider asked for every new connection.

``Database(url, password=provider)`` calls ``provider()`` each time the pool of an
engine the database owns (the primary's, the replicas') opens a DBAPI connection, and
connects with what it returns instead of the URL's password: an AWS RDS IAM token, a
Vault lease, a secret that a rotation changes while the app runs.  The call happens in
a ``do_connect`` listener that sets ``cparams["password"]``, the way SQLAlchemy's docs
show ("Generating dynamic authentication tokens", core/engines.rst).  An async
provider is awaited there with ``sqlalchemy.util.await_only``: an ``AsyncEngine``'s
pool connects inside the greenlet that ``greenlet_spawn`` started for the statement,
the one in which the async drivers await their own ``connect()``
(sqlalchemy/dialects/postgresql/asyncpg.py, ``AsyncAdapt_asyncpg_dbapi.connect``).

The password is never kept beyond the connection attempt: it is not stored on the
database, shown in its ``repr``, logged, or put in a message of the package.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import URL, Engine, event
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.util import await_only

from ._errors import ConfigurationError

__all__ = ["PasswordProvider", "check_provider", "install_provider"]

#: A zero-argument callable returning the password (sync), or an awaitable of it (async).
PasswordProvider = Callable[[], str | Awaitable[str]]


def check_provider(
    provider: object, *, url: URL | None, ready_engine: bool, sync: bool
) -> PasswordProvider | None:
    """Check ``password=`` at construction: a callable the database can use, or None."""
    if provider is None:
        return None
    if isinstance(provider, (str, bytes)):
        raise ConfigurationError(
            "password= takes a function that returns the password (called for every new "
            "connection), not the password itself: put a fixed password in the URL "
            "(postgresql+asyncpg://user:password@host/db)."
        )
    if not callable(provider):
        raise ConfigurationError(
            f"password= must be a zero-argument function returning the password, not "
            f"{type(provider).__name__}."
        )
    if sync and _is_async(provider):
        raise ConfigurationError(
            f"password={_name(provider)} is an async function, and a SyncDatabase connects "
            "in worker threads, where nothing can await it: pass a plain function (one "
            "that reads a cache your async code refreshes, say), or use Database."
        )
    if ready_engine:
        raise ConfigurationError(
            "password= cannot be used with a ready engine= (the app's own engine, which "
            "the package does not change): add a 'do_connect' listener that sets "
            "cparams['password'] to that engine yourself, or pass engine= a function that "
            "creates the engine (the package then adds the listener to it)."
        )
    if url is not None and url.get_backend_name() == "sqlite":
        raise ConfigurationError(
            "password= was given for a SQLite database, which has no passwords: remove it."
        )
    return provider


def install_provider(engine: Engine, listener: PasswordListener) -> None:
    """Make ``engine`` (a sync engine, an ``AsyncEngine``'s included) ask ``listener``'s
    provider for the password of each new connection; once per engine."""
    if engine in listener.engines:
        return
    listener.engines.add(engine)
    event.listen(engine, "do_connect", listener)


class PasswordListener:
    """The ``do_connect`` listener: the provider's password in the connection arguments."""

    __slots__ = ("__weakref__", "_can_await", "_provider", "engines")  # SQLAlchemy: weak refs

    def __init__(self, provider: PasswordProvider, *, can_await: bool) -> None:
        self._provider = provider
        self._can_await = can_await
        # The engines it listens on.  Not ``event.contains()``, keyed by ``id(engine)``:
        # a new engine at a dead one's address could look registered while it is not.
        self.engines: weakref.WeakSet[Engine] = weakref.WeakSet()

    def __call__(self, dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        # SQLAlchemy 2.1 passes each attempt a copy of the engine's arguments
        # (sqlalchemy/engine/create.py, ``connect()``).  Were the dict shared (older
        # versions), two threads connecting at once could swap answers, both current;
        # nothing awaits between this line and the driver's connect call.
        cparams["password"] = self._password(dialect)

    def _password(self, dialect: Any) -> str:
        provider = self._provider
        try:
            value: object = provider()
            if inspect.isawaitable(value):
                if not self._can_await:
                    _discard(value)
                    raise ConfigurationError(
                        f"The password provider {_name(provider)} returned an awaitable, and "
                        "a SyncDatabase connects in worker threads, where nothing can await "
                        "it: make it return the password (a str)."
                    )
                value = await_only(value)
        except (ConfigurationError, MissingGreenlet):
            raise
        except Exception as exc:
            # Raised as the driver's OperationalError, which SQLAlchemy wraps as it wraps
            # a refused login (sqlalchemy.exc.OperationalError): no connection could be
            # made, and every caller treats it so.  The provider's own exception is the
            # cause; its message is not repeated here.
            raise dialect.loaded_dbapi.OperationalError(
                f"The password provider {_name(provider)} raised {type(exc).__name__} (this "
                "exception's cause), so no connection was made: check the provider and the "
                "secret store it reads."
            ) from exc
        if not isinstance(value, str) or not value:
            what = "an empty str" if isinstance(value, str) else type(value).__name__
            raise ConfigurationError(
                f"The password provider {_name(provider)} returned {what}; it must return "
                "the password as a non-empty str."
            )
        return value


def _is_async(provider: object) -> bool:
    """Whether calling ``provider`` makes a coroutine (an ``async def`` function or method)."""
    return inspect.iscoroutinefunction(provider) or inspect.iscoroutinefunction(
        type(provider).__call__  # an object whose __call__ is async
    )


def _discard(awaitable: object) -> None:
    """Close a coroutine that will not be awaited (no "never awaited" warning)."""
    close = getattr(awaitable, "close", None)
    if inspect.iscoroutine(awaitable) and close is not None:
        close()


def _name(provider: object) -> str:
    """How a message names the provider: its qualified name, else its type's."""
    name = getattr(provider, "__qualname__", None) or type(provider).__qualname__
    return f"{name}()"
