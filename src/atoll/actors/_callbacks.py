"""Callbacks: callables sent to a peer by reference, and their proxies.

A function or bound method in a message is exported (once) and travels as
its owner and object id; the receiver gets a :class:`RemoteCallable` that
calls it back. Lifetimes are weighted reference counts: each export hands out
a weight, a proxy forwarded to a third process splits its own (no message to
the owner), and a proxy that dies sends its weight back; the owner lets the
callable go when all of it has come back.
"""

from __future__ import annotations

import types
from typing import Any, cast

from .._errors import AtollError, ProtocolError
from ..transport import _messages as m
from ..transport._codec import Reducer
from ..transport._plain import UNTRUSTED_MARKS, plain_rebuilder
from ._actor import Kind
from ._node_state import NodeState, loading

_KINDS = frozenset(int(kind) for kind in Kind)

_EXPORT_WEIGHT = 1 << 20
"""Reference weight handed out with each export."""


class Callbacks(NodeState):
    """Exports callables met in messages, and lets them go."""

    def _reducers(self) -> dict[type, Reducer]:
        return {_Callback: self._reduce_callback, RemoteCallable: RemoteCallable._forward}

    def mark(self, value: Any) -> Any:
        """Mark a callable sent as an argument or result: it becomes a callback."""
        t = type(value)
        if (
            t is types.FunctionType
            or t is types.MethodType
            or (t is types.BuiltinMethodType and not isinstance(value.__self__, types.ModuleType))
        ):
            return _Callback(value)
        return value

    def _reduce_callback(self, callback: _Callback) -> Any:
        return self._export_callable(callback.fn)

    def _export_callable(self, fn: Any) -> tuple[Any, ...]:
        try:
            key: Any = fn
            oid = self._export_keys.get(key)
        except TypeError:  # a bound method of an unhashable object
            key = ("id", id(fn))
            oid = self._export_keys.get(key)
        if oid is None:
            oid = self.export(fn, getattr(fn, "__qualname__", repr(fn)))
            self._export_keys[key] = oid
        export = self._exports[oid]
        export.weight += _EXPORT_WEIGHT
        dest = self.codec.dest
        if dest[:1] in UNTRUSTED_MARKS:
            holders = export.holders
            if holders is None:
                holders = export.holders = {}
            holders[dest] = holders.get(dest, 0) + _EXPORT_WEIGHT
        return (
            _rebuild_callable,
            (self.identity, oid, _EXPORT_WEIGHT, export.name, int(export.kind)),
        )

    def _release(self, oid: int, weight: int, src: bytes = b"") -> bool:
        """``src`` gives back ``weight`` of callback ``oid``; False if it may not."""
        export = self._exports.get(oid)
        if export is None or export.kinds is not None:
            return False
        if src[:1] in UNTRUSTED_MARKS:
            # An untrusted peer gives back only what it was handed, so that
            # it cannot let go of callbacks other peers hold.
            holders = export.holders
            held = 0 if holders is None else holders.get(src, 0)
            if not 0 < weight <= held:
                self.dropped["unentitled"] += 1
                return False
            holders[src] = held - weight  # type: ignore[index]
        export.weight -= weight
        if export.weight <= 0:
            del self._exports[oid]
            for key, value in list(self._export_keys.items()):
                if value == oid:
                    del self._export_keys[key]
        return True


class _Callback:
    """A callable marked to be sent by reference to its owner."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn


class RemoteCallable:
    """A callable that lives in another process; calling it runs it there.

    On the event loop's thread a call returns an awaitable; on any other thread
    (inside a sync actor method, say) it blocks and returns the result.
    """

    __slots__ = ("__weakref__", "_kind", "_name", "_node", "_oid", "_owner", "_weight")

    # ``node`` is a Node: its calling part, above this module, calls back.
    def __init__(
        self, node: Any, owner: bytes, oid: int, weight: int, name: str, kind: Kind
    ) -> None:
        self._node = node
        self._owner = owner
        self._oid = oid
        self._weight = weight
        self._name = name
        self._kind = kind

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._kind is Kind.STREAM:
            return self._node.stream(self._owner, self._oid, "__call__", args, kwargs)
        return self._node.invoke(self._owner, self._oid, "__call__", args, kwargs)

    def __repr__(self) -> str:
        owner = self._node.peer_names.get(self._owner, self._owner.decode(errors="replace"))
        return f"<remote callable {self._name} in {owner!r}>"

    def _forward(self) -> tuple[Any, ...]:
        give = self._weight // 2
        self._weight -= give
        return (_rebuild_callable, (self._owner, self._oid, give, self._name, int(self._kind)))

    def __del__(self) -> None:
        if self._weight:
            self._node.defer(self._owner, [m.encode(m.Release(self._oid, self._weight))])


@plain_rebuilder
def _rebuild_callable(owner: bytes, oid: int, weight: int, name: str, kind: int) -> Any:
    if not (
        type(owner) is bytes
        and type(oid) is int
        and type(weight) is int
        and weight > 0
        and type(name) is str
        and kind in _KINDS
    ):
        raise ProtocolError(f"malformed callback: {(owner, oid, weight, name, kind)!r}")
    node = cast(Callbacks, loading.get())
    if owner == node.identity:
        export = node._exports.get(oid)
        if export is None or export.kinds is not None:  # released, or not a callback at all
            raise AtollError(f"callback {name} was sent back to {node.name!r}, which released it")
        if not node._release(oid, weight, node.loading_from):
            raise ProtocolError(f"callback {name} was sent back by a peer it was not handed to")
        return export.obj
    proxy = node._proxies.get((owner, oid))
    if proxy is None:
        proxy = RemoteCallable(node, owner, oid, weight, name, Kind(kind))
        node._proxies[(owner, oid)] = proxy
    else:
        proxy._weight += weight
    return proxy
