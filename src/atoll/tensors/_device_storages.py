"""Tensors in device memory: their storages exported to peers as tokens,
opened from peers' tokens, and found again when they come back.

A device storage travels as a token of its owner's (a CUDA IPC handle, see
``_devices``) under a lease, with a *marker* the receiver's stream waits for
(so it never reads before the sender's queued work is done). Only the owner
can export a storage: one received from a peer and sent to a third process
is copied once. One sent back to its owner is found in the owner's table
again, by its identity.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from .._errors import SerializationError
from . import _devices
from ._descriptors import BackOnDevice, OnDevice, hashable
from ._leases import DeviceHold, Leases
from ._views import Views

_log = logging.getLogger(__name__)


class DeviceStorages:
    """The device storages this process exported, and those it opened."""

    def __init__(self, leases: Leases, views: Views, lock: threading.Lock) -> None:
        self._leases = leases
        self._views = views
        self._lock = lock
        self.identity = b""
        """This process's node identity: who owns the storages it exports."""
        self._exported = _devices.StorageTable()  # our storages others hold
        self._opened = _devices.StorageTable()  # storages others own, by identity
        # Per storage opened here, by id: (its weak reference, which fires
        # when its last view dies; owner; identity; leases it holds).
        self._opened_from: dict[
            int, tuple[weakref.ref[Any], bytes, Any, list[tuple[bytes | None, int]]]
        ] = {}
        self._opened_refs: dict[int, int] = {}  # id of the weak reference: id of the storage

    def entry(
        self, device: tuple[str, int, Any], dest: bytes, markers: dict[tuple[str, int], Any]
    ) -> OnDevice | BackOnDevice:
        """Describe storage ``device`` = (type, index, storage) for ``dest``;
        ``markers`` are the message's, one per device stream."""
        device_type, index, storage = device
        ops = _devices.ops_for(device_type)
        assert ops is not None
        with self._lock:
            origin = self._opened_from.get(id(storage))
        back = None
        if origin is not None and origin[0]() is device[2]:
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
            return BackOnDevice(device_type, index, marker, back)
        token = ops.export(storage)
        self._exported.put(ops.identity(token), storage)
        lease = self._leases.lease_device(dest, DeviceHold(storage, ops, token))
        return OnDevice(device_type, index, self.identity, token, marker, lease)

    def open(self, src: bytes, entry: OnDevice | BackOnDevice) -> Any:
        """The storage a device entry of a message from ``src`` stands for."""
        device_type, index = entry.device_type, entry.device
        ops = _devices.ops_for(device_type)
        if ops is None:
            raise SerializationError(
                f"a tensor on device {device_type!r} arrived, and this process cannot open "
                f"{device_type} memory of another process: send it as t.cpu()"
            )
        if type(entry) is BackOnDevice:
            storage = self._exported.get(hashable(entry.identity))
            if storage is None:
                raise SerializationError(
                    f"a {device_type} storage of this process came back after it was freed"
                )
            ops.wait(index, entry.marker)
            return storage
        assert type(entry) is OnDevice
        identity = hashable(ops.identity(entry.token))
        ours = entry.owner == self.identity  # a message to ourselves
        storage = (self._exported if ours else self._opened).get(identity)
        # Nothing can fail once the token is opened or settled here: else its
        # lease goes back as unopened, and its sender settles it.
        try:
            ops.wait(index, entry.marker)
            if storage is None:
                storage = ops.open(entry.token)
            else:
                ops.settle(entry.token)
        except Exception as exc:
            raise SerializationError(f"cannot open a {device_type} tensor: {exc}") from exc
        if ours:
            self._views.give_back(src, [entry.lease])  # our own memory: nothing to hold
            return storage
        with self._lock:
            held = self._opened_from.get(id(storage))
            if held is None or held[0]() is not storage:
                ref = weakref.ref(storage, self._on_dead)
                held = self._opened_from[id(storage)] = (ref, entry.owner, identity, [])
                self._opened_refs[id(ref)] = id(storage)
                self._opened.put(identity, storage)
            held[3].append((src, entry.lease))
        return storage

    def _on_dead(self, ref: weakref.ref[Any]) -> None:
        # Any thread, any moment: the last view of an opened storage is gone,
        # and with it every lease it held.
        held = self._opened_from.pop(self._opened_refs.pop(id(ref), -1), None)
        if held is None or held[0] is not ref:
            return
        for src, lease in held[3]:
            self._views.note((src, lease, None))

    def views_of(self, peer: bytes) -> int:
        """How many storages owned by ``peer`` this process has views of."""
        with self._lock:
            return sum(
                1
                for ref, owner, *_ in self._opened_from.values()
                if owner == peer and ref() is not None
            )

    def opened(self) -> int:
        return len(self._opened_from)
