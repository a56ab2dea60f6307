"""The tensor plane: arrays, tensors and big buffers travel beside the messages.

One :class:`Plane` per process, the facade over its parts, each a module
with one job (each uses only those listed before it):

========================  ====================================================
``_shm``                  segments in ``/dev/shm``: create, attach, unlink
``_adapters``             numpy arrays and torch tensors: extents, rebuilding
``_devices``              device memory (CUDA IPC): export, open, markers
``_descriptors``          the head of a message: one entry per region
``_arena``                this process's segments and its mappings of others'
``_views``                bases of views, their deaths, ``Unlease`` messages
``_leases``               what each peer holds of this process's memory
``_device_storages``      device storages sent and received
``_receiving``            values rebuilt over the regions of a message
``_sending``              values reduced, their regions sealed into a head
``_lifting``              tensors and plain values without pickle
========================  ====================================================

The codec sees the plane as its :class:`~atoll.transport._codec.Sidecar`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..transport._codec import Handler
from . import _adapters, _devices
from ._arena import POOL_BYTES, Arena, copy
from ._descriptors import decode_head, encode_head, leases_of
from ._device_storages import DeviceStorages
from ._leases import Leases
from ._lifting import Lifting
from ._receiving import Receiver
from ._sending import Batch, Sender, carried_as
from ._views import Views

TRANSFERS = ("shared_memory", "inline")
"""How regions above the inline threshold travel: see ``open_host(transfer=...)``."""

SHM_THRESHOLD = 1 << 16
"""Regions at least this big go through shared memory; smaller ones are copied
into the message. ``benchmarks/bench_tensors.py`` measures the crossover: on a
2-core machine shared memory wins from 64 KiB, and at 16 KiB the copy does."""


def check_transfer(transfer: str) -> str:
    if transfer not in TRANSFERS:
        raise ValueError(
            f"transfer must be one of {', '.join(map(repr, TRANSFERS))}, got {transfer!r}"
        )
    return transfer


class Plane:
    """One process's side of the tensor plane."""

    def __init__(
        self,
        name_prefix: str,
        *,
        transfer: str = "shared_memory",
        threshold: int = SHM_THRESHOLD,
        pool_bytes: int = POOL_BYTES,
        shm_limit: int | None = None,
        share_only_with: bytes | None = None,
    ) -> None:
        self.transfer = check_transfer(transfer)
        self.arena = Arena(name_prefix, pool_bytes, shm_limit)
        self.views = Views(self.arena)
        self._gone = self.views.gone
        self.leases = Leases(self.arena, self._gone)
        self.devices = DeviceStorages(self.leases, self.views, self.arena.lock)
        self.receiver = Receiver(self.arena, self.views, self.devices)
        self.sender = Sender(
            self.arena, self.leases, self.devices, transfer=transfer, threshold=threshold
        )
        self.sender.only_to = share_only_with
        self._lifting = Lifting(self.sender, self.receiver)
        self.dead = self.views.dead
        """Notes of views that died, not settled yet: read it (cheaply)
        before calling :attr:`drain`, which settles them."""
        self.drain = self.views.drain
        """Settle the views that died, send the ``Unlease`` messages due, and
        return those for ``keep_for`` (sent with a message of the caller's):
        ``drain(keep_for=None)``."""

    def connect(self, identity: bytes, send: Callable[[bytes, list[Any]], None]) -> None:
        """Name this process's node (``identity``: who owns the device
        storages it exports) and how to send a peer a message."""
        self.devices.identity = identity
        self.views.send = send

    # -- the per-call path (see Node) ----------------------------------

    def call_started(self) -> None:
        """A call is served on the loop's thread: views that die meanwhile
        ring no bell, as its reply (or its end) drains."""
        self.views.serving += 1

    def call_ended(self) -> None:
        views = self.views
        views.serving -= 1
        if views.dead:
            views.drain()

    async def serve(self) -> None:
        """Settle the views that die as they do (run as a task)."""
        await self.views.serve()

    # -- the codec's sidecar ---------------------------------------------

    def reducer(self, t: type) -> Handler | None:
        """What reduces an array, tensor or buffer of type ``t`` while
        pickling, or None."""
        return self.sender.reducer(t)

    def seal(self, batch: Batch, dest: bytes) -> tuple[bytes, list[Any]]:
        """The head of a pickled message's regions, and the frames that carry some."""
        head, frames = self.sender.seal(batch, dest)
        return encode_head(head), frames

    def begin_load(self, src: bytes, head: bytes, frames: Sequence[Any]) -> tuple[Any, int]:
        return self.receiver.begin_load(src, head, frames)

    def end_load(self, state: Any) -> None:
        self.receiver.end_load(state)

    def discard(self, src: bytes, head: bytes) -> None:
        """Give back the leases of a pickled message from ``src`` that will
        not be read (its call was dropped, its caller gave up)."""
        self.views.give_back(src, leases_of(decode_head(head).entries))

    def encode(self, value: Any, dest: bytes) -> tuple[bytes, list[Any]] | None:
        """``value`` encoded without pickle, or None (see ``_lifting``)."""
        return self._lifting.encode(value, dest)

    def encode_args(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], dest: bytes
    ) -> tuple[bytes, list[Any]] | None:
        return self._lifting.encode_args(args, kwargs, dest)

    def decode(self, data: bytes, frames: Sequence[Any], src: bytes) -> Any:
        return self._lifting.decode(data, frames, src)

    def discard_encoded(self, data: bytes, src: bytes) -> None:
        self._lifting.discard(data, src)

    # -- peers and lifetime ------------------------------------------------

    def unlease(self, peer: bytes, leases: Sequence[int]) -> None:
        """``peer`` dropped every view of these regions."""
        self.leases.unlease(peer, leases)

    def peer_gone(self, peer: bytes) -> int:
        """``peer`` died or left: what it leased is released. Returns how many
        of its device storages this process still has views of (their memory
        died with it)."""
        self._gone.add(peer)
        self.leases.peer_gone(peer)
        return self.devices.views_of(peer)

    def peer_replaced(self, peer: bytes) -> None:
        """``peer`` died and a new process takes its identity: what the old
        one leased is released; the new one is no stranger."""
        self.leases.peer_gone(peer)

    def forget_owner(self, name_prefix: str) -> None:
        """The process whose segments start with ``name_prefix`` is gone:
        unmap its segments once no view uses them, rather than keep them."""
        with self.arena.lock:
            self.arena.forget_owner(name_prefix)

    def device_leases(self) -> int:
        """Leases peers hold on this process's device memory."""
        return self.leases.device_out

    async def wait_device_leases(self) -> None:
        """Return once no peer holds a view of this process's device memory
        (which dies with it); bound the wait with a cancel scope."""
        await self.leases.wait_device_idle()

    def share(self, value: Any) -> Any:
        """Move an array or tensor into this process's arena (see :func:`atoll.share`)."""
        t = type(value)
        carried = carried_as(t)
        if carried == "tensor" and _adapters.tensor_handled(value):
            return self._share_tensor(value)
        if carried == "array" and _adapters.array_extent(value) is not None:
            return self._share_array(value)
        if carried == "tensor" and _devices.ops_for(value.device.type) is not None:
            return value  # device memory always travels by handle: nothing to move
        raise TypeError(f"share() takes a numpy array or a CPU torch tensor, got {t.__qualname__}")

    def _fresh_base(self, nbytes: int, tensors: bool) -> tuple[Any, int]:
        with self.arena.lock:
            segment = self.arena.alloc(nbytes)
            return self.views.base(segment, None, 0, tensors, 0, nbytes), segment.addr

    def _share_tensor(self, t: Any) -> Any:
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0 or self.arena.find_locked(storage.data_ptr(), storage.data_ptr() + nbytes):
            return t
        base, addr = self._fresh_base(nbytes, True)
        copy(addr, storage.data_ptr(), nbytes)
        with sys.modules["torch"].no_grad():
            t.set_(_adapters.storage_of(base), t.storage_offset(), t.shape, t.stride())
        return t

    def _share_array(self, a: Any) -> Any:
        extent = _adapters.array_extent(a)
        assert extent is not None
        if a.size == 0 or self.arena.find_locked(extent.lo, extent.hi):
            return a
        size = extent.hi - extent.lo
        base, addr = self._fresh_base(size, False)
        copy(addr, extent.lo, size)
        return _adapters.rebuild_array(
            base, extent.ptr - extent.lo, a.dtype.str, a.shape, a.strides, True
        )

    def stats(self) -> dict[str, int]:
        """What the plane holds now, for tests and for the curious."""
        with self.arena.lock:
            return {
                **self.arena.stats(),
                "leases": self.leases.count(),
                "device_leases": self.leases.device_out,
                "device_storages_opened": self.devices.opened(),
            }

    def close(self) -> None:
        """Unlink this process's segments. Views still held stay valid: the
        memory goes when the last mapping of it does."""
        with self.arena.lock:
            self.arena.close()
            self.leases.clear()
