"""Receiving: the values of a message rebuilt over the regions its head
describes.

A pickled value names one of the *rebuilders* here and its arguments; a
rebuilder finds the message's regions through a context variable set while
the message is unpickled (:meth:`Receiver.begin_load`). A lifted value (see
``_lifting``) names a rebuilder by its index in :data:`REBUILDERS` instead.
Each region is mapped or copied once, on first use; the leases of those
nothing was built on go back when the message is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

from .._errors import SerializationError
from ..transport._plain import plain_rebuilder
from . import _adapters
from ._arena import Arena
from ._descriptors import (
    BackOnDevice,
    Entry,
    InFrame,
    InHead,
    OnDevice,
    Shared,
    decode_head,
    leases_of,
)
from ._device_storages import DeviceStorages
from ._views import Views

Region = tuple[Any, int, dict[Any, Any], int, int]
"""A region received: a buffer holding it, the sender's address of the
buffer's first byte (a view at sender address p sits at offset p - that),
the roots of the tensors rebuilt over it, and where in the buffer the region
lies (offset, size)."""


class Incoming:
    """The regions of one message being read; each built on first use."""

    __slots__ = ("bases", "entries", "frames", "receiver", "src")

    def __init__(
        self, receiver: Receiver, src: bytes, entries: list[Entry], frames: Sequence[Any]
    ) -> None:
        self.receiver = receiver
        self.src = src
        self.entries = entries
        self.frames = frames
        self.bases: dict[int, Region] = {}

    def region(self, index: int, tensors: bool = False) -> Region:
        """The region at ``index``: see :meth:`~._views.Views.base` for
        ``tensors`` (a region holds views of one sort, the key its sender
        grouped by)."""
        found = self.bases.get(index)
        if found is None:
            entry = self.entries[index]
            if type(entry) is Shared:
                found = self.receiver.shared_region(self.src, entry, tensors)
            elif type(entry) is InFrame:
                buffer = bytearray(self.frames[entry.frame])
                found = (buffer, entry.origin, {}, 0, len(buffer))
            elif type(entry) is InHead:
                buffer = bytearray(entry.data)
                found = (buffer, entry.origin, {}, 0, len(buffer))
            else:
                raise SerializationError("malformed tensor descriptors: a device entry as memory")
            self.bases[index] = found
        return found

    def device_storage(self, index: int) -> Any:
        found = self.bases.get(index)
        if found is None:
            entry = self.entries[index]
            if type(entry) is not OnDevice and type(entry) is not BackOnDevice:
                raise SerializationError("malformed tensor descriptors: memory as a device entry")
            storage = self.receiver.devices.open(self.src, entry)
            found = self.bases[index] = (storage, 0, {}, 0, 0)
        return found[0]

    def finish(self) -> None:
        """Give back the leases of regions nothing was built on."""
        if len(self.bases) < len(self.entries):
            self.receiver.views.give_back(
                self.src,
                leases_of(e for i, e in enumerate(self.entries) if i not in self.bases),
            )


_incoming: ContextVar[Incoming] = ContextVar("atoll_incoming")


def _array_in(incoming: Incoming, index: int, ptr: int, *meta: Any) -> Any:
    region = incoming.region(index)
    return _adapters.rebuild_array(region[0], ptr - region[1], *meta)


def _tensor_in(incoming: Incoming, index: int, ptr: int, *meta: Any) -> Any:
    return _adapters.rebuild_tensor(incoming.region(index, True), ptr, *meta)


def _device_tensor_in(incoming: Incoming, index: int, *meta: Any) -> Any:
    return _adapters.tensor_on(incoming.device_storage(index), *meta)


def _buffer_in(incoming: Incoming, index: int, ptr: int, nbytes: int, as_type: str) -> Any:
    region = incoming.region(index)
    base, start = region[0], ptr - region[1]
    # A view of a view of ``base`` still holds ``base`` (its exporter).
    view = memoryview(base).cast("B")[start : start + nbytes]
    if as_type == "memoryview":
        return view
    return bytes(view) if as_type == "bytes" else bytearray(view)


def _empty_tensor_in(incoming: Incoming, *meta: Any) -> Any:
    return _adapters.empty_tensor(*meta)


def _empty_array_in(incoming: Incoming, *meta: Any) -> Any:
    return _adapters.empty_array(*meta)


# What a pickle names to rebuild a value (the message's regions are found
# through ``_incoming``).


@plain_rebuilder
def rebuild_array(index: int, ptr: int, *meta: Any) -> Any:
    return _array_in(_incoming.get(), index, ptr, *meta)


@plain_rebuilder
def rebuild_tensor(index: int, ptr: int, *meta: Any) -> Any:
    return _tensor_in(_incoming.get(), index, ptr, *meta)


@plain_rebuilder
def rebuild_device_tensor(index: int, *meta: Any) -> Any:
    return _device_tensor_in(_incoming.get(), index, *meta)


@plain_rebuilder
def rebuild_buffer(index: int, ptr: int, nbytes: int, as_type: str) -> Any:
    return _buffer_in(_incoming.get(), index, ptr, nbytes, as_type)


for _also in (_adapters.empty_tensor, _adapters.empty_array, _adapters.nested_tensor):
    plain_rebuilder(_also)

_BOTH_WAYS = (
    (rebuild_tensor, _tensor_in),
    (rebuild_array, _array_in),
    (rebuild_buffer, _buffer_in),
    (rebuild_device_tensor, _device_tensor_in),
    (_adapters.empty_tensor, _empty_tensor_in),
    (_adapters.empty_array, _empty_array_in),
)
REBUILDERS = tuple(rebuild for rebuild, _ in _BOTH_WAYS)
"""What a reducer names to rebuild a value."""
LANDERS = tuple(lander for _, lander in _BOTH_WAYS)
"""What rebuilds a value of a lifted message, by its rebuilder's index in
:data:`REBUILDERS`, given the message's :class:`Incoming` first."""
TENSOR = REBUILDERS.index(rebuild_tensor)


class Receiver:
    """Rebuilds the values of messages from peers."""

    def __init__(self, arena: Arena, views: Views, devices: DeviceStorages) -> None:
        self._arena = arena
        self.views = views
        self.devices = devices

    def begin_load(self, src: bytes, head: bytes, frames: Sequence[Any]) -> tuple[Any, int]:
        """Get ready to unpickle a message whose regions ``head`` describes;
        returns what :meth:`end_load` takes, and how many of the last
        ``frames`` carry regions."""
        decoded = decode_head(head)
        own = decoded.frames
        if not 0 <= own <= len(frames):
            raise SerializationError("malformed tensor descriptors: frames are missing")
        incoming = Incoming(self, src, decoded.entries, frames[len(frames) - own :])
        return (incoming, _incoming.set(incoming)), own

    def end_load(self, state: tuple[Incoming, Any]) -> None:
        incoming, token = state
        _incoming.reset(token)
        incoming.finish()

    def land(
        self, src: bytes, own: int, entries: list[Entry], frames: Sequence[Any], slots: Any
    ) -> list[Any]:
        """The values of a lifted message from ``src``: per slot (place,
        code, arguments), ``LANDERS[code](incoming, *arguments)``, or for
        code -1 the value of the slot at index ``arguments`` again."""
        if own != len(frames):
            raise SerializationError("malformed tensor descriptors: frames are missing")
        if len(slots) == 1 and len(entries) == 1 and type(entries[0]) is Shared:
            _, code, args = slots[0]
            if code == TENSOR:
                # One tensor in shared memory, the most common message that
                # carries any: what Incoming and _tensor_in do, in one step.
                try:
                    region = self.shared_region(src, entries[0], True)
                except BaseException:
                    self.views.give_back(src, [entries[0].lease])
                    raise
                return [_adapters.rebuild_tensor(region, *args[1:])]
        incoming = Incoming(self, src, entries, frames)
        made: list[Any] = []
        try:
            for _, code, args in slots:
                if code < 0:
                    made.append(made[args])
                elif code < len(LANDERS):
                    made.append(LANDERS[code](incoming, *args))
                else:
                    raise SerializationError(f"malformed lifted value: rebuilder {code}")
        finally:
            incoming.finish()
        return made

    def alone(self, src: bytes, lifted: Any) -> Any:
        """The tensor a lifted :class:`~._lifting.Alone` (or ``AloneInArgs``)
        from ``src`` describes."""
        try:
            buffer = self.attach(
                src, lifted.segment, lifted.lease, True, lifted.offset, lifted.size
            )
        except BaseException:
            self.views.give_back(src, [lifted.lease])
            raise
        return _adapters.tensor_over(buffer, lifted.dtype, lifted.shape, lifted.stride)

    def shared_region(self, src: bytes, entry: Shared, tensors: bool) -> Region:
        """The region a :class:`Shared` entry from ``src`` describes: over
        the region itself for tensors, else over the whole segment (see
        :meth:`~._views.Views.base`)."""
        buffer = self.attach(src, entry.segment, entry.lease, tensors, entry.offset, entry.size)
        if tensors:
            return (buffer, entry.origin, {}, 0, entry.size)
        return (buffer, entry.origin - entry.offset, {}, entry.offset, entry.size)

    def attach(
        self, src: bytes, name: str, lease: int, tensors: bool, start: int, size: int
    ) -> Any:
        """A base over bytes ``[start, start + size)`` of segment ``name``
        that holds lease ``lease`` of ``src``."""
        arena = self._arena
        arena.lock.acquire()  # by hand: a with block costs three times more
        try:
            owner = arena.open(name, src)
            if not 0 <= start <= start + size <= owner.size:
                raise SerializationError(
                    f"malformed tensor descriptors: bytes {start}..{start + size} of a "
                    f"{owner.size}-byte segment"
                )
            return self.views.base(owner, src, lease, tensors, start, size)
        finally:
            arena.lock.release()

    def discard(self, src: bytes, entries: list[Entry]) -> None:
        """Give back the leases of a message from ``src`` that will not be read."""
        self.views.give_back(src, leases_of(entries))
