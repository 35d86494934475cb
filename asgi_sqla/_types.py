"""ASGI type aliases used throughout the package.

They are the structural aliases Starlette uses rather than ``asgiref.typing``'s
TypedDicts: a TypedDict scope is not a ``MutableMapping``, so typing the middleware
with them would make every Starlette, FastAPI or Litestar app fail type-checking
when it is wrapped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
