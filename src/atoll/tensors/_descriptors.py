"""What a message says of the regions it carries: the entries of its head.

A message's *head* lists its *regions* (the memory of the arrays, tensors and
buffers in it), one entry each, in the order its values name them. Each
entry is a msgspec struct that travels as a short msgpack array whose first
item says which of them it is. ``origin`` is the region's address in the
sender: a view at sender address ``p`` lies at offset ``p - origin``.

Decoding is typed: a head whose entries are not these is rejected as a
whole, before anything is built on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from .._errors import SerializationError


class InHead(msgspec.Struct, array_like=True, tag=0):
    """A small region, copied into the head."""

    origin: int
    data: bytes


class InFrame(msgspec.Struct, array_like=True, tag=1):
    """A region copied into a frame of the message of its own."""

    origin: int
    frame: int
    """Index among the frames the head owns (the message's last ones)."""


class Shared(msgspec.Struct, array_like=True, tag=2):
    """A region in a shared-memory segment of the sender's (or of a process
    the sender received it from), leased to the receiver."""

    origin: int
    segment: str
    offset: int
    size: int
    lease: int


class OnDevice(msgspec.Struct, array_like=True, tag=3):
    """A storage in device memory, opened from its owner's token."""

    device_type: str
    device: int
    owner: bytes
    """Node identity of the process that owns the storage."""
    token: Any
    marker: Any
    """What the receiver's stream waits for before it reads the storage."""
    lease: int


class BackOnDevice(msgspec.Struct, array_like=True, tag=4):
    """A device storage of the receiver's own, sent back to it: found there
    again by ``identity``."""

    device_type: str
    device: int
    marker: Any
    identity: Any


Entry = InHead | InFrame | Shared | OnDevice | BackOnDevice


class Head(msgspec.Struct, array_like=True):
    """The regions of one message."""

    frames: int
    """How many of the message's last frames carry regions (:class:`InFrame`)."""
    entries: list[Entry]


encode_head = msgspec.msgpack.Encoder().encode
_decode_head = msgspec.msgpack.Decoder(Head).decode


def decode_head(data: bytes) -> Head:
    try:
        return _decode_head(data)
    except msgspec.DecodeError as exc:
        raise SerializationError(f"malformed tensor descriptors: {exc}") from exc


def leases_of(entries: Iterable[Entry]) -> list[int]:
    """The leases of entries nothing was built on, as given back: a device
    token never opened as ``-lease``, for its sender to settle (what its
    export took for the reader, only the reader or the sender can give back,
    and the reader may have no device)."""
    leases = []
    for entry in entries:
        if type(entry) is Shared:
            leases.append(entry.lease)
        elif type(entry) is OnDevice:
            leases.append(-entry.lease)
    return leases


def hashable(value: Any) -> Any:
    """``value`` with its lists made tuples (msgpack gives tuples back as lists)."""
    if type(value) is list:
        return tuple(hashable(v) for v in value)
    return value
