"""What a node knows, and the plumbing its parts share.

A node's parts (``_serving``, ``_callbacks``, ``_calling``, and ``_node``
over them) are mixins of one object: this is their common base. It holds
the state they share (calls out waiting, calls in running, exported objects,
peers that ended) and what every part uses to reach a peer: sending now or
with the next traffic, reading a payload, and the leases that peers give back
(which wait until what came before them is read).
"""

from __future__ import annotations

import itertools
import weakref
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

import anyio
import anyio.lowlevel
import zmq
from anyio.abc import TaskGroup

from .._errors import ActorDiedError, TransportError
from ..tensors import Plane
from ..transport import _messages as m
from ..transport._codec import Codec, Reducer
from ..transport._socket import Job, PeerUnreachableError
from ._actor import Kind, kind_of
from ._call_stats import CallStats
from ._turns import TurnGate

CallContext = tuple[int, int]
"""``(call_id, chain)`` of the call a task is serving."""

current_call: ContextVar[CallContext | None] = ContextVar("atoll_current_call", default=None)
loading: ContextVar[NodeState] = ContextVar("atoll_loading_node")
"""The node reading a payload (callbacks in it are rebuilt as its proxies)."""

ExcFactory = Callable[[], Exception]


class Pending:
    """A call out, until its reply (``header``) or a failure (``error``)."""

    __slots__ = ("dest", "done", "error", "event", "frames", "header", "new_event")

    def __init__(self, dest: bytes, new_event: Callable[[], Any] = anyio.Event) -> None:
        self.dest = dest
        self.done = False
        self.new_event = new_event
        self.event: Any = None  # made only if somebody sleeps on it
        self.header: m.Result | m.Error | None = None
        self.frames: list[zmq.Frame] = []
        self.error: Exception | None = None

    def is_done(self) -> bool:
        return self.done

    async def wait(self) -> None:
        if not self.done:
            if self.event is None:
                self.event = self.new_event()
            await self.event.wait()

    def finish(self, header: m.Result | m.Error | None, frames: list[zmq.Frame]) -> None:
        self.header = header
        self.frames = frames
        self.done = True
        if self.event is not None:
            self.event.set()

    def fail(self, exc: Exception) -> None:
        self.error = exc
        self.finish(None, [])


class StreamIn:
    """Caller side of a stream: items received and not yet consumed."""

    __slots__ = ("consumed", "dest", "done", "error", "event", "items")

    def __init__(self, dest: bytes) -> None:
        self.dest = dest
        self.items: deque[tuple[m.StreamItem, list[zmq.Frame]]] = deque()
        self.event: anyio.Event | None = None
        self.done = False
        self.error: Exception | None = None
        self.consumed = 0

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()

    def fail(self, exc: Exception) -> None:
        self.error = exc
        self.done = True
        self.wake()


class StreamOut:
    """Producer side of a stream: credit left to send."""

    __slots__ = ("credit", "event")

    def __init__(self, credit: int) -> None:
        self.credit = credit
        self.event: anyio.Event | None = None


class Export:
    __slots__ = ("gate", "holders", "kind", "kinds", "name", "obj", "weight")

    def __init__(
        self, obj: Any, name: str, kinds: dict[str, Kind] | None, gate: TurnGate | None
    ) -> None:
        self.obj = obj
        self.name = name
        self.kinds = kinds
        self.kind = kind_of(obj) if kinds is None else Kind.ASYNC
        self.gate = gate
        self.weight = 0
        self.holders: dict[bytes, int] | None = None
        """Untrusted peers handed this callback, and the weight each holds:
        only they may call it or give it back."""

    def held_by(self, peer: bytes) -> bool:
        holders = self.holders
        return holders is not None and holders.get(peer, 0) > 0


Handle = Callable[[bytes, Any, list[Any]], "Job | None"]
"""What handles one type of message: ``handle(src, msg, frames)``; for a
call, it returns a job."""


class NodeState:
    """The state of one process's node, and the plumbing its parts share."""

    def __init__(
        self,
        identity: bytes,
        node_no: int,
        name: str,
        transmit: Callable[[bytes, Sequence[Any]], None],
        plane: Plane,
        *,
        untrusted: bool = False,
    ) -> None:
        self.name = name
        self._wire = transmit
        self.plane = plane
        self.rename(identity)
        self._next_id = itertools.count((node_no << 40) + 1).__next__
        self._next_oid = itertools.count(16).__next__  # below 16: well-known objects
        self._pending: dict[int, Pending | StreamIn] = {}
        self._running: dict[tuple[bytes, int], Any] = {}  # the calls' cancel scopes
        self.calls = CallStats()
        self.tracer: Any = None
        """Set when calls are traced: an ``OtelTracer`` in the host, a
        ``Recorder`` in an actor process (see ``_tracing``)."""
        """The calls it served and serves, by method (see ``_call_stats``)."""
        self._streams_out: dict[tuple[bytes, int], StreamOut] = {}
        self._exports: dict[int, Export] = {}
        self._retired: dict[int, str] = {}  # names of unexported services, for errors
        self._export_keys: dict[Any, int] = {}
        self._proxies: weakref.WeakValueDictionary[tuple[bytes, int], Any] = (
            weakref.WeakValueDictionary()
        )
        self._deferred: deque[tuple[bytes, list[bytes]]] = deque()
        self._threads: dict[anyio.CancelScope, str] = {}  # sync calls running, and what
        self._threads_done: anyio.Event | None = None
        self.abandoned_threads = 0
        """Sync calls :meth:`finish_threads` stopped waiting for."""
        self._gone: dict[bytes, ExcFactory] = {}
        # Results and stream items from a peer not loaded yet, and the leases
        # that peer gave back meanwhile: a storage of ours may come back in
        # them, and must not be let go of before they are read.
        self._unread = 0
        self._held_back: dict[bytes, list[int]] = {}
        self._closed: ExcFactory | None = None
        self._tg: TaskGroup | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._loop_thread = 0
        self._new_event: Callable[[], Any] = anyio.Event
        self.peer_names: dict[bytes, str] = {}
        self.loading_from = b""
        """The peer whose payload is being read (callbacks in it come from it)."""
        self.dropped: Counter[str] = Counter()
        self.on_bye: Callable[[bytes, m.Bye], None] | None = None
        self.on_exit: Callable[[SystemExit, str], None] | None = None
        """Set by an actor process: a method called ``sys.exit()``."""
        self.poll_for: Callable[[Callable[[], bool]], Awaitable[None]] | None = None
        """Set by the transport: read the socket a while, for a reply expected soon."""
        self.codec = Codec(self._reducers(), plane, plain_only=untrusted)
        self._handlers = self._message_handlers()

    def _reducers(self) -> dict[type, Reducer]:
        """How the parts' own objects travel (by type), for the codec."""
        return {}

    def _message_handlers(self) -> dict[type, Handle]:
        """What handles each type of message (the node's, see ``_node``)."""
        return {}

    def _transmit(self, dest: bytes, frames: Sequence[Any]) -> None:
        # Leases given back go out first: the peer may reuse that memory as
        # soon as it has this message's answer.
        if self.plane.dead:
            self.plane.drain()
        self._wire(dest, frames)

    def rename(self, identity: bytes) -> None:
        """Serve under ``identity`` (a process's own, or, once, the identity
        of the actor it becomes; see ``_child``)."""
        self.identity = identity
        self.plane.connect(identity, self._send_quietly)

    def _send_quietly(self, dest: bytes, frames: Sequence[Any]) -> None:
        """Send a message whose loss only matters to a peer that is gone."""
        try:
            self._transmit(dest, frames)
        except TransportError:
            pass

    def _flush_deferred(self) -> None:
        deferred = self._deferred
        while deferred:
            dest, frames = deferred.popleft()
            if dest not in self._gone:
                self._send_quietly(dest, frames)

    def defer(self, dest: bytes, frames: list[bytes]) -> None:
        """Queue a message from any thread (a finalizer); sent with the next traffic."""
        self._deferred.append((dest, frames))

    def _load(self, payload: bytes, frames: Sequence[Any], what: str, src: bytes) -> Any:
        token = loading.set(self)
        self.loading_from = src
        try:
            return self.codec.loads(payload, frames, what, src)
        finally:
            loading.reset(token)

    def check_open(self, dest: bytes) -> None:
        if self._closed is not None:
            raise self._closed()
        gone = self._gone.get(dest)
        if gone is not None:
            raise gone()

    def _unreachable(self, dest: bytes, exc: TransportError) -> Exception:
        if isinstance(exc, PeerUnreachableError):
            # Gone, and the news of it (exit status, stderr) is on its way.
            name = self.peer_names.get(dest, dest.decode(errors="replace"))
            return ActorDiedError(name, detail="it is no longer connected")
        return exc

    def _unlease(self, src: bytes, leases: Sequence[int]) -> None:
        if self._unread:
            self._held_back.setdefault(src, []).extend(leases)
        else:
            self.plane.unlease(src, leases)

    def _read_one(self) -> None:
        """A result or stream item was loaded (or dropped): leases given back
        meanwhile go once nothing received is left unread. (One count for all
        peers: an integer on the per-call path, not a table.)"""
        self._unread -= 1
        if not self._unread and self._held_back:
            held, self._held_back = self._held_back, {}
            for src, leases in held.items():
                self.plane.unlease(src, leases)

    def _settle(self, src: bytes, reply: m.Result) -> None:
        """After loading ``reply`` (or dropping it): the leases it gave back."""
        if reply.unleased:
            self._unlease(src, reply.unleased)
        self._read_one()

    def export(self, obj: Any, name: str, *, oid: int | None = None, actor: bool = False) -> int:
        """Make ``obj`` callable by peers; an actor gets turns and a method table."""
        from ._actor import method_kinds

        if oid is None:
            oid = self._next_oid()
        kinds = method_kinds(type(obj)) if actor else None
        gate = TurnGate(getattr(obj, "max_concurrency", 1)) if actor else None
        self._exports[oid] = Export(obj, name, kinds, gate)
        return oid

    def unexport(self, oid: int) -> None:
        """Stop serving object ``oid``; later calls to it fail, naming it."""
        export = self._exports.pop(oid, None)
        if export is not None:
            self._retired[oid] = export.name
