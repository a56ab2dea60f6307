"""Tensors in device memory (CUDA): what the plane needs of a device type.

A tensor on a device travels as a *token* for its storage, never as its
bytes: for CUDA, the IPC handle of the allocation its storage lies in (what
``UntypedStorage._share_cuda_`` makes, as torch's own multiprocessing
does), which the receiver opens as a storage of the same memory. The plane
(``_plane``) does the rest as for shared memory: leases held by the sender,
released when the receiver's last view of the storage dies or when it dies;
a storage sent back to its owner is found again rather than opened; a
received storage sent on travels as its owner's token.

Order of work: each message with device tensors carries, per device, a
*marker* recorded on the sender's current stream after everything it queued
so far (a CUDA interprocess event); the receiver's current stream waits for
it before anything can read the tensors. So a kernel that writes a tensor
just before the send is finished before the receiver reads it, without
blocking either process's host thread.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Protocol


class DeviceOps(Protocol):
    """How storages of one device type cross processes."""

    def export(self, storage: Any) -> tuple[Any, ...]:
        """A token another process can open as ``storage``'s memory. Called
        once per send (a CUDA token holds a per-send reference count)."""

    def identity(self, token: tuple[Any, ...]) -> Any:
        """What tells the storage a token is for apart from others (hashable)."""

    def open(self, token: tuple[Any, ...]) -> Any:
        """A storage over the memory of a token from another process."""

    def settle(self, token: tuple[Any, ...]) -> None:
        """A token whose storage is already open here (or is ours): let go
        of what its export took for the reader."""

    def marker(self, device: int) -> Any:
        """Something recorded on ``device``'s current stream now."""

    def wait(self, device: int, marker: Any) -> None:
        """Make ``device``'s current stream wait for ``marker``."""


_ops: dict[str, DeviceOps] = {}

_OPENED_EVENTS = 64
"""Peers' interprocess events kept open here (one per peer and device), the
most recently used; one dropped is opened again if its peer sends again."""


def register(device_type: str, ops: DeviceOps) -> None:
    """Carry tensors on ``device_type`` with ``ops`` (tests register a fake
    for the ``meta`` device; CUDA is registered on first use)."""
    _ops[device_type] = ops


def ops_for(device_type: str) -> DeviceOps | None:
    ops = _ops.get(device_type)
    if ops is None and device_type == "cuda":
        ops = _ops["cuda"] = CudaOps(sys.modules["torch"])
    return ops


class CudaOps:
    """CUDA IPC through torch: memory handles and interprocess events."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self._events: dict[int, Any] = {}  # ours, one per device, recorded per send
        self._opened_events: dict[bytes, Any] = {}
        self._ready = False

    def _check(self) -> None:
        """CUDA is there to open what peers send (the first time, say why not)."""
        torch = self.torch
        if not torch.cuda.is_available():
            raise RuntimeError(
                "a CUDA tensor arrived, and this process has no CUDA device "
                f"(torch {torch.__version__}); send it as t.cpu(), or give this actor a GPU"
            )
        torch.cuda._lazy_init()
        self._ready = True

    def export(self, storage: Any) -> tuple[Any, ...]:
        # (device, handle, size, offset in the allocation, ref counter handle,
        # ref counter offset, event handle, event sync required)
        return tuple(storage._share_cuda_())

    def identity(self, token: tuple[Any, ...]) -> Any:
        return (token[1], token[3])  # the allocation's handle, the storage's offset in it

    def open(self, token: tuple[Any, ...]) -> Any:
        if not self._ready:
            self._check()
        return self.torch.UntypedStorage._new_shared_cuda(*token)

    def settle(self, token: tuple[Any, ...]) -> None:
        device, _, _, _, counter, counter_offset = token[:6]
        self.torch.UntypedStorage._release_ipc_counter(counter, counter_offset, device=device)

    def marker(self, device: int) -> Any:
        torch = self.torch
        event = self._events.get(device)
        if event is None:
            with torch.cuda.device(device):
                event = self._events[device] = torch.cuda.Event(interprocess=True)
        event.record(torch.cuda.current_stream(device))
        return event.ipc_handle()

    def wait(self, device: int, marker: Any) -> None:
        if not self._ready:
            self._check()
        torch = self.torch
        opened = self._opened_events
        event = opened.pop(marker, None)
        if event is None:
            event = torch.cuda.Event.from_ipc_handle(device, marker)
            if len(opened) >= _OPENED_EVENTS:  # those of peers gone, most likely
                del opened[next(iter(opened))]
        opened[marker] = event
        torch.cuda.current_stream(device).wait_event(event)


class StorageTable:
    """Storages by token identity, weakly: a storage this process exported
    (sent back to it, it is found again) or opened (sent again, it is the
    same storage)."""

    def __init__(self) -> None:
        self._by_identity: dict[Any, weakref.ref[Any]] = {}

    def get(self, identity: Any) -> Any:
        ref = self._by_identity.get(identity)
        return None if ref is None else ref()

    def put(self, identity: Any, storage: Any) -> None:
        def forget(_: Any, identity: Any = identity) -> None:
            if self._by_identity.get(identity) is ref:
                del self._by_identity[identity]

        ref = weakref.ref(storage, forget)
        self._by_identity[identity] = ref
