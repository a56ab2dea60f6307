"""The tensor plane: arrays, tensors and big buffers travel beside the messages.

While a message is pickled, every numpy array, CPU tensor and large byte
buffer in it is noted with where its bytes lie; views of one allocation are
grouped into one *region*, so they arrive as views of one buffer again. When
the pickle is done, each region is sealed into an entry of the message's
head:

- small regions are copied into the head or into a frame of their own;
- a region that already lies in shared memory (this process's arena, or a
  segment received from a peer) is sent as a descriptor, at no cost that
  depends on its size;
- any other region is copied once into a segment of this process's arena,
  and sent as a descriptor.

A descriptor carries a *lease*: the sender keeps the region alive (and never
reuses its memory) until the receiver says, with an ``Unlease`` message,
that every view it built on the region is gone, or until the receiver dies.
Receivers map a sender's segment once and keep the mapping.

Views die in any thread (the garbage collector runs everywhere), so their
finalizers only queue a note and ring a doorbell (a pipe); the bookkeeping and
the ``Unlease`` messages happen on the event loop's thread, in :meth:`Plane.drain`.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import logging
import mmap
import os
import sys
import threading
import types
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from contextvars import ContextVar
from typing import Any, TypeVar

import anyio
import msgspec

from .._errors import SerializationError
from ..transport import _messages as m
from ..transport._codec import Handler, Lifted
from . import _devices, _kinds, _shm

_log = logging.getLogger(__name__)

V = TypeVar("V")

TRANSFERS = ("shared_memory", "inline")
"""How regions above the inline threshold travel: see ``open_host(transfer=...)``."""

SHM_THRESHOLD = 1 << 16
"""Regions at least this big go through shared memory; smaller ones are copied
into the message. ``benchmarks/bench_tensors.py`` measures the crossover: on a
2-core machine shared memory wins from 64 KiB, and at 16 KiB the copy does."""

_HEAD_LIMIT = 8192
"""Regions smaller than this travel inside the head rather than as a frame."""

_ALIGN = 64
_MIN_SEGMENT = 1 << 16
_POOL_BYTES = 2 << 30
"""Free segments kept for reuse (their pages are already faulted in)."""
_IDLE_MAPPINGS = 16
_IDLE_BYTES = 2 << 30
"""Mappings of other processes' segments kept once no view uses them."""

_memmove = ctypes.memmove  # lets go of the GIL while it copies

_COPY_PART = 4 << 20
"""Copies of at least two such parts are split among threads: one thread
does not reach the memory's bandwidth (two copy 64 MiB twice as fast here)."""
_COPY_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def _copy(dst: int, src: int, nbytes: int) -> None:
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


_string_at = ctypes.string_at

# Head entries: (kind, origin, ...) where origin is the region's address in
# the sender, so a view at sender address p sits at offset p - origin.
_IN_HEAD = 0  # (0, origin, data)
_IN_FRAME = 1  # (1, origin, frame index)
_SHARED = 2  # (2, origin, segment name, offset in segment, size, lease)
# A storage in device memory (see ``_devices``): opened from its owner's token,
# or, sent back to its owner, found there again.
_DEVICE = 3  # (3, 0, device type, device index, owner, token, marker, lease)
_DEVICE_BACK = 4  # (4, 0, device type, device index, marker, identity)
_LEASED = (_SHARED, _DEVICE)  # kinds whose last item is a lease

_head_encode = msgspec.msgpack.Encoder().encode
_head_decode = msgspec.msgpack.Decoder(tuple[int, list[tuple[Any, ...]]]).decode


def check_transfer(transfer: str) -> str:
    if transfer not in TRANSFERS:
        raise ValueError(
            f"transfer must be one of {', '.join(map(repr, TRANSFERS))}, got {transfer!r}"
        )
    return transfer


def segment_size(nbytes: int) -> int:
    """The segment size that holds ``nbytes``: four sizes per power of two, so
    segments are reused for similar sizes and waste at most a fifth."""
    n = max(nbytes, _MIN_SEGMENT)
    step = 1 << max(n.bit_length() - 3, 12)
    return -(-n // step) * step


class _Mapped:
    """A segment mapped in this process."""

    __slots__ = ("addr", "array", "mm", "mv", "name", "size")

    def __init__(self, name: str, mm: mmap.mmap) -> None:
        self.name = name
        self.mm = mm
        self.mv = memoryview(mm)
        self.size = len(mm)
        self.addr = _shm.address(mm)
        self.array = ctypes.c_ubyte * self.size  # the type of a ctypes array over all of it

    def close(self) -> None:
        self.mv.release()
        try:
            self.mm.close()
        except BufferError:
            # Views the user still holds keep the mapping; it is unmapped (and
            # its descriptor closed) when the last of them goes.
            pass
        self.mm = None  # type: ignore[assignment]


class _Segment(_Mapped):
    """A segment of this process's arena."""

    __slots__ = ("holds",)

    def __init__(self, name: str, mm: mmap.mmap) -> None:
        super().__init__(name, mm)
        self.holds = 0  # leases out + live local views


class _Mapping(_Mapped):
    """This process's mapping of another process's segment."""

    __slots__ = ("live",)

    def __init__(self, name: str, mm: mmap.mmap) -> None:
        super().__init__(name, mm)
        self.live = 0  # views received on it that are alive


class _Group:
    __slots__ = ("copy", "device", "hi", "lo", "obj", "view")

    def __init__(
        self, lo: int, hi: int, copy: bool, view: memoryview | None, obj: Any = None
    ) -> None:
        self.lo = lo
        self.hi = hi
        self.copy = copy
        self.view = view  # bytes with no address to copy from: copied from this view
        # A value sent that views this memory: what holds it for a peer when it
        # is memory received from another process, sent on.
        self.obj = obj
        self.device: tuple[str, int, Any] | None = None  # (type, index, storage) on a device


_NO_IDS: frozenset[int] = frozenset()


class Batch:
    """The regions of one message being pickled."""

    __slots__ = ("copy_ids", "groups", "keep", "keys")

    def __init__(self) -> None:
        self.groups: list[_Group] = []
        self.keys: dict[Any, int] = {}
        self.copy_ids: AbstractSet[int] = _NO_IDS  # a set once copy_on_send is met
        self.keep: list[Any] = []  # tensors made while pickling: their memory is read at seal

    def add(
        self,
        key: Any,
        lo: int,
        hi: int,
        copy: bool,
        view: memoryview | None = None,
        obj: Any = None,
    ) -> int:
        if copy:
            key = ("copy", key)
        index = self.keys.get(key)
        if index is None:
            index = self.keys[key] = len(self.groups)
            self.groups.append(_Group(lo, hi, copy, view, obj))
        else:
            group = self.groups[index]
            group.lo = min(group.lo, lo)
            group.hi = max(group.hi, hi)
        return index

    def add_device(self, device_type: str, device: int, storage: Any) -> int:
        key = ("device", id(storage))
        index = self.keys.get(key)
        if index is None:
            index = self.keys[key] = len(self.groups)
            group = _Group(0, 0, False, None)
            group.device = (device_type, device, storage)
            self.groups.append(group)
            self.keep.append(storage)
        return index


class CopyOnSend:
    """Wraps a value whose arrays and tensors must be copied when sent, even
    where they already lie in shared memory: see :func:`copy_on_send`."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def copy_on_send(value: V) -> V:
    """Mark an argument (or result) so that the receiver gets a private copy
    of its arrays and tensors, and its writes never reach the sender.

    ``value`` is an array, a tensor, or a list, tuple, set or dict of them
    (nested up to 8 levels). Without it, a tensor that lies in shared memory
    is shared with the receiver: writes on either side are seen by both.
    """
    return CopyOnSend(value)  # type: ignore[return-value]  # unwrapped when sent


def _collect_ids(value: Any, ids: set[int], depth: int = 0) -> None:
    ids.add(id(value))
    if depth < 8 and type(value) in (list, tuple, set, frozenset, dict):
        for item in value.values() if type(value) is dict else value:
            _collect_ids(item, ids, depth + 1)


def _same(value: Any) -> Any:
    return value


class _Incoming:
    """The regions of one message being unpickled; built on first use."""

    __slots__ = ("bases", "entries", "frames", "plane", "src")

    def __init__(
        self, plane: Plane, src: bytes, entries: list[tuple[Any, ...]], frames: Sequence[Any]
    ) -> None:
        self.plane = plane
        self.src = src
        self.entries = entries
        self.frames = frames
        # Per region: a buffer holding it, the sender's address of the
        # buffer's first byte (a view at sender address p sits at offset
        # p - that), the roots of the tensors rebuilt over it, and where in
        # the buffer the region lies (offset, size).
        self.bases: dict[int, tuple[Any, int, dict[Any, Any], int, int]] = {}

    def base(self, index: int, tensors: bool = False) -> tuple[Any, int, dict[Any, Any], int, int]:
        """The region at ``index``: see :meth:`Plane._view` for ``tensors``
        (a region holds views of one kind, the key its sender grouped by)."""
        found = self.bases.get(index)
        if found is None:
            entry = self.entries[index]
            kind, origin = entry[0], entry[1]
            if kind == _SHARED:
                found = self.plane._shared_region(self.src, entry, tensors)
            else:
                buffer = bytearray(self.frames[entry[2]] if kind == _IN_FRAME else entry[2])
                found = (buffer, origin, {}, 0, len(buffer))
            self.bases[index] = found
        return found

    def unused_leases(self) -> list[int]:
        return _leases_of(
            entry for index, entry in enumerate(self.entries) if index not in self.bases
        )

    def device_storage(self, index: int) -> Any:
        found = self.bases.get(index)
        if found is None:
            storage = self.plane._open_device(self.src, self.entries[index])
            found = self.bases[index] = (storage, 0, {}, 0, 0)
        return found[0]


_incoming: ContextVar[_Incoming] = ContextVar("atoll_incoming")


def _batch(pickler: Any) -> Batch:
    """The regions noted so far while ``pickler`` runs."""
    batch = pickler.batch
    if batch is None:
        batch = pickler.batch = Batch()
    return batch  # type: ignore[no-any-return]


def _kind(t: type) -> str | None:
    """What the plane calls a type it carries by its memory ("tensor" or
    "array"), or None."""
    module = t.__module__
    if module == "numpy":
        return "array" if t is sys.modules["numpy"].ndarray else None
    if module.startswith("torch"):
        torch = sys.modules["torch"]
        if t is torch.Tensor or t is torch.nn.Parameter:
            return "tensor"
    return None


def _array_in(incoming: _Incoming, index: int, ptr: int, *meta: Any) -> Any:
    region = incoming.base(index)
    return _kinds.rebuild_array(region[0], ptr - region[1], *meta)


def _tensor_in(
    incoming: _Incoming,
    index: int,
    ptr: int,
    dtype: str,
    shape: Sequence[int],
    stride: Sequence[int],
    requires_grad: bool,
    parameter: bool,
    conj: bool = False,
) -> Any:
    return _kinds.rebuild_tensor(
        incoming.base(index, True), ptr, dtype, shape, stride, requires_grad, parameter, conj
    )


def _device_tensor_in(incoming: _Incoming, index: int, *meta: Any) -> Any:
    return _kinds.tensor_on(incoming.device_storage(index), *meta)


def _buffer_in(incoming: _Incoming, index: int, ptr: int, nbytes: int, kind: str) -> Any:
    region = incoming.base(index)
    base, start = region[0], ptr - region[1]
    # A view of a view of ``base`` still holds ``base`` (its exporter).
    view = memoryview(base).cast("B")[start : start + nbytes]
    if kind == "memoryview":
        return view
    return bytes(view) if kind == "bytes" else bytearray(view)


def _empty_tensor_in(incoming: _Incoming, *meta: Any) -> Any:
    return _kinds.empty_tensor(*meta)


def _empty_array_in(incoming: _Incoming, *meta: Any) -> Any:
    return _kinds.empty_array(*meta)


# What a pickle names to rebuild a value (the message's regions are found
# through ``_incoming``).


def _rebuild_array(index: int, ptr: int, *meta: Any) -> Any:
    return _array_in(_incoming.get(), index, ptr, *meta)


def _rebuild_tensor(index: int, ptr: int, *meta: Any) -> Any:
    return _tensor_in(_incoming.get(), index, ptr, *meta)


def _rebuild_device_tensor(index: int, *meta: Any) -> Any:
    return _device_tensor_in(_incoming.get(), index, *meta)


def _rebuild_buffer(index: int, ptr: int, nbytes: int, kind: str) -> Any:
    return _buffer_in(_incoming.get(), index, ptr, nbytes, kind)


_REBUILDERS = (
    (_rebuild_tensor, _tensor_in),
    (_rebuild_array, _array_in),
    (_rebuild_buffer, _buffer_in),
    (_rebuild_device_tensor, _device_tensor_in),
    (_kinds.empty_tensor, _empty_tensor_in),
    (_kinds.empty_array, _empty_array_in),
)
"""What a reducer names to rebuild a value, and what rebuilds it in a lifted
message (see :meth:`Plane.land`), where it goes by its index here."""
_LANDERS = tuple(lander for _, lander in _REBUILDERS)


_DeadNote = tuple[bytes | None, int, Any]
"""A view that died: (peer to unlease to or None, lease, owner)."""


class Plane:
    """One process's side of the tensor plane."""

    def __init__(
        self,
        name_prefix: str,
        *,
        transfer: str = "shared_memory",
        send: Callable[[bytes, list[Any]], None] | None = None,
        threshold: int = SHM_THRESHOLD,
        pool_bytes: int = _POOL_BYTES,
    ) -> None:
        self.transfer = check_transfer(transfer)
        self.threshold = threshold
        self._prefix = name_prefix
        self.send = send
        self._pool_bytes = pool_bytes
        self._lock = threading.Lock()
        self._names = itertools.count(1)
        self._leases_next = itertools.count(1).__next__
        self._segments: dict[str, _Segment] = {}
        self._free: dict[int, list[_Segment]] = {}
        self._free_bytes = 0
        self._mappings: dict[str, _Mapping] = {}
        self._idle: OrderedDict[str, _Mapping] = OrderedDict()  # least recently used first
        self._idle_bytes = 0
        self._orphans: set[str] = set()  # name prefixes of owners that are gone
        self._starts: list[int] = []  # sorted start addresses of segments and mappings
        self._at: dict[int, _Segment | _Mapping] = {}
        self._leases: dict[bytes, dict[int, Any]] = {}  # a _Segment, or a view held
        # Views handed out, by id of the weak reference that sees them die: that
        # reference, and the note its death leaves in ``dead``.
        self._watched: dict[int, tuple[weakref.ref[Any], _DeadNote]] = {}
        self._gone: set[bytes] = set()
        self.dead: deque[_DeadNote] = deque()
        self._bell: tuple[int, int] | None = None
        self._rung = False
        self.serving = 0
        """Calls being served on the loop's thread: views that die there
        meanwhile ring no bell, as the reply (or the call's end) drains."""
        self._loop = 0
        self._closed = False
        self.identity = b""
        """This process's node identity: who owns the device storages it exports."""
        self._exported = _devices.StorageTable()  # our device storages others hold
        self._opened = _devices.StorageTable()  # device storages others own, by identity
        # Per device storage opened here, by id: (its weak reference, which
        # fires when its last view dies; owner; identity; leases it holds).
        self._opened_from: dict[
            int, tuple[weakref.ref[Any], bytes, Any, list[tuple[bytes | None, int]]]
        ] = {}
        self._opened_refs: dict[int, int] = {}  # id of the weak reference: id of the storage
        self._device_out = 0  # leases on our device storages held by peers
        self._device_idle: anyio.Event | None = None
        self._types: dict[type, Handler] = {
            memoryview: self._reduce_memoryview,
            Lifted: self._reduce_lifted,
            CopyOnSend: self._reduce_copy_on_send,
        }

    # -- sending: noting regions while pickling, sealing them after -------

    def handler(self, t: type) -> Handler | None:
        """What reduces an array, tensor or buffer of type ``t`` while
        pickling, or None (see :class:`~atoll.transport._codec.Sidecar`)."""
        kind = _kind(t)
        if kind == "tensor":
            return self._tensor_reducer(sys.modules["torch"], self._reduce_device_tensor)
        if kind == "array":
            return self._reduce_array
        return self._types.get(t)

    def lifter(self, t: type) -> Handler | None:
        """What reduces a value of type ``t`` to one of :attr:`rebuilders`
        without a pickler, or None (see ``Codec._lift``)."""
        return None if t is CopyOnSend else self.handler(t)

    def one_lifter(self, t: type) -> Callable[[Any, bytes], tuple[Any, ...] | None] | None:
        """What describes a value of type ``t`` that is the only one of a
        message the plane carries, as flat fields that :meth:`land_one`
        takes, or None (see ``Codec._lift_one``)."""
        if _kind(t) == "tensor" and t is sys.modules["torch"].Tensor:  # not a Parameter
            return self._tensor_lifter()
        return None

    def _tensor_lifter(self) -> Callable[[Any, bytes], tuple[Any, ...] | None]:
        infos, dtype_info = _kinds.dtype_infos, _kinds.dtype_info

        def lift_tensor(t: Any, dest: bytes) -> tuple[Any, ...] | None:
            # The most common message that carries any: one plain CPU tensor
            # big enough for shared memory. It is a region of its own, from
            # its first byte, so it needs no batch, head or slot; the
            # general path takes the rest (autograd, conjugate and negative
            # views, parameters, small or empty tensors, other layouts).
            if self.transfer == "inline":
                return None
            info = infos.get(t.dtype) or dtype_info(t.dtype)
            if info.quantized or info.complex or not t.is_cpu or t.requires_grad or t.is_neg():
                return None
            try:
                shape: Any = t.shape
                stride: Any = t.stride()
                ptr = t.data_ptr()
            except RuntimeError:
                # No sizes, strides or storage of its own: a sparse, nested
                # or mkldnn tensor (each fails one of these; asking for the
                # layout first would cost every tensor another torch call).
                return None
            itemsize = info.itemsize
            if len(shape) == 1:
                shape, stride = shape[0], stride[0]  # 1-d: plain ints
                if not shape:
                    return None
                size = ((shape - 1) * stride + 1) * itemsize
            else:
                span = 0
                for n, step in zip(shape, stride, strict=True):
                    if not n:
                        return None
                    span += (n - 1) * step
                size = (span + 1) * itemsize
            if size < self.threshold or ptr % itemsize:
                return None
            name, offset, lease = self._lease(ptr, size, dest, False, None, t)
            return (name, offset, size, lease, info.name, shape, stride)

        return lift_tensor

    rebuilders: Sequence[Callable[..., Any]] = tuple(rebuild for rebuild, _ in _REBUILDERS)
    """What a lifted value may be rebuilt with: :meth:`land` takes its index."""

    def _reduce_lifted(self, lifted: Lifted, pickler: Any) -> Any:
        data = lifted.data
        if len(data) < self.threshold or self.transfer == "inline":
            return NotImplemented  # an out-of-band frame, sent without a copy
        index = _batch(pickler).add(("bytes", id(data)), 0, len(data), True, memoryview(data))
        return (_rebuild_buffer, (index, 0, len(data), type(data).__name__))

    def _reduce_memoryview(self, mv: memoryview, pickler: Any) -> Any:
        if mv.nbytes < self.threshold or self.transfer == "inline":
            return NotImplemented
        batch = _batch(pickler)
        flat = mv.cast("B") if mv.contiguous else memoryview(mv.tobytes())
        try:
            lo = _shm.address(flat)
        except TypeError:  # read-only: copied from the view itself
            lo = 0
            index = batch.add(("bytes", id(mv)), 0, flat.nbytes, True, flat)
        else:
            index = batch.add(
                ("buffer", lo), lo, lo + flat.nbytes, id(mv) in batch.copy_ids, None, flat
            )
        return (_rebuild_buffer, (index, lo, flat.nbytes, "memoryview"))

    def _reduce_copy_on_send(self, wrapper: CopyOnSend, pickler: Any) -> Any:
        batch = _batch(pickler)
        if type(batch.copy_ids) is not set:
            batch.copy_ids = set()
        _collect_ids(wrapper.value, batch.copy_ids)  # type: ignore[arg-type]
        return (_same, (wrapper.value,))

    def _reduce_array(self, a: Any, pickler: Any) -> Any:
        extent = _kinds.array_extent(a)
        if extent is None:
            return NotImplemented
        dtype = a.dtype.str
        if a.size == 0:
            return (_kinds.empty_array, (dtype, a.shape, a.strides))
        batch = _batch(pickler)
        index = batch.add(extent.key, extent.lo, extent.hi, id(a) in batch.copy_ids, None, a)
        return (_rebuild_array, (index, extent.ptr, dtype, a.shape, a.strides, a.flags.writeable))

    @staticmethod
    def _tensor_reducer(torch: Any, on_device: Callable[[Any, Any, Any], Any]) -> Handler:
        # Runs for every tensor sent, and each torch call costs several
        # microseconds when caches are cold: it makes as few as it can.
        plain_tensor, strided = torch.Tensor, torch.strided
        infos, dtype_info, empty_tensor = _kinds.dtype_infos, _kinds.dtype_info, _kinds.empty_tensor

        def reduce_tensor(t: Any, pickler: Any) -> Any:
            info = infos.get(t.dtype) or dtype_info(t.dtype)
            if info.quantized or t.layout is not strided:
                return NotImplemented  # torch's own pickling
            if t.is_nested:
                # Its parts travel as tensors, and are made one again (a copy).
                # Not torch's own pickling: that expects its buffer to start
                # its storage, which a received buffer need not.
                return (_kinds.nested_tensor, (list(t.unbind()),))
            if not t.is_cpu:
                return on_device(t, info, pickler)
            batch = pickler.batch
            if batch is None:
                batch = pickler.batch = Batch()
            copy = id(t) in batch.copy_ids
            parameter = type(t) is not plain_tensor
            grad = t.requires_grad
            if grad:
                t = t.detach()  # the data travels; the graph does not
            conj = info.complex and t.is_conj()
            if t.is_neg():
                # A lazy negation (the imaginary part of a conjugate view): sent
                # as real data, a copy that must live until the batch is sealed.
                t = t.resolve_conj().resolve_neg()
                conj = False
                batch.keep.append(t)
            itemsize = info.itemsize
            shape = t.shape  # a tuple (torch.Size) that pickle and msgpack both take
            stride = t.stride()
            ptr = t.data_ptr()
            if len(shape) == 1:
                span = (shape[0] - 1) * stride[0]
                empty = not shape[0]
            else:
                span, empty = 0, False
                for n, step in zip(shape, stride, strict=True):
                    span += (n - 1) * step
                    empty = empty or not n
            if empty:
                return (empty_tensor, (info.name, shape, stride, grad, parameter))
            if ptr % itemsize:
                t = t.clone()  # a view at an address its dtype cannot sit at
                stride, ptr = t.stride(), t.data_ptr()
                batch.keep.append(t)
            # Views of one storage are one region: keyed by where the storage starts.
            key = ptr - t.storage_offset() * itemsize
            index = batch.add(key, ptr, ptr + (span + 1) * itemsize, copy, None, t)
            # A conjugate view travels as the memory it views, and is one again.
            return (_rebuild_tensor, (index, ptr, info.name, shape, stride, grad, parameter, conj))

        return reduce_tensor

    def _reduce_device_tensor(self, t: Any, info: Any, pickler: Any) -> Any:
        device = t.device
        ops = _devices.ops_for(device.type)
        if ops is None:
            return NotImplemented  # torch's own pickling (a copy through the message)
        batch = pickler.batch or _batch(pickler)
        parameter = type(t) is not sys.modules["torch"].Tensor
        grad = t.requires_grad
        copy = id(t) in batch.copy_ids
        if grad:
            t = t.detach()
        conj = info.complex and t.is_conj()
        if copy or t.is_neg():
            # A private copy (copy_on_send), or real data for a lazy negation;
            # queued on the device's stream, which the marker sealed later follows.
            lazy = conj or t.is_neg()
            t = t.resolve_conj().resolve_neg() if lazy else t.clone()
            conj = False
            batch.keep.append(t)
        storage = t.untyped_storage()
        shape, stride = tuple(t.shape), t.stride()
        if not storage.nbytes():
            return (_kinds.empty_tensor, (info.name, shape, stride, grad, parameter, str(device)))
        index = batch.add_device(device.type, device.index or 0, storage)
        meta = (info.name, shape, stride, t.storage_offset(), grad, parameter, conj)
        return (_rebuild_device_tensor, (index, *meta))

    def seal(self, batch: Batch, dest: bytes, *, encoded: bool = True) -> tuple[Any, list[Any]]:
        """The head describing ``batch``'s regions (msgpack, or the value to
        encode as part of a message if not ``encoded``), and the frames that
        carry some."""
        entries: list[tuple[Any, ...]] = []
        frames: list[Any] = []
        inline = self.transfer == "inline"
        threshold = self.threshold
        markers: dict[tuple[str, int], Any] = {}
        for group in batch.groups:
            if group.device is not None:
                entries.append(self._device_entry(group.device, dest, markers))
                continue
            origin = group.lo if group.view is not None else group.lo & -_ALIGN
            size = group.hi - origin
            if not inline and (size >= threshold or self._in_shared(group, origin)):
                # Big, or already shared (then always shared: writes stay seen).
                name, offset, lease = self._lease(
                    origin, size, dest, group.copy, group.view, group.obj
                )
                entries.append((_SHARED, origin, name, offset, size, lease))
            elif size < _HEAD_LIMIT:
                entries.append((_IN_HEAD, origin, self._read(group, origin, size)))
            else:
                entries.append((_IN_FRAME, origin, len(frames)))
                frames.append(self._read(group, origin, size))
        head = (len(frames), entries)
        return (_head_encode(head) if encoded else head), frames

    def _in_shared(self, group: _Group, origin: int) -> bool:
        if group.copy or group.view is not None or not self._starts:
            return False
        with self._lock:
            return self._find(origin, group.hi) is not None

    @staticmethod
    def _read(group: _Group, origin: int, size: int) -> bytes:
        if group.view is not None:
            return bytes(group.view)
        return _string_at(origin, size)

    def _lease(
        self,
        origin: int,
        size: int,
        dest: bytes,
        copy: bool = False,
        view: memoryview | None = None,
        obj: Any = None,
    ) -> tuple[str, int, int]:
        """Lease bytes ``[origin, origin + size)`` to ``dest``: the segment
        they lie in, where in it, and the lease. They are copied once into
        the arena first, unless they lie there already or in a segment
        received (then ``obj``, which views them, is what holds them), or
        ``copy`` says to, or they have no address (``view`` has them)."""
        self._lock.acquire()  # by hand: a with block costs three times more
        try:
            holder: Any = None
            where: Any = None
            if not copy and view is None:
                starts = self._starts
                i = bisect.bisect_right(starts, origin) - 1
                if i >= 0:
                    where = self._at[starts[i]]
                    if origin + size > where.addr + where.size:
                        where = None
            if type(where) is _Segment:
                holder = where
            elif type(where) is _Mapping:
                holder = obj  # received, sent on: the value holds that memory
            if holder is None:
                where = holder = self._alloc(size)
                if view is not None:
                    where.mv[:size] = view
                else:
                    _copy(where.addr, origin, size)
                offset = 0
            else:
                offset = origin - where.addr
            lease = self._leases_next()
            if type(holder) is _Segment:
                holder.holds += 1
            if dest in self._gone:  # the send will fail: nothing to hold for
                if type(holder) is _Segment:
                    self._unhold(holder)
            else:
                held = self._leases.get(dest)
                if held is None:
                    held = self._leases[dest] = {}
                held[lease] = holder
            return where.name, offset, lease
        finally:
            self._lock.release()

    def _device_entry(
        self, device: tuple[str, int, Any], dest: bytes, markers: dict[tuple[str, int], Any]
    ) -> tuple[Any, ...]:
        device_type, index, storage = device
        ops = _devices.ops_for(device_type)
        assert ops is not None
        with self._lock:
            origin = self._opened_from.get(id(storage))
        received = origin is not None and origin[0]() is storage
        back = None
        if received:
            assert origin is not None
            if origin[1] == dest:  # back to its owner, who has it
                back = origin[2]
            else:
                # Received from another process: only the owner can export it.
                # One copy, which this process then owns (and says so).
                _log.warning(
                    "atoll: a %s tensor storage received from another process is sent on "
                    "to a third: copied once (%d bytes) on %s:%d; send it from its owner "
                    "to avoid the copy",
                    device_type,
                    storage.nbytes(),
                    device_type,
                    index,
                )
                storage = storage.clone()
                markers.pop((device_type, index), None)  # recorded before this copy
        marker = markers.get((device_type, index))
        if marker is None:
            # After everything queued so far on this stream (copies made for
            # this message included): the receiver's stream waits for it.
            marker = markers[device_type, index] = ops.marker(index)
        if back is not None:
            return (_DEVICE_BACK, 0, device_type, index, marker, back)
        token = ops.export(storage)
        self._exported.put(ops.identity(token), storage)
        with self._lock:
            lease = self._leases_next()
            if dest not in self._gone:
                self._leases.setdefault(dest, {})[lease] = _DeviceHold(storage, ops, token)
                self._device_out += 1
        return (_DEVICE, 0, device_type, index, self.identity, token, marker, lease)

    def _open_device(self, src: bytes, entry: Sequence[Any]) -> Any:
        """The storage a device entry of a message from ``src`` stands for."""
        kind, _, device_type, index = entry[:4]
        ops = _devices.ops_for(device_type)
        if ops is None:
            raise SerializationError(
                f"a tensor on device {device_type!r} arrived, and this process cannot open "
                f"{device_type} memory of another process: send it as t.cpu()"
            )
        if kind == _DEVICE_BACK:
            marker, identity = entry[4], _hashable(entry[5])
            storage = self._exported.get(identity)
            if storage is None:
                raise SerializationError(
                    f"a {device_type} storage of this process came back after it was freed"
                )
            ops.wait(index, marker)
            return storage
        owner, token, marker, lease = entry[4:8]
        identity = _hashable(ops.identity(token))
        ours = owner == self.identity  # a message to ourselves
        storage = (self._exported if ours else self._opened).get(identity)
        # Nothing can fail once the token is opened or settled here: else its
        # lease goes back as unopened, and its sender settles it.
        try:
            ops.wait(index, marker)
            if storage is None:
                storage = ops.open(token)
            else:
                ops.settle(token)
        except Exception as exc:
            raise SerializationError(f"cannot open a {device_type} tensor: {exc}") from exc
        if ours:
            self._give_back(src, [lease])  # our own memory: nothing to hold
            return storage
        with self._lock:
            held = self._opened_from.get(id(storage))
            if held is None or held[0]() is not storage:
                ref = weakref.ref(storage, self._on_device_dead)
                held = self._opened_from[id(storage)] = (ref, owner, identity, [])
                self._opened_refs[id(ref)] = id(storage)
                self._opened.put(identity, storage)
            held[3].append((src, lease))
        return storage

    def _on_device_dead(self, ref: weakref.ref[Any]) -> None:
        # Any thread, any moment (as _on_dead): the last view of an opened
        # device storage is gone, and with it every lease it held.
        held = self._opened_from.pop(self._opened_refs.pop(id(ref), -1), None)
        if held is None or held[0] is not ref:
            return
        for src, lease in held[3]:
            self.dead.append((src, lease, _NO_OWNER))
        if not self._rung and not (self.serving and threading.get_ident() == self._loop):
            self._ring()

    def device_leases(self) -> int:
        """Leases peers hold on this process's device memory."""
        return self._device_out

    async def wait_device_leases(self) -> None:
        """Return once no peer holds a view of this process's device memory
        (which dies with it); bound the wait with a cancel scope."""
        while self._device_out:
            self._device_idle = anyio.Event()
            await self._device_idle.wait()

    def _find(self, lo: int, hi: int) -> _Segment | _Mapping | None:
        i = bisect.bisect_right(self._starts, lo) - 1
        if i >= 0:
            found = self._at[self._starts[i]]
            if hi <= found.addr + found.size:
                return found
        return None

    def _index(self, owner: _Segment | _Mapping) -> None:
        bisect.insort(self._starts, owner.addr)
        self._at[owner.addr] = owner

    def _unindex(self, owner: _Segment | _Mapping) -> None:
        del self._starts[bisect.bisect_left(self._starts, owner.addr)]
        del self._at[owner.addr]

    # -- the arena -----------------------------------------------------------

    def _alloc(self, nbytes: int) -> _Segment:
        """A free segment that holds ``nbytes`` (reused if one is warm)."""
        size = segment_size(nbytes)
        free = self._free.get(size)
        if free:
            self._free_bytes -= size
            return free.pop()
        while True:
            name = f"{self._prefix}{next(self._names)}"
            try:
                segment = _Segment(name, _shm.create(name, size))
                break
            except FileExistsError:
                continue
        self._segments[name] = segment
        self._index(segment)
        return segment

    def _unhold(self, segment: _Segment) -> None:
        segment.holds -= 1
        if segment.holds or segment.name not in self._segments:
            return
        self._free.setdefault(segment.size, []).append(segment)
        self._free_bytes += segment.size
        while self._free_bytes > self._pool_bytes:
            # Past the pool's size: give back free segments, biggest first.
            size = max(self._free)
            same = self._free[size]
            victim = same.pop(0)
            if not same:
                del self._free[size]
            self._free_bytes -= victim.size
            self._drop_segment(victim)

    def _drop_segment(self, segment: _Segment) -> None:
        del self._segments[segment.name]
        self._unindex(segment)
        _shm.unlink(segment.name)
        segment.close()

    def share(self, value: Any) -> Any:
        """Move an array or tensor into this process's arena (see :func:`atoll.share`)."""
        t = type(value)
        kind = _kind(t)
        if kind == "tensor" and _kinds.tensor_handled(value):
            return self._share_tensor(value)
        if kind == "array" and _kinds.array_extent(value) is not None:
            return self._share_array(value)
        if kind == "tensor" and _devices.ops_for(value.device.type) is not None:
            return value  # device memory always travels by handle: nothing to move
        raise TypeError(f"share() takes a numpy array or a CPU torch tensor, got {t.__qualname__}")

    def _fresh_base(self, nbytes: int, tensors: bool) -> tuple[Any, int]:
        with self._lock:
            segment = self._alloc(nbytes)
            return self._view(segment, None, 0, tensors, 0, nbytes), segment.addr

    def _share_tensor(self, t: Any) -> Any:
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0 or self._find_locked(storage.data_ptr(), storage.data_ptr() + nbytes):
            return t
        base, addr = self._fresh_base(nbytes, True)
        _copy(addr, storage.data_ptr(), nbytes)
        torch = sys.modules["torch"]
        with torch.no_grad():
            t.set_(_kinds.storage_of(base), t.storage_offset(), t.shape, t.stride())
        return t

    def _share_array(self, a: Any) -> Any:
        extent = _kinds.array_extent(a)
        assert extent is not None
        if a.size == 0 or self._find_locked(extent.lo, extent.hi):
            return a
        size = extent.hi - extent.lo
        base, addr = self._fresh_base(size, False)
        _copy(addr, extent.lo, size)
        return _kinds.rebuild_array(
            base, extent.ptr - extent.lo, a.dtype.str, a.shape, a.strides, True
        )

    def _find_locked(self, lo: int, hi: int) -> bool:
        with self._lock:
            return self._find(lo, hi) is not None

    # -- receiving -------------------------------------------------------

    def begin_load(self, src: bytes, head: bytes, frames: Sequence[Any]) -> tuple[Any, int]:
        """Get ready to unpickle a message whose regions ``head`` describes;
        returns what :meth:`end_load` takes, and how many of the last
        ``frames`` carry regions."""
        try:
            own, entries = _head_decode(head)
        except msgspec.DecodeError as exc:
            raise SerializationError(f"malformed tensor descriptors: {exc}") from exc
        if not 0 <= own <= len(frames):
            raise SerializationError("malformed tensor descriptors: frames are missing")
        incoming = _Incoming(self, src, entries, frames[len(frames) - own :])
        return (incoming, _incoming.set(incoming)), own

    def end_load(self, state: tuple[Any, Any]) -> None:
        incoming, token = state
        _incoming.reset(token)
        if len(incoming.bases) < len(incoming.entries):
            self._give_back(incoming.src, incoming.unused_leases())

    def discard(self, src: bytes, head: bytes | Sequence[Sequence[Any]]) -> None:
        """Give back the leases of a message from ``src`` that will not be
        read (its call was dropped, its caller gave up): its head, or the
        head's entries."""
        entries = _head_decode(head)[1] if isinstance(head, bytes) else head
        self._give_back(src, _leases_of(entries))

    def discard_one(self, src: bytes, fields: Sequence[Any]) -> None:
        """Likewise for a one-lifter's ``fields`` (see :meth:`land_one`)."""
        self._give_back(src, [fields[3]])

    def _give_back(self, src: bytes, leases: list[int]) -> None:
        """Leases of regions nothing was built on (a load that failed, a
        message not read): released with the next traffic."""
        if leases:
            self.dead.extend((src, lease, _NO_OWNER) for lease in leases)
            self._ring()

    def land(
        self, src: bytes, own: Any, entries: Any, frames: Sequence[Any], slots: Sequence[Any]
    ) -> list[Any]:
        """The values of a lifted message from ``src``: per slot (place,
        code, arguments), ``rebuilders[code](*arguments)``, or for code -1 the
        value of the slot at index ``arguments`` again. ``own`` and
        ``entries`` describe the regions (the head :meth:`seal` made, not
        encoded); ``frames`` are all the message's frames after its header."""
        if own != len(frames) or type(entries) is not list:
            raise SerializationError("malformed tensor descriptors")
        if len(slots) == 1 and len(entries) == 1 and entries[0][0] == _SHARED:
            _, code, args = slots[0]
            if _LANDERS[code] is _tensor_in:
                # One tensor in shared memory, the most common message that
                # carries any: what _Incoming and _tensor_in do, in one step.
                try:
                    region = self._shared_region(src, entries[0], True)
                except BaseException:
                    self._give_back(src, [entries[0][-1]])
                    raise
                return [_kinds.rebuild_tensor(region, *args[1:])]
        incoming = _Incoming(self, src, entries, frames)
        made: list[Any] = []
        try:
            for _, code, args in slots:
                made.append(made[args] if code < 0 else _LANDERS[code](incoming, *args))
        finally:
            if len(incoming.bases) < len(entries):
                self._give_back(incoming.src, incoming.unused_leases())
        return made

    def land_one(self, src: bytes, fields: Sequence[Any]) -> Any:
        """The tensor that a one-lifter's ``fields`` from ``src`` describe
        (see :meth:`one_lifter`)."""
        name, start, size, lease, dtype, shape, stride = fields
        try:
            buffer = self._attach(src, name, lease, True, start, size)
        except BaseException:
            self._give_back(src, [lease])
            raise
        return _kinds.tensor_over(buffer, dtype, shape, stride)

    def _shared_region(
        self, src: bytes, entry: Sequence[Any], tensors: bool
    ) -> tuple[Any, int, dict[Any, Any], int, int]:
        """The region a ``_SHARED`` entry from ``src`` describes, as
        ``_Incoming.bases`` holds it: over the region itself for tensors,
        else over the whole segment (see :meth:`_view`)."""
        _, origin, name, start, size, lease = entry
        buffer = self._attach(src, name, lease, tensors, start, size)
        if tensors:
            return (buffer, origin, {}, 0, size)
        return (buffer, origin - start, {}, start, size)

    def _attach(
        self, src: bytes, name: str, lease: int, tensors: bool, start: int, size: int
    ) -> Any:
        self._lock.acquire()  # by hand: a with block costs three times more
        try:
            mapping = self._mappings.get(name)
            if mapping is None:
                segment = self._segments.get(name)
                if segment is not None:  # our own memory, sent back to us
                    return self._view(segment, src, lease, tensors, start, size)
                try:
                    mapping = _Mapping(name, _shm.attach(name))
                except FileNotFoundError:
                    raise SerializationError(
                        f"shared memory {name} is gone: the process that sent it exited "
                        "before the message was read"
                    ) from None
                self._mappings[name] = mapping
                self._index(mapping)
            elif not mapping.live:
                self._unidle(mapping)
            return self._view(mapping, src, lease, tensors, start, size)
        finally:
            self._lock.release()

    def _view(
        self,
        owner: _Segment | _Mapping,
        src: bytes | None,
        lease: int,
        tensors: bool,
        start: int,
        size: int,
    ) -> Any:
        """A buffer whose life holds ``owner``'s memory: every view built on
        it keeps it, and its death is noted (lease ``lease`` of ``src`` is
        over).

        For tensors it is a memoryview of bytes [start, start + size) of it:
        torch keeps the very object it was given. numpy, and memoryviews
        sliced from it, would keep only the mmap under a memoryview, so for
        them it is a ctypes array over all of it (which they keep; it costs
        a few times more to make)."""
        base = owner.mv[start : start + size] if tensors else owner.array.from_buffer(owner.mm)
        watch = weakref.ref(base, self._on_dead)
        # Kept here until it fires: a weak reference that dies first never calls back.
        self._watched[id(watch)] = (watch, (src, lease, owner))
        if isinstance(owner, _Segment):
            owner.holds += 1
        else:
            owner.live += 1
        return base

    def _on_dead(self, watch: weakref.ref[Any]) -> None:
        # Any thread, any moment: queue it, ring, touch nothing else. On the
        # loop's thread during a call, the call's reply will drain the queue.
        self.dead.append(self._watched.pop(id(watch))[1])
        if not self._rung and not (self.serving and threading.get_ident() == self._loop):
            self._ring()

    def _ring(self) -> None:
        self._rung = True
        bell = self._bell
        if bell is not None:
            try:
                os.write(bell[1], b"\0")
            except OSError:
                pass  # full (already rung) or closed

    # -- releases, peers, lifecycle -------------------------------------

    def drain(self, keep_for: bytes | None = None) -> tuple[int, ...]:
        """Settle what finalizers noted; send the ``Unlease`` messages due,
        except those for ``keep_for``, which are returned for the caller to
        send with a message of its own."""
        dead = self.dead
        if not dead:
            return ()
        kept: list[int] = []
        out: dict[bytes, list[int]] = {}
        self._lock.acquire()  # by hand: a with block costs three times more
        try:
            while dead:
                src, lease, owner = dead.popleft()
                if type(owner) is _Segment:
                    self._unhold(owner)
                elif type(owner) is _Mapping:
                    owner.live -= 1
                    if not owner.live:
                        self._idle_mapping(owner)
                if src is None:
                    continue  # a view of our own memory: no peer to tell
                if src == keep_for:
                    kept.append(lease)
                else:
                    out.setdefault(src, []).append(lease)
        finally:
            self._lock.release()
        if out and self.send is not None:
            for src, leases in out.items():
                if src not in self._gone:
                    self.send(src, [m.encode(m.Unlease(tuple(leases)))])
        return tuple(kept)

    def _idle_mapping(self, mapping: _Mapping) -> None:
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

    def _unidle(self, mapping: _Mapping) -> None:
        if self._idle.pop(mapping.name, None) is not None:
            self._idle_bytes -= mapping.size

    def _unmap(self, mapping: _Mapping) -> None:
        del self._mappings[mapping.name]
        self._unindex(mapping)
        mapping.close()

    def unlease(self, peer: bytes, leases: Sequence[int]) -> None:
        """``peer`` dropped every view of these regions."""
        self._lock.acquire()  # by hand: a with block costs three times more
        try:
            held = self._leases.get(peer)
            if held is None:
                return
            for lease in leases:
                holder = held.pop(lease, None)
                if type(holder) is _Segment:
                    self._unhold(holder)
                elif type(holder) is _DeviceHold:
                    self._device_let_go()
                elif holder is None and lease < 0:  # a device token it never opened
                    holder = held.pop(-lease, None)
                    if type(holder) is _DeviceHold:
                        self._settle_unopened(holder)
                        self._device_let_go()
            # A forwarded region's view is let go here; its own finalizer
            # then unleases it upstream.
        finally:
            self._lock.release()

    def peer_gone(self, peer: bytes) -> int:
        """``peer`` died or left: what it leased is released. Returns how many
        of its device storages this process still has views of (their memory
        died with it)."""
        with self._lock:
            self._gone.add(peer)
            held = self._leases.pop(peer, {})
            for holder in held.values():
                if type(holder) is _Segment:
                    self._unhold(holder)
                elif type(holder) is _DeviceHold:
                    self._device_let_go()
            return sum(
                1
                for ref, owner, *_ in self._opened_from.values()
                if owner == peer and ref() is not None
            )

    @staticmethod
    def _settle_unopened(holder: _DeviceHold) -> None:
        try:
            holder.ops.settle(holder.token)
        except Exception as exc:  # its memory stays reserved until this process exits
            _log.warning("atoll: could not settle a device token its reader never opened: %r", exc)

    def _device_let_go(self) -> None:
        self._device_out -= 1
        if not self._device_out and self._device_idle is not None:
            self._device_idle.set()

    def forget_owner(self, name_prefix: str) -> None:
        """The process whose segments start with ``name_prefix`` is gone:
        unmap its segments once no view uses them, rather than keep them."""
        with self._lock:
            self._orphans.add(name_prefix)
            for mapping in [mp for mp in self._idle.values() if mp.name.startswith(name_prefix)]:
                self._unidle(mapping)
                self._unmap(mapping)

    async def serve(self) -> None:
        """Settle finalizers' notes as they come (run as a task)."""
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

    def stats(self) -> dict[str, int]:
        """What the plane holds now, for tests and for the curious."""
        with self._lock:
            return {
                "segments": len(self._segments),
                "segment_bytes": sum(s.size for s in self._segments.values()),
                "free_bytes": self._free_bytes,
                "leases": sum(len(held) for held in self._leases.values()),
                "mappings": len(self._mappings),
                "mapped_bytes": sum(mp.size for mp in self._mappings.values()),
                "device_leases": self._device_out,
                "device_storages_opened": len(self._opened_from),
            }

    def close(self) -> None:
        """Unlink this process's segments. Views still held stay valid: the
        memory goes when the last mapping of it does."""
        with self._lock:
            self._closed = True
            for segment in list(self._segments.values()):
                self._drop_segment(segment)
            self._free.clear()
            self._free_bytes = 0
            for mapping in list(self._mappings.values()):
                self._unmap(mapping)
            self._idle.clear()
            self._idle_bytes = 0
            self._leases.clear()


_NO_OWNER: Any = types.SimpleNamespace()


def _leases_of(entries: Iterable[Sequence[Any]]) -> list[int]:
    """The leases of region entries nothing was built on, as given back: a
    device token never opened as ``-lease``, for its sender to settle (what
    its export took for the reader, only the reader or the sender can give
    back, and the reader may have no device)."""
    return [
        entry[-1] if entry[0] == _SHARED else -entry[-1] for entry in entries if entry[0] in _LEASED
    ]


class _DeviceHold:
    """A lease's hold on a device storage of this process, and the token it
    was sent as (settled here if it comes back unopened)."""

    __slots__ = ("ops", "storage", "token")

    def __init__(self, storage: Any, ops: _devices.DeviceOps, token: tuple[Any, ...]) -> None:
        self.storage = storage
        self.ops = ops
        self.token = token


def _hashable(value: Any) -> Any:
    """``value`` with its lists made tuples (msgpack gives tuples back as lists)."""
    if type(value) is list:
        return tuple(_hashable(v) for v in value)
    return value
