"""Encoding of arguments and results: pickle protocol 5, buffers out of band.

Buffers of at least ``OOB_THRESHOLD`` bytes (numpy arrays, ``PickleBuffer``,
``memoryview``, large ``bytes``/``bytearray``) leave the pickle stream and
travel as extra ZeroMQ frames, sent without a copy. cloudpickle is used only
where plain pickle cannot work: lambdas, closures, and classes or functions
defined in ``__main__`` (which the receiving process cannot import).
"""

from __future__ import annotations

import io
import pickle
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from .._errors import AtollError, ProtocolError, SerializationError
from ._plain import FIRST_BYTE, UNTRUSTED_MARKS, PlainWire

OOB_THRESHOLD = 8192
"""Buffers smaller than this stay inside the pickle stream (a frame costs more)."""

_LIFT_SCAN_LIMIT = 64
"""Containers longer than this are not scanned for large ``bytes`` to lift."""

Reducer = Callable[[Any], Any]
"""A hook returning a ``__reduce__`` tuple for runtime objects, or ``NotImplemented``."""

Handler = Callable[[Any, Any], Any]
"""What the pickler runs for an object of one type: ``handler(obj, pickler)``
returns a ``__reduce__`` tuple, or ``NotImplemented`` for pickle's own way."""

_LEARNT_TYPES = 4096
"""How many types' handlers a codec remembers (it starts over past that)."""

_HEADED = 0
"""First byte of a payload that starts with a sidecar head (a pickle stream
starts with the PROTO opcode, 0x80), followed by the head's length (4 bytes)."""
_PICKLED = 0x80
"""First byte of a pickle stream (the PROTO opcode)."""
SIDECAR_ENCODED = range(0x91, 0x9F)
"""First bytes of a payload the sidecar encoded itself (see
:meth:`Sidecar.encode`): msgpack's short arrays."""


class Sidecar(Protocol):
    """Carries some values beside the pickle stream (the tensor plane), or
    instead of it.

    While pickling, ``reducer`` names once per type what reduces its objects
    (or None); a reducer may keep what it needs in ``pickler.batch``.
    ``seal`` turns a batch into a head and extra frames (sent after the
    pickle's own) once the pickle is complete. A stream with such a head is
    unpickled between ``begin_load`` (which says how many of the last frames
    are the sidecar's) and ``end_load``.

    Before any of that, the codec offers the sidecar the whole value
    (``encode``, ``encode_args``): a value of plain items and the sidecar's
    own, the sidecar may encode by itself, faster, into a payload that
    starts with one of :data:`SIDECAR_ENCODED`; ``decode`` reads it.
    """

    def reducer(self, t: type) -> Handler | None: ...

    def seal(self, batch: Any, dest: bytes) -> tuple[bytes, list[Any]]: ...

    def begin_load(self, src: bytes, head: bytes, frames: Sequence[Any]) -> tuple[Any, int]: ...

    def end_load(self, state: Any) -> None: ...

    def discard(self, src: bytes, head: bytes) -> None:
        """Give back what a pickled message that will not be read leases."""
        ...

    def encode(self, value: Any, dest: bytes) -> tuple[bytes, list[Any]] | None: ...

    def encode_args(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], dest: bytes
    ) -> tuple[bytes, list[Any]] | None: ...

    def decode(self, data: bytes, frames: Sequence[Any], src: bytes) -> Any: ...

    def discard_encoded(self, data: bytes, src: bytes) -> None:
        """Give back what a payload of the sidecar's that will not be read leases."""
        ...


_V = TypeVar("_V")


def _remember(learnt: dict[type, _V], t: type, found: _V) -> _V:
    """Note what was learnt of type ``t``, and return it."""
    if len(learnt) >= _LEARNT_TYPES:
        learnt.clear()  # types made on the fly: do not keep them all alive
    learnt[t] = found
    return found


class _NeedsCloudpickle(Exception):
    pass


def _unpicklable(what: str, exc: Exception) -> SerializationError:
    return SerializationError(
        f"cannot pickle the {what}: {exc}. Send picklable values, or wrap "
        "the object in an actor and pass its ref instead."
    )


def _rebuild_bytes(buf: Any) -> bytes:
    return bytes(buf)


def _rebuild_bytearray(buf: Any) -> bytearray:
    return bytearray(buf)


def _rebuild_memoryview(buf: Any) -> memoryview:
    return memoryview(bytearray(buf))


class Lifted:
    """Stands in for a large ``bytes``/``bytearray`` so it goes out of band.

    C pickle saves exact ``bytes`` and ``bytearray`` in-band without asking
    ``reducer_override``, so large ones near the top of a payload are wrapped.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild = _rebuild_bytes if type(self.data) is bytes else _rebuild_bytearray
        return (rebuild, (pickle.PickleBuffer(self.data),))


def _is_big_bytes(x: object) -> bool:
    return (type(x) is bytes or type(x) is bytearray) and len(x) >= OOB_THRESHOLD  # type: ignore[arg-type]


Marker = Callable[[Any], Any]
"""Replaces a value the runtime must treat specially (a callback), else returns it."""


def _no_mark(x: Any) -> Any:
    return x


def _prepare_one(x: Any, mark: Marker) -> Any:
    if _is_big_bytes(x):
        return Lifted(x)
    return mark(x)


def prepare(x: Any, mark: Marker = _no_mark) -> Any:
    """Mark ``x`` for sending: large byte strings go out of band, and ``mark``
    sees ``x`` itself and the items of a short list, tuple or dict ``x``."""
    t = type(x)
    if (t is list or t is tuple) and len(x) <= _LIFT_SCAN_LIMIT:
        items = [_prepare_one(v, mark) for v in x]
        if any(a is not b for a, b in zip(items, x, strict=True)):
            return t(items)
        return x
    if t is dict and len(x) <= _LIFT_SCAN_LIMIT:
        marked = {k: _prepare_one(v, mark) for k, v in x.items()}
        if any(marked[k] is not v for k, v in x.items()):
            return marked
        return x
    return _prepare_one(x, mark)


def prepare_args(
    args: tuple[Any, ...], kwargs: dict[str, Any], mark: Marker = _no_mark
) -> tuple[Any, ...]:
    """:func:`prepare` applied to each argument; returns ``(args, kwargs)``."""
    return (
        tuple([prepare(a, mark) for a in args]),
        {k: prepare(v, mark) for k, v in kwargs.items()} if kwargs else kwargs,
    )


SCALARS = frozenset({type(None), bool, int, float, complex, str})
_PLAIN_ITEMS = 16
"""Containers up to this long are checked for the plain fast path."""


def is_plain(x: Any, depth: int = 3) -> bool:
    """True for small values that plain C pickle handles alone: scalars, short
    ``bytes`` and short tuples, lists and dicts of such. No hook would change
    how they are pickled, so :meth:`Codec.dumps` skips the hooks."""
    t = type(x)
    if t in SCALARS:
        return True
    if t is bytes:
        return len(x) < OOB_THRESHOLD
    if t is dict:
        if depth == 0 or len(x) > _PLAIN_ITEMS or not SCALARS.issuperset(map(type, x)):
            return False
        values = x.values()
    elif t is tuple or t is list:
        if depth == 0 or len(x) > _PLAIN_ITEMS:
            return False
        values = x
    else:
        return False
    for v in values:  # noqa: SIM110 (a loop is cheaper than all() and a generator)
        if not is_plain(v, depth - 1):
            return False
    return True


def _reduce_memoryview(view: memoryview, pickler: Any) -> Any:
    flat = view if view.contiguous else view.tobytes()
    return (_rebuild_memoryview, (pickle.PickleBuffer(flat),))


def _check_main(obj: Any, pickler: Any) -> Any:
    # Defined in ``__main__``: the receiving process cannot import it.
    if getattr(obj, "__module__", None) == "__main__":
        raise _NeedsCloudpickle
    return NotImplemented


_by_value: weakref.WeakKeyDictionary[type, tuple[Any, ...]] = weakref.WeakKeyDictionary()
"""Classes defined in ``__main__`` that were sent: how they are sent (by value)."""

_received: OrderedDict[bytes, type] = OrderedDict()
"""Classes received by value, by their digest: the most recent ``_RECEIVED_CLASSES``."""
_RECEIVED_CLASSES = 256


def _reduce_main_class(cls: type, pickler: Any) -> Any:
    """A class defined in ``__main__`` (a script, a notebook) travels by value:
    pickled by cloudpickle once, its bytes sent with a digest that lets the
    receiver rebuild it once too. (cloudpickle on every message costs a
    no-op call ten times over.) Later changes to the class object are not
    sent, as the receiver keeps the class it first rebuilt either way."""
    if getattr(cls, "__module__", None) != "__main__":
        return NotImplemented
    reduction = _by_value.get(cls)
    if reduction is None:
        import hashlib

        from ._by_value import dumps as dumps_by_value

        try:
            blob = dumps_by_value(cls)
        except Exception:
            raise _NeedsCloudpickle from None  # the whole message, and its error
        digest = hashlib.blake2b(blob, digest_size=16).digest()
        reduction = _by_value[cls] = (_class_by_value, (digest, blob))
    return reduction


def _class_by_value(digest: bytes, blob: bytes) -> type:
    cls = _received.get(digest)
    if cls is None:
        cls = _received[digest] = pickle.loads(blob)
        if len(_received) > _RECEIVED_CLASSES:
            _received.popitem(last=False)
    return cls


class _MainClassPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        return _reduce_main_class(obj, self) if isinstance(obj, type) else NotImplemented


def dumps_main_by_value(obj: Any) -> bytes:
    """Plain pickle of ``obj``, except that classes defined in ``__main__``
    go by value (an exception class of a script raised in an actor, say)."""
    f = io.BytesIO()
    _MainClassPickler(f, protocol=5).dump(obj)
    return f.getvalue()


def _chain(first: Handler, then: Handler) -> Handler:
    def handler(obj: Any, pickler: Any) -> Any:
        reduced = first(obj, pickler)
        return then(obj, pickler) if reduced is NotImplemented else reduced

    return handler


def _call_reducer(reducer: Reducer) -> Handler:
    return lambda obj, pickler: reducer(obj)


class Codec:
    """Pickles values with out-of-band buffers; ``reducers`` (by exact type)
    handle runtime objects, and ``sidecar`` carries values beside the stream."""

    def __init__(
        self,
        reducers: dict[type, Reducer] | None = None,
        sidecar: Sidecar | None = None,
        *,
        plain_only: bool = False,
    ) -> None:
        self._reducers = dict(reducers or {})
        self._sidecar = sidecar
        self.plain = PlainWire(self._reducers, sidecar)
        """Plain payloads (see ``_plain``): what untrusted peers send."""
        self.plain_only = plain_only
        """Everything this codec sends is plain (this process is untrusted)."""
        self.dest = b""
        """Whom the payload being pickled is for."""
        # The pickler asks about every object that is not a plain container or
        # scalar; one lookup by type answers (learnt once per type).
        plain: dict[type, Handler | None] = {}
        self._plain_handlers = plain
        self._cloud_handlers: dict[type, Handler | None] = {}
        learn = self._learn

        class _Pickler(pickle.Pickler):
            batch: Any = None

            def reducer_override(self, obj: Any) -> Any:
                try:
                    handler = plain[type(obj)]
                except KeyError:
                    handler = learn(type(obj), cloud=False)
                return NotImplemented if handler is None else handler(obj, self)

        self._pickler_cls = _Pickler
        self._cloud_pickler_cls: type[pickle.Pickler] | None = None

    def _learn(self, t: type, *, cloud: bool) -> Handler | None:
        found: list[Handler] = []
        reducer = self._reducers.get(t)
        if reducer is not None:
            found.append(_call_reducer(reducer))
        if self._sidecar is not None:
            handler = self._sidecar.reducer(t)
            if handler is not None:
                found.append(handler)
        if t is memoryview:
            found.append(_reduce_memoryview)
        if not cloud and issubclass(t, type):
            found.append(_reduce_main_class)
        elif not cloud and t is types.FunctionType:
            found.append(_check_main)
        chosen = None
        for handler in reversed(found):
            chosen = handler if chosen is None else _chain(handler, chosen)
        return _remember(self._cloud_handlers if cloud else self._plain_handlers, t, chosen)

    def _cloud_pickler(self) -> type[pickle.Pickler]:
        if self._cloud_pickler_cls is None:
            from . import _by_value  # imports cloudpickle: only when plain pickle cannot do

            handlers = self._cloud_handlers
            learn = self._learn

            class _CloudPickler(_by_value.Pickler):
                batch: Any = None

                def reducer_override(self, obj: Any) -> Any:
                    try:
                        handler = handlers[type(obj)]
                    except KeyError:
                        handler = learn(type(obj), cloud=True)
                    reduced = NotImplemented if handler is None else handler(obj, self)
                    if reduced is NotImplemented:
                        return super().reducer_override(obj)
                    return reduced

            self._cloud_pickler_cls = _CloudPickler
        return self._cloud_pickler_cls

    def dumps(self, obj: Any, what: str = "value", dest: bytes = b"") -> tuple[bytes, list[Any]]:
        """Pickle ``obj`` for ``dest``; return the payload and the frames that follow it."""
        self.dest = dest  # for reducers that note whom they hand a thing to
        if is_plain(obj):
            return pickle.dumps(obj, 5), []
        buffers: list[Any] = []

        def keep(buf: pickle.PickleBuffer) -> bool:
            if buf.raw().nbytes < OOB_THRESHOLD:
                return True  # in-band
            buffers.append(buf)
            return False

        f = io.BytesIO()
        pickler: pickle.Pickler = self._pickler_cls(f, protocol=5, buffer_callback=keep)
        try:
            pickler.dump(obj)
        except (_NeedsCloudpickle, pickle.PicklingError, AttributeError, TypeError):
            buffers.clear()
            f = io.BytesIO()
            pickler = self._cloud_pickler()(f, protocol=5, buffer_callback=keep)
            try:
                pickler.dump(obj)
            except AtollError:
                raise
            except Exception as exc2:
                raise _unpicklable(what, exc2) from exc2
        except AtollError:
            raise  # said clearly already (a full /dev/shm, say)
        except Exception as exc:  # what a type's own reduction raised
            raise _unpicklable(what, exc) from exc
        batch = pickler.batch  # type: ignore[attr-defined]
        if batch is None:
            return f.getvalue(), buffers
        assert self._sidecar is not None
        head, frames = self._sidecar.seal(batch, dest)
        return b"".join(
            (bytes((_HEADED,)), len(head).to_bytes(4, "little"), head, f.getbuffer())
        ), buffers + frames

    def dumps_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], mark: Marker, what: str, dest: bytes
    ) -> tuple[bytes, list[Any]]:
        """:meth:`dumps` of ``prepare_args(args, kwargs, mark)``, faster
        where the arguments are scalars and short byte strings, or the
        sidecar encodes them itself."""
        if self.plain_only:
            return self.plain.dumps((args, kwargs), mark, what, dest)
        for v in args:
            t = type(v)
            if not (t in SCALARS or (t is bytes and len(v) < OOB_THRESHOLD)):
                break
        else:
            if not kwargs:
                return pickle.dumps((args, kwargs), 5), []
        if self._sidecar is not None:
            done = self._sidecar.encode_args(args, kwargs, dest)
            if done is not None:
                return done
        return self.dumps(prepare_args(args, kwargs, mark), what, dest)

    def dumps_value(
        self, value: Any, mark: Marker, what: str, dest: bytes
    ) -> tuple[bytes, list[Any]]:
        """:meth:`dumps` of ``prepare(value, mark)``, faster where the value
        is a scalar or a short byte string, or the sidecar encodes it itself."""
        if self.plain_only:
            return self.plain.dumps(value, mark, what, dest)
        t = type(value)
        if t in SCALARS or (t is bytes and len(value) < OOB_THRESHOLD):
            return pickle.dumps(value, 5), []
        if self._sidecar is not None:
            done = self._sidecar.encode(value, dest)
            if done is not None:
                return done
        return self.dumps(prepare(value, mark), what, dest)

    def discard(self, data: bytes, src: bytes) -> None:
        """Give back what a payload from ``src`` that will not be read leases
        (its call was dropped, or its caller gave up on it)."""
        sidecar = self._sidecar
        if sidecar is None or not data:
            return
        try:
            if data[0] == _HEADED:
                size = int.from_bytes(data[1:5], "little")
                sidecar.discard(src, bytes(data[5 : 5 + size]))
            elif data[0] in SIDECAR_ENCODED:
                sidecar.discard_encoded(data, src)
        except Exception:
            pass  # not a payload atoll made: it leases nothing

    def loads(
        self, data: bytes, buffers: Sequence[Any], what: str = "value", src: bytes = b""
    ) -> Any:
        """Read a payload from ``src`` made by :meth:`dumps` (or by the plain
        wire: then it is read without pickle), with the frames after it.
        From an untrusted peer, only a plain payload is read."""
        try:
            if not data:
                raise ProtocolError(f"the {what} is an empty payload")
            first = data[0]
            if first == FIRST_BYTE or src[:1] in UNTRUSTED_MARKS:
                if first != FIRST_BYTE:
                    raise ProtocolError(
                        f"the {what} from an untrusted peer is not a plain payload "
                        f"(first byte {first:#04x}): refused unread"
                    )
                return self.plain.loads(data, buffers, what, src)
            if first == _PICKLED:
                return pickle.loads(data, buffers=buffers)
            if first != _HEADED and first not in SIDECAR_ENCODED:
                raise SerializationError(
                    f"cannot read the {what}: not a payload atoll makes (first byte {first:#04x})"
                )
            if self._sidecar is None:
                raise SerializationError(f"the {what} holds tensors, and nothing here reads them")
            if first != _HEADED:
                return self._sidecar.decode(data, buffers, src)
            size = int.from_bytes(data[1:5], "little")
            view = memoryview(data)
            state, own = self._sidecar.begin_load(src, bytes(view[5 : 5 + size]), buffers)
            try:
                return pickle.loads(view[5 + size :], buffers=buffers[: len(buffers) - own])
            finally:
                self._sidecar.end_load(state)
        except (SerializationError, ProtocolError):
            raise
        except Exception as exc:
            raise SerializationError(f"cannot unpickle the {what}: {exc!r}") from exc
