"""ActorRef: the handle through which an actor is called, from any process."""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

from .._errors import ProtocolError
from ..transport._plain import plain_rebuilder
from ._actor import IDEMPOTENT, Kind
from ._node import Node
from ._node_state import loading

_KINDS = frozenset(int(kind) for kind in Kind)

A = TypeVar("A")

ACTOR_OID = 0
"""Object id of the actor inside its own process."""

BOOT_OID = 2
"""Object id, in a new actor process, of what builds its actor (called once)."""

STATUS_OID = 3
"""Object id, in an actor process, of what tells the host how busy it is
(its health probe, and whether it is idle): calls running, streams open."""

LOG_OID = 4
"""Object id, in the host, of what takes the log records actors forward."""

SPAN_OID = 6
"""Object id, in the host, of what takes the spans actors recorded."""

REPORT_OID = 5
"""Object id, in an actor process, of what tells the host what it serves
(calls running, per-method counts and latencies, shared memory held), and
the tasks of its event loop."""


class ActorRef(Generic[A]):
    """A handle on an actor; ``ref.method(...)`` calls it in its process.

    ``await ref.method(*args)`` runs an ``async def`` or plain method remotely
    and returns its result; ``async for x in ref.method(*args)`` iterates an
    async-generator method. Refs are made by :meth:`Host.spawn`, never built
    by hand; they can be passed to other actors as arguments or results, and
    many tasks may share one.

    For type checkers, :meth:`Host.spawn` returns the actor class itself, so
    method signatures and return types are checked as the class declares them.
    """

    __slots__ = ("_id", "_kinds", "_methods", "_name", "_node", "_oid")

    def __init__(
        self,
        node: Node,
        actor_id: bytes,
        name: str,
        kinds: dict[str, Kind],
        oid: int = 0,
    ) -> None:
        self._node = node
        self._id = actor_id
        self._oid = oid
        self._name = name
        self._kinds = kinds
        self._methods: dict[str, _Method] = {}

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            if name.startswith("__") and name.endswith("__"):
                raise AttributeError(name)  # protocols (copy, pickle, numpy) probe these
            methods = ", ".join(sorted(self._kinds)) or "none"
            raise AttributeError(
                f"{name!r}: a ref to actor {self._name!r} only calls its public methods "
                f"(no leading underscore) in the actor's process; they are: {methods}. "
                "Attributes and private methods stay in the actor: add a public method "
                "that returns what you need"
            )
        method = self._methods.get(name)
        if method is not None:
            return method
        kind = self._kinds.get(name)
        if kind is None:
            raise AttributeError(f"actor {self._name!r} has no public method {name!r}")
        method = self._methods[name] = _Method(self, name, kind)
        return method

    def __repr__(self) -> str:
        return f"<ActorRef {self._name!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorRef) and (other._id, other._oid) == (self._id, self._oid)

    def __hash__(self) -> int:
        return hash((self._id, self._oid))

    def __reduce__(self) -> tuple[Any, ...]:
        kinds = {k: int(v) for k, v in self._kinds.items()}
        return (_rebuild_ref, (self._id, self._name, kinds, self._oid))


class BlockingRef(ActorRef[A]):
    """A ref from :func:`atoll.blocking_host`: the same as an :class:`ActorRef`
    (a ref blocks whenever it is called outside its host's event loop), typed
    for sync code: with the ``atoll.mypy`` plugin its methods return plain
    results and its streams are plain iterators."""

    __slots__ = ()


class _Method:
    __slots__ = ("_kind", "_name", "_node", "_ref")

    def __init__(self, ref: ActorRef[Any], name: str, kind: Kind) -> None:
        self._ref = ref
        self._node = ref._node
        self._name = name
        self._kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent along, ``ref.method`` stays a method of the same actor.
        return (getattr, (self._ref, self._name))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._kind is Kind.STREAM:
            return self._node.stream(self._ref._id, self._ref._oid, self._name, args, kwargs)
        retry = self._kind in IDEMPOTENT
        return self._node.invoke(self._ref._id, self._ref._oid, self._name, args, kwargs, retry)


@plain_rebuilder
def _rebuild_ref(actor_id: bytes, name: str, kinds: dict[str, int], oid: int = 0) -> ActorRef[Any]:
    if not (
        type(actor_id) is bytes
        and type(name) is str
        and type(kinds) is dict
        and all(type(k) is str and v in _KINDS for k, v in kinds.items())
        and type(oid) is int
    ):
        raise ProtocolError(f"malformed ref: {(actor_id, name, kinds, oid)!r}")
    node = cast(Node, loading.get())
    node.peer_names.setdefault(actor_id, name)
    return ActorRef(node, actor_id, name, {k: Kind(v) for k, v in kinds.items()}, oid)
