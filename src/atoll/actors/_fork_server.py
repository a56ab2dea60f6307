"""The fork server's own process: the protocol with its host, and the loop
that forks actor processes (see ``_forks`` for why, and for the host's side).

The protocol, over a ``SOCK_SEQPACKET`` socket pair (one message each):

- server -> host ``R``: ready.
- host -> server ``S`` with two descriptors (the child's stdin and stderr):
  fork one.
- server -> host ``F`` + pid, with a pidfd of the child: forked, in request
  order. The host signals and watches the child through the pidfd, so a pid
  the system has reused is never signalled.
- server -> host ``X`` + pid + exit code (negative: the signal): it exited.
  The server is the child's parent and reaps it.

The server exits when the host's end closes (the host closed or died);
its children notice the host's death themselves (their stdin ends). It never
creates a ZeroMQ context nor a thread, so forking it is safe.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading

import anyio

READY = b"R"
SPAWN = b"S"
FORKED = b"F"
EXITED = b"X"
PID = struct.Struct("=q")
EXIT = struct.Struct("=qq")


def serve(ctl_fd: int) -> bool:
    """Run a fork server on ``ctl_fd``; True in a forked child (which then
    runs the actor), False in the server once its host has gone."""
    from . import _child  # noqa: F401  (what an actor imports, imported once here)
    from ._title import set_title

    set_title(f"atoll: fork server [host {os.getppid()}] {sys.executable}", "atoll forks")

    async def nothing() -> None:
        pass

    anyio.run(nothing, backend="asyncio")  # the imports an event loop makes on its first run
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when its processes stop
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        # A fork would have them stopped wherever they were (a lock held for
        # good). Something imported at start-up (a .pth file, sitecustomize)
        # started them: the host starts its actors from scratch instead.
        logging.getLogger(__name__).warning(
            "atoll: no fork server: threads %s run after start-up; actor processes start "
            "from scratch",
            others,
        )
        return False
    ctl = socket.socket(fileno=ctl_fd)
    try:
        ctl.send(READY)
        return _fork_loop(ctl)
    except (BrokenPipeError, ConnectionResetError):
        return False  # the host has gone
    finally:
        if ctl.fileno() >= 0:
            ctl.close()


def _fork_loop(ctl: socket.socket) -> bool:
    selector = selectors.DefaultSelector()
    selector.register(ctl, selectors.EVENT_READ)
    children: dict[int, int] = {}  # pidfd -> pid
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is ctl:
                    msg, fds, _, _ = socket.recv_fds(ctl, 64, 3)
                    if not msg:
                        return False
                    if msg != SPAWN or len(fds) != 3:
                        for fd in fds:
                            os.close(fd)
                        continue
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        os.setsid()  # its process group: what it forks dies with it
                        ctl.close()
                        for pidfd in children:
                            os.close(pidfd)
                        os.dup2(fds[0], 0)
                        os.dup2(fds[1], 2)
                        os.dup2(fds[2], 1)
                        for fd in fds:
                            os.close(fd)
                        return True
                    pidfd = os.pidfd_open(pid)
                    for fd in fds:
                        os.close(fd)
                    children[pidfd] = pid
                    selector.register(pidfd, selectors.EVENT_READ)
                    socket.send_fds(ctl, [FORKED + PID.pack(pid)], [pidfd])
                else:
                    pidfd = key.fd
                    pid = children.pop(pidfd)
                    selector.unregister(pidfd)
                    os.close(pidfd)
                    _, status = os.waitpid(pid, 0)
                    ctl.send(EXITED + EXIT.pack(pid, os.waitstatus_to_exitcode(status)))
    finally:
        selector.close()
