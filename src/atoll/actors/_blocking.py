"""The blocking facade: actors for sync code (plain scripts, worker threads).

An :class:`ActorRef` already blocks when called from a thread other than its
host's event loop. :func:`blocking_host` adds the missing piece for a program
with no event loop at all: it runs a host on an event loop in a background
thread.

A blocking host that is never closed (entered without a ``with`` block, a
script that forgot) is closed when it is garbage-collected or, at the
latest, when the interpreter exits, before Python waits for its threads: a
forgotten host never keeps the interpreter from exiting.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import AbstractContextManager
from typing import Any, TypeVar, overload

from anyio.from_thread import BlockingPortal, start_blocking_portal

from . import _signals
from ._actor import Actor
from ._host import Host
from ._opener import HostOpener
from ._options import HostOptions
from ._processes import host_closed_error
from ._ref import BlockingRef

A = TypeVar("A", bound=Actor)


class BlockingHost:
    """A :class:`Host` driven from sync code; made by :func:`blocking_host`.

    Use it in a ``with`` block, or call :meth:`close` when done.
    """

    def __init__(self, backend: str, options: HostOptions) -> None:
        _signals.install()  # the host's loop thread cannot: it is not the main thread
        portal_cm = start_blocking_portal(backend, name="atoll host")
        portal = portal_cm.__enter__()
        try:
            host: Host = portal.call(_open, options)
        except BaseException as exc:
            portal_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._portal = portal
        self.host = host
        self._closer = _Closer(portal_cm, portal, host)
        # Closed when collected, or at exit: neither hook may refer to self.
        self._finalizer = weakref.finalize(self, self._closer)
        self._finalizer.atexit = False  # the hook below comes sooner
        _at_exit(self._closer)

    def __enter__(self) -> BlockingHost:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every actor and the host's event loop; later calls say the host is closed."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closer.done

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._closer.done:
            raise host_closed_error()
        return self._portal.call(fn, *args)

    def spawn(self, cls: type[A], /, *args: Any, name: str | None = None, **kwargs: Any) -> A:
        """Like :meth:`Host.spawn`; the ref's methods block and return results."""

        async def spawn() -> A:
            return await self.host.spawn(cls, *args, name=name, **kwargs)

        ref = self._call(spawn)
        ref.__class__ = BlockingRef
        return ref  # type: ignore[no-any-return]  # typed as the class: see atoll.mypy

    @overload
    def load_extension(
        self,
        path: str | os.PathLike[str],
        /,
        *args: Any,
        name: str | None = None,
        actor_class: type[A],
        **kwargs: Any,
    ) -> A: ...
    @overload
    def load_extension(
        self, path: str | os.PathLike[str], /, *args: Any, name: str | None = None, **kwargs: Any
    ) -> BlockingRef[Any]: ...
    def load_extension(
        self,
        path: str | os.PathLike[str],
        /,
        *args: Any,
        name: str | None = None,
        actor_class: type[A] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Like :meth:`Host.load_extension`; the ref's methods block."""

        async def load() -> Any:
            return await self.host.load_extension(
                path, *args, name=name, actor_class=actor_class, **kwargs
            )

        ref = self._call(load)
        ref.__class__ = BlockingRef
        return ref

    def stop(self, ref: Any) -> None:
        """Like :meth:`Host.stop`."""
        self._call(self.host.stop, ref)


def blocking_host(backend: str = "asyncio", **options: Any) -> BlockingHost:
    """Open a host for sync code; its event loop runs in a background thread.

    ``options`` are those of :class:`atoll.HostOptions`. Refs from this host block when
    called, and async-generator methods return plain iterators::

        with atoll.blocking_host() as host:
            counter = host.spawn(Counter, 10)
            assert counter.add(5) == 15

    Without a ``with`` block, call ``host.close()``; a host left open is
    closed when it is garbage-collected or when the interpreter exits.
    """
    return BlockingHost(backend, HostOptions(**options))


async def _open(options: HostOptions) -> Host:
    return await HostOpener(options)


class _Closer:
    """Closes one blocking host once: its host, then its event loop's thread."""

    def __init__(
        self, portal_cm: AbstractContextManager[Any], portal: BlockingPortal, host: Host
    ) -> None:
        self._portal_cm = portal_cm
        self._portal = portal
        self._host = host
        self._lock = threading.Lock()
        self.done = False

    def __call__(self) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
        _open_closers.discard(self)
        if self._host._node._loop_thread == threading.get_ident():
            # Collected on its own event loop's thread, which cannot wait for
            # itself: close from a thread of its own.
            threading.Thread(target=self._close, name="atoll host close").start()
        else:
            self._close()

    def _close(self) -> None:
        try:
            self._portal.call(self._host.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)


_open_closers: set[_Closer] = set()
_exit_hook_installed = False


def _at_exit(closer: _Closer) -> None:
    """Have ``closer`` run at interpreter exit, before Python joins threads
    (an idle worker thread of the host's loop would be waited for forever)."""
    global _exit_hook_installed
    _open_closers.add(closer)
    if not _exit_hook_installed:
        register = getattr(threading, "_register_atexit", None)
        if register is None:
            import atexit

            register = atexit.register
        register(_close_all)
        _exit_hook_installed = True


def _close_all() -> None:
    for closer in list(_open_closers):
        closer()
