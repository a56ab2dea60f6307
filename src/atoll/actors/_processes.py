"""The host's actor processes: a record of each, watching them, stopping them.

A process is watched by a task of the host (its exit status, its stderr,
relayed line by line and kept in a tail for errors). Stopping is ``Bye`` and
a grace, then SIGTERM, then SIGKILL; every wait has a deadline, and none
relies on the watcher still running: ``asyncio.run`` cancels every task it
finds left, the watchers included, and the stop then watches the process
itself. When a process has ended, everything that waits on it fails with
the reason, and what the host keeps of it is bounded.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from collections.abc import Callable

import anyio
from anyio.abc import Process, TaskGroup

from .._errors import ActorClosedError, ActorDiedError, TransportError
from ..tensors import _shm
from ..transport import _messages as m
from ..transport._hub import Hub
from ._errors_wire import pack_error
from ._limits import Cgroup, Limits, limit_hit
from ._node import Node, _fresh
from ._output import Output
from ._registry import Registry

_logger = logging.getLogger(__name__)

_STDERR_TAIL_LINES = 20
_DUMP_WAIT = 1.0  # how long a hung process may take to write its stacks
_DUMP_LINES = 80
TERMINATE_WAIT = 1.0
"""How long a stop waits after SIGTERM, and then after SIGKILL."""
KILL_WAIT = 1.0


class ActorProcess:
    """The host's record of one actor process."""

    def __init__(self, identity: bytes, name: str) -> None:
        self.identity = identity
        self.name = name
        self.process: Process | None = None
        self.ready = anyio.Event()  # hello received, or the process exited
        self.exited = anyio.Event()
        # Its watcher ended: it reported the exit, or it was cancelled first
        # (asyncio.run cancels every task left when main() returns).
        self.watch_ended = anyio.Event()
        self.stderr_done = anyio.Event()
        self.stdout_done = anyio.Event()
        self.compatible = False
        self.box: str | None = None
        """Its sandbox's /dev/shm folder, if it is sandboxed."""
        self.limits: Limits | None = None
        self.cgroup: Cgroup | None = None
        """Its cgroups, if it has limits (see ``_limits``)."""
        self.limit_hit = ""
        """Which of its limits the kernel killed it for, if any."""
        self.stopping = False
        self.holding = anyio.Event()  # it waits for peers' views of its device memory
        self.hold_until = 0.0  # until then (anyio.current_time())
        self.exitcode: int | None = None
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self.brought_down_by: str | None = None
        """The name of the actor whose death took this one along (a group)."""
        self.dump: list[str] | None = None
        """Lines of stderr kept whole while it dumps its threads' stacks."""
        self.started = anyio.current_time()
        """When its process was started (the host's clock)."""
        self.env = ""
        """Its environment's folder."""
        self.debugging = 0
        """Its breakpoints waiting for or holding the host's terminal (see ``_debugger``)."""
        self.debugged_until = 0.0
        """When its last debugger session ended (the host's clock)."""
        self.node_no = int(identity[1:])
        """Where its call ids start (a new one for each incarnation)."""

    def on_hello(self, hello: m.Hello) -> None:
        self.compatible = hello.version == m.WIRE_VERSION
        self.ready.set()

    def gone_error(self) -> Exception:
        if self.stopping:
            return ActorClosedError(f"actor {self.name!r} was stopped")
        return ActorDiedError(
            self.name, self.exitcode, "\n".join(self.stderr_tail), detail=self.limit_hit
        )


class Processes:
    """The host's actor processes, by identity: started by the spawner,
    watched and stopped here."""

    def __init__(
        self, hub: Hub, node: Node, registry: Registry, shm_prefix: str, output: Output
    ) -> None:
        self.output = output
        self._hub = hub
        self._node = node
        self._registry = registry
        self._shm_prefix = shm_prefix
        self.actors: dict[bytes, ActorProcess] = {}
        self.tg: TaskGroup | None = None
        """The host's task group, once it runs: the watchers' home."""
        self.on_death: Callable[[ActorProcess, Exception], Exception | None] | None = None
        """Set by the supervisor: told of each exit; the error for calls in
        flight if the actor comes back, else None."""

    def watch(self, actor: ActorProcess) -> None:
        """Watch ``actor``'s process (just started) until it exits."""
        assert self.tg is not None
        self.tg.start_soon(self._supervise, actor)

    async def stop_all(self, grace: float) -> None:
        async with anyio.create_task_group() as tg:
            for actor in list(self.actors.values()):
                tg.start_soon(self.stop, actor, grace)

    async def _supervise(self, actor: ActorProcess) -> None:
        process = actor.process
        assert process is not None
        try:
            # Shielded: the exit is reported even when the host's tasks are
            # cancelled; the stop path makes sure the process does exit.
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, actor, "stdout")
                    tg.start_soon(self._pump, actor, "stderr")
                    code = await process.wait()
                    kill_group(process.pid)
                    # Let the last lines arrive, unless a grandchild holds the pipes.
                    with anyio.move_on_after(0.05):
                        await actor.stderr_done.wait()
                        await actor.stdout_done.wait()
                    tg.cancel_scope.cancel()
                await process.aclose()
            actor.exitcode = code
            if actor.limits is not None:
                actor.limit_hit = limit_hit(actor.limits, actor.cgroup, code) or actor.limit_hit
            self.on_exit(actor)
        finally:
            actor.watch_ended.set()

    async def _pump(self, actor: ActorProcess, which: str) -> None:
        """Pass ``actor``'s stdout or stderr on, line by line (see ``_output``);
        keep the tail of its stderr (and a dump of its threads' stacks)."""
        assert actor.process is not None
        stream = getattr(actor.process, which)
        pid = actor.process.pid

        def keep(line: str) -> bool:
            if actor.dump is not None:  # the stacks it was asked for: kept aside
                actor.dump.append(line)
                return True
            actor.stderr_tail.append(line)
            return False

        try:
            if stream is not None:
                stderr = which == "stderr"
                await self.output.read(
                    stream, which, lambda: (actor.name, pid), keep if stderr else None
                )
        finally:
            (actor.stderr_done if which == "stderr" else actor.stdout_done).set()

    def on_exit(self, actor: ActorProcess) -> None:
        if actor.exited.is_set():
            return  # reported already (a watcher late after the stop gave up on it)
        self._hub.forget(actor.identity)
        if actor.process is not None:
            # Its segments: views of them stay valid where they are mapped.
            prefix = _shm.owner_prefix(self._shm_prefix, actor.process.pid)
            if actor.box is not None:  # its segments are in its folder, named by it
                self._node.plane.arena.boxes.pop(actor.identity, None)
                prefix = f"{self._shm_prefix}{actor.identity.decode()}-"
                _shm.unlink(os.path.basename(actor.box))
            _shm.sweep(prefix)
            self._node.plane.forget_owner(prefix)
        error = actor.gone_error()
        restarting = None if self.on_death is None else self.on_death(actor, error)
        if restarting is None:  # (the supervisor may have said why it gave up)
            error = actor.gone_error()
            self.abandon(actor.identity, actor.name, error, stopped=actor.stopping)
        else:  # the same identity comes back: calls in flight fail, the name stays
            self._node.peer_gone(actor.identity, lambda: _fresh(restarting), restarting=True)
            self._tell_others(actor.identity, actor.name, restarting, restarting=True)
        actor.exited.set()
        actor.ready.set()
        if self.actors.get(actor.identity) is actor:
            del self.actors[actor.identity]

    def abandon(self, identity: bytes, name: str, error: Exception, *, stopped: bool) -> None:
        """``identity`` is gone for good: calls to it fail with ``error``."""

        def make_exc() -> Exception:
            return _fresh(error)  # not the record itself: it is let go of now

        self._registry.mark_gone(identity, None if stopped else make_exc)
        self._node.peer_gone(identity, make_exc)
        self._tell_others(identity, name, error)

    def _tell_others(
        self, identity: bytes, name: str, error: Exception, *, restarting: bool = False
    ) -> None:
        died = m.encode(m.Died(identity, pack_error(error, name), restarting))
        for other in self.actors.values():
            if other.identity != identity and other.compatible and not other.exited.is_set():
                try:
                    self._hub.send(other.identity, [died])
                except TransportError:
                    pass

    async def stacks(self, actor: ActorProcess | bytes) -> str:
        """The stack of each of ``actor``'s threads (an identity will do),
        written by its process (faulthandler, on SIGUSR1) without stopping
        it; "" if it wrote none, or has no process now."""
        if type(actor) is bytes:
            found = self.actors.get(actor)
            if found is None:
                return ""
            actor = found
        assert isinstance(actor, ActorProcess)
        process = actor.process
        if process is None or actor.exited.is_set():
            return ""
        actor.dump = []
        try:
            for pid in _actor_pids(process.pid):
                os.kill(pid, signal.SIGUSR1)
            with anyio.move_on_after(_DUMP_WAIT):
                seen = -1
                while len(actor.dump) != seen or not actor.dump:  # until it stops writing
                    seen = len(actor.dump)
                    await anyio.sleep(0.05)
            return "\n".join(actor.dump)
        except ProcessLookupError:
            return ""
        finally:
            actor.dump = None

    async def kill_hung(self, actor: ActorProcess, why: str) -> None:
        """Kill ``actor``, alive but not answering; its death quotes the
        stack of each of its threads."""
        stacks = "\n".join((await self.stacks(actor)).split("\n")[:_DUMP_LINES])
        actor.limit_hit = why + (f"; the stacks of its threads then:\n{stacks}" if stacks else "")
        if actor.process is not None:
            signal_process(actor.process, "kill")

    async def stop(self, actor: ActorProcess, grace: float, *, again: bool = False) -> None:
        """Stop ``actor``: ``Bye`` and ``grace`` seconds (longer if it waits for
        views of its device memory), then SIGTERM, then SIGKILL; every wait
        has a deadline, and none depends on another task still running.
        ``again``: its identity lives on (it sleeps until its next call)."""
        with anyio.CancelScope(shield=True):
            if not actor.exited.is_set():
                actor.stopping = True
                if not again:
                    # Calls to it fail now; leases with it are settled until
                    # it exits (it may be waiting for views of its device memory).
                    self._node.peer_gone(actor.identity, actor.gone_error, exited=False)
                process = actor.process
                if actor.compatible and grace > 0:
                    try:
                        self._hub.send(actor.identity, [m.encode(m.Bye())])
                    except TransportError:
                        pass
                    if not await self._wait_exit(actor, grace) and actor.holding.is_set():
                        # It said it waits for peers' views of its device memory.
                        await self._wait_exit(actor, actor.hold_until - anyio.current_time())
                if process is None:
                    self._hub.forget(actor.identity)
                elif not actor.exited.is_set():
                    signal_process(process, "terminate")
                    if not await self._wait_exit(actor, TERMINATE_WAIT):
                        signal_process(process, "kill")
                        if not await self._wait_exit(actor, KILL_WAIT):
                            _logger.warning(
                                "atoll: actor %r (pid %d) has not exited %g s after SIGKILL; "
                                "no longer waiting for it",
                                actor.name,
                                process.pid,
                                KILL_WAIT,
                            )
                            self.on_exit(actor)
            self.actors.pop(actor.identity, None)

    async def _wait_exit(self, actor: ActorProcess, seconds: float) -> bool:
        """Wait up to ``seconds`` for ``actor``'s process to end; whether it has."""
        with anyio.move_on_after(seconds):
            await actor.watch_ended.wait()
            if not actor.exited.is_set():
                # Its watcher was cancelled before the exit came (asyncio.run
                # cancels every task it finds left): watch the process here.
                await _process_ended(actor.process)
                self.on_exit(actor)
        return actor.exited.is_set()

    def on_bye(self, src: bytes, bye: m.Bye) -> None:
        actor = self.actors.get(src)
        if actor is not None and actor.stopping and bye.hold > 0:
            # Its own deadline, and a second to exit after it.
            actor.hold_until = anyio.current_time() + bye.hold + 1.0
            actor.holding.set()


def kill_group(pid: int) -> None:
    """Kill what is left of the process group that process ``pid`` led (the
    processes it forked): an actor's children do not outlive it. Called as
    soon as it is reaped, while its group still holds its id."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left of it


def stderr_tail_text(actor: ActorProcess) -> str:
    if not actor.stderr_tail:
        return ""
    return "\nlast lines of its stderr:\n" + "\n".join(actor.stderr_tail)


def host_closed_error() -> ActorClosedError:
    return ActorClosedError("this host is closed: open a new one with atoll.open_host()")


async def _process_ended(process: Process | None) -> None:
    """Return once ``process`` has ended (its pidfd turns readable); where
    there are no pidfds, never (the caller's deadline ends the wait)."""
    if process is None:
        return
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        await anyio.sleep_forever()
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)


def signal_process(process: Process, how: str) -> None:
    try:
        getattr(process, how)()
    except ProcessLookupError:
        pass


def _actor_pids(pid: int) -> list[int]:
    """The actor's own process under ``pid``: ``pid`` itself, or for a
    sandboxed actor the interpreter bubblewrap runs (a signal to bubblewrap
    would end the sandbox)."""
    todo = [pid]
    while todo:
        one = todo.pop(0)
        try:
            with open(f"/proc/{one}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if not argv[0].endswith(b"bwrap"):  # (it retitles itself "atoll: <name>")
                return [one]
            with open(f"/proc/{one}/task/{one}/children") as f:
                todo += [int(child) for child in f.read().split()]
        except (OSError, ValueError):
            continue
    return [pid]
