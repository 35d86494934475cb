"""Checking options when ``Database`` and ``SQLAlchemyMiddleware`` are constructed.

Configuration is read once, at import, where a mistake is cheap to report; an engine
or session option that SQLAlchemy would only refuse when the engine is created (at
lifespan startup, in every worker) or at the first request is refused here instead,
with a ``ConfigurationError`` that names the option and the fix.  Nothing here
connects to a database: engines are made in each worker's lifespan, never at import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from typing import Any, TypeVar

from sqlalchemy import URL, create_engine
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from ._errors import ConfigurationError
from ._secrets import mask_text, mask_url

__all__ = [
    "check_block_options",
    "check_bool",
    "check_engine_options",
    "check_number",
    "check_session_options",
]

_T = TypeVar("_T")

#: Numeric engine options: (what they count, whole number?, minimum, an example).
_ENGINE_NUMBERS: dict[str, tuple[str, bool, int, float]] = {
    "pool_size": ("connections kept open in the pool", True, 0, 5),
    "max_overflow": ("connections opened beyond pool_size (-1: no limit)", True, -1, 10),
    "pool_timeout": ("seconds to wait for a free connection", False, 0, 30),
    "pool_recycle": ("seconds after which a connection is replaced (-1: never)", False, -1, 3600),
    "query_cache_size": ("compiled statements cached", True, 0, 500),
    "insertmanyvalues_page_size": ("rows per batched INSERT", True, 1, 1000),
}
#: Boolean engine options, with the other values SQLAlchemy takes for them.
_ENGINE_FLAGS: dict[str, tuple[object, ...]] = {
    "pool_pre_ping": (),
    "pool_use_lifo": (),
    "hide_parameters": (),
    "enable_from_linting": (),
    "use_insertmanyvalues": (),
    "echo": (None, "debug"),
    "echo_pool": (None, "debug"),
}
_ENGINE_STRINGS = ("isolation_level", "logging_name", "pool_logging_name", "paramstyle")
_ENGINE_MAPPINGS = ("connect_args", "execution_options")

_SESSION_FLAGS = ("expire_on_commit", "autoflush", "autobegin", "twophase", "close_resets_only")
_JOIN_MODES = ("conservative_savepoint", "create_savepoint", "control_fully", "rollback_only")


def check_number(
    option: str,
    value: _T,
    unit: str,
    *,
    example: float,
    integer: bool = False,
    minimum: float = 0,
    optional: bool = False,
) -> _T:
    """Return ``value`` if it is a finite number of ``unit`` >= ``minimum``, else raise.

    ``integer`` asks for a whole number, ``optional`` also takes None.  A bool is
    refused (``True`` is an int to Python, never a count to a reader), and so are
    NaN and infinity: a backoff of ``inf`` would sleep forever at the first conflict.
    """
    if value is None and optional:
        return value
    kind = Integral if integer else Real
    if (
        isinstance(value, kind)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= minimum  # type: ignore[operator]
    ):
        return value
    what = "a whole number" if integer else "a finite number"
    none = " or None" if optional else ""
    shown = int(example) if integer else example
    raise ConfigurationError(
        f"{option} must be {what} of {unit}, >= {minimum:g}{none}, not {value!r}; "
        f"pass e.g. {option}={shown!r}."
    )


def check_bool(
    option: str, value: _T, *, also: tuple[object, ...] = (), example: str | None = None
) -> _T:
    """Return ``value`` if it is True or False (or one of ``also``), else raise.

    Truthy stand-ins (``1``, ``"yes"``, ``"no"``) are refused: ``"no"`` is true.
    ``example`` is the fix shown, ``OPTION=True`` by default.
    """
    if isinstance(value, bool) or any(value is other or value == other for other in also):
        return value
    *first, last = map(repr, (True, False, *also))
    allowed = f"{', '.join(first)} or {last}"
    raise ConfigurationError(
        f"{option} must be {allowed}, not {value!r}; pass e.g. {example or f'{option}=True'}."
    )


def check_engine_options(url: URL, options: Mapping[str, Any], *, sync: bool) -> dict[str, Any]:
    """``options`` for ``create_async_engine(url, ...)`` (``create_engine`` when ``sync``),
    checked; a copy.

    The common options' types are checked from a table.  Unknown options, and
    options the dialect and pool of ``url`` do not take (``pool_size`` with SQLite's
    in-memory ``StaticPool``), are found by building an engine and dropping it:
    SQLAlchemy checks every keyword when an engine is made, and leaves connecting to
    the first checkout, so no connection is opened.  That costs about 0.1 ms, plus
    importing the driver, which startup imports anyway.
    """
    checked = dict(options)
    for option, value in checked.items():
        if option in _ENGINE_NUMBERS:
            unit, integer, minimum, example = _ENGINE_NUMBERS[option]
            check_number(option, value, unit, example=example, integer=integer, minimum=minimum)
        elif option in _ENGINE_FLAGS:
            check_bool(option, value, also=_ENGINE_FLAGS[option])
        elif option in _ENGINE_STRINGS and not isinstance(value, str):
            raise ConfigurationError(
                f"{option} must be a string, not {value!r}; pass e.g. {option}='...'."
            )
        elif option in _ENGINE_MAPPINGS and not isinstance(value, Mapping):
            raise ConfigurationError(
                f"{option} must be a dict, not {value!r}; pass e.g. {option}={{...}}."
            )
    # Plugins may take keywords of their own and hook every engine made: leave them
    # to the real engine.
    if "plugins" not in checked and "plugin" not in url.query:
        _build_and_drop(url, checked, create_engine if sync else create_async_engine)
    return checked


def _build_and_drop(url: URL, options: dict[str, Any], create: Callable[..., object]) -> None:
    name = create.__name__
    try:
        create(url, **options)
    except ImportError:
        return  # the driver is not installed: startup names the pip extra that installs it
    except TypeError as exc:
        # SQLAlchemy's message quotes each keyword that nothing consumed.
        unknown = [option for option in options if f"'{option}'" in str(exc)]
        if not unknown:
            raise _refused(url, exc, name) from None
        names = ", ".join(repr(option) for option in unknown)
        raise ConfigurationError(
            f"{name}() does not take {names} with the dialect and pool of "
            f"{mask_url(url)}: check the spelling, or remove "
            f"{'it' if len(unknown) == 1 else 'them'} from Database(...)."
        ) from None
    except (ArgumentError, ValueError) as exc:
        raise _refused(url, exc, name) from None


def _refused(url: URL, exc: Exception, name: str) -> ConfigurationError:
    return ConfigurationError(
        f"{name}() refused the engine options given to Database() for "
        f"{mask_url(url)} ({type(exc).__name__}: {mask_text(str(exc), url)}); fix or "
        f"remove the option it names."
    )


def check_session_options(options: object, *, sync: bool) -> dict[str, Any]:
    """``options`` for ``async_sessionmaker`` (``sessionmaker`` when ``sync``), checked; a copy.

    Keywords are checked by making one session of the class that will be used, with
    no bind (which takes no connection): ``class_`` may take keywords of its own.
    """
    if options is None:
        return {}
    maker = "sessionmaker" if sync else "async_sessionmaker"
    if not isinstance(options, Mapping):
        raise ConfigurationError(
            f"session_options must be a dict of {maker}() keywords, not "
            f"{type(options).__name__}; pass e.g. session_options={{'expire_on_commit': True}}."
        )
    checked = dict(options)
    _check_session_values(checked, "session_options")
    if sync:
        _check_sync_session_class(checked)
    else:
        _check_session_classes(checked)
    _try_session_keywords(checked, checked.get("class_", Session if sync else AsyncSession))
    return checked


def _check_session_values(checked: dict[str, Any], where: str) -> None:
    """Check the values of the common options; ``where`` names where they were given."""
    block = where != "session_options"
    for option, value in checked.items():
        if option in _SESSION_FLAGS:
            example = f"{where}({option}=True)" if block else f"{where}={{{option!r}: True}}"
            check_bool(option, value, example=example)
        elif option == "join_transaction_mode" and value not in _JOIN_MODES:
            raise ConfigurationError(
                f"join_transaction_mode must be one of {', '.join(map(repr, _JOIN_MODES))}, "
                f"not {value!r} (in {where})."
            )
        elif option == "info" and not isinstance(value, Mapping):
            example = f"{where}(info={{...}})" if block else f"{where}={{'info': {{...}}}}"
            raise ConfigurationError(
                f"info must be a dict, not {value!r} (in {where}); pass e.g. {example}."
            )
    if "bind" in checked:
        raise ConfigurationError(
            "session_options must not hold 'bind': sessions are bound to the Database's "
            "engine; pass the engine itself as Database(engine=...)."
        )


def _check_session_classes(checked: dict[str, Any]) -> None:
    session_class = checked.get("class_", AsyncSession)
    if not (isinstance(session_class, type) and issubclass(session_class, AsyncSession)):
        raise ConfigurationError(
            f"class_ must be AsyncSession or a subclass of it, not {session_class!r} "
            "(in session_options)."
        )
    sync_class = checked.get("sync_session_class", Session)
    if not (isinstance(sync_class, type) and issubclass(sync_class, Session)):
        raise ConfigurationError(
            f"sync_session_class must be Session or a subclass of it, not {sync_class!r} "
            "(in session_options)."
        )


def _check_sync_session_class(checked: dict[str, Any]) -> None:
    session_class = checked.get("class_", Session)
    if isinstance(session_class, type) and issubclass(session_class, AsyncSession):
        raise ConfigurationError(
            f"class_ is {session_class.__name__}, an AsyncSession, and a SyncDatabase makes "
            "synchronous sessions: pass a Session class (sqlmodel.Session, say), or use "
            "Database for async sessions."
        )
    if not (isinstance(session_class, type) and issubclass(session_class, Session)):
        raise ConfigurationError(
            f"class_ must be Session or a subclass of it, not {session_class!r} "
            "(in session_options)."
        )
    if "sync_session_class" in checked:
        raise ConfigurationError(
            "sync_session_class is an AsyncSession option; a SyncDatabase's sessions are "
            "of class_ itself: pass session_options={'class_': YourSession}."
        )


def _try_session_keywords(
    checked: dict[str, Any], session_class: type[Any], where: str = "session_options"
) -> None:
    keywords = {option: value for option, value in checked.items() if option != "class_"}
    try:
        session_class(**keywords)
    except TypeError as exc:
        unknown = [option for option in keywords if f"'{option}'" in str(exc)]
        names = ", ".join(map(repr, unknown)) or str(exc)
        given = f"{where} holds" if where == "session_options" else f"{where} was given"
        raise ConfigurationError(
            f"{given} {names}, which {session_class.__name__}() does not "
            "take: check the spelling, or remove it."
        ) from None


#: Options a block cannot have, and why: what it shares with its ``Database``.
_NOT_PER_BLOCK = {
    "class_": "the session class is the Database's: pass session_class= to the Database",
    "sync_session_class": "the session class is the Database's: pass it to the Database",
    "bind": "a block's session is bound to the Database's engine; for another database, "
    "make a Database for it",
    "binds": "a block's session is bound to the Database's engine; for another database, "
    "make a Database for it",
    "twophase": "a block ends one database's session, in one phase; two-phase commit is "
    "the middleware's two_phase=True",
    # QueuePool has one timeout, read at every checkout (QueuePool._do_get reads
    # self._timeout); neither Pool.connect() nor Engine.connect() takes one.
    "pool_timeout": "SQLAlchemy's pool has one timeout for every checkout, set when the "
    "engine is made (create_engine(pool_timeout=...)), not one per session; for work "
    "that must wait less for a connection, give it a Database of its own with its own "
    "pool_timeout",
}


def check_block_options(
    options: Mapping[str, Any], session_class: type[Any], where: str
) -> dict[str, Any]:
    """A block's session options (``db.scope(**options)``), checked; a copy.

    They are the sessionmaker keywords that may differ from one session of a
    ``Database`` to the next, checked as ``check_session_options`` checks the
    Database's, with ``session_class`` (the Database's) taking the keywords.
    ``where`` names the call in messages (``db.scope``).
    """
    checked = dict(options)
    for option in checked:
        why = _NOT_PER_BLOCK.get(option)
        if why is not None:
            raise ConfigurationError(f"{where}() does not take {option}=: {why}.")
    _check_session_values(checked, where)
    _try_session_keywords(checked, session_class, where)
    return checked
