"""The memory a process shares: its arena of segments, and its mappings of
other processes' segments.

A *segment* is a file in ``/dev/shm`` mapped into its creator's memory. A
process's *arena* is the segments it created: regions it sends are copied
into one once, unless they lie in one already. Segments come in a few sizes
(:func:`segment_size`), and free ones are kept for reuse up to a pool size,
their pages already faulted in. A *mapping* is this process's view of a
segment another process created; mappings no view uses any more stay open
for a while (the sender is likely to send from the same segment again).

Every segment and mapping is indexed by address, so a region about to be
sent is found in shared memory (and sent as a descriptor, without a copy)
if it lies there. One lock guards all of this; the plane's other parts
take it too (:attr:`Arena.lock`).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import itertools
import mmap
import os
import threading
from collections import OrderedDict
from typing import Any

from .._errors import SerializationError
from . import _shm

MIN_SEGMENT = 1 << 16
POOL_BYTES = 2 << 30
"""Free segments kept for reuse (their pages are already faulted in)."""
_IDLE_MAPPINGS = 16
_IDLE_BYTES = 2 << 30
"""Mappings of other processes' segments kept once no view uses them."""

_memmove = ctypes.memmove  # lets go of the GIL while it copies

_COPY_PART = 4 << 20
"""Copies of at least two such parts are split among threads: one thread
does not reach the memory's bandwidth (two copy 64 MiB twice as fast here)."""
_COPY_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def copy(dst: int, src: int, nbytes: int) -> None:
    """``memmove``, split among up to ``_COPY_THREADS`` threads when it is big."""
    parts = min(_COPY_THREADS, nbytes // _COPY_PART)
    if parts < 2:
        _memmove(dst, src, nbytes)
        return
    step = nbytes // parts & -4096
    done = 0
    threads = []
    for _ in range(parts - 1):
        thread = threading.Thread(target=_memmove, args=(dst + done, src + done, step))
        try:
            thread.start()
        except RuntimeError:  # no more threads to be had: the rest is copied here
            break
        threads.append(thread)
        done += step
    try:
        _memmove(dst + done, src + done, nbytes - done)
    finally:
        for thread in threads:
            thread.join()


def segment_size(nbytes: int) -> int:
    """The segment size that holds ``nbytes``: four sizes per power of two, so
    segments are reused for similar sizes and waste at most a fifth."""
    n = max(nbytes, MIN_SEGMENT)
    step = 1 << max(n.bit_length() - 3, 12)
    return -(-n // step) * step


class Mapped:
    """A segment mapped in this process."""

    __slots__ = ("addr", "array", "boxed", "links", "mm", "mv", "name", "path", "size")

    def __init__(self, name: str, mm: mmap.mmap, folder: str | None = None) -> None:
        self.name = name
        self.path = os.path.join(folder or _shm.SHM_DIR, name)
        self.boxed = folder is not None
        """In a sandbox's folder: what is not sandboxed cannot open it."""
        self.links: list[str] = []
        """Its links in sandboxes' folders (see :meth:`Arena.hand_to`)."""
        self.mm = mm
        self.mv = memoryview(mm)
        self.size = len(mm)
        self.addr = _shm.address(mm)
        self.array = ctypes.c_ubyte * self.size  # the type of a ctypes array over all of it

    def close(self) -> None:
        for link in self.links:  # a sandbox no longer gets it, nor keeps it alive
            with contextlib.suppress(OSError):
                os.unlink(link)
        self.mv.release()
        try:
            self.mm.close()
        except BufferError:
            # Views the user still holds keep the mapping; it is unmapped (and
            # its descriptor closed) when the last of them goes.
            pass
        self.mm = None  # type: ignore[assignment]


class Segment(Mapped):
    """A segment of this process's arena."""

    __slots__ = ("holds",)

    def __init__(self, name: str, mm: mmap.mmap) -> None:
        super().__init__(name, mm, None)
        self.holds = 0  # leases out + live local views


class Mapping(Mapped):
    """This process's mapping of another process's segment."""

    __slots__ = ("live",)

    def __init__(self, name: str, mm: mmap.mmap, folder: str | None) -> None:
        super().__init__(name, mm, folder)
        self.live = 0  # views received on it that are alive


class Arena:
    """This process's segments and mappings, indexed by address."""

    def __init__(
        self, name_prefix: str, pool_bytes: int = POOL_BYTES, limit: int | None = None
    ) -> None:
        self.lock = threading.Lock()
        self.limit = limit
        """Bytes its segments may hold together (``Limits(shared_memory=...)``)."""
        self._held_bytes = 0
        self._prefix = name_prefix
        self.pool_bytes = pool_bytes
        self._names = itertools.count(1)
        self._segments: dict[str, Segment] = {}
        self._free: dict[int, list[Segment]] = {}
        self._free_bytes = 0
        self._mappings: dict[str, Mapping] = {}
        self._idle: OrderedDict[str, Mapping] = OrderedDict()  # least recently used first
        self._idle_bytes = 0
        self._orphans: set[str] = set()  # name prefixes of owners that are gone
        self._starts: list[int] = []  # sorted start addresses of segments and mappings
        self._at: dict[int, Segment | Mapping] = {}
        self.boxes: dict[bytes, str] = {}
        """The folders sandboxed peers see as their ``/dev/shm``, by identity."""

    # All methods but find_locked expect the caller to hold the lock.

    def find(self, lo: int, hi: int) -> Segment | Mapping | None:
        """The segment or mapping that bytes ``[lo, hi)`` lie in, if any."""
        starts = self._starts
        i = bisect.bisect_right(starts, lo) - 1
        if i >= 0:
            found = self._at[starts[i]]
            if hi <= found.addr + found.size:
                return found
        return None

    def find_locked(self, lo: int, hi: int) -> bool:
        """Whether bytes ``[lo, hi)`` lie in shared memory (takes the lock)."""
        if not self._starts:
            return False
        with self.lock:
            return self.find(lo, hi) is not None

    def _index(self, owner: Segment | Mapping) -> None:
        bisect.insort(self._starts, owner.addr)
        self._at[owner.addr] = owner

    def _unindex(self, owner: Segment | Mapping) -> None:
        del self._starts[bisect.bisect_left(self._starts, owner.addr)]
        del self._at[owner.addr]

    def alloc(self, nbytes: int) -> Segment:
        """A free segment that holds ``nbytes`` (reused if one is warm)."""
        size = segment_size(nbytes)
        free = self._free.get(size)
        if free:
            self._free_bytes -= size
            return free.pop()
        if self.limit is not None and self._held_bytes + size > self.limit:
            raise _shm.SharedMemoryError(
                f"{size} more bytes of shared memory would pass this actor's limit of "
                f"{self.limit} (Limits(shared_memory=...)); {self._held_bytes} are in use"
            )
        while True:
            name = f"{self._prefix}{next(self._names)}"
            try:
                segment = Segment(name, _shm.create(name, size))
                break
            except FileExistsError:
                continue
        self._segments[name] = segment
        self._held_bytes += size
        self._index(segment)
        return segment

    def unhold(self, segment: Segment) -> None:
        """One hold on ``segment`` (a lease, a view) is over: free it with the last."""
        segment.holds -= 1
        if segment.holds or segment.name not in self._segments:
            return
        self._free.setdefault(segment.size, []).append(segment)
        self._free_bytes += segment.size
        while self._free_bytes > self.pool_bytes:
            # Past the pool's size: give back free segments, biggest first.
            size = max(self._free)
            same = self._free[size]
            victim = same.pop(0)
            if not same:
                del self._free[size]
            self._free_bytes -= victim.size
            self._drop_segment(victim)

    def _drop_segment(self, segment: Segment) -> None:
        del self._segments[segment.name]
        self._held_bytes -= segment.size
        self._unindex(segment)
        _shm.unlink(segment.name)
        segment.close()

    def open(self, name: str, src: bytes) -> Segment | Mapping:
        """Segment ``name`` that ``src`` sent: one of ours (sent back to
        us), or mapped (once): from the folder of ``src``'s if it is
        sandboxed, else from ``/dev/shm``."""
        mapping = self._mappings.get(name)
        if mapping is None:
            segment = self._segments.get(name)
            if segment is not None:
                return segment
            folder = self.boxes.get(src)
            try:
                mapping = Mapping(name, _shm.attach(name, folder), folder)
            except FileNotFoundError:
                raise SerializationError(
                    f"shared memory {name} is gone: the process that sent it exited "
                    "before the message was read"
                ) from None
            self._mappings[name] = mapping
            self._index(mapping)
        elif not mapping.live and self._idle.pop(name, None) is not None:
            self._idle_bytes -= mapping.size
        return mapping

    def hand_to(self, where: Segment | Mapping, dest: bytes) -> None:
        """Let sandboxed ``dest`` see ``where``: a link in its folder (once)."""
        box = self.boxes.get(dest)
        if box is None:
            return
        link = os.path.join(box, where.name)
        if link in where.links:
            return
        try:
            os.link(where.path, link)
        except FileExistsError:
            pass
        where.links.append(link)

    def let_go(self, owner: Any) -> None:
        """A view built on ``owner``'s memory died (``owner`` may be neither
        a segment nor a mapping: then there is nothing to do)."""
        if type(owner) is Segment:
            self.unhold(owner)
        elif type(owner) is Mapping:
            owner.live -= 1
            if not owner.live:
                self._idle_mapping(owner)

    def _idle_mapping(self, mapping: Mapping) -> None:
        if self._orphans and mapping.name.startswith(tuple(self._orphans)):
            self._unmap(mapping)  # its owner is gone: nothing will reuse it
            return
        idle = self._idle
        idle[mapping.name] = mapping
        self._idle_bytes += mapping.size
        # The one that just went idle stays, however big.
        while len(idle) > 1 and (len(idle) > _IDLE_MAPPINGS or self._idle_bytes > _IDLE_BYTES):
            _, oldest = idle.popitem(last=False)
            self._idle_bytes -= oldest.size
            self._unmap(oldest)

    def _unmap(self, mapping: Mapping) -> None:
        del self._mappings[mapping.name]
        self._unindex(mapping)
        mapping.close()

    def forget_owner(self, name_prefix: str) -> None:
        """The process whose segments start with ``name_prefix`` is gone:
        unmap its segments once no view uses them, rather than keep them."""
        self._orphans.add(name_prefix)
        for mapping in [mp for mp in self._idle.values() if mp.name.startswith(name_prefix)]:
            del self._idle[mapping.name]
            self._idle_bytes -= mapping.size
            self._unmap(mapping)

    def stats(self) -> dict[str, int]:
        return {
            "segments": len(self._segments),
            "segment_bytes": sum(s.size for s in self._segments.values()),
            "free_bytes": self._free_bytes,
            "mappings": len(self._mappings),
            "mapped_bytes": sum(mp.size for mp in self._mappings.values()),
        }

    def close(self) -> None:
        """Unlink this process's segments and unmap the others. Views still
        held stay valid: the memory goes when the last mapping of it does."""
        for segment in list(self._segments.values()):
            self._drop_segment(segment)
        self._free.clear()
        self._free_bytes = 0
        for mapping in list(self._mappings.values()):
            self._unmap(mapping)
        self._idle.clear()
        self._idle_bytes = 0
