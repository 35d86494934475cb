"""The synchronous sessions bound to a test's connection: each blocks its thread for its turn.

:class:`_ThreadTurnTaking` is mixed in below the thread guard (and the app's own class)
of a ``SyncDatabase``'s sessions; :func:`_thread_session_class` makes the class of a
database's sessions during one test.  A session is often closed in another thread
than the one that took its turn (the package ends sessions in worker threads): the
turn is given back from there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._syncdb import SyncDatabase
from .._threaded import ThreadSession
from ._shared import _check_innermost, _listen_for_turns, _SharedConnectionSession
from ._turns import _Turns

__all__ = ["_thread_session_class"]


class _ThreadTurnTaking(_SharedConnectionSession):
    """Mixed in below the thread guard (and the app's class) of a ``SyncDatabase``'s
    sessions bound to the test's connection.

    Every way into the connection first blocks until the session has the turn; closing
    the session, in whichever thread, gives it back.  The package ends a session by
    calling ``commit()`` and ``close()`` (or ``invalidate()``) on it in a worker thread,
    and those calls reach the database through here, past the guard, like the app's.
    """

    def _connection_for_bind(self, *args: Any, **kwargs: Any) -> Any:
        # Every statement (execute(), scalars(), get(), lazy loads) and connection().
        self._asgi_sqla_turns.take_blocking(self)
        return super()._connection_for_bind(*args, **kwargs)

    def flush(self, objects: Any = None) -> None:
        # A flush reaches the connection through the SessionTransaction, not the above.
        self._asgi_sqla_turns.take_blocking(self)
        super().flush(objects)

    def bulk_save_objects(self, *args: Any, **kwargs: Any) -> None:
        self._asgi_sqla_turns.take_blocking(self)  # also through the SessionTransaction
        super().bulk_save_objects(*args, **kwargs)

    def bulk_insert_mappings(self, *args: Any, **kwargs: Any) -> None:
        self._asgi_sqla_turns.take_blocking(self)
        super().bulk_insert_mappings(*args, **kwargs)

    def bulk_update_mappings(self, *args: Any, **kwargs: Any) -> None:
        self._asgi_sqla_turns.take_blocking(self)
        super().bulk_update_mappings(*args, **kwargs)

    def commit(self) -> None:
        # Its flush and statements take the turn if needed; nothing is sent otherwise.
        _check_innermost(self)
        super().commit()

    def rollback(self) -> None:
        _check_innermost(self)
        super().rollback()

    def close(self) -> None:
        self._ending(super().close)

    def reset(self) -> None:
        self._ending(super().reset)

    def invalidate(self) -> None:
        # As for async sessions: roll back to the savepoint, keep the test's connection.
        self._ending(super().close)

    def _ending(self, end: Callable[[], None]) -> None:
        """Close or reset (only the innermost session may), then give the turn back."""
        try:
            _check_innermost(self)
            end()
        finally:
            self._asgi_sqla_turns.give_back(self)


def _thread_session_class(db: SyncDatabase, turns: _Turns, dialect: str) -> type[ThreadSession]:
    """The class of ``db``'s sessions during one test: its own with turn-taking below."""
    guarded: type[ThreadSession] = db._session_options["class_"]
    shared = type(
        f"Shared{guarded.__name__}",
        (guarded, _ThreadTurnTaking),
        {"_asgi_sqla_turns": turns, "_asgi_sqla_db": db, "_asgi_sqla_stack": []},
    )
    _listen_for_turns(shared, dialect)
    return shared
