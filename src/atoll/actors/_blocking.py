"""The blocking facade: actors for sync code (plain scripts, worker threads).

An :class:`ActorRef` already blocks when called from a thread other than its
host's event loop. :func:`blocking_host` adds the missing piece for a program
with no event loop at all: it runs a host on an event loop in a background
thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._actor import Actor
from ._host import Host, open_host

A = TypeVar("A", bound=Actor)


class BlockingHost:
    """A :class:`Host` driven from sync code; made by :func:`blocking_host`."""

    def __init__(self, portal: BlockingPortal, host: Host) -> None:
        self._portal = portal
        self.host = host

    def spawn(self, cls: type[A], /, *args: Any, name: str | None = None, **kwargs: Any) -> A:
        """Like :meth:`Host.spawn`; the ref's methods block and return results."""

        async def spawn() -> A:
            return await self.host.spawn(cls, *args, name=name, **kwargs)

        return self._portal.call(spawn)

    def stop(self, ref: Any) -> None:
        """Like :meth:`Host.stop`."""
        self._portal.call(self.host.stop, ref)


@contextmanager
def blocking_host(backend: str = "asyncio", **options: Any) -> Iterator[BlockingHost]:
    """Open a host for sync code; its event loop runs in a background thread.

    ``options`` are those of :func:`open_host`. Refs from this host block when
    called, and async-generator methods return plain iterators::

        with atoll.blocking_host() as host:
            counter = host.spawn(Counter, 10)
            assert counter.add(5) == 15
    """
    with (
        start_blocking_portal(backend) as portal,
        portal.wrap_async_context_manager(open_host(**options)) as host,
    ):
        yield BlockingHost(portal, host)
