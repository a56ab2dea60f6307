"""Messages of tensors and plain values, encoded without pickle.

The messages that carry tensors are most often tensors as arguments with a
few plain ones, or a tensor (or a tuple of them) as a result. Such a value
is *lifted*: it travels as msgpack (one of the structs here), with a slot
per tensor (where it goes, its rebuilder's index in
:data:`~._receiving.REBUILDERS`, that rebuilder's arguments) and the head of
its regions. Pickling and unpickling the same costs several times more (the
pickler's machinery, and the rebuilders' lookup by name). A tensor alone, or
among scalar arguments, needs even less: its fields only (:class:`Alone`).

Anything else (another type, a container holding tensors, an int msgpack
cannot carry exactly) is left to the pickler: :meth:`Lifting.encode`
returns None.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from .._errors import SerializationError
from ..transport._codec import OOB_THRESHOLD, SCALARS, Handler, is_plain
from ._descriptors import Head
from ._receiving import REBUILDERS, Receiver
from ._sending import Sender, carried_as

_ITEMS = 64
"""Longer tuples, lists and dicts are left to the pickler."""
_LEARNT_TYPES = 4096
"""How many types' reducers are remembered (it starts over past that)."""

# What a lifted value is: the one value itself; a tuple or list of values;
# call arguments (a tuple of values, and a dict of them by name).
WHOLE, TUPLE, LIST, CALL = range(4)


class Values(msgspec.Struct, array_like=True, tag=0):
    """A lifted value: plain items and slots for the plane's values."""

    shape: int
    """WHOLE, TUPLE, LIST or CALL."""
    first: Any
    """The items (positional arguments for CALL), slots' places left None."""
    second: dict[str, Any] | None
    """Named arguments (CALL only)."""
    head: Head
    slots: list[tuple[int | str | None, int, Any]]
    """Per value of the plane's: where it goes, its rebuilder's index (or
    -1: the value of the slot at index ``arguments`` again), arguments."""


class Alone(msgspec.Struct, array_like=True, tag=1):
    """One CPU tensor in shared memory, the whole value."""

    segment: str
    offset: int
    size: int
    lease: int
    dtype: str
    shape: int | list[int]
    stride: int | list[int]


class AloneInArgs(Alone, tag=2):
    """Positional arguments: scalars, and one CPU tensor in shared memory."""

    at: int
    items: list[Any]
    """The arguments, the tensor's place left None."""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Values | Alone | AloneInArgs).decode

FIRST_BYTES = range(0x91, 0x9F)
"""What a lifted payload starts with: msgpack's short arrays (a pickle
stream starts with 0x80)."""

_UNFIT: Any = object()
"""An item only the pickler can take."""


def _utf8(text: str) -> bool:
    """Whether msgpack can carry ``text`` (no lone surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _carried(v: Any) -> bool:
    """Whether msgpack carries ``v``, a scalar or short ``bytes``, exactly:
    not ints past 64 bits, strings with lone surrogates, or complex."""
    t = type(v)
    if t is int:
        return bool(-(1 << 63) <= v < 1 << 64)
    if t is str:
        return _utf8(v)
    if t is bytes:
        return len(v) < OOB_THRESHOLD
    return t is float or t is bool or v is None


class _Walk:
    """Goes through the items of a value: notes a slot per value the plane
    reduces, and whether all the rest is plain. It stands in for the
    pickler the reducers expect (``batch``)."""

    __slots__ = ("batch", "containers", "lifting", "plain", "seen", "slots")

    def __init__(self, lifting: Lifting) -> None:
        self.lifting = lifting
        self.batch: Any = None
        self.slots: list[Any] = []
        self.seen: dict[int, int] = {}
        self.containers = False  # plain tuples, lists or dicts met
        self.plain = True  # nothing but scalars, short bytes and such containers

    def items(self, items: Sequence[Any]) -> list[Any] | None:
        if len(items) > _ITEMS:
            return None
        out = []
        for i, v in enumerate(items):
            v = self.one(v, i)
            if v is _UNFIT:
                return None
            out.append(v)
        return out

    def one(self, v: Any, at: Any) -> Any:
        """``v`` if msgpack carries it as it is; None, its slot noted, if the
        plane reduces it; else ``_UNFIT``."""
        t = type(v)
        if t in SCALARS or t is bytes:
            return v if _carried(v) else _UNFIT
        if t is tuple or t is list or t is dict:
            if not is_plain(v):
                return _UNFIT
            self.containers = True
            return v
        first = self.seen.get(id(v))
        if first is not None:  # the same object again: the same object arrives
            self.slots.append((at, -1, first))
            return None
        lifting = self.lifting
        try:
            reducer = lifting.reducers[t]
        except KeyError:
            reducer = lifting.learn(t)
        if reducer is None:
            return _UNFIT
        reduced = reducer(v, self)
        if reduced is NotImplemented:
            return _UNFIT
        code = lifting.codes.get(reduced[0])
        if code is None:
            return _UNFIT
        self.plain = False
        self.seen[id(v)] = len(self.slots)
        self.slots.append((at, code, reduced[1]))
        return None


_Describe = Callable[[Any, bytes], tuple[Any, ...] | None]


class Lifting:
    """Encodes and decodes lifted values for one plane."""

    def __init__(self, sender: Sender, receiver: Receiver) -> None:
        self._sender = sender
        self._receiver = receiver
        self.reducers: dict[type, Handler | None] = {}
        self.codes = {fn: i for i, fn in enumerate(REBUILDERS)}
        self._alone: dict[type, _Describe | None] = {}

    def learn(self, t: type) -> Handler | None:
        if len(self.reducers) >= _LEARNT_TYPES:
            self.reducers.clear()  # types made on the fly: do not keep them all alive
        found = self.reducers[t] = self._sender.reducer(t)
        return found

    def _describer(self, t: type) -> _Describe | None:
        found = self._alone.get(t, _UNFIT)
        if found is _UNFIT:
            # A plain tensor only (not a Parameter).
            plain_tensor = carried_as(t) == "tensor" and t is sys.modules["torch"].Tensor
            found = self._alone[t] = self._sender.tensor_alone() if plain_tensor else None
        return found  # type: ignore[no-any-return]

    def encode_args(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], dest: bytes
    ) -> tuple[bytes, list[Any]] | None:
        """Call arguments for ``dest`` lifted, or None: pickle them."""
        if not kwargs:
            done = self._alone_in_args(args, dest)
            if done is not None:
                return done
        walk = _Walk(self)
        items = walk.items(args)
        if items is None or len(kwargs) > _ITEMS:
            return None
        named: dict[str, Any] = {}
        for k, v in kwargs.items():
            v = named[k] = walk.one(v, k)
            if v is _UNFIT or not _utf8(k):
                return None
        return self._finish(walk, CALL, items, named, (args, kwargs), dest)

    def encode(self, value: Any, dest: bytes) -> tuple[bytes, list[Any]] | None:
        """A value (a result, a stream item) for ``dest`` lifted, or None."""
        t = type(value)
        describe = self._describer(t)
        if describe is not None:
            fields = describe(value, dest)  # may lease: nothing may fail after it
            if fields is not None:
                return _encode(Alone(*fields)), []
        walk = _Walk(self)
        if t is tuple or t is list:
            items = walk.items(value)
            if items is None:
                return None
            return self._finish(walk, TUPLE if t is tuple else LIST, items, None, value, dest)
        if walk.one(value, None) is _UNFIT:
            return None
        return self._finish(walk, WHOLE, None, None, value, dest)

    def _alone_in_args(self, args: tuple[Any, ...], dest: bytes) -> tuple[bytes, list[Any]] | None:
        at = -1  # where the one argument that is not a scalar is
        for i, v in enumerate(args):
            if not _carried(v):
                if at >= 0:
                    return None  # a second one
                at = i
        if at < 0:
            return None
        describe = self._describer(type(args[at]))
        if describe is None:
            return None
        fields = describe(args[at], dest)  # may lease: nothing may fail after it
        if fields is None:
            return None
        items = list(args)
        items[at] = None
        segment, offset, size, lease, dtype, shape, stride = fields
        alone = AloneInArgs(segment, offset, size, lease, dtype, shape, stride, at, items)
        return _encode(alone), []

    def _finish(
        self, walk: _Walk, shape: int, first: Any, second: Any, obj: Any, dest: bytes
    ) -> tuple[bytes, list[Any]] | None:
        if walk.plain:
            return pickle.dumps(obj, 5), []  # nothing of the plane's after all
        if walk.containers:
            return None  # msgpack would make their tuples lists: the pickler takes them
        if walk.batch is None:  # only values rebuilt from their description (empty ones)
            head, frames = Head(0, []), list[Any]()
        else:
            head, frames = self._sender.seal(walk.batch, dest)
        return _encode(Values(shape, first, second, head, walk.slots)), frames

    def decode(self, data: bytes, frames: Sequence[Any], src: bytes) -> Any:
        """The value (or for arguments, ``(args, kwargs)``) a lifted payload
        from ``src`` carries."""
        try:
            lifted = _decode(data)
        except msgspec.DecodeError as exc:
            raise SerializationError(f"malformed lifted value: {exc}") from exc
        if type(lifted) is not Values:
            if frames:
                raise SerializationError("frames beside a value that has none")
            tensor = self._receiver.alone(src, lifted)  # type: ignore[arg-type]
            if type(lifted) is Alone:
                return tensor
            items = lifted.items  # type: ignore[union-attr]
            at = lifted.at  # type: ignore[union-attr]
            if not 0 <= at < len(items):
                raise SerializationError("malformed lifted value: no such argument")
            items[at] = tensor
            return tuple(items), {}
        slots = lifted.slots
        made = self._receiver.land(src, lifted.head.frames, lifted.head.entries, frames, slots)
        shape, first, second = lifted.shape, lifted.first, lifted.second
        if shape == WHOLE:
            return made[0]
        try:
            if shape == CALL:
                for (at, _, _), value in zip(slots, made, strict=True):
                    if type(at) is str:
                        second[at] = value  # type: ignore[index]
                    else:
                        first[at] = value
                return tuple(first), second
            for (at, _, _), value in zip(slots, made, strict=True):
                first[at] = value
        except (TypeError, IndexError, KeyError) as exc:
            raise SerializationError(f"malformed lifted value: {exc!r}") from exc
        return tuple(first) if shape == TUPLE else first

    def discard(self, data: bytes, src: bytes) -> None:
        """Give back what a lifted payload from ``src`` that will not be
        read leases."""
        try:
            lifted = _decode(data)
        except msgspec.DecodeError:
            return  # not a payload atoll made: it leases nothing
        if type(lifted) is Values:
            self._receiver.discard(src, lifted.head.entries)
        else:
            self._receiver.views.give_back(src, [lifted.lease])  # type: ignore[union-attr]
