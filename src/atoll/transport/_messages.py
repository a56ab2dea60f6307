"""Wire messages: the header frame of every multipart message.

A message is ``[header, *buffers]``; the header is one of the structs below,
msgpack-encoded as a tagged array. ``payload`` fields hold a pickle stream whose
out-of-band buffers are the message's remaining frames.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

WIRE_VERSION = 5


class _Msg(msgspec.Struct, tag=True, frozen=True, array_like=True, gc=False):
    pass


class Hello(_Msg, frozen=True):
    """First message of a child: proves it is the process the host started."""

    secret: bytes
    pid: int
    version: int


class Call(_Msg, frozen=True):
    """Run ``method`` on object ``target`` of the receiving process.

    ``parent`` is the call this one was made from (0: none) and ``chain`` the
    root of the whole call chain, which decides re-entrancy. ``credit`` > 0
    asks for a stream and is its initial window. ``trace``: the caller's
    span context when calls are traced (see ``actors._tracing``).
    """

    call_id: int
    parent: int
    chain: int
    target: int
    method: str
    payload: bytes
    credit: int = 0
    trace: bytes = b""


class Result(_Msg, frozen=True):
    """``unleased``: leases the replier gives back (see :class:`Unlease`),
    settled before the result is delivered."""

    call_id: int
    payload: bytes
    unleased: tuple[int, ...] = ()


class Error(_Msg, frozen=True):
    call_id: int
    payload: bytes


class Cancel(_Msg, frozen=True):
    call_id: int


class StreamItem(_Msg, frozen=True):
    call_id: int
    payload: bytes


class StreamEnd(_Msg, frozen=True):
    call_id: int


class Credit(_Msg, frozen=True):
    call_id: int
    n: int


class Release(_Msg, frozen=True):
    """The sender dropped ``count`` references to exported object ``oid``."""

    oid: int
    count: int


class Unlease(_Msg, frozen=True):
    """The sender dropped every view of the shared-memory regions it was lent
    under these leases: the lender may reuse their memory."""

    leases: tuple[int, ...]


class Died(_Msg, frozen=True):
    """Host to children: an actor process is gone; fail what waits on it.
    ``restarting``: a new process takes its place under the same identity
    (what is sent to it meanwhile waits for that one)."""

    actor: bytes
    payload: bytes
    restarting: bool = False


class Bye(_Msg, frozen=True):
    """Host to child: stop now. Child to host: stopping, but first waiting up
    to ``hold`` seconds for peers to drop their views of its device memory
    (which dies with it): the host's grace stretches to match."""

    hold: float = 0.0


Message = (
    Hello
    | Call
    | Result
    | Error
    | Cancel
    | StreamItem
    | StreamEnd
    | Credit
    | Release
    | Unlease
    | Died
    | Bye
)

encode = msgspec.msgpack.Encoder().encode
decode: Callable[[Any], Message] = msgspec.msgpack.Decoder(Message).decode
"""Decode a header from any buffer (bytes, a zmq.Frame)."""
DecodeError = msgspec.DecodeError
