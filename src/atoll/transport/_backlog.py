"""Messages a socket could not send yet, kept in order, by peer.

A ROUTER that finds one peer's queue full (it stopped reading) keeps what is
for that peer here, and keeps sending to every other peer: one slow or
hostile peer holds up only its own messages. Any other socket has one peer,
and one queue.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from .._errors import TransportError


class Backlog:
    """Queues of unsent messages, one per peer (``None`` for a socket with one)."""

    def __init__(self, by_peer: bool, limit: int) -> None:
        self._by_peer = by_peer
        self._limit = limit
        self.queues: dict[bytes | None, deque[Sequence[Any]]] = {}
        """Empty when nothing waits (what a socket checks on each send)."""

    def _peer_of(self, frames: Sequence[Any]) -> bytes | None:
        if not self._by_peer:
            return None
        first = frames[0]
        return first if type(first) is bytes else bytes(first)

    def holds_for(self, frames: Sequence[Any]) -> bool:
        """Whether messages wait for the peer of ``frames`` (which must then
        wait behind them)."""
        return self._peer_of(frames) in self.queues

    def add(self, frames: Sequence[Any]) -> None:
        """Keep ``frames`` until the peer takes them; TransportError if its
        queue is full (the peer is not reading)."""
        peer = self._peer_of(frames)
        queue = self.queues.get(peer)
        if queue is None:
            queue = self.queues[peer] = deque()
        elif len(queue) >= self._limit:
            raise TransportError(
                f"send backlog is full ({self._limit} messages"
                + ("" if peer is None else f" for {peer!r}")
                + "): the peer is not reading"
            )
        queue.append(frames)

    def flush(self, send: Callable[[Sequence[Any]], None]) -> bool:
        """Send what waits, peer by peer, until each peer's queue is empty or
        full (``send`` raised ``zmq.Again``); True if anything went."""
        sent = False
        for peer, queue in list(self.queues.items()):
            while queue:
                try:
                    send(queue[0])
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != errno.EHOSTUNREACH:
                        raise
                    # A ROUTER's peer left while its message waited: nobody to tell.
                queue.popleft()
                sent = True
            if not queue:
                del self.queues[peer]
        return sent
