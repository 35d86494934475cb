"""Masking the secrets a database URL carries, wherever a URL or a driver's message is shown.

A URL's password may be in its userinfo (``user:password@host``) or in its query:
asyncpg and libpq both take ``?password=``, and libpq ``?sslpassword=`` (the client
key's passphrase).  SQLAlchemy's ``render_as_string(hide_password=True)`` hides only
the first, so every URL and every driver message the package shows goes through
:func:`mask_url` or :func:`mask_text` instead.
"""

from __future__ import annotations

from urllib.parse import quote, quote_plus

from sqlalchemy import URL

__all__ = ["MASK", "is_secret_key", "mask_text", "mask_url"]

#: What a secret is replaced with.
MASK = "***"

#: Parts of query parameter names that carry a secret.  libpq: ``password``,
#: ``sslpassword``, ``oauth_client_secret`` (PostgreSQL 18); asyncpg: ``password``;
#: the MySQL drivers: ``passwd``.  Matched as substrings so that variants
#: (``ssl_password``, ``auth_token``) are masked too: masking a value that was not
#: secret costs a line of debugging, showing one that was costs a rotation.
#: ``passfile`` and ``sslkey`` are paths to secrets, not secrets, and stay shown.
_SECRET_KEY_PARTS = ("password", "passwd", "secret", "token")


def is_secret_key(key: str) -> bool:
    """Whether the query parameter ``key`` of a database URL carries a secret."""
    lowered = key.lower()
    return any(part in lowered for part in _SECRET_KEY_PARTS)


def mask_url(url: URL) -> str:
    """``url`` as a string with its password and secret query values shown as ``***``.

    The format is SQLAlchemy's ``render_as_string`` (query keys sorted), so a URL
    without secrets in its query reads exactly as ``render_as_string(hide_password=True)``.
    """
    query = url.query
    if not any(is_secret_key(key) for key in query):
        return url.render_as_string(hide_password=True)
    # Rendered here: render_as_string would percent-encode the mask as %2A%2A%2A.
    shown = url.set(query={}).render_as_string(hide_password=True)
    pairs = [
        f"{quote_plus(key)}={MASK if is_secret_key(key) else quote_plus(value)}"
        for key in sorted(query)
        for value in _values(query[key])
    ]
    return f"{shown}?{'&'.join(pairs)}"


def mask_text(text: str, url: URL) -> str:
    """``text`` (a driver's message, say) with every secret of ``url`` replaced by ``***``.

    Drivers may echo their connection arguments or the DSN they were given, so each
    secret is also removed in its percent-encoded forms.
    """
    for secret in _secrets(url):
        for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
            text = text.replace(form, MASK)
    return text


def _secrets(url: URL) -> list[str]:
    """The secret values of ``url``, longest first (so none is half-replaced by another)."""
    found = {str(url.password)} if url.password else set()
    for key, values in url.query.items():
        if is_secret_key(key):
            found.update(value for value in _values(values) if value)
    return sorted(found, key=len, reverse=True)


def _values(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """A query parameter's values (SQLAlchemy keeps a repeated one as a tuple)."""
    return (value,) if isinstance(value, str) else value
