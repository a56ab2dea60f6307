"""``breakpoint()`` inside an actor: a pdb session on the host's terminal.

An actor process's stdin is its host's pipe and its stdout is relayed line
by line, so pdb cannot talk to the user the usual way. Instead
``sys.breakpointhook`` connects to the host's debug socket (``debug`` in
the hub's private directory, see ``_debugger``), proves who it is with its
per-spawn secret, and waits for the terminal: one actor holds it at a
time. pdb then reads and writes that connection, which the host relays to
its own terminal. ``continue`` (or ``quit``) ends the session and gives the
terminal to the next actor waiting; a breakpoint set meanwhile opens a
new session when it is reached.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

GO = b"G"
"""The host's word: the terminal is yours."""


class _Connection:
    """Where the debug socket is and how to prove who we are."""

    path = ""
    hello: dict[str, Any] = {}


def install(path: str, identity: str, secret: bytes, name: str) -> None:
    """Make ``breakpoint()`` in this process open a session on the host's
    terminal through the debug socket at ``path``."""
    _Connection.path = path
    _Connection.hello = {"identity": identity, "secret": secret.hex(), "name": name}
    sys.breakpointhook = _breakpointhook


def rename(name: str) -> None:
    """The actor's name, once this process serves one."""
    _Connection.hello["name"] = name


def _open_session(where: str) -> Any:
    """A file on a connection that holds the host's terminal, or None (the
    host said why not, and that is printed)."""
    if not _Connection.path:
        print("atoll: breakpoint() ignored: a sandboxed actor does not get the host's "
              "terminal", file=sys.stderr)  # fmt: skip
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(_Connection.path)
        hello = {**_Connection.hello, "pid": os.getpid(), "where": where}
        sock.sendall(json.dumps(hello).encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    except OSError as exc:
        sock.close()
        print(f"atoll: breakpoint() ignored: no debug socket ({exc})", file=sys.stderr)
        return None
    if answer[:1] != GO:
        sock.close()
        why = answer[1:].decode(errors="replace").strip() or "the host closed"
        print(f"atoll: breakpoint() ignored: {why}", file=sys.stderr)
        return None
    session = sock.makefile("rw", buffering=1, encoding="utf-8", errors="replace", newline="\n")
    sock.close()  # the connection closes with the file
    return session


def _breakpointhook(*args: Any, **kwargs: Any) -> None:
    if os.environ.get("PYTHONBREAKPOINT") == "0":
        return
    frame = sys._getframe(1)
    where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
    session = _open_session(where)
    if session is not None:
        _debugger(session).set_trace(frame)


def _debugger(session: Any) -> Any:
    import pdb

    class SessionPdb(pdb.Pdb):
        """pdb on a session with the host's terminal, which ``continue``
        and ``quit`` end; reaching a breakpoint later opens another."""

        def __init__(self, session: Any) -> None:
            super().__init__(stdin=session, stdout=session, nosigint=True)
            self.session: Any = session
            self.prompt = f"(Pdb {_Connection.hello['name']}) "

        def _end(self) -> None:
            if self.session is not None:
                try:
                    self.session.close()
                except OSError:
                    pass  # the host went away
                self.session = None

        def interaction(self, frame: Any, tb: Any) -> None:
            if self.session is None:
                where = "a breakpoint"
                if frame is not None:
                    where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                self.session = _open_session(where)
                if self.session is None:
                    self.set_continue()
                    return
                self.stdin = self.stdout = self.session
            super().interaction(frame, tb)

        def set_continue(self) -> None:
            super().set_continue()
            self._end()

        def set_quit(self) -> None:
            super().set_quit()
            self._end()

    return SessionPdb(session)
