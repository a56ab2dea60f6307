"""Calling: calls and streams out to peers, and their replies.

A call gets an id, and the id of the call its task is serving (if any) as
its parent, with the chain it belongs to: the callee lets calls of a chain
that holds its turn re-enter (A calls B, B calls back into A). Its result
or error comes back as a reply; a caller that gives up sends ``Cancel``. A
stream is a call whose items come back one by one, under credit.
"""

from __future__ import annotations

import threading
from collections.abc import Coroutine
from typing import Any

import anyio
import anyio.lowlevel
import zmq

from .._errors import ActorDiedError, TransportError
from ..transport import _messages as m
from ._errors_wire import unpack_error
from ._node_state import CallContext, Pending, StreamIn, current_call
from ._serving import Serving

STREAM_WINDOW = 16
"""Stream items a producer may send ahead of the consumer."""


class Calling(Serving):
    """Makes calls and streams out, and takes their replies."""

    def invoke(
        self,
        dest: bytes,
        target: int,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: bool = False,
    ) -> Any:
        """A call as the caller's thread needs it: a coroutine on the event
        loop's thread, the result itself (blocking) on any other thread.
        ``retry``: made once more if the actor died and is being restarted
        (an idempotent method)."""
        call = self.call_again if retry else self.call
        if threading.get_ident() == self._loop_thread:
            return call(dest, target, method, args, kwargs)
        if self._closed is not None:
            raise self._closed()  # its event loop may be gone: nothing to ask it
        import anyio.from_thread  # only threads need it; actor processes start without it

        return anyio.from_thread.run(
            self._call_from_thread,
            call,
            (dest, target, method, args, kwargs),
            current_call.get(),
            token=self._token,
        )

    async def _call_from_thread(
        self, call: Any, request: tuple[Any, ...], ctx: CallContext | None
    ) -> Any:
        current_call.set(ctx)
        return await call(*request)

    async def call_again(
        self, dest: bytes, target: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """:meth:`call`, made once more if the actor died while it ran and
        is being restarted: for a method marked idempotent."""
        try:
            return await self.call(dest, target, method, args, kwargs)
        except ActorDiedError as exc:
            if not exc.restarting:
                raise
        return await self.call(dest, target, method, args, kwargs)

    def call(
        self, dest: bytes, target: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Coroutine[Any, Any, Any]:
        """Call ``method`` of object ``target`` in peer ``dest``: await it for
        its result. Traced when calls are (not atoll's own well-known objects)."""
        tracer = self.tracer
        if tracer is not None and (target == 0 or target >= 16):
            callee = self.peer_names.get(dest) or dest.decode(errors="replace")
            return tracer.client(self._call, callee, method, dest, target, method, args, kwargs)  # type: ignore[no-any-return]
        return self._call(dest, target, method, args, kwargs)

    async def _call(
        self,
        dest: bytes,
        target: int,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        trace: bytes = b"",
    ) -> Any:
        if self._closed is not None or dest in self._gone:
            self.check_open(dest)
        if self._deferred:
            self._flush_deferred()
        call_id, frames = self._encode_call(dest, target, method, args, kwargs, trace=trace)
        pending = Pending(dest, self._new_event)
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
        raise unpack_error(reply.payload, dest)

    def _encode_call(
        self,
        dest: bytes,
        target: int,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        credit: int = 0,
        trace: bytes = b"",
    ) -> tuple[int, list[Any]]:
        """A new call id and the frames of its Call, linked to the call this
        task is serving (if any) so that its chain can re-enter."""
        call_id = self._next_id()
        ctx = current_call.get()
        parent, chain = (0, call_id) if ctx is None else ctx
        payload, buffers = self.codec.dumps_call(
            args, kwargs, self.mark, f"arguments of {method}()", dest
        )
        header = m.encode(m.Call(call_id, parent, chain, target, method, payload, credit, trace))
        return call_id, [header, *buffers]

    def notify(
        self, dest: bytes, target: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Call without waiting for (or hearing of) the result."""
        self.check_open(dest)
        tracer = self.tracer
        trace = tracer.wire() if tracer is not None and (target == 0 or target >= 16) else b""
        _, frames = self._encode_call(dest, target, method, args, kwargs, trace=trace)
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

    def _on_reply(self, src: bytes, msg: m.Result | m.Error, frames: list[zmq.Frame]) -> None:
        pending = self._pending.pop(msg.call_id, None)
        if pending is not None and pending.dest != src:
            # Call ids are guessable: only the peer a call went to answers it.
            self._pending[msg.call_id] = pending
            self.dropped["misaddressed"] += 1
            return
        if type(pending) is Pending:
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
            pending.fail(unpack_error(msg.payload, src))


class RemoteStream:
    """Async iterator over the items a remote async generator yields.

    Backpressure is by credit: the producer may run ``window`` items ahead;
    the consumer grants more as it takes items. Leaving the loop early (or
    ``aclose()``) cancels the producer.
    """

    def __init__(
        self,
        node: Calling,
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
        self._state: StreamIn | None = None

    def __aiter__(self) -> RemoteStream:
        return self

    def __await__(self) -> Any:
        raise TypeError(
            f"{self._request[1]}() is an async generator method: iterate it with "
            "`async for`, do not await it"
        )

    def _open(self) -> StreamIn:
        node = self._node
        node.check_open(self._dest)
        trace = node.tracer.wire() if node.tracer is not None else b""  # (no span of its own)
        call_id, frames = node._encode_call(
            self._dest, *self._request, credit=self._window, trace=trace
        )
        state = StreamIn(self._dest)
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

    def _drop_items(self, state: StreamIn) -> None:
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
