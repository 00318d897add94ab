"""Finding objects as the Engine API does: by full ID, exact name, or unique ID prefix."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from orchestrator.api.docker import ApiError

T = TypeVar("T")


def resolve(
    items: Iterable[T], ref: str, kind: str, name_of: Callable[[T], str], id_of: Callable[[T], str]
) -> T:
    objs = list(items)
    for o in objs:
        if id_of(o) == ref:
            return o
    named = [o for o in objs if name_of(o) == ref]
    if len(named) == 1:
        return named[0]
    prefixed = [o for o in objs if id_of(o).startswith(ref)] if ref else []
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1 or len(named) > 1:
        raise ApiError(
            404, f"{kind} {ref} is ambiguous ({len(prefixed) or len(named)} matches found)"
        )
    raise ApiError(404, f"{kind} {ref} not found")
