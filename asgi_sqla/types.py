"""The ASGI type aliases the package uses, public for apps and tests that wrap it.

Inside the package, scopes and messages are the structural ``MutableMapping`` aliases
Starlette uses.  At the public edge (the app the middleware wraps, and the
middleware's own ``__call__``) any ASGI callable is accepted: Starlette and FastAPI
type scopes as ``MutableMapping``, while Quart, Litestar and ``asgiref.typing`` use
TypedDicts, which are not ``MutableMapping``s; no single alias satisfies both under
``mypy --strict``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias

__all__ = ["ASGIApp", "AnyASGIApp", "Message", "Receive", "Scope", "Send"]

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
#: Any framework's ASGI 3 application, whatever its scope and message types.
AnyASGIApp: TypeAlias = Callable[[Any, Any, Any], Awaitable[None]]
