"""A pure ASGI middleware giving each request a lazy SQLAlchemy session.

``Database`` gives an ``AsyncSession``; ``SyncDatabase`` a ``Session``, for synchronous
drivers and ``def`` endpoints.

The transaction commits (or rolls back) before the status line is sent, and the
connection goes back to the pool before the body does.
"""

from importlib.metadata import version as _version

from ._database import Database, commit_below_400
from ._errors import (
    AsgiSqlaError,
    BlockingCallError,
    CommitFailedError,
    ConcurrentSessionUseError,
    ConfigurationError,
    DatabaseBusyError,
    DatabaseStartupError,
    NoSessionContextError,
    ResponseCutShortError,
    RollbackOnlyError,
    SessionEndedError,
)
from ._lifespan import STATE_KEY
from ._middleware import SQLAlchemyMiddleware
from ._outcome import Outcome, Result
from ._routes import manual_commit, read_only
from ._stats import PoolStatus, RequestStats
from ._syncdb import SyncDatabase
from ._unit import SCOPE_KEY, SessionContext, State, TaskSessionKey

__all__ = [
    "SCOPE_KEY",
    "STATE_KEY",
    "AsgiSqlaError",
    "BlockingCallError",
    "CommitFailedError",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "Database",
    "DatabaseBusyError",
    "DatabaseStartupError",
    "NoSessionContextError",
    "Outcome",
    "PoolStatus",
    "RequestStats",
    "ResponseCutShortError",
    "Result",
    "RollbackOnlyError",
    "SQLAlchemyMiddleware",
    "SessionContext",
    "SessionEndedError",
    "State",
    "SyncDatabase",
    "TaskSessionKey",
    "commit_below_400",
    "manual_commit",
    "read_only",
]

#: The installed distribution's version: pyproject.toml is its one source.
__version__ = _version("asgi-sqla")

# Public classes show (in tracebacks, reprs and docs) under the name users import them
# by, asgi_sqla.CommitFailedError rather than asgi_sqla._errors.CommitFailedError; they
# pickle by that name too.
for _name in __all__:
    _public = globals()[_name]
    if isinstance(_public, type) and _public.__module__.startswith("asgi_sqla._"):
        _public.__module__ = __name__
del _name, _public, _version
