"""Views of shared memory, and what their deaths set off.

Every array, tensor or buffer built on shared memory (received, or moved
into the arena by ``share()``) is built on one *base* buffer made here,
which holds the memory while any view of it lives. When the base dies, a
note of it is queued: which segment or mapping it held, and which peer's
lease it stood for. Views die in any thread (the garbage collector runs
everywhere), so the finalizer only queues the note and rings a *doorbell*
(a pipe); the bookkeeping and the ``Unlease`` messages happen on the event
loop's thread, in :meth:`Views.drain`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from ..transport import _messages as m
from ._arena import Arena, Mapping, Segment

DeadNote = tuple[bytes | None, int, Any]
"""A view that died: (peer to unlease to or None, lease, segment or mapping
it held, or None)."""


class Views:
    """The bases handed out, and the notes of those that died."""

    def __init__(self, arena: Arena) -> None:
        self._arena = arena
        self.send: Callable[[bytes, list[Any]], None] | None = None
        """Sends a message to a peer (the ``Unlease`` messages)."""
        # Bases handed out, by id of the weak reference that sees them die: that
        # reference, and the note its death leaves in ``dead``.
        self._watched: dict[int, tuple[weakref.ref[Any], DeadNote]] = {}
        self.dead: deque[DeadNote] = deque()
        self.gone: set[bytes] = set()
        """Peers that died or left: nobody to send their releases to."""
        self._bell: tuple[int, int] | None = None
        self._rung = False
        self.serving = 0
        """Calls being served on the loop's thread: views that die there
        meanwhile ring no bell, as the reply (or the call's end) drains."""
        self._loop = 0

    def base(
        self,
        owner: Segment | Mapping,
        src: bytes | None,
        lease: int,
        tensors: bool,
        start: int,
        size: int,
    ) -> Any:
        """A buffer whose life holds ``owner``'s memory: every view built on
        it keeps it, and its death is noted (lease ``lease`` of ``src`` is
        over). The caller holds the arena's lock.

        For tensors it is a memoryview of bytes [start, start + size) of it:
        torch keeps the very object it was given. numpy, and memoryviews
        sliced from it, would keep only the mmap under a memoryview, so for
        them it is a ctypes array over all of it (which they keep; it costs
        a few times more to make)."""
        base = owner.mv[start : start + size] if tensors else owner.array.from_buffer(owner.mm)
        watch = weakref.ref(base, self._on_dead)
        # Kept here until it fires: a weak reference that dies first never calls back.
        self._watched[id(watch)] = (watch, (src, lease, owner))
        if type(owner) is Segment:
            owner.holds += 1
        else:
            owner.live += 1  # type: ignore[union-attr]
        return base

    def _on_dead(self, watch: weakref.ref[Any]) -> None:
        # Any thread, any moment: queue it, ring, touch nothing else. On the
        # loop's thread during a call, the call's reply will drain the queue.
        self.note(self._watched.pop(id(watch))[1])

    def note(self, dead: DeadNote) -> None:
        """Queue a note (from any thread), and ring unless a reply will drain."""
        self.dead.append(dead)
        if not self._rung and not (self.serving and threading.get_ident() == self._loop):
            self.ring()

    def give_back(self, src: bytes, leases: list[int]) -> None:
        """Leases of regions nothing was built on (a load that failed, a
        message not read): released with the next traffic."""
        if leases:
            self.dead.extend((src, lease, None) for lease in leases)
            self.ring()

    def ring(self) -> None:
        self._rung = True
        bell = self._bell
        if bell is not None:
            try:
                os.write(bell[1], b"\0")
            except OSError:
                pass  # full (already rung) or closed

    def drain(self, keep_for: bytes | None = None) -> tuple[int, ...]:
        """Settle the notes queued; send the ``Unlease`` messages due,
        except those for ``keep_for``, which are returned for the caller to
        send with a message of its own."""
        dead = self.dead
        if not dead:
            return ()
        kept: list[int] = []
        out: dict[bytes, list[int]] = {}
        arena = self._arena
        arena.lock.acquire()  # by hand: a with block costs three times more
        try:
            while dead:
                src, lease, owner = dead.popleft()
                arena.let_go(owner)
                if src is None:
                    continue  # a view of our own memory: no peer to tell
                if src == keep_for:
                    kept.append(lease)
                else:
                    out.setdefault(src, []).append(lease)
        finally:
            arena.lock.release()
        if out and self.send is not None:
            for src, leases in out.items():
                if src not in self.gone:
                    self.send(src, [m.encode(m.Unlease(tuple(leases)))])
        return tuple(kept)

    async def serve(self) -> None:
        """Settle notes as the doorbell rings (run as a task)."""
        read_fd, write_fd = os.pipe()  # not inherited by children (PEP 446)
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._bell = (read_fd, write_fd)
        self._loop = threading.get_ident()
        try:
            while True:
                if self._rung:
                    self._rung = False
                    self.drain()
                await anyio.wait_readable(read_fd)
                try:
                    while os.read(read_fd, 4096):
                        pass
                except BlockingIOError:
                    pass
        finally:
            self._bell = None
            os.close(read_fd)
            os.close(write_fd)
