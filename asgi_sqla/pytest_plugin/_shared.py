"""The base of the sessions bound to a test's connection, and the events they listen to.

Both kinds of database build their test sessions on :class:`_SharedConnectionSession`:
an async ``Database`` as its ``AsyncSession``'s ``sync_session_class`` (``_async``), a
``SyncDatabase`` as the session class itself (``_sync``).  The events, registered on
each such class by :func:`_listen_for_turns`, take the turn when a session begins its
transaction (the net under the ways in that take it first), keep the stack of the
sessions whose savepoints are open, and on PostgreSQL check deferred constraints
before a commit.  :func:`_check_innermost` refuses to end a session out of that order.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from .._database import BaseDatabase
from .._errors import AsgiSqlaError
from ._turns import _Turns

__all__ = ["_SharedConnectionSession", "_check_innermost", "_listen_for_turns"]

_NOT_INNERMOST = (
    "A session of {db!r} is ending while a session opened after it on the test's "
    "connection is still open. In a test all sessions share one connection, where "
    "savepoints form a stack, so a session opened inside another must end first. This "
    "happens when db.session is first used inside a db.new_session() or db.scope() block "
    "of the same request: use db.session once before the block, or end the block first."
)


class _SharedConnectionSession(Session):
    """The synchronous side of a session bound to the test's connection.

    For an async ``Database`` it is the ``AsyncSession``'s ``sync_session``; for a
    ``SyncDatabase``, the session itself (with :class:`_ThreadTurnTaking`).  It carries
    the session's turn (so that SQLAlchemy's session events see it too), and pins
    ``twophase`` off: a two-phase session would begin a transaction of its own on the
    test's connection, where one is already open (with ``two_phase=True`` the
    middleware commits the databases of a test in one phase).
    """

    _asgi_sqla_turns: _Turns
    _asgi_sqla_db: BaseDatabase
    #: The sessions whose savepoint is open on the connection, innermost last.
    _asgi_sqla_stack: list[_SharedConnectionSession]
    _asgi_sqla_turn: object | None = None

    @property
    def twophase(self) -> bool:
        return False

    @twophase.setter
    def twophase(self, value: bool) -> None:
        pass


def _after_begin(session: Session, transaction: SessionTransaction, connection: Any) -> None:
    # Every way into the connection the plugin knows of takes the turn first; this is
    # the net under them, so that a path it missed fails loudly instead of
    # interleaving savepoints.
    if transaction.parent is None:
        shared = cast(_SharedConnectionSession, session)
        shared._asgi_sqla_turns.take_now(shared)
        shared._asgi_sqla_stack.append(shared)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        stack = cast(_SharedConnectionSession, session)._asgi_sqla_stack
        if session in stack:
            stack.remove(session)


def _check_innermost(shared: _SharedConnectionSession) -> None:
    """Refuse to end a session whose savepoint has another session's on top of it.

    Its RELEASE or ROLLBACK TO would end that one's savepoint too, under it.
    """
    stack = shared._asgi_sqla_stack
    if stack and stack[-1] is not shared and shared in stack:
        raise AsgiSqlaError(_NOT_INNERMOST.format(db=shared._asgi_sqla_db))


def _check_deferred_constraints(session: Session) -> None:
    """Check PostgreSQL's deferred constraints now, where the app's COMMIT would."""
    if session.in_nested_transaction() or not session.in_transaction():
        return  # the app's own begin_nested(): releasing it checks nothing in production
    session.flush()
    connection = session.connection()
    connection.exec_driver_sql("SAVEPOINT asgi_sqla_check")
    try:
        connection.exec_driver_sql("SET CONSTRAINTS ALL IMMEDIATE")
    finally:
        # Rolling back restores every constraint's mode and leaves the pending checks
        # pending (PostgreSQL undoes both with the subtransaction).
        connection.exec_driver_sql("ROLLBACK TO SAVEPOINT asgi_sqla_check")
        connection.exec_driver_sql("RELEASE SAVEPOINT asgi_sqla_check")


def _listen_for_turns(sync_class: type[Session], dialect: str) -> None:
    """The events of a class of sessions bound to the test's connection to ``dialect``."""
    event.listen(sync_class, "after_begin", _after_begin)
    event.listen(sync_class, "after_transaction_end", _after_transaction_end)
    if dialect == "postgresql":
        event.listen(sync_class, "before_commit", _check_deferred_constraints)
