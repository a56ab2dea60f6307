"""Opening a host: ``async with open_host()``, ``await open_host()``, or
``await start_host()``, the host then closed with ``host.aclose()``."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from ._host import Host
from ._options import HostOptions, keywords_of


@keywords_of(HostOptions)
def open_host(options: HostOptions) -> HostOpener:
    """Open a host: the hub and a scope for actor processes.

    Use it as ``async with atoll.open_host() as host:``; leaving the block
    stops every actor (gracefully, then terminate, then kill, each with a
    deadline); calls still in flight fail with :class:`ActorClosedError`.
    Where one block cannot hold the host's whole life (a notebook, whose
    cells are separate tasks; an application's start-up and shut-down
    hooks), await it instead and close it yourself, from any task::

        host = await atoll.open_host()   # or atoll.start_host()
        ...
        await host.aclose()

    Works on asyncio and trio, including inside an event loop that is
    already running. A host whose task is cancelled from outside still
    stops everything within the stop deadlines.

    The options are those of :class:`atoll.HostOptions`, each documented
    there; an option out of range is a ``ValueError`` naming it.
    """
    return HostOpener(options)


class HostOpener:
    """What :func:`open_host` returns: an async context manager, or an
    awaitable for a host you close yourself with :meth:`Host.aclose`."""

    def __init__(self, options: HostOptions) -> None:
        self._options = options
        self._host: Host | None = None

    async def _open(self) -> Host:
        host = Host(self._options)
        await host._start()
        return host

    def __await__(self) -> Generator[Any, None, Host]:
        return self._open().__await__()

    async def __aenter__(self) -> Host:
        if self._host is not None:
            raise RuntimeError("this open_host() was entered already: call open_host() again")
        self._host = await self._open()
        return self._host

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._host is not None
        await self._host.aclose()


@keywords_of(HostOptions)
async def start_host(options: HostOptions) -> Host:
    """Open a host that you close yourself: ``await atoll.open_host(...)``.

    For notebooks and applications whose start and end are in different
    tasks; ``await host.aclose()`` stops it. The options are those of
    :class:`atoll.HostOptions`.
    """
    return await HostOpener(options)


__all__ = ["HostOpener", "open_host", "start_host"]
