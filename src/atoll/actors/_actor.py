"""The :class:`Actor` base class and the method table derived from it."""

from __future__ import annotations

import enum
import inspect
from typing import Any, ClassVar


class Actor:
    """Base class of actors.

    Subclass it and define methods; every public method (no leading
    underscore) can be called through the :class:`~atoll.ActorRef` that
    :meth:`Host.spawn` returns. ``async def`` methods run on the actor's event
    loop; plain ``def`` methods run in a worker thread so they never block its
    mailbox; ``async def`` generators are streams.

    An actor runs one call at a time (its *turn*), except calls made along the
    chain of a call it is already running, which re-enter at once. Set
    ``max_concurrency`` above 1 to let that many unrelated calls run together.
    """

    max_concurrency: ClassVar[int] = 1

    async def on_start(self) -> None:
        """Called in the actor's process after construction, before any call."""

    async def on_stop(self) -> None:
        """Called in the actor's process when it is stopped gracefully."""


class Kind(enum.IntEnum):
    ASYNC = 1
    SYNC = 2
    STREAM = 3
    ASYNC_IDEMPOTENT = 4
    """As a ref sees an ``async def`` marked :func:`idempotent` (it runs as ASYNC)."""
    SYNC_IDEMPOTENT = 5


IDEMPOTENT = frozenset({Kind.ASYNC_IDEMPOTENT, Kind.SYNC_IDEMPOTENT})


def idempotent(method: Any) -> Any:
    """Mark an actor method safe to run twice: a call to it in flight when
    its actor died is run again, once, on the actor's new process (see
    ``spawn(restart=...)``), instead of failing."""
    method.__atoll_idempotent__ = True
    return method


def ref_kinds(cls: type) -> dict[str, Kind]:
    """:func:`method_kinds` as refs see them: idempotent methods marked."""
    marked = {Kind.ASYNC: Kind.ASYNC_IDEMPOTENT, Kind.SYNC: Kind.SYNC_IDEMPOTENT}
    return {
        name: marked.get(kind, kind)
        if getattr(getattr(cls, name, None), "__atoll_idempotent__", False)
        else kind
        for name, kind in method_kinds(cls).items()
    }


_LIFECYCLE = frozenset({"on_start", "on_stop", "max_concurrency"})


_kinds_by_class: dict[type, dict[str, Kind]] = {}


def method_kinds(cls: type) -> dict[str, Kind]:
    """Public remotely callable methods of ``cls`` and how each one runs."""
    kinds = _kinds_by_class.get(cls)
    if kinds is None:
        kinds = _kinds_by_class[cls] = _method_kinds(cls)
    return kinds


def _method_kinds(cls: type) -> dict[str, Kind]:
    kinds: dict[str, Kind] = {}
    for name in dir(cls):
        if name.startswith("_") or name in _LIFECYCLE:
            continue
        attr = inspect.getattr_static(cls, name)
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        elif not inspect.isfunction(attr):
            continue
        kinds[name] = kind_of(attr)
    return kinds


def kind_of(fn: Any) -> Kind:
    if inspect.isasyncgenfunction(fn):
        return Kind.STREAM
    if inspect.iscoroutinefunction(fn):
        return Kind.ASYNC
    return Kind.SYNC
