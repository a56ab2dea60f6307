"""The hub: the host's ROUTER socket, which authenticates and routes.

Frames on the wire (the ROUTER adds or strips the identity frame):

* a peer's DEALER sends ``[dest, header, *buffers]``;
* the hub receives ``[src, dest, header, *buffers]``;
* a message for the host itself (``dest == HOST``) is handed to ``deliver``;
  any other is forwarded as ``[dest, src, header, *buffers]``, so the receiving
  DEALER reads ``[src, header, *buffers]``.

A peer is known only after the host announced it with :meth:`Hub.expect`, and
proved only after its first message, a :class:`Hello` carrying the per-spawn
secret. Anything else (unknown identities, frames before the Hello, malformed
messages) is dropped and counted in :attr:`Hub.dropped`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from .._errors import TransportError
from ._messages import DecodeError, Hello, decode
from ._socket import AsyncSocket, Job, PeerUnreachableError

HOST = b"@"
"""Identity under which the host itself is addressed."""

Deliver = Callable[[bytes, list[zmq.Frame]], "Job | None"]
Unroutable = Callable[[bytes, bytes, list[zmq.Frame]], None]


def sweep_dead_hosts() -> None:
    """Remove hub directories left by hosts that died without cleaning up."""
    # The host's side imports its tools where it uses them: actor processes
    # import this module too, and start faster without them.
    import glob
    import shutil
    import tempfile

    for path in glob.glob(os.path.join(tempfile.gettempdir(), "atoll-*-*")):
        try:
            pid = int(os.path.basename(path).split("-")[1])
        except ValueError:
            continue
        if not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def remove_hub_dir(endpoint: str) -> None:
    """Remove the private directory of a hub at ``endpoint`` (its host is dead)."""
    if endpoint.startswith("ipc://"):
        path = os.path.dirname(endpoint[len("ipc://") :])
        if os.path.basename(path).startswith("atoll-"):
            import shutil

            shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Peer:
    __slots__ = ("on_hello", "proved", "secret")

    def __init__(self, secret: bytes, on_hello: Callable[[Hello], None]) -> None:
        self.secret = secret
        self.on_hello = on_hello
        self.proved = False


class Hub:
    """The host's ROUTER on an ``ipc://`` path inside a private 0700 directory."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        import tempfile

        sweep_dead_hosts()
        # mkdtemp makes it 0700; the pid in the name lets a sweeper tell
        # whether the owner is still alive.
        self._dir = tempfile.mkdtemp(prefix=f"atoll-{os.getpid()}-")
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            self.endpoint = f"ipc://{os.path.join(self._dir, 'hub')}"
            sock.bind(self.endpoint)
        except zmq.ZMQError:
            # No ipc transport here (or the path is too long): loopback TCP.
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            self.endpoint = f"tcp://127.0.0.1:{port}"
        self.socket = AsyncSocket(sock)
        self._peers: dict[bytes, _Peer] = {}
        self.traffic: dict[bytes, int] = {}
        """Messages to and from each peer listed here, counted (what tells
        the host an actor is idle)."""
        self.parked: set[bytes] = set()
        """Peers whose messages go to the host's ``unroutable`` even once
        connected (an actor being restarted, until its actor is built)."""
        self.dropped: Counter[str] = Counter()
        """Dropped messages by reason: ``unknown``, ``unproved``, ``malformed``,
        ``backlog`` (for a peer that stopped reading)."""

    @property
    def dir(self) -> str:
        """The hub's private directory (0700), removed when the hub closes."""
        return self._dir

    def expect(self, identity: bytes, secret: bytes, on_hello: Callable[[Hello], None]) -> None:
        """Announce a peer that will connect as ``identity`` and prove ``secret``."""
        self._peers[identity] = _Peer(secret, on_hello)

    def forget(self, identity: bytes) -> None:
        """Stop routing to and from ``identity``."""
        self._peers.pop(identity, None)

    def proves(self, identity: bytes, secret: bytes) -> bool:
        """Whether ``secret`` is the one ``identity`` was announced with."""
        import hmac

        peer = self._peers.get(identity)
        return peer is not None and hmac.compare_digest(peer.secret, secret)

    def is_routable(self, identity: bytes) -> bool:
        peer = self._peers.get(identity)
        return peer is not None and peer.proved

    def send(self, dest: bytes, frames: Sequence[Any]) -> None:
        """Send ``frames`` (header first) from the host to peer ``dest``."""
        self.socket.send([dest, HOST, *frames])

    async def serve(self, deliver: Deliver, unroutable: Unroutable) -> None:
        """Route until cancelled.

        ``deliver(src, frames)`` gets messages for the host (header first);
        ``unroutable(src, dest, frames)`` gets messages for a peer that is not
        (or no longer) connected, so the host can answer the sender.
        """
        peers = self._peers
        parked = self.parked
        traffic = self.traffic
        send = self.socket.send

        def on_message(frames: list[zmq.Frame]) -> Job | None:
            if len(frames) < 3:
                self.dropped["malformed"] += 1
                return None
            src = frames[0].bytes
            peer = peers.get(src)
            if peer is None:
                self.dropped["unknown"] += 1
                return None
            if not peer.proved:
                self._admit(src, peer, frames[2])
                return None
            dest = frames[1].bytes
            if traffic:
                if src in traffic:
                    traffic[src] += 1
                if dest in traffic:
                    traffic[dest] += 1
            if dest == HOST:
                return deliver(src, frames[2:])
            target = peers.get(dest)
            if target is None or not target.proved or (parked and dest in parked):
                unroutable(src, dest, frames[2:])
                return None
            try:
                send([frames[1], frames[0], *frames[2:]])
            except PeerUnreachableError:
                unroutable(src, dest, frames[2:])
            except TransportError:  # dest stopped reading: its backlog is full
                self.dropped["backlog"] += 1
            return None

        await self.socket.serve(on_message)

    def _admit(self, src: bytes, peer: _Peer, header: zmq.Frame) -> None:
        import hmac

        try:
            hello = decode(header)
        except DecodeError:
            self.dropped["malformed"] += 1
            return
        if not isinstance(hello, Hello) or not hmac.compare_digest(hello.secret, peer.secret):
            self.dropped["unproved"] += 1
            return
        peer.proved = True
        peer.on_hello(hello)

    def close(self) -> None:
        """Close the socket and remove the private directory."""
        import shutil

        self.socket.close()
        shutil.rmtree(self._dir, ignore_errors=True)
