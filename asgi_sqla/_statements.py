"""What a statement about to run does: whether it only reads.

Read replicas route by it (a write sends the request's later reads to the primary) and
autocommit reads refuse anything else; each passes its own test for SQL text, which
SQLAlchemy cannot classify.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["locks", "reads_only"]


def reads_only(statement: str, context: Any, text_reads: Callable[[str], bool]) -> bool:
    """Whether ``statement`` (with its ``before_cursor_execute`` ``context``) only reads.

    A compiled statement reads only when it is a ``SELECT`` that locks no row and has no
    data-modifying CTE (``select(...).add_cte(insert(...).cte())`` compiles to ``WITH
    ... INSERT ... SELECT``); SQL text is judged by ``text_reads``.
    """
    if context is None or context.isinsert or context.isupdate or context.isdelete:
        return False
    if context.isddl:
        return False
    compiled = context.compiled
    if compiled is None or context.is_text:
        return text_reads(statement)
    clause = getattr(compiled, "statement", None)
    if not getattr(clause, "is_select", False) or locks(clause):
        return False
    ctes = getattr(compiled, "ctes", None) or {}
    return not any(getattr(cte.element, "is_dml", False) for cte in ctes)


def locks(clause: Any) -> bool:
    """Whether ``clause`` is a ``SELECT ... FOR UPDATE`` / ``FOR SHARE``."""
    return getattr(clause, "_for_update_arg", None) is not None
