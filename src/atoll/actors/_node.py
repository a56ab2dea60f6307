"""The RPC engine of one process, shared by the host and every actor process.

A :class:`Node` makes calls (to a peer identity and an object id there) and
serves calls to the objects it exports: the actor itself (object 0 in an actor
process) and callables passed along as callbacks. It knows nothing about
sockets: it is given a ``transmit(dest, frames)`` function and fed incoming
messages through :meth:`Node.on_message`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import types
import weakref
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from contextvars import ContextVar
from typing import Any

import anyio
import anyio.lowlevel
import zmq
from anyio.abc import TaskGroup

from .._errors import (
    ActorClosedError,
    ActorDiedError,
    AtollError,
    SerializationError,
    TransportError,
)
from ..tensors import Plane
from ..transport import _messages as m
from ..transport._codec import Codec
from ..transport._socket import Job, PeerUnreachableError, event_maker, job_scope, run_job
from ._actor import Kind, kind_of
from ._errors_wire import pack_error, unpack_error
from ._turns import TurnGate

_log = logging.getLogger(__name__)

STREAM_WINDOW = 16
"""Stream items a producer may send ahead of the consumer."""

_EXPORT_WEIGHT = 1 << 20
"""Reference weight handed out with each export (weighted reference counting:
a proxy forwarded to a third process splits its weight, with no message to
the owner, and the owner frees the object when all weight has come back)."""

_GONE_KEPT = 256
"""Peers that ended whose exit (code, stderr) a call to them still reports."""

CallContext = tuple[int, int]
"""``(call_id, chain)`` of the call a task is serving."""

current_call: ContextVar[CallContext | None] = ContextVar("atoll_current_call", default=None)
_loading: ContextVar[Node] = ContextVar("atoll_loading_node")

ExcFactory = Callable[[], Exception]


class _Pending:
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


class _StreamIn:
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


class _StreamOut:
    """Producer side of a stream: credit left to send."""

    __slots__ = ("credit", "event")

    def __init__(self, credit: int) -> None:
        self.credit = credit
        self.event: anyio.Event | None = None


class _Export:
    __slots__ = ("gate", "kind", "kinds", "name", "obj", "weight")

    def __init__(
        self, obj: Any, name: str, kinds: dict[str, Kind] | None, gate: TurnGate | None
    ) -> None:
        self.obj = obj
        self.name = name
        self.kinds = kinds
        self.kind = kind_of(obj) if kinds is None else Kind.ASYNC
        self.gate = gate
        self.weight = 0


class Node:
    """Calls out, serves calls in, for one process."""

    def __init__(
        self,
        identity: bytes,
        node_no: int,
        name: str,
        transmit: Callable[[bytes, Sequence[Any]], None],
        plane: Plane,
    ) -> None:
        self.identity = identity
        self.name = name
        self._wire = transmit
        self.plane = plane
        plane.send = self._send_quietly
        plane.identity = identity
        self._next_id = itertools.count((node_no << 40) + 1).__next__
        self._next_oid = itertools.count(16).__next__  # below 16: well-known objects
        self._pending: dict[int, _Pending | _StreamIn] = {}
        self._running: dict[tuple[bytes, int], Any] = {}  # the calls' cancel scopes
        self._streams_out: dict[tuple[bytes, int], _StreamOut] = {}
        self._exports: dict[int, _Export] = {}
        self._retired: dict[int, str] = {}  # names of unexported services, for errors
        self._export_keys: dict[Any, int] = {}
        self._proxies: weakref.WeakValueDictionary[tuple[bytes, int], RemoteCallable] = (
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
        self.dropped: Counter[str] = Counter()
        self.on_bye: Callable[[bytes, m.Bye], None] | None = None
        self.on_exit: Callable[[SystemExit, str], None] | None = None
        """Set by an actor process: a method called ``sys.exit()``."""
        self.poll_for: Callable[[Callable[[], bool]], Awaitable[None]] | None = None
        """Set by the transport: read the socket a while, for a reply expected soon."""
        self.codec = Codec(
            {_Callback: self._reduce_callback, RemoteCallable: RemoteCallable._forward}, plane
        )

    # -- lifecycle ---------------------------------------------------------

    def start(self, tg: TaskGroup) -> None:
        """Serve incoming calls as tasks of ``tg``, on the current event loop."""
        self._tg = tg
        self._token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        self._new_event = event_maker()
        tg.start_soon(self.plane.serve)

    def _transmit(self, dest: bytes, frames: Sequence[Any]) -> None:
        if self.plane.dead:
            # Leases given back go out first: the peer may reuse that memory
            # as soon as it has this message's answer.
            self.plane.drain()
        self._wire(dest, frames)

    def export(self, obj: Any, name: str, *, oid: int | None = None, actor: bool = False) -> int:
        """Make ``obj`` callable by peers; an actor gets turns and a method table."""
        from ._actor import method_kinds

        if oid is None:
            oid = self._next_oid()
        kinds = method_kinds(type(obj)) if actor else None
        gate = TurnGate(getattr(obj, "max_concurrency", 1)) if actor else None
        self._exports[oid] = _Export(obj, name, kinds, gate)
        return oid

    def unexport(self, oid: int) -> None:
        """Stop serving object ``oid``; later calls to it fail, naming it."""
        export = self._exports.pop(oid, None)
        if export is not None:
            self._retired[oid] = export.name

    def close(self, make_exc: ExcFactory, *, later: ExcFactory | None = None) -> None:
        """Fail every pending call and stream with ``make_exc()``; refuse new
        ones with ``later()`` (by default ``make_exc()`` too)."""
        self._closed = later or make_exc
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.fail(make_exc())
        for scope in self._running.values():
            scope.cancel()
        self._drop_queued(lambda src, call_id: True)

    def peer_gone(self, peer: bytes, make_exc: ExcFactory, *, exited: bool = True) -> None:
        """``peer`` is gone: fail what waits on it, cancel what it asked for.
        Not ``exited`` (it is stopping): the tensor plane still settles leases
        with it until it has."""
        gone = self._gone
        gone[peer] = make_exc
        given_back = self._held_back.pop(peer, None)
        if given_back:
            self.plane.unlease(peer, given_back)
        while len(gone) > _GONE_KEPT:
            # The oldest: a call through a ref that old gets the hub's "no such actor".
            oldest = next(iter(gone))
            del gone[oldest]
            self.peer_names.pop(oldest, None)
        if exited:
            held = self.plane.peer_gone(peer)
            if held:
                name = self.peer_names.get(peer, peer.decode(errors="replace"))
                _log.warning(
                    "atoll: %s exited while this process holds views of %d of its device "
                    "storages: they are no longer valid memory; do not use them (copy what "
                    "you need, or drop it, before the process that made it stops)",
                    name,
                    held,
                )
        for call_id, p in list(self._pending.items()):
            if p.dest == peer:
                del self._pending[call_id]
                p.fail(make_exc())
        for (src, _), scope in list(self._running.items()):
            if src == peer:
                scope.cancel()
        self._drop_queued(lambda src, _: src == peer)

    def _drop_queued(self, matches: Callable[[bytes, int], bool]) -> None:
        """Forget calls still waiting for their turn (their caller gave up)."""
        for export in self._exports.values():
            if export.gate is not None and export.gate.queue:
                queue = export.gate.queue
                kept = []
                for chain, (src, msg, frames) in queue:
                    if matches(src, msg.call_id):
                        self.codec.discard(msg.payload, src)
                    else:
                        kept.append((chain, (src, msg, frames)))
                if len(kept) != len(queue):
                    queue.clear()
                    queue.extend(kept)

    def _unreachable(self, dest: bytes, exc: TransportError) -> Exception:
        if isinstance(exc, PeerUnreachableError):
            # Gone, and the news of it (exit status, stderr) is on its way.
            name = self.peer_names.get(dest, dest.decode(errors="replace"))
            return ActorDiedError(name, detail="it is no longer connected")
        return exc

    def check_open(self, dest: bytes) -> None:
        if self._closed is not None:
            raise self._closed()
        gone = self._gone.get(dest)
        if gone is not None:
            raise gone()

    # -- outgoing calls ----------------------------------------------------

    def invoke(
        self, dest: bytes, target: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A call as the caller's thread needs it: a coroutine on the event
        loop's thread, the result itself (blocking) on any other thread."""
        if threading.get_ident() == self._loop_thread:
            return self.call(dest, target, method, args, kwargs)
        if self._closed is not None:
            raise self._closed()  # its event loop may be gone: nothing to ask it
        import anyio.from_thread  # only threads need it; actor processes start without it

        return anyio.from_thread.run(
            self._call_from_thread,
            dest,
            target,
            method,
            args,
            kwargs,
            current_call.get(),
            token=self._token,
        )

    async def _call_from_thread(
        self,
        dest: bytes,
        target: int,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ctx: CallContext | None,
    ) -> Any:
        current_call.set(ctx)
        return await self.call(dest, target, method, args, kwargs)

    async def call(
        self, dest: bytes, target: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Call ``method`` of object ``target`` in peer ``dest`` and return its result."""
        if self._closed is not None or dest in self._gone:
            self.check_open(dest)
        if self._deferred:
            self._flush_deferred()
        call_id, frames = self._encode_call(dest, target, method, args, kwargs)
        pending = _Pending(dest, self._new_event)
        self._pending[call_id] = pending
        try:
            self._transmit(dest, frames)
        except TransportError as exc:
            del self._pending[call_id]
            self.check_open(dest)
            raise self._unreachable(dest, exc) from exc
        try:
            # The only call out reads the socket for its reply, unless the reply
            # comes from this very process (a service of the host): then another
            # task of this loop makes it, and reading would only hold it up.
            if pending.done:
                # Read while sending (this thread was held up meanwhile): still
                # a checkpoint, so that a cancelled caller stops here.
                await anyio.lowlevel.checkpoint()
            elif len(self._pending) == 1 and self.poll_for is not None and dest != self.identity:
                await self.poll_for(pending.is_done)
            await pending.wait()
        except BaseException:
            if self._pending.pop(call_id, None) is not None:
                self._send_quietly(dest, [m.encode(m.Cancel(call_id))])
            elif type(pending.header) is m.Result:  # it came as we gave up
                self.codec.discard(pending.header.payload, dest)
                self._settle(dest, pending.header)
            raise
        if pending.error is not None:
            raise pending.error
        reply = pending.header
        if type(reply) is m.Result:
            try:
                return self._load(reply.payload, pending.frames, f"result of {method}()", dest)
            finally:
                self._settle(dest, reply)
        assert reply is not None
        raise unpack_error(reply.payload)

    def _encode_call(
        self,
        dest: bytes,
        target: int,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        credit: int = 0,
    ) -> tuple[int, list[Any]]:
        """A new call id and the frames of its Call, linked to the call this
        task is serving (if any) so that its chain can re-enter."""
        call_id = self._next_id()
        ctx = current_call.get()
        parent, chain = (0, call_id) if ctx is None else ctx
        payload, buffers = self.codec.dumps_call(
            args, kwargs, self.mark, f"arguments of {method}()", dest
        )
        header = m.encode(m.Call(call_id, parent, chain, target, method, payload, credit))
        return call_id, [header, *buffers]

    def notify(
        self, dest: bytes, target: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Call without waiting for (or hearing of) the result."""
        self.check_open(dest)
        _, frames = self._encode_call(dest, target, method, args, kwargs)
        try:
            self._transmit(dest, frames)
        except TransportError as exc:
            raise self._unreachable(dest, exc) from exc

    def stream(
        self,
        dest: bytes,
        target: int,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        window: int = STREAM_WINDOW,
    ) -> Any:
        """Iterate the items that an async-generator method yields: an async
        iterator on the event loop's thread, a blocking one on other threads."""
        stream = RemoteStream(self, dest, target, method, args, kwargs, window)
        if threading.get_ident() == self._loop_thread:
            return stream
        if self._closed is not None:
            raise self._closed()
        return _BlockingStream(stream, self._token)

    def _load(self, payload: bytes, frames: Sequence[Any], what: str, src: bytes) -> Any:
        token = _loading.set(self)
        try:
            return self.codec.loads(payload, frames, what, src)
        finally:
            _loading.reset(token)

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

    # -- incoming messages -------------------------------------------------

    def on_message(self, src: bytes, frames: list[Any]) -> Job | None:
        """Handle one message from ``src``: ``[header, *buffers]``.

        A call is returned as a job for the transport to run in a task;
        everything else is handled here and now.
        """
        try:
            msg = m.decode(frames[0])
        except m.DecodeError:
            self.dropped["malformed"] += 1
            return None
        kind = type(msg)
        job = None
        if kind is m.Result or kind is m.Error:
            self._on_reply(src, msg, frames)  # type: ignore[arg-type]
        elif kind is m.Call:
            job = self._on_call(src, msg, frames)  # type: ignore[arg-type]
        elif kind is m.StreamItem:
            stream = self._pending.get(msg.call_id)  # type: ignore[union-attr]
            if type(stream) is _StreamIn:
                self._unread += 1
                stream.items.append((msg, frames[1:]))  # type: ignore[arg-type]
                stream.wake()
            else:  # its consumer gave up
                self.codec.discard(msg.payload, src)  # type: ignore[union-attr]
        elif kind is m.StreamEnd:
            stream = self._pending.pop(msg.call_id, None)  # type: ignore[union-attr]
            if type(stream) is _StreamIn:
                stream.done = True
                stream.wake()
        elif kind is m.Credit:
            out = self._streams_out.get((src, msg.call_id))  # type: ignore[union-attr]
            if out is not None:
                out.credit += msg.n  # type: ignore[union-attr]
                if out.event is not None:
                    out.event.set()
        elif kind is m.Cancel:
            scope = self._running.get((src, msg.call_id))  # type: ignore[union-attr]
            if scope is not None:
                scope.cancel()
            else:
                self._drop_queued(lambda s, c: s == src and c == msg.call_id)  # type: ignore[union-attr]
        elif kind is m.Release:
            self._release(msg.oid, msg.count)  # type: ignore[union-attr]
        elif kind is m.Unlease:
            self._unlease(src, msg.leases)  # type: ignore[union-attr]
        elif kind is m.Died:
            exc = unpack_error(msg.payload)  # type: ignore[union-attr]
            self.peer_gone(msg.actor, lambda: _fresh(exc))  # type: ignore[union-attr]
        elif kind is m.Bye and self.on_bye is not None:
            self.on_bye(src, msg)  # type: ignore[arg-type]
        else:
            self.dropped["unexpected"] += 1
        if self._deferred:
            self._flush_deferred()
        return job

    def _on_reply(self, src: bytes, msg: m.Result | m.Error, frames: list[zmq.Frame]) -> None:
        pending = self._pending.pop(msg.call_id, None)
        if type(pending) is _Pending:
            # Its caller settles the leases given back once it has loaded the
            # result: a storage of ours may come back in it, and must not be
            # freed first (the peer's last lease on it rides on this reply,
            # or on an Unlease right behind it).
            if type(msg) is m.Result:
                self._unread += 1
            pending.finish(msg, frames[1:])
            return
        if type(msg) is m.Result and msg.unleased:
            self._unlease(src, msg.unleased)
        if pending is None:  # the caller gave up (cancelled) before the reply came
            if type(msg) is m.Result:
                self.codec.discard(msg.payload, src)
            return
        if type(msg) is m.Error:
            pending.fail(unpack_error(msg.payload))

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

    def _on_call(self, src: bytes, msg: m.Call, frames: list[zmq.Frame]) -> Job | None:
        export = self._exports.get(msg.target)
        if export is None or self._closed is not None:
            what = self._retired.get(msg.target, f"object #{msg.target}")
            exc = ActorClosedError(f"{what!r} in {self.name!r} was stopped or unregistered")
            self.codec.discard(msg.payload, src)
            self._send_quietly(src, [m.encode(m.Error(msg.call_id, pack_error(exc, self.name)))])
            return None
        gate = export.gate
        if gate is not None and not gate.try_enter(msg.chain):
            # Not its turn: it waits as data, not as a parked task.
            gate.queue.append((msg.chain, (src, msg, frames)))
            return None
        return functools.partial(self._serve_turns, src, msg, frames, export)

    async def _serve_turns(
        self, src: bytes, msg: m.Call, frames: list[zmq.Frame], export: _Export
    ) -> None:
        """Serve a call whose turn is taken, then the queued calls that the
        end of each turn lets in, one after another in this task."""
        gate = export.gate
        # The job's scope, entered before the method's first step by whoever
        # runs jobs: a method that enters a scope of its own before it first
        # suspends (fail_after, a task group, trio.sleep) nests it inside
        # this one, as the event loop requires.
        scope = job_scope.get()
        if gate is None:
            await self._serve_call(src, msg, frames, export, scope)
            return
        while True:
            try:
                await self._serve_call(src, msg, frames, export, scope)
            except BaseException:
                self._next_turn(gate, msg.chain, export, here=False)
                raise
            ready = self._next_turn(gate, msg.chain, export, here=not scope.cancel_called)
            if ready is None:
                return
            src, msg, frames = ready

    def _next_turn(self, gate: TurnGate, chain: int, export: _Export, *, here: bool) -> Any:
        """End a call's turn. The queued call that this lets in, if any, is
        returned to be served next in this job; unless not ``here`` (its
        scope was cancelled, or it failed): then it gets a task of its own."""
        gate.leave(chain)
        ready = gate.next_ready()
        if ready is None or here:
            return ready
        assert self._tg is not None
        self._tg.start_soon(run_job, functools.partial(self._serve_turns, *ready, export))
        return None

    async def _serve_call(
        self, src: bytes, msg: m.Call, frames: list[zmq.Frame], export: _Export, scope: Any
    ) -> None:
        plane = self.plane
        plane.serving += 1
        # Workers run one call after another: reset what this one set.
        token = current_call.set((msg.call_id, msg.chain))
        try:
            # Cancelling the scope cancels the call; the Cancelled exception
            # goes past this method (no reply: nobody wants one) to the scope.
            key = (src, msg.call_id)
            self._running[key] = scope
            try:
                result = await self._invoke(src, export, msg, frames)
            finally:
                del self._running[key]
        except (Exception, KeyboardInterrupt) as exc:
            # A KeyboardInterrupt here was raised by the method itself (actor
            # processes ignore SIGINT): the call fails with it, reported as
            # what it was (a RemoteError: never re-raised as a Ctrl-C here).
            self._send_quietly(src, [m.encode(m.Error(msg.call_id, pack_error(exc, export.name)))])
        except SystemExit as exc:
            if self.on_exit is None:
                raise
            self.on_exit(exc, f"{export.name}.{msg.method}()")
        else:
            if not msg.credit:
                self._reply(src, msg.call_id, result, export.name)
        finally:
            current_call.reset(token)
            plane.serving -= 1
            if plane.dead:
                plane.drain()

    async def _invoke(
        self, src: bytes, export: _Export, msg: m.Call, frames: list[zmq.Frame]
    ) -> Any:
        method = msg.method
        if export.kinds is None:
            fn, kind = export.obj, export.kind
        else:
            kind = export.kinds.get(method)  # type: ignore[assignment]
            if kind is None:
                self.codec.discard(msg.payload, src)
                raise AttributeError(
                    f"actor {export.name!r} ({type(export.obj).__qualname__}) has no public "
                    f"method {method!r}"
                )
            fn = getattr(export.obj, method)
        args, kwargs = self._load(msg.payload, frames[1:], f"arguments of {method}()", src)
        if msg.credit:
            if kind is not Kind.STREAM:
                raise TypeError(f"{method}() is not an async generator: await it, do not iterate")
            await self._produce(src, msg, fn(*args, **kwargs))
            return None
        if kind is Kind.ASYNC:
            return await fn(*args, **kwargs)
        if kind is Kind.SYNC:
            return await self._in_thread(functools.partial(fn, *args, **kwargs), export, src)
        raise TypeError(f"{method}() is an async generator: iterate it with `async for`")

    async def _in_thread(self, fn: Callable[[], Any], export: _Export, src: bytes) -> Any:
        """Run a sync method or callback in a worker thread.

        A caller that gives up does not interrupt it (a thread cannot be):
        it keeps its turn until it returns, and its result is dropped. Only
        :meth:`finish_threads`, when this process closes, stops waiting for it.
        """
        with anyio.CancelScope(shield=True) as guard:
            caller = self.peer_names.get(src, src.decode(errors="replace"))
            self._threads[guard] = f"{export.name} (called by {caller!r})"
            try:
                return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
            finally:
                del self._threads[guard]
                if not self._threads and self._threads_done is not None:
                    self._threads_done.set()
        raise ActorClosedError(f"{self.name!r} closed while {export.name} still ran in a thread")

    async def finish_threads(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the sync calls still running in worker
        threads, saying what for; then stop waiting for them (their threads
        run on, and their results are dropped)."""
        if not self._threads:
            return
        running = ", ".join(sorted(self._threads.values()))
        _log.warning(
            "atoll: %s is closing; waiting up to %g s for sync calls still running in "
            "worker threads: %s",
            self.name,
            seconds,
            running,
        )
        self._threads_done = anyio.Event()
        with anyio.CancelScope(shield=True), anyio.move_on_after(seconds):
            await self._threads_done.wait()
        if self._threads:
            _log.warning(
                "atoll: %s no longer waits for sync calls still running after %g s: %s; "
                "their threads run on, and their results are dropped",
                self.name,
                seconds,
                ", ".join(sorted(self._threads.values())),
            )
            self.abandoned_threads = len(self._threads)
            for guard in list(self._threads):
                guard.cancel()

    def _reply(self, dest: bytes, call_id: int, result: Any, name: str) -> None:
        try:
            payload, buffers = self.codec.dumps_value(result, self.mark, "result", dest)
        except SerializationError as exc:
            self._send_quietly(dest, [m.encode(m.Error(call_id, pack_error(exc, name)))])
            return
        # Leases given back ride on the reply: settled before it is delivered.
        unleased = self.plane.drain(keep_for=dest) if self.plane.dead else ()
        self._send_quietly(dest, [m.encode(m.Result(call_id, payload, unleased)), *buffers])

    async def _produce(self, dest: bytes, msg: m.Call, agen: Any) -> None:
        key = (dest, msg.call_id)
        out = _StreamOut(msg.credit)
        self._streams_out[key] = out
        try:
            async with aclosing(agen):
                async for item in agen:
                    while out.credit <= 0:
                        out.event = anyio.Event()
                        await out.event.wait()
                    out.credit -= 1
                    payload, buffers = self.codec.dumps_value(item, self.mark, "stream item", dest)
                    self._transmit(dest, [m.encode(m.StreamItem(msg.call_id, payload)), *buffers])
            self._transmit(dest, [m.encode(m.StreamEnd(msg.call_id))])
        finally:
            del self._streams_out[key]

    # -- callbacks: exported callables and their proxies -------------------

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
        return (_rebuild_callable, (self.identity, oid, _EXPORT_WEIGHT, export.name, export.kind))

    def _release(self, oid: int, weight: int) -> None:
        export = self._exports.get(oid)
        if export is None or export.kinds is not None:
            return
        export.weight -= weight
        if export.weight <= 0:
            del self._exports[oid]
            for key, value in list(self._export_keys.items()):
                if value == oid:
                    del self._export_keys[key]


class _Callback:
    """A callable marked to be sent by reference to its owner."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn


def _fresh(exc: Exception) -> Exception:
    """A new exception like ``exc``, so concurrent raisers never share one."""
    new = type(exc).__new__(type(exc))
    new.__dict__.update(exc.__dict__)
    new.args = exc.args
    return new


class RemoteCallable:
    """A callable that lives in another process; calling it runs it there.

    On the event loop's thread a call returns an awaitable; on any other thread
    (inside a sync actor method, say) it blocks and returns the result.
    """

    __slots__ = ("__weakref__", "_kind", "_name", "_node", "_oid", "_owner", "_weight")

    def __init__(
        self, node: Node, owner: bytes, oid: int, weight: int, name: str, kind: Kind
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
        return (_rebuild_callable, (self._owner, self._oid, give, self._name, self._kind))

    def __del__(self) -> None:
        if self._weight:
            self._node.defer(self._owner, [m.encode(m.Release(self._oid, self._weight))])


def _rebuild_callable(owner: bytes, oid: int, weight: int, name: str, kind: Kind) -> Any:
    node = _loading.get()
    if owner == node.identity:
        export = node._exports.get(oid)
        if export is None:
            raise AtollError(f"callback {name} was sent back to {node.name!r}, which released it")
        node._release(oid, weight)
        return export.obj
    proxy = node._proxies.get((owner, oid))
    if proxy is None:
        proxy = RemoteCallable(node, owner, oid, weight, name, kind)
        node._proxies[(owner, oid)] = proxy
    else:
        proxy._weight += weight
    return proxy


class RemoteStream:
    """Async iterator over the items a remote async generator yields.

    Backpressure is by credit: the producer may run ``window`` items ahead;
    the consumer grants more as it takes items. Leaving the loop early (or
    ``aclose()``) cancels the producer.
    """

    def __init__(
        self,
        node: Node,
        dest: bytes,
        target: int,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        window: int,
    ) -> None:
        if window < 2:
            raise ValueError(f"stream window must be at least 2, got {window}")
        self._node = node
        self._dest = dest
        self._request = (target, method, args, kwargs)
        self._window = window
        self._call_id = 0
        self._state: _StreamIn | None = None

    def __aiter__(self) -> RemoteStream:
        return self

    def __await__(self) -> Any:
        raise TypeError(
            f"{self._request[1]}() is an async generator method: iterate it with "
            "`async for`, do not await it"
        )

    def _open(self) -> _StreamIn:
        node = self._node
        node.check_open(self._dest)
        call_id, frames = node._encode_call(self._dest, *self._request, credit=self._window)
        state = _StreamIn(self._dest)
        node._pending[call_id] = state
        self._call_id = call_id
        self._state = state
        try:
            node._transmit(self._dest, frames)
        except TransportError as exc:
            del node._pending[call_id]
            node.check_open(self._dest)
            raise node._unreachable(self._dest, exc) from exc
        return state

    async def __anext__(self) -> Any:
        state = self._state
        if state is None:
            state = self._open()
        while not state.items:
            if state.done:
                if state.error is not None:
                    raise state.error
                raise StopAsyncIteration
            state.event = anyio.Event()
            try:
                await state.event.wait()
            except BaseException:
                self._abort()
                raise
        item, frames = state.items.popleft()
        state.consumed += 1
        if state.consumed * 2 >= self._window and not state.done:
            self._node._send_quietly(
                self._dest, [m.encode(m.Credit(self._call_id, state.consumed))]
            )
            state.consumed = 0
        try:
            return self._node._load(
                item.payload, frames, f"item of {self._request[1]}()", self._dest
            )
        finally:
            self._node._read_one()

    def _abort(self) -> None:
        state = self._state
        if state is not None:
            self._drop_items(state)
            if not state.done:
                state.done = True
                if self._node._pending.pop(self._call_id, None) is not None:
                    self._node._send_quietly(self._dest, [m.encode(m.Cancel(self._call_id))])

    def _drop_items(self, state: _StreamIn) -> None:
        """Items received and never to be read: give back what they lease."""
        while state.items:
            item, _ = state.items.popleft()
            self._node.codec.discard(item.payload, self._dest)
            self._node._read_one()

    async def aclose(self) -> None:
        """Stop the stream; the producer's generator is closed in its process."""
        self._abort()
        await anyio.lowlevel.checkpoint()

    def __del__(self) -> None:
        state = self._state
        if state is not None:
            self._drop_items(state)
            if not state.done:
                state.done = True
                self._node._pending.pop(self._call_id, None)
                self._node.defer(self._dest, [m.encode(m.Cancel(self._call_id))])


class _BlockingStream:
    """A :class:`RemoteStream` iterated from a thread outside the event loop."""

    def __init__(self, stream: RemoteStream, token: Any) -> None:
        self._stream = stream
        self._token = token

    def __iter__(self) -> _BlockingStream:
        return self

    def __next__(self) -> Any:
        import anyio.from_thread

        try:
            return anyio.from_thread.run(self._stream.__anext__, token=self._token)
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        import anyio.from_thread

        anyio.from_thread.run(self._stream.aclose, token=self._token)
