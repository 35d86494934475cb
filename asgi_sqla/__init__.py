"""A pure ASGI middleware giving each request a lazy SQLAlchemy ``AsyncSession``.

The transaction commits (or rolls back) before the status line is sent, and the
connection goes back to the pool before the body does.
"""

from ._database import Database, commit_below_400
from ._errors import (
    AsgiSqlaError,
    CommitFailedError,
    ConcurrentSessionUseError,
    ConfigurationError,
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
from ._unit import SCOPE_KEY, SessionContext, State

__all__ = [
    "SCOPE_KEY",
    "STATE_KEY",
    "AsgiSqlaError",
    "CommitFailedError",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "Database",
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
    "commit_below_400",
    "manual_commit",
    "read_only",
]

__version__ = "0.1.0"
