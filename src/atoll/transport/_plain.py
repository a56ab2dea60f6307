"""The plain wire: values that travel without pickle, for untrusted peers.

Whatever an untrusted actor sends is read without ever unpickling: its
values travel as msgpack, with msgpack extension types for what msgpack has
no word for. Reading a plain payload runs no code of the sender's choosing:
it builds builtin values, and calls only what the receiver named itself,
*rebuilders* (the tensor plane's, refs and callbacks) and *wire types* the
application registered (:func:`wire_type`), each by name.

A plain payload is one byte, :data:`FIRST_BYTE`, then msgpack:
``[head, value]``, ``head`` the sidecar's regions (the tensor plane's) or
None. Inside ``value``:

======  ================================  ====================================
code    extension                         carries
======  ================================  ====================================
1, 2,   tuple, set, frozenset             msgpack array of the items
3
4       complex                           ``[real, imag]``
5       int beyond 64 bits                its decimal digits
6, 7    bytearray, memoryview             the bytes
8       dict whose keys are not all str   ``[[key, value], ...]``
9       a rebuilt value                   ``[rebuilder's name, [arguments]]``
10      a registered wire type            ``[its name, its plain form]``
======  ================================  ====================================

Reading is bounded (:class:`PlainLimits`): payload bytes, nesting depth and
items in all; anything malformed is a :class:`~atoll.ProtocolError` for that
payload alone.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from .._errors import ProtocolError, SerializationError

FIRST_BYTE = 0x01
"""What a plain payload starts with (a pickle stream starts with 0x80)."""

UNTRUSTED = b"u"
"""What the identity of an untrusted peer starts with: a node reads what
such a peer sends with the plain wire only. (The hub proves identities.)"""
SANDBOXED = b"s"
"""What the identity of a sandboxed peer starts with: untrusted too, and its
tensors travel inside the messages (it sees no shared memory but its own)."""
UNTRUSTED_MARKS = frozenset({UNTRUSTED, SANDBOXED})
"""First bytes of the identities whose payloads are read plain only:
``src[:1] in UNTRUSTED_MARKS``."""

_TUPLE, _SET, _FROZENSET, _COMPLEX, _BIG_INT, _BYTEARRAY, _MEMORYVIEW, _DICT = range(1, 9)
_REBUILT, _WIRE_TYPE = 9, 10


@dataclasses.dataclass(frozen=True)
class PlainLimits:
    """Bounds on what reading one plain payload may take."""

    max_bytes: int = 1 << 30
    """The payload's size (the bytes of tensors in shared memory do not count)."""
    max_depth: int = 64
    """Containers nested in containers."""
    max_items: int = 10_000_000
    """Items of all containers together."""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_Ext = msgspec.msgpack.Ext


@dataclasses.dataclass(frozen=True)
class _WireType:
    name: str
    to_plain: Callable[[Any], Any]
    from_plain: Callable[[Any], Any]


_wire_types: dict[type, _WireType] = {}
_wire_names: dict[str, _WireType] = {}


def wire_type(
    cls: type,
    convert: tuple[Callable[[Any], Any], Callable[[Any], Any]] | None = None,
    *,
    name: str | None = None,
) -> type:
    """Let values of ``cls`` travel on the plain wire (to and from untrusted
    actors), by name. Register it on both sides, under the same name.

    A msgspec Struct, a dataclass or an enum needs nothing else; any other
    class needs ``convert=(to_plain, from_plain)``: ``to_plain(value)`` makes
    plain values of it (what the plain wire carries), ``from_plain(plain)``
    the value again. Usable as a class decorator.
    """
    if not isinstance(cls, type):
        raise TypeError(f"wire_type() takes a class, got {cls!r}")
    key = name or f"{cls.__module__}.{cls.__qualname__}"
    if convert is not None:
        to_plain, from_plain = convert
    elif issubclass(cls, enum.Enum):
        to_plain, from_plain = (lambda v: v.value), cls
    elif issubclass(cls, msgspec.Struct) or dataclasses.is_dataclass(cls):
        to_plain = msgspec.to_builtins

        def from_plain(plain: Any, cls: type = cls) -> Any:
            return msgspec.convert(plain, cls)
    else:
        raise TypeError(
            f"wire_type({cls.__qualname__}): not a msgspec Struct, dataclass or enum; "
            "give convert=(to_plain, from_plain)"
        )
    registered = _WireType(key, to_plain, from_plain)
    _wire_types[cls] = registered
    _wire_names[key] = registered
    return cls


class Encoder:
    """Stands in for a pickler while the plane's reducers run (``batch``)."""

    __slots__ = ("batch",)

    def __init__(self) -> None:
        self.batch: Any = None


Reduce = Callable[[Any, Any], Any]
"""``reduce(value, encoder)``: ``(rebuilder, arguments)``, or NotImplemented."""

_EXACT = (type(None), bool, float, str, bytes)


def to_wire(
    value: Any,
    reducer_for: Callable[[type], Reduce | None],
    names: dict[Any, str],
    encoder: Encoder,
    what: str,
    mark: Callable[[Any], Any] = lambda v: v,
) -> Any:
    """``value`` as what msgpack encodes (extensions for the rest). The
    reducer ``reducer_for(type)`` names, if any, reduces a value to one of
    the rebuilders in ``names`` (by function: its name) and its arguments."""
    memo: dict[int, Any] = {}  # containers in progress: a cycle is refused

    def walk(v: Any, depth: int) -> Any:
        t = type(v)
        if t in _EXACT:
            return v
        if t is int:
            return v if -(1 << 63) <= v < 1 << 64 else _Ext(_BIG_INT, str(v).encode())
        if depth > 100:
            raise SerializationError(f"cannot send the {what}: nested more than 100 deep")
        if t is list or t is tuple or t is set or t is frozenset or t is dict:
            if id(v) in memo:
                raise SerializationError(
                    f"cannot send the {what} on the plain wire: it contains itself"
                )
            memo[id(v)] = v
            try:
                if t is list:
                    return [walk(x, depth + 1) for x in v]
                if t is dict:
                    if all(type(k) is str for k in v):
                        return {k: walk(x, depth + 1) for k, x in v.items()}
                    pairs = [[walk(k, depth + 1), walk(x, depth + 1)] for k, x in v.items()]
                    return _Ext(_DICT, _encode(pairs))
                code = _TUPLE if t is tuple else _SET if t is set else _FROZENSET
                return _Ext(code, _encode([walk(x, depth + 1) for x in v]))
            finally:
                del memo[id(v)]
        if t is complex:
            return _Ext(_COMPLEX, _encode([v.real, v.imag]))
        if t is bytearray:
            return _Ext(_BYTEARRAY, bytes(v))
        if t is memoryview:
            return _Ext(_MEMORYVIEW, v.tobytes())
        marked = mark(v)
        if marked is not v:  # a callable sent as a callback
            v, t = marked, type(marked)
        registered = _wire_types.get(t)
        if registered is not None:
            return _Ext(_WIRE_TYPE, _encode([registered.name, walk(registered.to_plain(v), 0)]))
        reduce = reducer_for(t)
        if reduce is not None:
            reduced = reduce(v, encoder)
            if reduced is not NotImplemented:
                name = names.get(reduced[0])
                if name is not None:
                    # Shapes may be tuples of a type of their own (torch.Size).
                    args = [
                        walk(tuple(a) if isinstance(a, tuple) else a, depth + 1) for a in reduced[1]
                    ]
                    return _Ext(_REBUILT, _encode([name, args]))
        raise SerializationError(
            f"cannot send the {what}: a {t.__module__}.{t.__qualname__} cannot travel on the "
            "plain wire (this actor is untrusted). Send plain values (None, bool, int, float, "
            "complex, str, bytes, list, tuple, dict, set), arrays and tensors, refs and "
            f"callbacks; or register the type on both sides: atoll.wire_type({t.__qualname__})"
            " for a msgspec Struct, dataclass or enum, or with convert=(to_plain, from_plain)"
        )

    return walk(value, 0)


_PREFIX = bytes((FIRST_BYTE,))


def dumps(tree: Any, head: bytes | None) -> bytes:
    """A plain payload: ``tree`` (from :func:`to_wire`) and the sidecar's head."""
    return _PREFIX + _encode((head, tree))


def split(data: bytes | memoryview, limits: PlainLimits) -> tuple[bytes | None, Any]:
    """The head and the raw value of a plain payload (checked, not built)."""
    if len(data) > limits.max_bytes:
        raise ProtocolError(
            f"a plain payload of {len(data)} bytes is over the limit ({limits.max_bytes})"
        )
    try:
        outer = _decode(memoryview(data)[1:])
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed plain payload: {exc}") from None
    if type(outer) is not list or len(outer) != 2:
        raise ProtocolError("malformed plain payload: not [head, value]")
    head, value = outer
    if head is not None and type(head) is not bytes:
        raise ProtocolError("malformed plain payload: its head is not bytes")
    return head, value


def from_wire(
    raw: Any, rebuilders: Callable[[str], Callable[..., Any] | None], limits: PlainLimits
) -> Any:
    """The value a plain payload's raw value stands for."""
    items = 0

    def build(v: Any, depth: int) -> Any:
        nonlocal items
        t = type(v)
        if t in _EXACT or t is int:
            return v
        if depth > limits.max_depth:
            raise ProtocolError(f"a plain value nested more than {limits.max_depth} deep")
        if t is list:
            items += len(v)
            if items > limits.max_items:
                raise ProtocolError(f"a plain value of more than {limits.max_items} items")
            return [build(x, depth + 1) for x in v]
        if t is dict:
            items += len(v)
            if items > limits.max_items:
                raise ProtocolError(f"a plain value of more than {limits.max_items} items")
            return {k: build(x, depth + 1) for k, x in v.items()}
        if t is not _Ext:
            raise ProtocolError(f"malformed plain value: a {t.__name__}")
        return extension(v.code, v.data, depth + 1)

    def inner(data: bytes, depth: int) -> Any:
        try:
            return _decode(data)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise ProtocolError(f"malformed plain value: {exc}") from None

    def listed(data: bytes, depth: int) -> list[Any]:
        found = inner(data, depth)
        if type(found) is not list:
            raise ProtocolError("malformed plain value: an extension without its items")
        built = build(found, depth)
        assert type(built) is list
        return built

    def extension(code: int, data: bytes, depth: int) -> Any:
        if code == _TUPLE:
            return tuple(listed(data, depth))
        if code in (_SET, _FROZENSET):
            try:
                return (set if code == _SET else frozenset)(listed(data, depth))
            except TypeError as exc:  # an unhashable item
                raise ProtocolError(f"malformed plain set: {exc}") from None
        if code == _DICT:
            pairs = listed(data, depth)
            try:
                return {k: x for k, x in pairs}
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"malformed plain dict: {exc}") from None
        if code == _COMPLEX:
            parts = listed(data, depth)
            if len(parts) != 2 or not all(type(p) in (int, float) for p in parts):
                raise ProtocolError("malformed plain complex")
            return complex(parts[0], parts[1])
        if code == _BIG_INT:
            if len(data) > 4300 or not data.lstrip(b"-").isdigit():
                raise ProtocolError("malformed plain int")
            return int(data)
        if code == _BYTEARRAY:
            return bytearray(data)
        if code == _MEMORYVIEW:
            return memoryview(bytearray(data))
        if code in (_REBUILT, _WIRE_TYPE):
            named = listed(data, depth)
            if len(named) != 2 or type(named[0]) is not str:
                raise ProtocolError("malformed plain value: a named extension without its name")
            name, args = named
            if code == _WIRE_TYPE:
                registered = _wire_names.get(name)
                if registered is None:
                    raise ProtocolError(
                        f"a value of type {name!r} arrived, which is not registered here: "
                        "register it with atoll.wire_type() in this process too"
                    )
                try:
                    return registered.from_plain(args)
                except Exception as exc:
                    raise ProtocolError(f"a malformed {name}: {exc}") from None
            rebuild = rebuilders(name)
            if rebuild is None or type(args) is not list:
                raise ProtocolError(f"a value rebuilt by {name!r}, which nothing here rebuilds")
            try:
                return rebuild(*args)
            except (ProtocolError, SerializationError):
                raise
            except Exception as exc:
                raise ProtocolError(f"malformed arguments for {name}: {exc!r}") from None
        raise ProtocolError(f"malformed plain value: extension {code}")

    return build(raw, 0)


def rebuilder_names(functions: Sequence[Callable[..., Any]]) -> dict[Any, str]:
    """Rebuilders by function, named by module and qualified name."""
    return {fn: f"{fn.__module__}.{fn.__qualname__}" for fn in functions}


_rebuilders: dict[str, Callable[..., Any]] = {}
"""What a plain value may name to be rebuilt: atoll's own, by name."""


def plain_rebuilder(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Let plain values name ``fn`` to be rebuilt (a decorator, for atoll's
    own rebuilders only: what a payload may call)."""
    _rebuilders[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return fn


class Sidecar(Protocol):
    """What the plain wire needs of the tensor plane (see ``_codec.Sidecar``)."""

    def reducer(self, t: type) -> Reduce | None: ...

    def seal(self, batch: Any, dest: bytes) -> tuple[bytes, list[Any]]: ...

    def begin_load(self, src: bytes, head: bytes, frames: Sequence[Any]) -> tuple[Any, int]: ...

    def end_load(self, state: Any) -> None: ...


class PlainWire:
    """Sends and reads plain payloads for one process."""

    def __init__(
        self,
        reducers: dict[type, Callable[[Any], Any]],
        sidecar: Sidecar | None,
        limits: PlainLimits | None = None,
    ) -> None:
        self._reducers = reducers
        self._sidecar = sidecar
        self.limits = limits or PlainLimits()
        self._names = {fn: name for name, fn in _rebuilders.items()}
        self._found: dict[type, Reduce | None] = {}

    def _reducer_for(self, t: type) -> Reduce | None:
        found = self._found.get(t, _NOT_LEARNT)
        if found is _NOT_LEARNT:
            reducer = self._reducers.get(t)
            if reducer is not None:
                found = _by_value(reducer)
            elif self._sidecar is not None and self._sidecar.reducer(t) is not None:
                found = self._sidecar.reducer(t)
            else:
                found = _own_reduce
            self._found[t] = found
        return found  # type: ignore[no-any-return]

    def dumps(
        self, value: Any, mark: Callable[[Any], Any], what: str, dest: bytes
    ) -> tuple[bytes, list[Any]]:
        """``value`` as a plain payload for ``dest``, and the frames after it."""
        t = type(value)
        if t in _EXACT or (t is int and -(1 << 63) <= value < 1 << 64):
            return _PREFIX + _encode((None, value)), []  # a scalar: nothing to walk
        if len(self._names) != len(_rebuilders):  # registered since
            self._names = {fn: name for name, fn in _rebuilders.items()}
        encoder = Encoder()
        tree = to_wire(value, self._reducer_for, self._names, encoder, what, mark)
        if encoder.batch is None:
            return dumps(tree, None), []
        assert self._sidecar is not None
        head, frames = self._sidecar.seal(encoder.batch, dest)
        return dumps(tree, head), frames

    def loads(self, data: bytes, buffers: Sequence[Any], what: str, src: bytes) -> Any:
        """The value of a plain payload from ``src``."""
        head, raw = split(data, self.limits)
        if type(raw) in _EXACT or type(raw) is int:
            if head is not None or buffers:
                raise ProtocolError(f"malformed {what}: frames beside a value that has none")
            return raw  # a scalar: nothing to build
        if head is None:
            if buffers:
                raise ProtocolError(f"malformed {what}: frames beside a value that has none")
            return from_wire(raw, _rebuilders.get, self.limits)
        if self._sidecar is None:
            raise ProtocolError(f"the {what} holds tensors, and nothing here reads them")
        state, _ = self._sidecar.begin_load(src, head, buffers)
        try:
            return from_wire(raw, _rebuilders.get, self.limits)
        finally:
            self._sidecar.end_load(state)


_NOT_LEARNT: Any = object()


def _by_value(reducer: Callable[[Any], Any]) -> Reduce:
    return lambda value, encoder: reducer(value)


def _own_reduce(value: Any, encoder: Any) -> Any:
    """What a value's own ``__reduce__`` says (only a registered rebuilder
    will do: see :func:`to_wire`)."""
    try:
        reduced = value.__reduce__()
    except Exception:
        return NotImplemented
    return reduced if type(reduced) is tuple and len(reduced) == 2 else NotImplemented
