"""Load shedding: a database's limit on requests holding its sessions at once.

``Database(url, admission_limit=N)``.  Without a limit, every request past what the
pool serves queues inside the pool until ``pool_timeout``, and the requests already
admitted slow down with the queue; with it, a request past the limit waits at most
``admission_timeout`` seconds here, then gets ``DatabaseBusyError``, which the
middleware answers with 503 and ``Retry-After``, as it does a pool timeout.

Who counts: the middleware's units of work (an HTTP request, a websocket's round
between two ``receive()``), never ``db.scope()``, ``db.new_session()`` nor a framework
adapter's background tasks, which are scripts and workers.  Each such unit holds one
:class:`Ticket` per database per round, shared by its sessions of that database (the
primary's and a replica's read session), so a request counts once.  The ticket takes
a place when a session first needs a connection (the guard's ``_connection_for_bind``:
a request that never touches the database is never counted, nor refused), and gives
it back once the round's sessions have ended, whatever ended them.

A ticket's life::

    NEW --enter, a place is free--> ADMITTED --leave--> LEFT
    NEW --enter, the limit is reached--> WAITING --a place is handed over--> ADMITTED
    WAITING --admission_timeout passed, or the caller was cancelled--> NEW
    NEW or WAITING --leave--> LEFT

A place given back goes straight to the ticket that has waited longest (FIFO): the
count does not drop, so a newcomer cannot take it first.  Waiting wakes on an event,
never polls: an ``AsyncSession``'s call (running in a greenlet, see ``_session``)
awaits a future on its event loop through SQLAlchemy's ``await_only``; a
``SyncDatabase``'s call waits on a ``threading.Event`` in its worker thread.  A
synchronous call on the event loop's own thread (``block_event_loop=True``) never
waits: nothing on that loop could give a place back meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from time import monotonic

from sqlalchemy.util.concurrency import await_only, in_greenlet

from ._errors import DatabaseBusyError

__all__ = ["Admission", "Ticket"]

_BUSY = (
    "{db!r} already has {limit} requests using its connections (admission_limit={limit}), "
    "and none finished within admission_timeout={timeout:g} s, so this request was "
    "refused; the middleware answers 503 with Retry-After. If the database can serve "
    "more, raise admission_limit together with pool_size + max_overflow; to queue "
    "longer rather than refuse, raise admission_timeout."
)

# A ticket's states (see the module doc).
_NEW = "new"
_WAITING = "waiting"
_ADMITTED = "admitted"
_LEFT = "left"


class Ticket:
    """One unit of work's (one round's) place, or wait for one, at one database."""

    __slots__ = ("_admission", "_deadline", "_waiters", "_wake", "state")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.state = _NEW
        #: What wakes this ticket's waiting calls: a future, or an event for threads.
        self._wake: asyncio.Future[None] | threading.Event | None = None
        self._deadline = 0.0
        #: Calls waiting on this ticket (a request's primary and read sessions may both).
        self._waiters = 0

    def enter(self) -> None:
        """Hold a place (wait for one if need be), or raise ``DatabaseBusyError``.

        Called before every connection a session of the ticket takes; once admitted,
        this is one comparison.
        """
        if self.state is _ADMITTED:
            return
        if in_greenlet():  # an AsyncSession's call: wait on its event loop
            await_only(self._admission.wait_async(self))
        else:
            self._admission.wait(self)

    def leave(self) -> None:
        """Give the place back (to the longest waiter, if any); ends the ticket."""
        self._admission.leave(self)


class Admission:
    """The places of one database: at most ``limit`` tickets admitted at once."""

    def __init__(self, db: object, limit: int, timeout: float) -> None:
        self._db = db
        self.limit = limit
        self.timeout = timeout
        # Tickets enter in worker threads and the event loop's thread alike.
        self._lock = threading.Lock()
        self._admitted = 0
        self._queue: deque[Ticket] = deque()

    def ticket(self) -> Ticket:
        """A new ticket, holding no place yet."""
        return Ticket(self)

    def _try_enter(self, ticket: Ticket, *, may_wait: bool) -> bool:
        """Under the lock: admit ``ticket`` if it can be now; True when it is admitted.

        Otherwise, when it ``may_wait``, it joins the queue (once, however many calls
        wait on it); else it is refused.
        """
        state = ticket.state
        if state is _ADMITTED:
            return True
        if state is _NEW:
            if self._admitted < self.limit:  # free places imply an empty queue
                self._admitted += 1
                ticket.state = _ADMITTED
                return True
            if not may_wait or self.timeout <= 0:
                raise self._busy()
            ticket.state = _WAITING
            ticket._deadline = monotonic() + self.timeout
            ticket._wake = None
            self._queue.append(ticket)
        elif state is _LEFT:
            raise self._busy()  # its round was ended meanwhile: nothing may start on it
        ticket._waiters += 1
        return False

    async def wait_async(self, ticket: Ticket) -> None:
        """Admit ``ticket``, waiting on this event loop; raise ``DatabaseBusyError``."""
        with self._lock:
            if self._try_enter(ticket, may_wait=True):
                return
            wake = ticket._wake
            if wake is None:
                wake = ticket._wake = asyncio.get_running_loop().create_future()
            assert isinstance(wake, asyncio.Future)  # a Database's calls all wait async
        try:
            # asyncio.wait neither cancels the future at the timeout nor when this
            # task is cancelled: another call of the ticket may still wait on it.
            await asyncio.wait((wake,), timeout=max(0.0, ticket._deadline - monotonic()))
        finally:
            with self._lock:
                admitted = self._stop_waiting(ticket)
        if not admitted:
            raise self._busy()

    def wait(self, ticket: Ticket) -> None:
        """Admit ``ticket``, waiting in this thread; raise ``DatabaseBusyError``."""
        on_loop = asyncio._get_running_loop() is not None
        with self._lock:
            if self._try_enter(ticket, may_wait=not on_loop):
                return
            wake = ticket._wake
            if wake is None:
                wake = ticket._wake = threading.Event()
            assert isinstance(wake, threading.Event)  # a SyncDatabase's calls all block
        try:
            wake.wait(max(0.0, ticket._deadline - monotonic()))
        finally:
            with self._lock:
                admitted = self._stop_waiting(ticket)
        if not admitted:
            raise self._busy()

    def _stop_waiting(self, ticket: Ticket) -> bool:
        """Under the lock: one call stops waiting on ``ticket``; whether it was admitted.

        The last call to stop takes a ticket still waiting out of the queue (timed
        out, or cancelled): it is NEW again, and a later statement may try again.
        """
        ticket._waiters -= 1
        if ticket.state is _WAITING and ticket._waiters == 0:
            self._queue.remove(ticket)
            ticket.state = _NEW
        return ticket.state is _ADMITTED

    def leave(self, ticket: Ticket) -> None:
        """End ``ticket``; its place, if it held one, goes to the longest waiter."""
        with self._lock:
            state = ticket.state
            ticket.state = _LEFT
            if state is _WAITING:
                self._queue.remove(ticket)
                _wake(ticket)  # its calls find it LEFT and are refused
            elif state is _ADMITTED:
                self._hand_over()

    def _hand_over(self) -> None:
        """Under the lock: a place is free; give it to the first waiter that can take it."""
        while self._queue:
            waiter = self._queue.popleft()
            waiter.state = _ADMITTED
            if _wake(waiter):
                return
            waiter.state = _NEW  # its event loop is closed: nobody waits there any more
        self._admitted -= 1

    def _busy(self) -> DatabaseBusyError:
        return DatabaseBusyError(_BUSY.format(db=self._db, limit=self.limit, timeout=self.timeout))


def _wake(ticket: Ticket) -> bool:
    """Wake the calls waiting on ``ticket``; False if they cannot be (a closed loop)."""
    wake = ticket._wake
    if isinstance(wake, threading.Event):
        wake.set()
    elif wake is not None:
        try:
            wake.get_loop().call_soon_threadsafe(_resolve, wake)
        except RuntimeError:  # the loop is closed
            return False
    return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
