"""Messages for actors that have no process at the moment.

An actor that restarts, sleeps (lazy, or stopped for being idle) or is
being reloaded keeps its identity, and what is sent to it meanwhile, from
the host or from other actors, waits here, in order: the hub routes it to
the host (the actor is *parked*), and the host keeps it. When a process
serves the identity again the messages go to it; if none will, each call
among them is answered with the reason. A message to an identity that is
neither here nor connected is a call to an actor that is gone: answered so.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import ActorClosedError, AtollError
from ..transport import _messages as m
from ..transport._hub import HOST, Hub
from ._errors_wire import pack_error
from ._processes import Processes
from ._ref import BOOT_OID, STATUS_OID

HELD_MAX = 10_000
"""Messages kept for one actor; past it, they are refused as for a missing peer."""


class Waiting:
    """What waits, by identity: ``(sender, frames)`` in the order it came."""

    def __init__(self, hub: Hub, processes: Processes) -> None:
        self._hub = hub
        self._processes = processes
        self.held: dict[bytes, deque[tuple[bytes, Sequence[Any]]]] = {}
        self.on_held: Callable[[bytes], None] = lambda identity: None
        """Told each time a message is kept (to start a sleeping actor)."""

    def __contains__(self, identity: bytes) -> bool:
        return identity in self.held

    def park(self, identity: bytes) -> None:
        """From now on, what comes for ``identity`` waits here."""
        self.held.setdefault(identity, deque())
        self._hub.parked.add(identity)

    def release(self, identity: bytes) -> None:
        """A process serves ``identity`` again: hand it what waited, in order."""
        self._hub.parked.discard(identity)
        for src, frames in self.held.pop(identity, ()):
            try:
                if src == HOST:
                    self._hub.send(identity, frames)
                else:
                    self._hub.socket.send([identity, src, *frames])
            except AtollError:
                pass  # gone again: its death fails what waits on it

    def fail(self, identity: bytes, error: Exception, name: str, *, keep: bool = False) -> None:
        """Answer each call that waited for ``identity`` with ``error`` (the
        host's own calls are failed by its node); ``keep``: it stays parked."""
        held = self.held.pop(identity, ())
        if keep:
            self.held[identity] = deque()
        else:
            self._hub.parked.discard(identity)
        for src, frames in held:
            if src != HOST:
                self.refuse(src, frames, error, name)

    def refuse(self, src: bytes, frames: Sequence[Any], error: Exception, name: str) -> None:
        """Answer the call in ``frames`` (if it is one) from ``src`` with ``error``."""
        try:
            msg = m.decode(frames[0])
        except m.DecodeError:
            return
        if type(msg) is m.Call:
            try:
                self._hub.send(src, [m.encode(m.Error(msg.call_id, pack_error(error, name)))])
            except AtollError:
                pass

    def hold(self, dest: bytes, src: bytes, frames: Sequence[Any]) -> bool:
        """Keep a message for ``dest`` if it is parked; False if it is not
        (or the message is its new process's boot, or the host asking it
        whether it is busy: those go now)."""
        held = self.held.get(dest)
        if held is None:
            return False
        if src == HOST:
            try:
                msg = m.decode(frames[0])
            except m.DecodeError:
                return False
            if type(msg) is m.Call and msg.target in (BOOT_OID, STATUS_OID):
                return False
        if len(held) >= HELD_MAX:
            return False  # it fails as a message to a missing peer would
        held.append((src, [bytes(f) if not isinstance(f, bytes) else f for f in frames]))
        self.on_held(dest)
        return True

    def unroutable(self, src: bytes, dest: bytes, frames: list[Any]) -> None:
        """The hub's word: ``src`` addressed ``dest``, which is not connected."""
        if self.held and self.hold(dest, src, frames):
            return
        try:
            msg = m.decode(frames[0])
        except m.DecodeError:
            self._hub.dropped["malformed"] += 1
            return
        if type(msg) is not m.Call:
            return  # credits, cancels, releases for a gone actor: nothing to do
        actor = self._processes.actors.get(dest)
        if actor is not None:
            error: Exception = actor.gone_error()
        else:
            error = ActorClosedError(f"no actor with id {dest!r} runs in this host")
        self.refuse(src, frames, error, actor.name if actor is not None else "host")
