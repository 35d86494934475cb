"""Reading a database's URL and engine options from environment variables (``from_env``).

``Database.from_env()`` reads ``DATABASE_URL`` and ``DATABASE_POOL_SIZE``...;
``Database.from_env("ANALYTICS")`` reads ``ANALYTICS_DATABASE_URL`` and
``ANALYTICS_DATABASE_POOL_SIZE``...  Each value is parsed strictly, once, at import
(where ``Database`` checks its options too), and a mistake is a ``ConfigurationError``
naming the variable and the form expected.  A URL's value is never shown: it carries
the password.  Only the variables listed in ``_VARIABLES`` are read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError

from ._errors import ConfigurationError

__all__ = ["read_environment"]

#: What a prefix may be: a name a shell can export (POSIX: letters, digits and
#: underscores, not starting with a digit), without the ``_`` the package adds.
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?<!_)")

#: The spellings of a flag: what systemd, Docker Compose files and shells commonly use.
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")

_URL_FORM = "dialect+driver://user:password@host:port/dbname"
_EXAMPLE_URL = {
    False: "postgresql+asyncpg://user:password@host/dbname",
    True: "postgresql+psycopg://user:password@host/dbname",
}


class _Variable(NamedTuple):
    """A variable ``{PREFIX_}DATABASE_{suffix}`` and the keyword of ``Database`` it sets."""

    suffix: str
    keyword: str
    #: ``(value, variable)`` -> the keyword's value; raises ``_Malformed`` with the form
    #: expected, or ``ConfigurationError``.
    parse: Callable[[str, str], Any]
    #: A valid value, shown in the error message.
    example: str


class _Malformed(Exception):
    """A value is not of the form its variable needs (the argument: that form)."""


def _whole(minimum: int) -> Callable[[str, str], int]:
    def parse(value: str, variable: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise _Malformed(f"a whole number >= {minimum}") from None
        if number < minimum:
            raise _Malformed(f"a whole number >= {minimum}")
        return number

    return parse


def _seconds(minimum: int) -> Callable[[str, str], float]:
    def parse(value: str, variable: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise _Malformed(f"a number of seconds >= {minimum}") from None
        if not (math.isfinite(number) and number >= minimum):
            raise _Malformed(f"a finite number of seconds >= {minimum}")
        return int(number) if number.is_integer() else number

    return parse


def _flag(value: str, variable: str) -> bool:
    lowered = value.lower()
    if lowered not in _TRUE + _FALSE:
        raise _Malformed("true or false (or 1/0, yes/no, on/off)")
    return lowered in _TRUE


def _echo(value: str, variable: str) -> bool | str:
    # create_engine(echo="debug") logs the rows too.
    if value.lower() == "debug":
        return "debug"
    try:
        return _flag(value, variable)
    except _Malformed:
        raise _Malformed("true, false or debug") from None


def _url(value: str, variable: str) -> URL:
    try:
        return make_url(value)
    except (ArgumentError, ValueError):
        # The parser's message repeats the URL, password included: say it ourselves.
        raise ConfigurationError(
            f"{variable} is not a valid SQLAlchemy URL; the expected form is {_URL_FORM}."
        ) from None


def _urls(value: str, variable: str) -> list[URL]:
    entries = [entry.strip() for entry in value.split(",")]
    urls = []
    for number, entry in enumerate(entries, start=1):
        where = f"URL {number} of {len(entries)} in {variable}"
        if not entry:
            raise ConfigurationError(
                f"{where} is empty: separate the URLs with single commas (a comma in a "
                "password is written %2C)."
            )
        urls.append(_url(entry, where))
    return urls


#: The variables read, after ``{PREFIX_}DATABASE_``, in the order they are documented.
_VARIABLES = (
    _Variable("POOL_SIZE", "pool_size", _whole(0), "5"),
    _Variable("MAX_OVERFLOW", "max_overflow", _whole(-1), "10"),
    _Variable("POOL_TIMEOUT", "pool_timeout", _seconds(0), "30"),
    _Variable("POOL_RECYCLE", "pool_recycle", _seconds(-1), "3600"),
    _Variable("POOL_PRE_PING", "pool_pre_ping", _flag, "true"),
    _Variable("ECHO", "echo", _echo, "false"),
    _Variable("REPLICAS", "replicas", _urls, "postgresql+asyncpg://replica/dbname"),
)


def read_environment(
    prefix: object, environ: Mapping[str, str], *, sync: bool, given: Collection[str]
) -> tuple[URL, dict[str, Any]]:
    """The URL and the keywords for ``Database`` (``SyncDatabase`` when ``sync``) that
    the variables of ``prefix`` set.

    Keywords in ``given`` (passed by the caller, who wins) are not read.  Whitespace
    around a value is ignored, and a variable set to the empty string counts as unset,
    as ``Database()`` does for ``DATABASE_URL``.
    """
    start = _variable_prefix(prefix)
    if "url" in given or "engine" in given:
        raise ConfigurationError(
            f"from_env() reads the URL from {start}DATABASE_URL: to pass a URL or an engine "
            "yourself, call the class itself, e.g. Database(url, pool_size=5)."
        )
    url_variable = f"{start}DATABASE_URL"
    # A value read from a file (a container's secret) often ends with a newline.
    url = environ.get(url_variable, "").strip()
    if not url:
        raise ConfigurationError(
            f"{url_variable} is not set: set it to the database's URL, e.g. "
            f"{url_variable}={_EXAMPLE_URL[sync]}."
        )
    options: dict[str, Any] = {}
    for variable in _VARIABLES:
        name = f"{start}DATABASE_{variable.suffix}"
        value = environ.get(name, "")
        if variable.keyword in given or not value.strip():
            continue
        if variable.keyword == "replicas" and sync:
            raise ConfigurationError(
                f"{name} is set, and read replicas are supported by the async Database "
                "only: unset it, or use Database.from_env()."
            )
        try:
            options[variable.keyword] = variable.parse(value.strip(), name)
        except _Malformed as exc:
            raise ConfigurationError(
                f"{name}={value!r} is not {exc}; set e.g. {name}={variable.example}."
            ) from None
    return _url(url, url_variable), options


def _variable_prefix(prefix: object) -> str:
    """``"ANALYTICS_"`` for ``"ANALYTICS"``, ``""`` for None."""
    if prefix is None:
        return ""
    if isinstance(prefix, str) and _PREFIX.fullmatch(prefix):
        return f"{prefix}_"
    if prefix == "":
        hint = ": from_env() without a prefix reads DATABASE_URL"
    elif isinstance(prefix, str) and _PREFIX.fullmatch(prefix.rstrip("_")):
        hint = f": the underscore is added, from_env({prefix.rstrip('_')!r})"
    else:
        hint = ""
    raise ConfigurationError(
        "The prefix of from_env() must be letters, digits and underscores, not starting "
        "with a digit nor ending with an underscore, e.g. from_env('ANALYTICS') for "
        f"ANALYTICS_DATABASE_URL; not {prefix!r}{hint}."
    )
