"""``breakpoint()`` inside actors, driven through a pseudo-terminal: each
actor's pdb session opens on the host's terminal in turn, what is typed
there reaches it, ``c`` lets it go on; the health probe does not take an
actor stopped in the debugger for a hung one; an untrusted actor gets no
terminal."""

from __future__ import annotations

import os
import sys

import anyio
import pytest

pytestmark = pytest.mark.anyio

APP = os.path.join(os.path.dirname(__file__), "debug_app.py")


class _Terminal:
    """The master side of a pseudo-terminal: what the app shows, and typing."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = b""

    async def expect(self, text: str) -> str:
        """Read until ``text`` shows; what came up to and with it."""
        wanted = text.encode()
        while wanted not in self.seen:
            await anyio.wait_readable(self.fd)
            try:
                self.seen += os.read(self.fd, 4096)
            except OSError:  # the app closed the terminal
                raise AssertionError(f"no {text!r} in:\n{self.seen.decode()}") from None
        shown, _, self.seen = self.seen.partition(wanted)
        return (shown + wanted).decode()

    async def rest(self) -> str:
        """All the app shows until it closes the terminal."""
        while True:
            await anyio.wait_readable(self.fd)
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: every process holding the terminal has exited
                data = b""
            if not data:
                rest, self.seen = self.seen, b""
                return rest.decode()
            self.seen += data

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")


async def test_each_actors_breakpoint_takes_the_terminal_in_turn(anyio_backend_name: str) -> None:
    master, slave = os.openpty()
    process = await anyio.open_process(
        [sys.executable, APP, anyio_backend_name], stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    terminal = _Terminal(master)
    try:
        with anyio.fail_after(60):
            await terminal.expect("READY")
            shown = await terminal.expect("(Pdb ")  # the first session's prompt
            holder = (await terminal.expect(") "))[:-2]
            other = "second" if holder == "first" else "first"
            assert "stopped at" in shown and "debug_app.py" in shown
            values = {"first": "40", "second": "15"}
            terminal.type("p y")
            assert values[holder] in await terminal.expect(f"(Pdb {holder}) ")
            # At the prompt longer than the health probe's timeout: the
            # stopped actor is not killed as hung (its loop is blocked).
            await anyio.sleep(1.0)
            terminal.type("p y")
            later = await terminal.expect(f"(Pdb {holder}) ")
            assert f"(Pdb {other})" not in later  # one actor holds the terminal at a time
            terminal.type("y = 100")
            await terminal.expect(f"(Pdb {holder}) ")
            terminal.type("c")
            await terminal.expect(f"(Pdb {other}) ")  # the next one's turn
            terminal.type("p y")
            assert values[other] in await terminal.expect(f"(Pdb {other}) ")
            terminal.type("c")
            rest = await terminal.rest()
            assert "UNTRUSTED went on" in rest
            assert "an untrusted actor does not get the host's terminal" in rest
            first, second = (101, 15) if holder == "first" else (41, 100)
            assert f"RESULTS {first} {second}" in rest
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.aclose()
        os.close(master)


async def test_without_a_terminal_a_breakpoint_says_so_and_the_actor_goes_on() -> None:
    import atoll
    from debug_app import Stopper

    lines: list[str] = []
    async with atoll.open_host(output=lambda actor, pid, stream, line: lines.append(line)) as host:
        stopper = await host.spawn(Stopper, name="stopper")
        with anyio.fail_after(30):
            assert await stopper.sync_stop(2) == 6  # the host's stdin is no tty here
    assert any("the host has no terminal" in line for line in lines), lines
