"""Fork servers: actor processes forked from a process that has already
imported atoll and its dependencies.

Starting Python and importing pyzmq, msgspec, anyio and asyncio takes an
actor process 130-200 ms on a small machine, nearly all of a spawn. A host
therefore starts, per environment, one *fork server*: a process started like
an actor (same interpreter, same flags, same ``sys.path``) that imports what
an actor needs, runs an empty event loop once so that the lazy imports are
done too, and then only forks. Each fork becomes an actor process as if it
had been started fresh: its stdin and stderr are pipes of its own that the
host made, it reads its boot description (secret included) from stdin, and
it creates its ZeroMQ context after the fork. The fork server never creates
one, nor any thread, so forking it is safe.

This module is the host's side: starting a server, asking it for forks,
and each fork as an :class:`anyio.abc.Process`. The server's own loop and
the protocol between the two are in ``_fork_server``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream, Process, TaskGroup

from ._fork_server import EXIT, EXITED, FORKED, PID, READY, SPAWN

# Variables the interpreter or the dynamic loader read only at start-up: a
# fork server started under other values cannot give a child these.
_STARTUP_VARS = ("PYTHON", "LD_", "MALLOC_")

# How long a child's exit status may lag the kernel's word that it ended.
_STATUS_WAIT = 1.0


def supported() -> bool:
    """Whether this system has what fork servers need (Linux pidfds)."""
    return hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


class ForkServerError(Exception):
    """A fork server could not be started."""


class ForkServer:
    """The host's end of one fork server."""

    def __init__(self, process: Process, sock: socket.socket, env: Mapping[str, str]) -> None:
        self.process = process
        self._sock = sock
        self._startup_env = {k: v for k, v in env.items() if k.startswith(_STARTUP_VARS)}
        self._slots: deque[_Slot] = deque()  # forks asked for, in order
        self._children: dict[int, ForkedProcess] = {}
        self._send_lock = anyio.Lock()
        self.alive = True

    @classmethod
    async def start(cls, argv: Sequence[str], env: Mapping[str, str], tg: TaskGroup) -> ForkServer:
        """Start a fork server (``argv`` runs atoll's boot script; the
        control descriptor's number is appended) and wait until it is ready
        (bound the wait by the caller's scope)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = await anyio.open_process(
                [*argv, "--fork-server", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                env=env,
                pass_fds=[theirs.fileno()],
            )
        except OSError as exc:
            ours.close()
            raise ForkServerError(f"could not start a fork server: {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        server = cls(process, ours, env)
        try:
            msg, _ = await server._receive()
            if msg != READY:
                raise ForkServerError("the fork server ended before it was ready")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await server.aclose(grace=0)  # not serving yet: nothing to wait for
            raise
        tg.start_soon(server._serve)
        return server

    def can_fork(self, env: Mapping[str, str]) -> bool:
        """Whether a child of this server can have ``env``: what only counts
        at an interpreter's start must be what the server started with."""
        wanted = {k: v for k, v in env.items() if k.startswith(_STARTUP_VARS)}
        return self.alive and wanted == self._startup_env

    async def fork(self) -> ForkedProcess | None:
        """A new child, or None if the server is gone (start the process
        another way). Bound the wait by the caller's scope: a child that
        comes after its caller gave up is killed."""
        if not self.alive:
            return None
        stdin_r, stdin_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        slot = _Slot()
        try:
            try:
                async with self._send_lock:  # one waiter for room at a time
                    while True:
                        try:
                            socket.send_fds(self._sock, [SPAWN], [stdin_r, stderr_w, stdout_w])
                            break
                        except BlockingIOError:  # many asked at once: let it catch up
                            await anyio.wait_writable(self._sock)
                    self._slots.append(slot)  # in the order of the requests
            except OSError:
                self._gone()
            else:
                try:
                    await slot.done.wait()
                finally:
                    if slot.child is None:
                        slot.abandoned = True  # a child that comes later is killed
            finally:
                os.close(stdin_r)  # the child's ends: the server has its own now
                os.close(stderr_w)
                os.close(stdout_w)
        except BaseException:
            for fd in (stdin_w, stderr_r, stdout_r):
                os.close(fd)
            if slot.child is not None:  # it came as the caller gave up
                slot.child._discard()
            raise
        if slot.child is None:
            for fd in (stdin_w, stderr_r, stdout_r):
                os.close(fd)
            return None
        for fd in (stdin_w, stderr_r, stdout_r):
            os.set_blocking(fd, False)
        slot.child._attach(_PipeWriter(stdin_w), _PipeReader(stderr_r), _PipeReader(stdout_r))
        return slot.child

    async def _receive(self) -> tuple[bytes, list[int]]:
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(self._sock, 64, 1)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            except OSError:
                return b"", []
            return (msg or b"", fds)

    async def _serve(self) -> None:
        try:
            while True:
                msg, fds = await self._receive()
                kind = msg[:1]
                if kind == FORKED and fds and len(msg) == 1 + PID.size:
                    (pid,) = PID.unpack_from(msg, 1)
                    child = self._children[pid] = ForkedProcess(pid, fds[0], self)
                    slot = self._slots.popleft() if self._slots else None
                    if slot is None or slot.abandoned:
                        child._discard()  # its spawn gave up on it
                        continue
                    slot.child = child
                    slot.done.set()
                elif kind == EXITED and len(msg) == 1 + EXIT.size:
                    pid, code = EXIT.unpack_from(msg, 1)
                    exited = self._children.pop(pid, None)
                    if exited is not None:
                        exited._exited(code)
                else:
                    for fd in fds:
                        os.close(fd)
                    if not msg:
                        return
        except anyio.ClosedResourceError:
            pass
        finally:
            self._gone()

    def _gone(self) -> None:
        """The server has ended: no more forks, no more exit statuses."""
        self.alive = False
        while self._slots:
            self._slots.popleft().done.set()
        for child in self._children.values():
            child._status.set()  # its status is lost with the server
        self._children.clear()

    async def aclose(self, grace: float = 1.0) -> None:
        """Close the server (its children live on until they are stopped)."""
        if self._sock.fileno() >= 0:
            anyio.notify_closing(self._sock)
            self._sock.close()
        self._gone()
        with anyio.CancelScope(shield=True):
            if grace > 0:
                with anyio.move_on_after(grace):
                    await self.process.wait()
            if self.process.returncode is None:
                try:
                    self.process.kill()
                except ProcessLookupError:
                    pass
            await self.process.aclose()


class _Slot:
    """One fork asked of a server: the child, once the server says which."""

    def __init__(self) -> None:
        self.child: ForkedProcess | None = None
        self.done = anyio.Event()
        self.abandoned = False


class ForkedProcess(Process):
    """A fork server's child, as the host sees it: an :class:`anyio.abc.Process`."""

    def __init__(self, pid: int, pidfd: int, server: ForkServer) -> None:
        self._pid = pid
        self._pidfd = pidfd
        self._server = server
        self._returncode: int | None = None
        self._status = anyio.Event()
        self._stdin: _PipeWriter | None = None
        self._stderr: _PipeReader | None = None
        self._stdout: _PipeReader | None = None

    def _attach(self, stdin: _PipeWriter, stderr: _PipeReader, stdout: _PipeReader) -> None:
        self._stdin, self._stderr, self._stdout = stdin, stderr, stdout

    def _exited(self, code: int) -> None:
        self._returncode = code
        self._status.set()

    async def wait(self) -> int:
        """Wait for the exit; -1 if the fork server went away before it said how."""
        if self._returncode is None and self._pidfd >= 0:
            await anyio.wait_readable(self._pidfd)  # the kernel's word: it has ended
            with anyio.move_on_after(_STATUS_WAIT):
                await self._status.wait()
        return self._returncode if self._returncode is not None else -1

    def send_signal(self, sig: int) -> None:
        if self._pidfd < 0:
            raise ProcessLookupError(self._pid)
        signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _discard(self) -> None:
        """End a child nobody took (the server reaps it)."""
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(self._pidfd)
        self._pidfd = -1
        self._server._children.pop(self._pid, None)

    async def aclose(self) -> None:
        for stream in (self._stdin, self._stderr, self._stdout):
            if stream is not None:
                await stream.aclose()
        if self._pidfd >= 0:
            anyio.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        self._server._children.pop(self._pid, None)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def stdin(self) -> ByteSendStream | None:
        return self._stdin

    @property
    def stdout(self) -> ByteReceiveStream | None:
        return self._stdout

    @property
    def stderr(self) -> ByteReceiveStream | None:
        return self._stderr


class _PipeWriter(ByteSendStream):
    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                await anyio.wait_writable(self._fd)
            except BrokenPipeError:
                raise anyio.BrokenResourceError from None

    async def send_eof(self) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._fd >= 0:
            anyio.notify_closing(self._fd)
            os.close(self._fd)
            self._fd = -1


class _PipeReader(ByteReceiveStream):
    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                continue
            if not data:
                raise anyio.EndOfStream
            return data

    async def aclose(self) -> None:
        if self._fd >= 0:
            anyio.notify_closing(self._fd)
            os.close(self._fd)
            self._fd = -1
