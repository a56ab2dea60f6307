"""Sending: the regions of a message noted while it is encoded, then sealed
into its head.

While a message is pickled (or lifted, see ``_lifting``), every numpy
array, CPU tensor and large byte buffer in it is reduced to a rebuilder
(see ``_receiving``) and noted in the message's :class:`Batch` with where
its bytes lie; views of one allocation are grouped into one *region*, so
they arrive as views of one buffer again. When the message is encoded, each
region is sealed into an entry of the head (see ``_descriptors``):

- small regions are copied into the head or into a frame of their own;
- a region that already lies in shared memory (this process's arena, or a
  segment received from a peer) is leased as it is, at no cost that depends
  on its size;
- any other region is copied once into a segment of the arena, and leased.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

from ..transport._codec import Handler, Lifted
from ..transport._plain import SANDBOXED, plain_rebuilder
from . import _adapters, _devices, _shm
from ._arena import Arena
from ._descriptors import Entry, Head, InFrame, InHead, Shared
from ._device_storages import DeviceStorages
from ._leases import Leases
from ._receiving import rebuild_array, rebuild_buffer, rebuild_device_tensor, rebuild_tensor

V = TypeVar("V")

HEAD_LIMIT = 8192
"""Regions smaller than this travel inside the head rather than as a frame."""

_ALIGN = 64

_string_at = ctypes.string_at


class Group:
    """One region of a message: views of one allocation."""

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

    def read(self, origin: int, size: int) -> bytes:
        if self.view is not None:
            return bytes(self.view)
        return _string_at(origin, size)


_NO_IDS: frozenset[int] = frozenset()


class Batch:
    """The regions of one message being encoded."""

    __slots__ = ("copy_ids", "groups", "keep", "keys")

    def __init__(self) -> None:
        self.groups: list[Group] = []
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
            self.groups.append(Group(lo, hi, copy, view, obj))
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
            group = Group(0, 0, False, None)
            group.device = (device_type, device, storage)
            self.groups.append(group)
            self.keep.append(storage)
        return index


def batch_of(encoder: Any) -> Batch:
    """The regions noted so far while ``encoder`` (a pickler, or what
    stands in for one) runs."""
    batch = encoder.batch
    if batch is None:
        batch = encoder.batch = Batch()
    return batch  # type: ignore[no-any-return]


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


@plain_rebuilder
def _same(value: Any) -> Any:
    return value


def carried_as(t: type) -> str | None:
    """How the plane carries a value of type ``t`` by its memory ("tensor"
    or "array"), or None."""
    module = t.__module__
    if module == "numpy":
        return "array" if t is sys.modules["numpy"].ndarray else None
    if module.startswith("torch"):
        torch = sys.modules["torch"]
        if t is torch.Tensor or t is torch.nn.Parameter:
            return "tensor"
    return None


class Sender:
    """Reduces values to rebuilders while noting their regions, and seals
    the regions of a message into its head."""

    def __init__(
        self,
        arena: Arena,
        leases: Leases,
        devices: DeviceStorages,
        *,
        transfer: str,
        threshold: int,
    ) -> None:
        self._arena = arena
        self._leases = leases
        self._devices = devices
        self.transfer = transfer
        self.threshold = threshold
        self.only_to: bytes | None = None
        """Set in a sandboxed process: the one peer it may share memory with."""
        self._types: dict[type, Handler] = {
            memoryview: self._reduce_memoryview,
            Lifted: self._reduce_lifted,
            CopyOnSend: self._reduce_copy_on_send,
        }

    def copies_to(self, dest: bytes) -> bool:
        """Whether regions for ``dest`` travel inside the message. A
        sandboxed peer sees no shared memory but what its host links into
        its folder; a sandboxed process shares only with its host."""
        if self.transfer == "inline":
            return True
        if self.only_to is not None:
            return dest != self.only_to
        return dest[:1] == SANDBOXED and dest not in self._arena.boxes

    def reducer(self, t: type) -> Handler | None:
        """What reduces an array, tensor or buffer of type ``t``, or None."""
        carried = carried_as(t)
        if carried == "tensor":
            return self._tensor_reducer(sys.modules["torch"])
        if carried == "array":
            return self._reduce_array
        return self._types.get(t)

    def _reduce_lifted(self, lifted: Lifted, encoder: Any) -> Any:
        data = lifted.data
        if len(data) < self.threshold or self.transfer == "inline":
            return NotImplemented  # an out-of-band frame, sent without a copy
        index = batch_of(encoder).add(("bytes", id(data)), 0, len(data), True, memoryview(data))
        return (rebuild_buffer, (index, 0, len(data), type(data).__name__))

    def _reduce_memoryview(self, mv: memoryview, encoder: Any) -> Any:
        if mv.nbytes < self.threshold or self.transfer == "inline":
            return NotImplemented
        batch = batch_of(encoder)
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
        return (rebuild_buffer, (index, lo, flat.nbytes, "memoryview"))

    def _reduce_copy_on_send(self, wrapper: CopyOnSend, encoder: Any) -> Any:
        batch = batch_of(encoder)
        if type(batch.copy_ids) is not set:
            batch.copy_ids = set()
        _collect_ids(wrapper.value, batch.copy_ids)  # type: ignore[arg-type]
        return (_same, (wrapper.value,))

    def _reduce_array(self, a: Any, encoder: Any) -> Any:
        extent = _adapters.array_extent(a)
        if extent is None:
            return NotImplemented
        dtype = a.dtype.str
        if a.size == 0:
            return (_adapters.empty_array, (dtype, a.shape, a.strides))
        batch = batch_of(encoder)
        index = batch.add(extent.key, extent.lo, extent.hi, id(a) in batch.copy_ids, None, a)
        return (rebuild_array, (index, extent.ptr, dtype, a.shape, a.strides, a.flags.writeable))

    def _tensor_reducer(self, torch: Any) -> Handler:
        # Runs for every tensor sent, and each torch call costs several
        # microseconds when caches are cold: it makes as few as it can.
        plain_tensor, strided = torch.Tensor, torch.strided
        infos, dtype_info = _adapters.dtype_infos, _adapters.dtype_info
        empty_tensor, tensor_span = _adapters.empty_tensor, _adapters.tensor_span
        on_device = self._reduce_device_tensor

        def reduce_tensor(t: Any, encoder: Any) -> Any:
            info = infos.get(t.dtype) or dtype_info(t.dtype)
            if info.quantized or t.layout is not strided:
                return NotImplemented  # torch's own pickling
            if t.is_nested:
                # Its parts travel as tensors, and are made one again (a copy).
                # Not torch's own pickling: that expects its buffer to start
                # its storage, which a received buffer need not.
                return (_adapters.nested_tensor, (list(t.unbind()),))
            if not t.is_cpu:
                return on_device(t, info, encoder)
            batch = encoder.batch
            if batch is None:
                batch = encoder.batch = Batch()
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
            span = tensor_span(shape, stride)
            if span < 0:
                return (empty_tensor, (info.name, shape, stride, grad, parameter))
            ptr = t.data_ptr()
            if ptr % itemsize:
                t = t.clone()  # a view at an address its dtype cannot sit at
                stride, ptr = t.stride(), t.data_ptr()
                batch.keep.append(t)
            # Views of one storage are one region: keyed by where the storage starts.
            key = ptr - t.storage_offset() * itemsize
            index = batch.add(key, ptr, ptr + (span + 1) * itemsize, copy, None, t)
            # A conjugate view travels as the memory it views, and is one again.
            return (rebuild_tensor, (index, ptr, info.name, shape, stride, grad, parameter, conj))

        return reduce_tensor

    def _reduce_device_tensor(self, t: Any, info: Any, encoder: Any) -> Any:
        device = t.device
        if _devices.ops_for(device.type) is None:
            return NotImplemented  # torch's own pickling (a copy through the message)
        batch = batch_of(encoder)
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
            return (
                _adapters.empty_tensor,
                (info.name, shape, stride, grad, parameter, str(device)),
            )
        index = batch.add_device(device.type, device.index or 0, storage)
        meta = (info.name, shape, stride, t.storage_offset(), grad, parameter, conj)
        return (rebuild_device_tensor, (index, *meta))

    def seal(self, batch: Batch, dest: bytes) -> tuple[Head, list[Any]]:
        """The head describing ``batch``'s regions, and the frames that carry some."""
        entries: list[Entry] = []
        frames: list[Any] = []
        inline = self.copies_to(dest)
        threshold = self.threshold
        markers: dict[tuple[str, int], Any] = {}
        for group in batch.groups:
            if group.device is not None:
                entries.append(self._devices.entry(group.device, dest, markers))
                continue
            origin = group.lo if group.view is not None else group.lo & -_ALIGN
            size = group.hi - origin
            if not inline and (size >= threshold or self._in_shared(group, origin)):
                # Big, or already shared (then always shared: writes stay seen).
                name, offset, lease = self._leases.lease(
                    origin, size, dest, group.copy, group.view, group.obj
                )
                entries.append(Shared(origin, name, offset, size, lease))
            elif size < HEAD_LIMIT:
                entries.append(InHead(origin, group.read(origin, size)))
            else:
                entries.append(InFrame(origin, len(frames)))
                frames.append(group.read(origin, size))
        return Head(len(frames), entries), frames

    def _in_shared(self, group: Group, origin: int) -> bool:
        if group.copy or group.view is not None:
            return False
        return self._arena.find_locked(origin, group.hi)

    def tensor_alone(self) -> Callable[[Any, bytes], tuple[Any, ...] | None]:
        """What describes a plain CPU tensor that is the only value of a
        message the plane carries, as flat fields (see ``_lifting``), or
        returns None where the general way must take it."""
        infos, dtype_info = _adapters.dtype_infos, _adapters.dtype_info
        lease = self._leases.lease

        def describe(t: Any, dest: bytes) -> tuple[Any, ...] | None:
            # The most common message that carries any: one plain CPU tensor
            # big enough for shared memory. It is a region of its own, from
            # its first byte, so it needs no batch, head or slot; the
            # general path takes the rest (autograd, conjugate and negative
            # views, parameters, small or empty tensors, other layouts).
            if self.copies_to(dest):
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
            span = _adapters.tensor_span(shape, stride)
            if span < 0:
                return None
            size = (span + 1) * itemsize
            if size < self.threshold or ptr % itemsize:
                return None
            if len(shape) == 1:
                shape, stride = shape[0], stride[0]  # 1-d: plain ints
            name, offset, lease_no = lease(ptr, size, dest, False, None, t)
            return (name, offset, size, lease_no, info.name, shape, stride)

        return describe
