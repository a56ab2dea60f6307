"""The host's side of ``breakpoint()`` in actors (see ``_breakpoint``).

A Unix socket, ``debug``, in the hub's private directory. An actor process
at a breakpoint connects, says who it is (identity and per-spawn secret,
checked as the hub checks its hello) and waits its turn for the host's
terminal; then the host relays between the terminal and the actor's pdb
until the session ends (``continue``, ``quit``, or the actor's death).
Only trusted actors get the terminal, and only when the host has one (its
stdin is a tty); the others are told why, and their ``breakpoint()``
returns. An actor waiting for or holding the terminal is not hung: the
health probe leaves it alone (``ActorProcess.debugging``).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import anyio
import anyio.abc

from ..transport._hub import Hub
from ..transport._plain import UNTRUSTED_MARKS
from ._breakpoint import GO
from ._control import read_line
from ._processes import Processes

_logger = logging.getLogger(__name__)

SOCKET = "debug"
_HELLO_LIMIT = 4096
_HELLO_WAIT = 5.0


class Debugger:
    """Serves the debug socket: one actor's pdb session on the host's
    terminal at a time, the others waiting their turn in order."""

    def __init__(self, directory: str, hub: Hub, processes: Processes) -> None:
        self.path = os.path.join(directory, SOCKET)
        self._hub = hub
        self._processes = processes
        self._terminal = anyio.Lock()
        self.sessions = 0
        """Sessions held so far."""

    async def serve(self) -> None:
        try:
            listener = await anyio.create_unix_listener(self.path, mode=0o600)
        except OSError as exc:
            _logger.warning("atoll: no debug socket: breakpoint() in actors is ignored (%s)", exc)
            return
        async with listener:
            await listener.serve(self._handle)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(_HELLO_WAIT):
                    hello = json.loads(await read_line(stream, _HELLO_LIMIT))
                identity = str(hello["identity"]).encode()
                secret = bytes.fromhex(str(hello["secret"]))
                name, pid, where = str(hello["name"]), int(hello["pid"]), str(hello["where"])
            except (ValueError, KeyError, TypeError, TimeoutError, anyio.EndOfStream):
                return  # not an actor's hello
            actor = self._processes.actors.get(identity)
            if not self._hub.proves(identity, secret) or actor is None:
                return await _refuse(stream, "not an actor of this host")
            if identity[:1] in UNTRUSTED_MARKS:
                return await _refuse(stream, "an untrusted actor does not get the host's terminal")
            if not _has_terminal():
                return await _refuse(stream, "the host has no terminal (its stdin is not a tty)")
            actor.debugging += 1
            try:
                async with self._terminal:
                    await self._session(stream, name, pid, where)
            finally:
                actor.debugging -= 1
                actor.debugged_until = anyio.current_time()

    async def _session(
        self, stream: anyio.abc.SocketStream, name: str, pid: int, where: str
    ) -> None:
        self.sessions += 1
        _show(f"\n--- atoll: actor {name!r} (pid {pid}) stopped at {where}; "
              "`c` lets it go on ---\n")  # fmt: skip
        try:
            await stream.send(GO + b"\n")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(_keyboard, stream)
            try:
                while True:
                    _show(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the session ended: continued, quit, or the actor died
            tg.cancel_scope.cancel()
        _show(f"--- atoll: actor {name!r} goes on ---\n")


def _has_terminal() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (AttributeError, ValueError, OSError):
        return False  # no stdin, or not a file


def _show(data: str | bytes) -> None:
    out = sys.stdout
    if isinstance(data, bytes):
        data = data.decode(errors="replace")
    out.write(data)
    out.flush()


async def _keyboard(stream: anyio.abc.SocketStream) -> None:
    """Pass what is typed on the host's terminal to the actor's pdb."""
    fd = sys.stdin.fileno()
    while True:
        await anyio.wait_readable(fd)
        data = os.read(fd, 4096)
        if not data:
            return  # the terminal closed: the session ends with the actor's reads
        await stream.send(data)


async def _refuse(stream: anyio.abc.SocketStream, why: str) -> None:
    try:
        await stream.send(b"N" + why.encode() + b"\n")
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
