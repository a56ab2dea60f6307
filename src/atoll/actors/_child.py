"""An actor process: ``main()``, which ``_boot`` runs (or ``python -m atoll.actors._child``).

The host writes its boot description (``_boot_spec``: hub endpoint,
identity, the per-spawn secret, sys.path...) to our stdin and keeps the pipe
open. EOF on stdin means the
host is gone, and we exit at once: no orphans, whatever killed the host.
"""

from __future__ import annotations

import faulthandler
import importlib
import io
import logging
import os
import signal
import sys
import traceback
from typing import Any

import anyio
import msgspec
import zmq

from .._errors import ActorClosedError, ExtensionError, TransportError
from ..tensors import Plane, _shm
from ..transport import _messages as m
from ..transport._codec import Codec
from ..transport._hub import HOST, remove_hub_dir
from ..transport._socket import AsyncSocket, Job
from . import _breakpoint, _runtime
from ._actor import Actor, ref_kinds
from ._boot_spec import Become, BootSpec, decode_become, decode_boot
from ._limits import apply_rlimits, lower_priority
from ._log_forwarding import forward
from ._node import Node
from ._ref import ACTOR_OID, BOOT_OID, REPORT_OID, SPAN_OID, STATUS_OID
from ._registry import class_key
from ._title import set_actor_title
from ._tracing import Recorder, Spans

_log = logging.getLogger(__name__)


def _read_boot() -> BootSpec:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 65536)
        if not chunk:
            sys.exit(0)  # the host went away before telling us anything
        data += chunk
    return decode_boot(data)


class _Child:
    def __init__(self, boot: BootSpec) -> None:
        self.boot = boot
        self.name: str = boot.name
        self.ctx: zmq.Context[Any] = zmq.Context()
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, boot.identity.encode())
        sock.connect(boot.hub)
        self.socket = AsyncSocket(sock)
        self.shm_prefix: str = boot.shm_prefix
        # on_stop's bound, inside the host's grace, so that the host hears
        # why it ended before terminating the process.
        self.on_stop_timeout = 0.8 * boot.stop_timeout
        self.device_lease_timeout: float = boot.device_lease_timeout
        plane = Plane(
            _shm.owner_prefix(self.shm_prefix, os.getpid()),
            transfer=boot.transfer,
            shm_limit=boot.shm_limit,
            share_only_with=HOST if boot.sandboxed else None,
        )
        self.node = Node(
            boot.identity.encode(),
            boot.node,
            self.name,
            self._transmit,
            plane,
            untrusted=not boot.trusted,
        )
        self.socket.spin = self.socket.linger = boot.spin_us * 1e-6
        self.node.poll_for = self.socket.poll_for
        _runtime.child_node = self.node
        self.stop = anyio.Event()
        self.node.on_bye = self._bye
        forward(self.node, boot.log_level)
        if boot.tracing:
            self.node.tracer = Recorder(self._send_spans)
        self.node.on_exit = self._exit_requested
        self.exit_code = 0
        self.actor: Any = None

    async def _status(self) -> tuple[int, int]:
        """Calls running (this one aside) or waiting for their turn, and
        streams open: answered by the event loop itself, so a loop that is
        blocked does not answer."""
        node = self.node
        queued = sum(len(e.gate.queue) for e in node._exports.values() if e.gate is not None)
        return len(node._running) - 1 + queued, len(node._streams_out)

    async def _report(self, what: str = "status") -> Any:
        """What the host's status asks (``status``): plain data, see
        ``_call_stats``; or (``tasks``) the tasks of this event loop."""
        if what == "tasks":
            return task_tree()
        plane = self.node.plane.stats()
        return {
            **self.node.calls.report(),
            "leases": plane["leases"],
            "shared_memory_bytes": plane["segment_bytes"],
            "mapped_bytes": plane["mapped_bytes"],
            "threads": len(self.node._threads),
        }

    def _send_spans(self, spans: Spans) -> None:
        data = msgspec.msgpack.encode(spans)
        self.node.notify(HOST, SPAN_OID, "spans", (self.name, data), {})

    def _bye(self, src: bytes, bye: m.Bye) -> None:
        if src == HOST:
            self.stop.set()
        else:  # only the host stops an actor
            self.node.dropped["unentitled"] += 1

    def _transmit(self, dest: bytes, frames: Any) -> None:
        self.socket.send([dest, *frames])

    def _on_message(self, frames: list[zmq.Frame]) -> Job | None:
        if len(frames) < 2:
            self.node.dropped["malformed"] += 1
            return None
        return self.node.on_message(frames[0].bytes, frames[1:])

    async def _build_actor(
        self, name: str, spec: bytes, paths: list[str], /, *args: Any, **kwargs: Any
    ) -> tuple[dict[str, int], str]:
        """Build the actor this process serves: what the host calls at
        ``BOOT_OID``, once, as an ordinary call; its methods and class."""
        if self.actor is not None:
            raise RuntimeError(f"actor process {self.name!r} already serves an actor")
        self.name = self.node.name = name
        _breakpoint.rename(name)
        set_actor_title(name, self.boot.host_pid)
        sys.path[:0] = paths  # an extension's folder
        try:
            cls = Codec().loads(spec, [], "actor class")
            if isinstance(cls, str):
                cls = _entry_point(cls)
            actor = cls(*args, **kwargs)
            await actor.on_start()
        except Exception as exc:
            missing = _missing_module(exc) if self.boot.isolated else None
            if missing is None:
                raise
            raise ModuleNotFoundError(
                f"No module named {missing!r}: it is not installed in the actor's "
                "environment; add it to the environment's dependencies",
                name=missing,
            ) from exc
        self.actor = actor
        self.node.unexport(BOOT_OID)
        self.node.export(actor, self.name, oid=ACTOR_OID, actor=True)
        return {k: int(v) for k, v in ref_kinds(cls).items()}, class_key(cls)

    def _exit_requested(self, exc: SystemExit, where: str) -> None:
        """A method called ``sys.exit()``: this process exits, as the method
        asked, once it has stopped like at the host's request (``on_stop``
        runs). Its callers get ActorDiedError with the exit code, and the
        line below in its stderr tail."""
        code = exc.code
        if code is None:
            self.exit_code = 0
        elif isinstance(code, int):
            self.exit_code = code
        else:
            _log.error("%s", code)  # what Python does with a message for an exit code
            self.exit_code = 1
        frames = traceback.extract_tb(exc.__traceback__)
        at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        _log.warning("atoll: actor %r: %s called sys.exit(%r)%s", self.name, where, code, at)
        self.stop.set()

    async def _watch_host(self) -> None:
        data = b""
        while True:
            await anyio.wait_readable(0)
            chunk = os.read(0, 4096)
            if not chunk:
                # The host died without saying goodbye: nobody is left to
                # answer, so leave at once, whatever the actor is doing, and
                # take the host's private directory along.
                remove_hub_dir(self.boot.hub)
                _shm.sweep(self.shm_prefix)
                os._exit(0)
            data += chunk
            while b"\n" in data:
                line, data = data.split(b"\n", 1)
                self._become(decode_become(line))

    def _become(self, become: Become) -> None:
        """Serve under another identity from now (a warm process taken to
        restart an actor): reconnect under it and prove the new secret."""
        if self.actor is not None:
            _log.warning("atoll: actor %r: already serves an actor; stays itself", self.name)
            return
        identity = become.identity.encode()
        sock = self.socket.zmq_socket
        sock.disconnect(self.boot.hub)  # (nothing waits on the old connection)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(self.boot.hub)
        self.node.rename(identity)
        _breakpoint.install(self.boot.debug, become.identity, become.secret, self.name)
        self.socket.send([HOST, m.encode(m.Hello(become.secret, os.getpid(), m.WIRE_VERSION))])

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg
            self.node.start(tg)
            self.node.export(self._build_actor, "build", oid=BOOT_OID)
            self.node.export(self._status, "status", oid=STATUS_OID)
            self.node.export(self._report, "report", oid=REPORT_OID)
            tg.start_soon(self.socket.serve, self._on_message)
            tg.start_soon(self._watch_host)
            if self.node.tracer is not None:
                tg.start_soon(self.node.tracer.serve)
            hello = m.Hello(self.boot.secret, os.getpid(), m.WIRE_VERSION)
            self.socket.send([HOST, m.encode(hello)])
            await self.stop.wait()
            if self.node.tracer is not None:
                self.node.tracer.flush()  # what it recorded last, while it may still send
            self.node.close(lambda: ActorClosedError(f"actor {self.name!r} is stopping"))
            if self.actor is not None:
                with anyio.move_on_after(self.on_stop_timeout) as scope:
                    try:
                        await self.actor.on_stop()
                    except Exception:
                        # The host relays our stderr, and keeps its tail.
                        _log.exception("atoll: actor %r: on_stop() raised", self.name)
                if scope.cancelled_caught:
                    _log.warning(
                        "atoll: actor %r: on_stop() took over %g s and was cancelled",
                        self.name,
                        self.on_stop_timeout,
                    )
            await self.node.finish_threads(self.on_stop_timeout)
            await self._wait_device_leases()
            tg.cancel_scope.cancel()
        self.socket.close()
        self.ctx.term()
        self.node.plane.close()

    async def _wait_device_leases(self) -> None:
        """Device memory (CUDA) dies with the process that allocated it: views
        peers hold of ours would fail. Wait for them, with a deadline, and say so."""
        plane = self.node.plane
        if not plane.device_leases():
            return
        timeout = self.device_lease_timeout
        _log.warning(
            "atoll: actor %r is stopping while peers hold %d views of its device memory; "
            "waiting up to %g s for them to be dropped",
            self.name,
            plane.device_leases(),
            timeout,
        )
        try:
            self.socket.send([HOST, m.encode(m.Bye(hold=timeout))])  # the host waits as long
        except TransportError:
            return  # the host is gone, and so are the views it held
        with anyio.move_on_after(timeout):
            await plane.wait_device_leases()
        left = plane.device_leases()
        if left:
            _log.warning(
                "atoll: actor %r: %d views of its device memory are still held by peers; "
                "they become invalid as it exits",
                self.name,
                left,
            )


def task_tree() -> str:
    """Each task of this process's event loop, under the task that started
    it, with where it waits: what the stack of a thread does not show."""
    tasks = anyio.get_running_tasks()
    known = {task.id for task in tasks}
    children: dict[int | None, list[Any]] = {}
    for task in tasks:
        parent = task.parent_id if task.parent_id in known else None
        children.setdefault(parent, []).append(task)
    lines: list[str] = []

    def show(parent: int | None, depth: int) -> None:
        for task in children.get(parent, ()):
            lines.append(f"{'  ' * depth}task {task.name}")
            for where in _awaiting(task.coro):
                lines.append(f"{'  ' * depth}    {where}")
            show(task.id, depth + 1)

    show(None, 0)
    return "\n".join(lines)


def _awaiting(coro: Any) -> list[str]:
    """Where a task's coroutine waits: each frame of its ``await`` chain
    (through the transport's ``Resumed``, which runs a call's coroutine)."""
    where: list[str] = []
    while coro is not None and len(where) < 24:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        code = frame.f_code
        if code.co_qualname != "Resumed.__await__":
            where.append(f"{code.co_qualname} ({code.co_filename}:{frame.f_lineno})")
        inner = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        coro = inner if inner is not None else frame.f_locals.get("coro")
    return where


def _missing_module(exc: BaseException) -> str | None:
    """The module whose absence caused ``exc``, if that is what it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ModuleNotFoundError) and seen.name:
            return seen.name
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


def _entry_point(spec: str) -> type[Actor]:
    """The class an extension's entry point (``module:Class``) names."""
    module_name, _, qualname = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.partition(".")[0] and exc.name != module_name:
            raise  # the module is there; something it imports is not
        raise ExtensionError(
            f"the atoll entry point {spec!r} names module {module_name!r}, which is not in "
            "the extension folder (or its src/): fix the module name"
        ) from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ExtensionError(
                f"the atoll entry point {spec!r}: module {module_name!r} has no {part!r}"
            )
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Actor)):
        raise ExtensionError(
            f"the atoll entry point {spec!r} is {obj!r}, not a subclass of atoll.Actor: "
            "point it at your actor class"
        )
    return obj


def _log_to_stderr() -> None:
    """atoll's records go to stderr, which the host relays and keeps the tail
    of, whatever the actor's own code does with logging (its records do not
    reach the root logger twice)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    atoll_logger = logging.getLogger("atoll")
    atoll_logger.addHandler(handler)
    atoll_logger.propagate = False


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group; the host decides
    # when actors stop, so the signal is the host's to handle, not ours.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The host's word for "you are hung": the stack of each thread to stderr,
    # which the host quotes when it says why it killed this process.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # stdout is a pipe to the host, which passes it on line by line: so is it written.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    _log_to_stderr()
    boot = _read_boot()
    set_actor_title(boot.name, boot.host_pid)
    if boot.environ is not None:  # forked by a fork server: become what a fresh start would be
        os.environ.clear()
        os.environ.update(boot.environ)
    if boot.cwd is not None:
        os.chdir(boot.cwd)
    _breakpoint.install(boot.debug, boot.identity, boot.secret, boot.name)
    apply_rlimits(boot.rlimits)  # before any of the actor's code runs
    lower_priority(boot.nice)
    wanted: list[str] = boot.sys_path
    sys.path[:] = wanted + [p for p in sys.path if p not in wanted]
    for module in boot.imports:
        importlib.import_module(module)  # a warm process: paid for before any spawn
    child = _Child(boot)
    anyio.run(child.run, backend="asyncio")
    if child.node.abandoned_threads:
        # Sync methods still running that the stop no longer waited for:
        # exiting normally would wait for their threads, past the host's grace.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(child.exit_code)
    if child.exit_code:
        sys.exit(child.exit_code)


if __name__ == "__main__":
    main()
