"""The host's control socket: how ``atoll status``, ``atoll top`` and
``atoll stack`` attach to a running host from another terminal.

A Unix socket, ``control``, in the hub's private directory (0700, so only
its owner reaches it), beside ``control.key`` (0600): 32 random bytes that
a client must send back, as an actor proves its per-spawn secret to the
hub. The host also checks the connecting process's user (``SO_PEERCRED``)
and refuses any other, root included. One request per connection, one line
of JSON each way: ``{"key": hex, "op": "status"}`` or ``{"key": hex, "op":
"stack", "name": NAME}``; the answer is ``{"status": ...}``, ``{"stack":
text}`` or ``{"error": text}``.
"""

from __future__ import annotations

import glob
import hmac
import logging
import os
import socket
import struct
import tempfile
from typing import Any

import anyio
import anyio.abc
import msgspec

_logger = logging.getLogger(__name__)

SOCKET = "control"
KEY = "control.key"
_REQUEST_LIMIT = 4096
_ANSWER_WAIT = 10.0
"""How long a client waits for the host's answer."""
_CRED = struct.Struct("3i")  # pid, uid, gid


class ControlError(Exception):
    """The control socket could not be reached, or refused the request."""


class Control:
    """The host's side: serves requests on its control socket."""

    def __init__(self, directory: str, observer: Any) -> None:
        self.path = os.path.join(directory, SOCKET)
        self._observer = observer
        self._key = os.urandom(32)
        self._key_path = os.path.join(directory, KEY)
        self.refused = 0
        """Connections refused (another user, or a wrong key)."""

    async def serve(self) -> None:
        try:
            listener = await anyio.create_unix_listener(self.path, mode=0o600)
        except OSError as exc:  # a path too long for a Unix socket, say
            _logger.warning("atoll: no control socket for `atoll status` (%s)", exc)
            return
        fd = os.open(self._key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self._key.hex().encode())
        async with listener:
            await listener.serve(self._handle)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            _, uid, _ = _CRED.unpack(
                raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
            )
            if uid != os.getuid():
                self.refused += 1
                return  # not a word to another user
            try:
                with anyio.fail_after(_ANSWER_WAIT):
                    request = await read_line(stream)
                    answer = await self._answer(request)
            except (ValueError, TimeoutError, anyio.EndOfStream):
                self.refused += 1
                return
            except anyio.BrokenResourceError:
                return
            try:
                await stream.send(msgspec.json.encode(answer) + b"\n")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the client went away

    async def _answer(self, line: bytes) -> dict[str, Any]:
        request = msgspec.json.decode(line)
        if not isinstance(request, dict) or not hmac.compare_digest(
            str(request.get("key", "")).encode(), self._key.hex().encode()
        ):
            raise ValueError("wrong key")
        op = request.get("op")
        if op == "status":
            return {"status": msgspec.to_builtins(await self._observer.status())}
        if op == "stack":
            try:
                return {"stack": await self._observer.stacks_of(str(request.get("name")))}
            except KeyError as exc:
                return {"error": exc.args[0]}
        return {"error": f"unknown request {op!r}: this host knows `status` and `stack`"}


async def read_line(stream: anyio.abc.ByteReceiveStream, limit: int = _REQUEST_LIMIT) -> bytes:
    """One line from ``stream``, of ``limit`` bytes at most (ValueError past it)."""
    data = b""
    while not data.endswith(b"\n"):
        data += await stream.receive()
        if len(data) > limit:
            raise ValueError(f"a line longer than {limit} bytes")
    return data


# -- the client's side (the CLI) --------------------------------------------


def running_hosts() -> list[tuple[int, str]]:
    """This user's hosts that run now, as ``(pid, directory)``, by pid."""
    found = []
    pattern = os.path.join(tempfile.gettempdir(), "atoll-*", SOCKET)
    for path in glob.glob(pattern):
        directory = os.path.dirname(path)
        try:
            pid = int(os.path.basename(directory).split("-")[1])
            if os.stat(directory).st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except (ValueError, IndexError, OSError):
            continue  # not a host's, someone else's, or its host has died
        found.append((pid, directory))
    return sorted(found)


def pick_host(pid: int | None) -> str:
    """The directory of the host to attach to: ``pid``'s, or the only one."""
    hosts = running_hosts()
    if pid is not None:
        for one, directory in hosts:
            if one == pid:
                return directory
        raise ControlError(f"no atoll host of yours runs as pid {pid}")
    if not hosts:
        raise ControlError("no atoll host of yours runs on this machine")
    if len(hosts) > 1:
        pids = ", ".join(str(one) for one, _ in hosts)
        raise ControlError(f"several atoll hosts run (pids {pids}): choose one with --pid")
    return hosts[0][1]


def ask(directory: str, op: str, **fields: Any) -> Any:
    """Send one request to the host whose hub directory is ``directory``."""
    try:
        with open(os.path.join(directory, KEY), "rb") as f:
            key = f.read().decode()
    except OSError as exc:
        raise ControlError(f"cannot read the host's control key: {exc}") from None
    request = msgspec.json.encode({"key": key, "op": op, **fields}) + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_ANSWER_WAIT + 5)
        try:
            sock.connect(os.path.join(directory, SOCKET))
            sock.sendall(request)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ControlError("the host refused the request, or closed meanwhile")
                data += chunk
        except OSError as exc:
            raise ControlError(f"cannot reach the host's control socket: {exc}") from None
    answer = msgspec.json.decode(data)
    if "error" in answer:
        raise ControlError(answer["error"])
    return answer[op]
