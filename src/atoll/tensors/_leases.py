"""The lease table: what each peer holds of this process's memory.

Every region sent as a descriptor carries a *lease*, numbered by its
sender. Until the receiver gives the lease back (an ``Unlease`` message, once
every view it built on the region is gone) or dies, the sender keeps the
memory alive and never reuses it. What a lease holds is one of:

- a :class:`~._arena.Segment` of this process's arena (its hold count);
- a :class:`DeviceHold`: a device storage of this process, and the token it
  was exported as;
- any other object: a value received from another process and sent on,
  whose own life holds the memory (and whose own lease goes back upstream
  when it dies).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import anyio

from . import _devices
from ._arena import Arena, Segment, copy

_log = logging.getLogger(__name__)


class DeviceHold:
    """A lease's hold on a device storage of this process, and the token it
    was sent as (settled here if it comes back unopened)."""

    __slots__ = ("ops", "storage", "token")

    def __init__(self, storage: Any, ops: _devices.DeviceOps, token: tuple[Any, ...]) -> None:
        self.storage = storage
        self.ops = ops
        self.token = token

    def settle_unopened(self) -> None:
        try:
            self.ops.settle(self.token)
        except Exception as exc:  # its memory stays reserved until this process exits
            _log.warning("atoll: could not settle a device token its reader never opened: %r", exc)


class Leases:
    """Leases out, by peer."""

    def __init__(self, arena: Arena, gone: set[bytes]) -> None:
        self._arena = arena
        self._next = itertools.count(1).__next__
        self._held: dict[bytes, dict[int, Any]] = {}
        self._gone = gone  # peers that died or left (the plane's)
        self.device_out = 0
        """Leases peers hold on this process's device memory."""
        self._device_idle: anyio.Event | None = None

    def lease(
        self,
        origin: int,
        size: int,
        dest: bytes,
        copy_always: bool = False,
        view: memoryview | None = None,
        obj: Any = None,
    ) -> tuple[str, int, int]:
        """Lease bytes ``[origin, origin + size)`` to ``dest``: the segment
        they lie in, where in it, and the lease. They are copied once into
        the arena first, unless they lie there already or in a segment
        received (then ``obj``, which views them, is what holds them), or
        ``copy_always`` says to, or they have no address (``view`` has them)."""
        arena = self._arena
        arena.lock.acquire()  # by hand: a with block costs three times more
        try:
            holder: Any = None
            where: Any = None
            if not copy_always and view is None:
                where = arena.find(origin, origin + size)
                # In a segment received, sent on: the value holds that memory
                # (unless it is in a sandbox's folder, which only sandboxes see).
                holder = where if type(where) is Segment else obj if where is not None else None
                if holder is obj and where.boxed and dest not in arena.boxes:
                    holder = None
            if holder is None:
                where = holder = arena.alloc(size)
                if view is not None:
                    where.mv[:size] = view
                else:
                    copy(where.addr, origin, size)
                offset = 0
            else:
                offset = origin - where.addr
            if arena.boxes:
                arena.hand_to(where, dest)  # a sandboxed dest sees only what it is handed
            lease = self._next()
            if type(holder) is Segment:
                holder.holds += 1
            if dest in self._gone:  # the send will fail: nothing to hold for
                self._let_go(holder)
            else:
                held = self._held.get(dest)
                if held is None:
                    held = self._held[dest] = {}
                held[lease] = holder
            return where.name, offset, lease
        finally:
            arena.lock.release()

    def lease_device(self, dest: bytes, hold: DeviceHold) -> int:
        with self._arena.lock:
            lease = self._next()
            if dest not in self._gone:
                self._held.setdefault(dest, {})[lease] = hold
                self.device_out += 1
        return lease

    def _let_go(self, holder: Any) -> None:
        if type(holder) is Segment:
            self._arena.unhold(holder)
        elif type(holder) is DeviceHold:
            self.device_out -= 1
            if not self.device_out and self._device_idle is not None:
                self._device_idle.set()
        # Else a region received and sent on: its view is let go here, and its
        # own finalizer then gives its lease back upstream.

    def unlease(self, peer: bytes, leases: Sequence[int]) -> None:
        """``peer`` dropped every view of these regions. A negative lease is
        a device token it never opened: settled here."""
        arena = self._arena
        arena.lock.acquire()
        try:
            held = self._held.get(peer)
            if held is None:
                return
            for lease in leases:
                holder = held.pop(lease, None)
                if holder is None and lease < 0:
                    holder = held.pop(-lease, None)
                    if type(holder) is not DeviceHold:
                        continue
                    holder.settle_unopened()
                if holder is not None:
                    self._let_go(holder)
        finally:
            arena.lock.release()

    def peer_gone(self, peer: bytes) -> None:
        """``peer`` died or left (and is in the plane's gone set): what it
        leased is released."""
        with self._arena.lock:
            for holder in self._held.pop(peer, {}).values():
                self._let_go(holder)

    def count(self) -> int:
        return sum(len(held) for held in self._held.values())

    async def wait_device_idle(self) -> None:
        """Return once no peer holds a view of this process's device memory."""
        while self.device_out:
            self._device_idle = anyio.Event()
            await self._device_idle.wait()

    def clear(self) -> None:
        self._held.clear()
