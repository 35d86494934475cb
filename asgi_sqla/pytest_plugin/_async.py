"""The async sessions bound to a test's connection: they wait for the turn in their task.

:class:`_TurnTaking` is mixed in below the guard of a ``Database``'s session class:
every method that reaches the database first waits for the session's turn
(``_Turns.take``), and closing the session gives it back.  :func:`_session_classes`
makes a test's pair of classes for a ``Database``: that async class, and the
``sync_session_class`` under it, built on ``_SharedConnectionSession``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction
from sqlalchemy.orm import Session

from .._database import Database
from .._session import _GUARDED_METHODS
from ._shared import _check_innermost, _listen_for_turns, _SharedConnectionSession
from ._turns import _Turns

__all__ = ["_session_classes"]


class _TurnTakingTransaction(AsyncSessionTransaction):
    """``session.begin()``: the turn is taken before the transaction begins."""

    __slots__ = ()

    async def __aenter__(self) -> AsyncSessionTransaction:
        await _take_turn(self.session)
        return await super().__aenter__()


class _TurnTaking(AsyncSession):
    """Mixed in below the guard of the sessions bound to the test's connection.

    Every method that reaches the database first waits for the session's turn; closing
    the session gives the turn back.  (Placed after ``GuardedSession`` in the class
    order, so the guard's checks run first, and the package's own cleanup, which
    reaches past the guard, still passes through here.)
    """

    def begin(self) -> AsyncSessionTransaction:
        return _TurnTakingTransaction(self)

    def begin_nested(self) -> AsyncSessionTransaction:
        return _TurnTakingTransaction(self, nested=True)

    async def close(self) -> None:
        await self._ending(super().close)

    async def reset(self) -> None:
        await self._ending(super().reset)

    async def _ending(self, end: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Close or reset (only the innermost session may), then give the turn back."""
        shared = _shared(self)
        try:
            _check_innermost(shared)
            await end()
        finally:
            shared._asgi_sqla_turns.give_back(shared)

    async def invalidate(self) -> None:
        # The package invalidates a connection whose state it cannot trust (after a
        # failed commit).  This one is the test's, shared by every session, and its
        # state is known: the session's savepoint.  Roll back to it; keep the connection.
        await _TurnTaking.close(self)


def _shared(session: AsyncSession) -> _SharedConnectionSession:
    return cast(_SharedConnectionSession, session.sync_session)


async def _take_turn(session: AsyncSession) -> None:
    shared = _shared(session)
    await shared._asgi_sqla_turns.take(shared)


def _taking_turn(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    method = getattr(AsyncSession, name)
    ends = name in ("commit", "rollback")

    @functools.wraps(method)
    async def taking_turn(self: _TurnTaking, *args: Any, **kwargs: Any) -> Any:
        await _take_turn(self)
        if ends:
            _check_innermost(_shared(self))
        return await getattr(super(_TurnTaking, self), name)(*args, **kwargs)

    return taking_turn


for _name in _GUARDED_METHODS:
    if hasattr(AsyncSession, _name):  # delete_all and merge_all are new in 2.1
        setattr(_TurnTaking, _name, _taking_turn(_name))


def _session_classes(
    db: Database, turns: _Turns, dialect: str
) -> tuple[type[AsyncSession], type[Session]]:
    """The async and sync session classes of ``db``'s sessions during one test."""
    options = db._session_options
    sync_base: type[Session] = options.get("sync_session_class", Session)
    sync_class = type(
        f"Shared{sync_base.__name__}",
        (_SharedConnectionSession, sync_base),
        {"_asgi_sqla_turns": turns, "_asgi_sqla_db": db, "_asgi_sqla_stack": []},
    )
    _listen_for_turns(sync_class, dialect)
    return _turn_taking_class(options["class_"]), sync_class


@functools.cache
def _turn_taking_class(guarded: type[AsyncSession]) -> type[AsyncSession]:
    """``guarded`` (the Database's session class) with :class:`_TurnTaking` below its guard."""
    return type(f"Shared{guarded.__name__}", (guarded, _TurnTaking), {})
