"""Serving: calls from peers to the objects this process exports.

An incoming call becomes a job, which the transport runs in a worker's
cancel scope (see ``transport._socket``): up to its first suspension
synchronously, so a call that does not suspend has replied before the event
loop turns. An actor's calls take turns (``_turns``): a call not let in
waits as data in its gate's queue, and the call whose turn ends lets the
next in and serves it in the same job. A sync method runs in a worker
thread; an async generator method streams its items under credit.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import anyio
import zmq

from .._errors import ActorClosedError, AtollError
from ..transport import _messages as m
from ..transport._hub import HOST
from ..transport._plain import UNTRUSTED_MARKS
from ..transport._socket import Job, job_scope, run_job
from ._actor import Kind
from ._callbacks import Callbacks
from ._errors_wire import pack_error
from ._node_state import Export, StreamOut, current_call
from ._tracing import call_attributes
from ._turns import TurnGate

_log = logging.getLogger(__name__)


class NotStarted:
    """Stands for a call's cancel scope until its job starts."""

    __slots__ = ("cancel_called",)

    def __init__(self) -> None:
        self.cancel_called = False

    def cancel(self) -> None:
        self.cancel_called = True


class Serving(Callbacks):
    """Serves calls in to exported objects: turns, threads, streams out."""

    def _on_call(self, src: bytes, msg: m.Call, frames: list[zmq.Frame]) -> Job | None:
        export = self._exports.get(msg.target)
        if export is None or self._closed is not None:
            what = self._retired.get(msg.target, f"object #{msg.target}")
            exc = ActorClosedError(f"{what!r} in {self.name!r} was stopped or unregistered")
            self.codec.discard(msg.payload, src)
            self._send_error(src, msg.call_id, exc, self.name)
            return None
        if export.kinds is None and src[:1] in UNTRUSTED_MARKS and not export.held_by(src):
            # A callback: only a peer it was handed to may call it (untrusted
            # peers cannot guess another's object ids into calls).
            self.dropped["unentitled"] += 1
            self.codec.discard(msg.payload, src)
            exc = ActorClosedError(f"object #{msg.target} in {self.name!r} was not handed to you")
            self._send_error(src, msg.call_id, exc, self.name)
            return None
        gate = export.gate
        if gate is not None and not gate.try_enter(msg.chain):
            # Not its turn: it waits as data, not as a parked task.
            gate.queue.append((msg.chain, (src, msg, frames)))
            return None
        # Until its job starts, a Cancel for it is noted here (else, with
        # nothing running nor queued to cancel, it would be lost).
        self._running[(src, msg.call_id)] = NotStarted()
        return functools.partial(self._serve_turns, src, msg, frames, export)

    async def _serve_turns(
        self, src: bytes, msg: m.Call, frames: list[zmq.Frame], export: Export
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

    def _next_turn(self, gate: TurnGate, chain: int, export: Export, *, here: bool) -> Any:
        """End a call's turn. The queued call that this lets in, if any, is
        returned to be served next in this job; unless not ``here`` (its
        scope was cancelled, or it failed): then a task of its own serves
        the queue (see :meth:`_serve_next`)."""
        gate.leave(chain)
        if here:
            return gate.next_ready()
        if gate.queue:
            assert self._tg is not None
            self._tg.start_soon(run_job, functools.partial(self._serve_next, export))
        return None

    async def _serve_next(self, export: Export) -> None:
        """Serve the queued calls that a cancelled or failed call let in. It
        takes the next one only now, in its own task: until then the call
        stays queued, and a cancellation that comes meanwhile drops it from
        the queue rather than finding it neither queued nor running."""
        assert export.gate is not None
        ready = export.gate.next_ready()
        if ready is not None:
            src, msg, frames = ready
            await self._serve_turns(src, msg, frames, export)

    async def _serve_call(
        self, src: bytes, msg: m.Call, frames: list[zmq.Frame], export: Export, scope: Any
    ) -> None:
        plane = self.plane
        plane.call_started()
        # Workers run one call after another: reset what this one set.
        token = current_call.set((msg.call_id, msg.chain))
        key = (src, msg.call_id)
        # Counted: the actor's methods and callbacks, not the well-known
        # objects the host asks (its health probe, the status report).
        method = msg.method if msg.target == 0 else export.name if msg.target >= 16 else ""
        start = 0.0
        failed = True
        traced = self.tracer.server_start(msg.trace) if msg.trace and self.tracer else None
        error = "cancelled"
        try:
            # Cancelling the scope cancels the call; the Cancelled exception
            # goes past this method (no reply: nobody wants one) to the scope.
            early = self._running.get(key)
            if type(early) is NotStarted and early.cancel_called:
                del self._running[key]  # its caller gave up before it started
                self.codec.discard(msg.payload, src)
                return
            self._running[key] = scope
            if method:
                start = self.calls.started(key, method, msg.chain)
            try:
                result = await self._invoke(src, export, msg, frames)
            finally:
                del self._running[key]
        except (Exception, KeyboardInterrupt) as exc:
            # A KeyboardInterrupt here was raised by the method itself (actor
            # processes ignore SIGINT): the call fails with it, reported as
            # what it was (a RemoteError: never re-raised as a Ctrl-C here).
            error = f"{type(exc).__name__}: {exc}"
            self._send_error(src, msg.call_id, exc, export.name)
        except SystemExit as exc:
            if self.on_exit is None:
                raise
            self.on_exit(exc, f"{export.name}.{msg.method}()")
        else:
            failed = False
            if not msg.credit:
                self._reply(src, msg.call_id, result, export.name)
        finally:
            current_call.reset(token)
            plane.call_ended()
            if start:
                self.calls.ended(key, method, start, failed)
            if traced is not None:
                self._end_span(traced, src, msg, export, error if failed else "")

    def _end_span(self, traced: Any, src: bytes, msg: m.Call, export: Export, error: str) -> None:
        caller = self.peer_names.get(src) or (
            "host" if src == HOST else src.decode(errors="replace")
        )
        attributes = call_attributes(export.name, msg.method, msg.call_id, caller)
        attributes["atoll.chain"] = msg.chain
        self.tracer.server_end(traced, f"{export.name}.{msg.method}", attributes, error)

    async def _invoke(
        self, src: bytes, export: Export, msg: m.Call, frames: list[zmq.Frame]
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

    async def _in_thread(self, fn: Callable[[], Any], export: Export, src: bytes) -> Any:
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

    def _send_error(self, dest: bytes, call_id: int, exc: BaseException, name: str) -> None:
        payload = pack_error(exc, name, plain=self.codec.plain_only)
        self._send_quietly(dest, [m.encode(m.Error(call_id, payload))])

    def _reply(self, dest: bytes, call_id: int, result: Any, name: str) -> None:
        try:
            payload, buffers = self.codec.dumps_value(result, self.mark, "result", dest)
        except AtollError as exc:  # not sendable, or no shared memory left for it
            self._send_error(dest, call_id, exc, name)
            return
        # Leases given back ride on the reply: settled before it is delivered.
        unleased = self.plane.drain(keep_for=dest) if self.plane.dead else ()
        self._send_quietly(dest, [m.encode(m.Result(call_id, payload, unleased)), *buffers])

    async def _produce(self, dest: bytes, msg: m.Call, agen: Any) -> None:
        key = (dest, msg.call_id)
        out = StreamOut(msg.credit)
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
