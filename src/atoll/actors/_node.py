"""The RPC engine of one process, shared by the host and every actor process.

A :class:`Node` makes calls (to a peer identity and an object id there) and
serves calls to the objects it exports: the actor itself (object 0 in an actor
process) and callables passed along as callbacks. It knows nothing about
sockets: it is given a ``transmit(dest, frames)`` function and fed incoming
messages through :meth:`Node.on_message`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from ..transport import _messages as m
from ..transport._hub import HOST
from ..transport._socket import Job, event_maker
from ._calling import Calling
from ._errors_wire import unpack_error
from ._node_state import ExcFactory, Handle, StreamIn

_log = logging.getLogger(__name__)

_GONE_KEPT = 256
"""Peers that ended whose exit (code, stderr) a call to them still reports."""


class Node(Calling):
    """Calls out, serves calls in, for one process."""

    def _message_handlers(self) -> dict[type, Handle]:
        return {
            m.Result: self._on_reply,
            m.Error: self._on_reply,
            m.Call: self._on_call,
            m.StreamItem: self._on_stream_item,
            m.StreamEnd: self._on_stream_end,
            m.Credit: self._on_credit,
            m.Cancel: self._on_cancel,
            m.Release: self._on_release,
            m.Unlease: self._on_unlease,
            m.Died: self._on_died,
            m.Bye: self._on_bye,
        }

    def start(self, tg: TaskGroup) -> None:
        """Serve incoming calls as tasks of ``tg``, on the current event loop."""
        self._tg = tg
        self._token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        self._new_event = event_maker()
        tg.start_soon(self.plane.serve)

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

    def peer_gone(
        self, peer: bytes, make_exc: ExcFactory, *, exited: bool = True, restarting: bool = False
    ) -> None:
        """``peer`` is gone: fail what waits on it, cancel what it asked for.
        Not ``exited`` (it is stopping): the tensor plane still settles leases
        with it until it has. ``restarting``: a new process takes its
        identity, so calls to it after this one are not refused here."""
        gone = self._gone
        if not restarting:
            gone[peer] = make_exc
        given_back = self._held_back.pop(peer, None)
        if given_back:
            self.plane.unlease(peer, given_back)
        while len(gone) > _GONE_KEPT:
            # The oldest: a call through a ref that old gets the hub's "no such actor".
            oldest = next(iter(gone))
            del gone[oldest]
            self.peer_names.pop(oldest, None)
        if restarting:
            self.plane.peer_replaced(peer)
        elif exited:
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
        handle = self._handlers.get(type(msg))
        if handle is None:
            self.dropped["unexpected"] += 1
            return None
        try:
            job = handle(src, msg, frames)
        except Exception as exc:  # a header well formed, its contents not (an error's payload)
            self.dropped["malformed"] += 1
            _log.debug("atoll: dropped a malformed %s from %r: %s", type(msg).__name__, src, exc)
            return None
        if self._deferred:
            self._flush_deferred()
        return job

    def _on_stream_item(self, src: bytes, msg: m.StreamItem, frames: list[Any]) -> None:
        stream = self._pending.get(msg.call_id)
        if stream is not None and stream.dest != src:
            self.dropped["misaddressed"] += 1
            return
        if type(stream) is StreamIn:
            self._unread += 1
            stream.items.append((msg, frames[1:]))
            stream.wake()
        else:  # its consumer gave up
            self.codec.discard(msg.payload, src)

    def _on_stream_end(self, src: bytes, msg: m.StreamEnd, frames: list[Any]) -> None:
        stream = self._pending.get(msg.call_id)
        if stream is None:  # its consumer gave up
            return
        if stream.dest != src:
            self.dropped["misaddressed"] += 1
            return
        del self._pending[msg.call_id]
        if type(stream) is StreamIn:
            stream.done = True
            stream.wake()

    def _on_credit(self, src: bytes, msg: m.Credit, frames: list[Any]) -> None:
        out = self._streams_out.get((src, msg.call_id))
        if out is not None:
            out.credit += msg.n
            if out.event is not None:
                out.event.set()

    def _on_cancel(self, src: bytes, msg: m.Cancel, frames: list[Any]) -> None:
        scope = self._running.get((src, msg.call_id))
        if scope is not None:
            scope.cancel()
        else:
            call_id = msg.call_id
            self._drop_queued(lambda s, c: s == src and c == call_id)

    def _on_release(self, src: bytes, msg: m.Release, frames: list[Any]) -> None:
        self._release(msg.oid, msg.count, src)

    def _on_unlease(self, src: bytes, msg: m.Unlease, frames: list[Any]) -> None:
        self._unlease(src, msg.leases)

    def _on_died(self, src: bytes, msg: m.Died, frames: list[Any]) -> None:
        if src != HOST or self.identity == HOST or msg.actor in (HOST, self.identity):
            # Only the host knows who died, and says so only to the others.
            self.dropped["unentitled"] += 1
            return
        exc = unpack_error(msg.payload, src)
        self.peer_gone(msg.actor, lambda: _fresh(exc), restarting=msg.restarting)

    def _on_bye(self, src: bytes, msg: m.Bye, frames: list[Any]) -> None:
        if self.on_bye is None:
            self.dropped["unexpected"] += 1
        else:
            self.on_bye(src, msg)


def _fresh(exc: Exception) -> Exception:
    """A new exception like ``exc``, so concurrent raisers never share one."""
    new = type(exc).__new__(type(exc))
    new.__dict__.update(exc.__dict__)
    new.args = exc.args
    return new
