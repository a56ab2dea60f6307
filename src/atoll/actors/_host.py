"""The host: the user's process, which owns the hub and every actor process."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import secrets
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import zmq
from anyio.abc import Process, TaskGroup

from .._errors import (
    ActorClosedError,
    ActorDiedError,
    AtollError,
    SpawnError,
    TransportError,
)
from ..tensors import Plane, _shm, check_transfer
from ..transport import _messages as m
from ..transport._codec import Codec, prepare_args
from ..transport._hub import HOST, Hub
from ..transport._socket import Job
from . import _runtime
from ._actor import Actor, method_kinds
from ._errors_wire import pack_error
from ._node import ExcFactory, Node, _Pending
from ._ref import ACTOR_OID, ActorRef
from ._registry import REGISTRY_OID, Registry, RegistryService, Subscription

A = TypeVar("A", bound=Actor)

_STDERR_TAIL_LINES = 20
_SRC_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _ActorProcess:
    """The host's record of one actor process."""

    def __init__(self, identity: bytes, name: str) -> None:
        self.identity = identity
        self.name = name
        self.process: Process | None = None
        self.ready = anyio.Event()  # hello received, or the process exited
        self.exited = anyio.Event()
        self.stderr_done = anyio.Event()
        self.trusted = False
        self.stopping = False
        self.exitcode: int | None = None
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)

    def on_hello(self, hello: m.Hello) -> None:
        self.trusted = hello.version == m.WIRE_VERSION
        self.ready.set()

    def gone_error(self) -> Exception:
        if self.stopping:
            return ActorClosedError(f"actor {self.name!r} was stopped")
        return ActorDiedError(self.name, self.exitcode, "\n".join(self.stderr_tail))


class Host:
    """Owns the hub and the actor processes; made by :func:`open_host`."""

    def __init__(
        self,
        *,
        stop_timeout: float = 2.0,
        spawn_timeout: float = 60.0,
        spin_us: float = 150,
        transfer: str = "shared_memory",
    ) -> None:
        if spin_us < 0:
            raise ValueError(f"spin_us must be 0 (no polling) or more, got {spin_us}")
        self._spin_us = spin_us
        self._transfer = check_transfer(transfer)
        _shm.sweep_dead_hosts()
        self._shm_prefix = _shm.host_prefix()
        self._stop_timeout = stop_timeout
        self._spawn_timeout = spawn_timeout
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._hub = Hub(self._ctx)
        plane = Plane(_shm.owner_prefix(self._shm_prefix, os.getpid()), transfer=transfer)
        self.node = Node(HOST, 0, "host", self._transmit, plane)
        self._hub.socket.spin = spin_us * 1e-6
        self.node.wait_reply = self._hub.socket.wait_for
        self.node.wake_reader = self._hub.socket.wake_reader
        self._actors: dict[bytes, _ActorProcess] = {}
        self._numbers = itertools.count(1)
        self._tg: TaskGroup | None = None
        self._closed = False
        self.registry = Registry(self.node)
        self.node.export(RegistryService(self.registry), "registry", oid=REGISTRY_OID, actor=True)

    def _transmit(self, dest: bytes, frames: Sequence[Any]) -> None:
        if dest != HOST:
            self._hub.send(dest, frames)
            return
        # A call to a service of the host, or its reply: loop back, copying the
        # buffers as the wire would, so caller and service never share memory.
        socket = self._hub.socket
        copied: list[Any] = [frames[0], *(bytes(b) for b in frames[1:])]
        job = self.node.on_message(HOST, copied)
        if job is not None:
            socket.submit(job)
        socket.wake_reader()

    def register(self, name: str, service: Any) -> Any:
        """Make ``service`` (an Actor, or any object) a named service living in
        the host, reachable with :func:`atoll.lookup` from every actor process.

        It takes turns like an actor. Returns its ref; raises ``ValueError`` if
        the name is taken.
        """
        self._check_open()
        self.registry.check_free(name)
        oid = self.node.export(service, name, actor=True)
        kinds = method_kinds(type(service))
        self.registry.add(name, HOST, oid, kinds, type(service))
        return ActorRef(self.node, HOST, name, kinds, oid)

    @contextmanager
    def registered(self, name: str, service: Any) -> Iterator[Any]:
        """:meth:`register` for the duration of a ``with`` block; yields the ref."""
        ref = self.register(name, service)
        try:
            yield ref
        finally:
            self.unregister(name)

    def unregister(self, name: str) -> None:
        """Forget the service registered as ``name``; later calls to it fail."""
        entry = self.registry.remove(name)
        if entry is not None and entry.identity == HOST:
            self.node.unexport(entry.oid)

    async def lookup(self, target: str | type[A]) -> Any:
        """Like :func:`atoll.lookup`, for this host."""
        await anyio.lowlevel.checkpoint()
        return self.registry.find(_runtime._key(target))

    def subscribe(self, topic: str, callback: Callable[[Any], Any] | None = None) -> Subscription:
        """Receive the events actors publish on ``topic`` with :func:`atoll.publish`.

        Iterate the returned subscription, or pass ``callback`` (sync or async)
        to have it called with each event. Close it to stop.
        """
        subscription = self.registry.subscribe(topic)
        if callback is not None:
            assert self._tg is not None
            self._tg.start_soon(_deliver, subscription, callback)
        return subscription

    @property
    def dropped(self) -> dict[str, int]:
        """Messages dropped so far, by reason (unknown peer, malformed, ...)."""
        return dict(self._hub.dropped + self.node.dropped)

    @property
    def endpoint(self) -> str:
        """The hub's ZeroMQ endpoint."""
        return self._hub.endpoint

    async def spawn(self, cls: type[A], /, *args: Any, name: str | None = None, **kwargs: Any) -> A:
        """Start ``cls(*args, **kwargs)`` in a new process and return its ref.

        The process runs this interpreter; the class may live in any importable
        module or in ``__main__``. Raises :class:`SpawnError` if the class
        cannot be imported there or its constructor (or ``on_start``) raises.

        For type checkers the returned :class:`ActorRef` has the class's type,
        so method signatures are checked as the class declares them.
        """
        self._check_open()
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise TypeError(f"spawn() needs a subclass of atoll.Actor, got {cls!r}")
        number = next(self._numbers)
        name = name or f"{cls.__name__}-{number}"
        self.registry.check_free(name)
        identity = b"a%d" % number
        secret = secrets.token_bytes(32)
        actor = _ActorProcess(identity, name)
        cls_bytes, _ = Codec().dumps(cls, f"actor class {cls.__qualname__}")
        payload, buffers = self.node.codec.dumps(
            (cls_bytes, *prepare_args(args, kwargs, self.node.mark)),
            f"arguments of {cls.__qualname__}()",
            identity,
        )
        self._actors[identity] = actor
        self.node.peer_names[identity] = name
        self._hub.expect(identity, secret, actor.on_hello)
        try:
            await self._start_process(actor, number, secret)
            with anyio.fail_after(self._spawn_timeout):
                await actor.ready.wait()
            if actor.exited.is_set() or not actor.trusted:
                raise (
                    actor.gone_error()
                    if actor.exited.is_set()
                    else SpawnError(
                        f"actor {name!r} speaks another wire version; is atoll the same "
                        "version in its environment?"
                    )
                )
            await self._init(actor, payload, buffers)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._stop(actor, grace=0)
            if isinstance(exc, (ActorDiedError, TimeoutError, TransportError, SpawnError)):
                if isinstance(exc, SpawnError):
                    raise
                raise SpawnError(
                    f"actor {name!r} ({cls.__qualname__}) failed to start: {exc}"
                ) from exc
            raise
        self.registry.add(name, identity, ACTOR_OID, method_kinds(cls), cls)
        ref: A = ActorRef(self.node, identity, name, method_kinds(cls))  # type: ignore[assignment]
        return ref  # typed as the actor class: see the docstring

    async def _start_process(self, actor: _ActorProcess, number: int, secret: bytes) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC_ROOT, env.get("PYTHONPATH")) if p)
        boot = {
            "hub": self._hub.endpoint,
            "identity": actor.identity.decode(),
            "secret": secret.hex(),
            "node": number,
            "name": actor.name,
            "sys_path": sys.path,
            "spin_us": self._spin_us,
            "shm_prefix": self._shm_prefix,
            "transfer": self._transfer,
        }
        actor.process = process = await anyio.open_process(
            [sys.executable, "-m", "atoll.actors._child"],
            stdin=subprocess.PIPE,
            stdout=None,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self._tg is not None and process.stdin is not None
        self._tg.start_soon(self._supervise, actor)
        # The secret goes through the pipe, never argv. The pipe then stays
        # open: the child exits when it reads EOF, i.e. when this process dies.
        await process.stdin.send(json.dumps(boot).encode() + b"\n")

    async def _init(self, actor: _ActorProcess, payload: bytes, buffers: list[Any]) -> None:
        node = self.node
        call_id = node._next_id()
        pending = _Pending(actor.identity)
        node._pending[call_id] = pending
        self._hub.send(actor.identity, [m.encode(m.Init(call_id, payload)), *buffers])
        try:
            await pending.event.wait()
        finally:
            node._pending.pop(call_id, None)
        if pending.error is not None:
            raise pending.error
        if type(pending.header) is m.Error:
            from ._errors_wire import unpack_error

            cause = unpack_error(pending.header.payload)
            raise SpawnError(f"actor {actor.name!r} failed to start: {cause!r}") from cause

    async def _supervise(self, actor: _ActorProcess) -> None:
        process = actor.process
        assert process is not None
        # Shielded: the supervisor reports the exit even when the host's body
        # is cancelled; shutdown makes sure the process does exit.
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump_stderr, actor)
                code = await process.wait()
                # Let the last lines of stderr arrive, unless a grandchild holds the pipe.
                with anyio.move_on_after(0.05):
                    await actor.stderr_done.wait()
                tg.cancel_scope.cancel()
            await process.aclose()
        actor.exitcode = code
        self._on_exit(actor)

    async def _pump_stderr(self, actor: _ActorProcess) -> None:
        assert actor.process is not None and actor.process.stderr is not None
        partial = b""
        try:
            async for chunk in actor.process.stderr:
                sys.stderr.write(chunk.decode(errors="replace"))
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                actor.stderr_tail.extend(line.decode(errors="replace") for line in lines)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            if partial:
                actor.stderr_tail.append(partial.decode(errors="replace"))
            actor.stderr_done.set()

    def _on_exit(self, actor: _ActorProcess) -> None:
        self._hub.forget(actor.identity)
        if actor.process is not None:
            # Its segments: views of them stay valid where they are mapped.
            prefix = _shm.owner_prefix(self._shm_prefix, actor.process.pid)
            _shm.sweep(prefix)
            self.node.plane.forget_owner(prefix)
        self.registry.mark_gone(actor.identity, None if actor.stopping else actor.gone_error)
        error = actor.gone_error()

        def make_exc() -> Exception:
            return actor.gone_error()

        self.node.peer_gone(actor.identity, make_exc)
        died = m.encode(m.Died(actor.identity, pack_error(error, actor.name)))
        for other in self._actors.values():
            if other is not actor and other.trusted and not other.exited.is_set():
                try:
                    self._hub.send(other.identity, [died])
                except TransportError:
                    pass
        actor.exited.set()
        actor.ready.set()

    async def stop(self, ref: Any) -> None:
        """Stop one actor: gracefully, then terminate, then kill, each with a deadline.

        Calls to it that are in flight fail with :class:`ActorClosedError`.
        """
        if not isinstance(ref, ActorRef) or ref._node is not self.node:
            raise TypeError(f"stop() takes a ref spawned by this host, got {ref!r}")
        actor = self._actors.get(ref._id)
        if actor is not None:
            await self._stop(actor, self._stop_timeout)

    async def _stop(self, actor: _ActorProcess, grace: float) -> None:
        with anyio.CancelScope(shield=True):
            if not actor.exited.is_set():
                actor.stopping = True
                self.node.peer_gone(actor.identity, actor.gone_error)
                if actor.trusted and grace > 0:
                    try:
                        self._hub.send(actor.identity, [m.encode(m.Bye())])
                    except TransportError:
                        pass
                    with anyio.move_on_after(grace):
                        await actor.exited.wait()
                process = actor.process
                if process is not None and not actor.exited.is_set():
                    _signal(process, "terminate")
                    with anyio.move_on_after(1.0):
                        await actor.exited.wait()
                    if not actor.exited.is_set():
                        _signal(process, "kill")
                        await actor.exited.wait()
            self._actors.pop(actor.identity, None)

    def _check_open(self) -> None:
        if self._closed:
            raise ActorClosedError("this host is closed: open a new one with atoll.open_host()")

    # -- the hub's traffic for the host ---------------------------------

    def _unroutable(self, src: bytes, dest: bytes, frames: list[zmq.Frame]) -> None:
        """A peer addressed an actor that is not (or no longer) connected."""
        try:
            msg = m.decode(frames[0])
        except m.DecodeError:
            self._hub.dropped["malformed"] += 1
            return
        if type(msg) is not m.Call:
            return  # credits, cancels, releases for a gone actor: nothing to do
        actor = self._actors.get(dest)
        if actor is not None:
            error: Exception = actor.gone_error()
        else:
            error = ActorClosedError(f"no actor with id {dest!r} runs in this host")
        name = actor.name if actor is not None else "host"
        try:
            self._hub.send(src, [m.encode(m.Error(msg.call_id, pack_error(error, name)))])
        except TransportError:
            pass

    async def _run(self, tg: TaskGroup) -> None:
        self._tg = tg
        self.node.start(tg)
        tg.start_soon(self._hub.serve, self._on_message, self._unroutable)

    def _on_message(self, src: bytes, frames: list[zmq.Frame]) -> Job | None:
        return self.node.on_message(src, frames)

    async def _shutdown(self) -> None:
        self._closed = True
        self.registry.close_subscriptions()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for actor in list(self._actors.values()):
                    tg.start_soon(self._stop, actor, self._stop_timeout)
        self.node.close(
            lambda: ActorClosedError("the host was closed while this call was in flight")
        )

    def _close_transport(self) -> None:
        self._hub.close()
        self._ctx.term()
        self.node.plane.close()
        _shm.sweep(self._shm_prefix)


async def _deliver(subscription: Subscription, callback: Callable[[Any], Any]) -> None:
    async for value in subscription:
        result = callback(value)
        if inspect.isawaitable(result):
            await result


def _signal(process: Process, how: str) -> None:
    try:
        getattr(process, how)()
    except ProcessLookupError:
        pass


@asynccontextmanager
async def open_host(
    *,
    stop_timeout: float = 2.0,
    spawn_timeout: float = 60.0,
    spin_us: float = 150,
    transfer: str = "shared_memory",
) -> AsyncIterator[Host]:
    """Open a host: the hub and a scope for actor processes.

    Leaving the block stops every actor (gracefully, then terminate, then
    kill, each with a deadline); calls still in flight fail with
    :class:`ActorClosedError`. Works on asyncio and trio, including inside an
    event loop that is already running.

    ``stop_timeout`` is the grace an actor gets to stop before it is
    terminated; ``spawn_timeout`` bounds a spawn. ``spin_us``: a caller with
    the only call in flight polls for its reply this long before sleeping,
    which saves an event-loop wake-up when replies are fast; other tasks of
    the loop wait at most that long meanwhile. 0 turns it off.

    ``transfer`` says how numpy arrays, CPU tensors and byte buffers of
    64 KiB or more travel, for the host and every actor it spawns:
    ``"shared_memory"`` (as descriptors of shared memory, no copy of data
    already there) or ``"inline"`` (copied into the messages, for systems
    with a small or no ``/dev/shm``). Anything else is a ``ValueError``.
    """
    host = Host(
        stop_timeout=stop_timeout, spawn_timeout=spawn_timeout, spin_us=spin_us, transfer=transfer
    )
    token = _runtime.current_host.set(host)
    tg = anyio.create_task_group()
    # The task group is entered by hand so that an exception from the body
    # reaches the caller as itself, not wrapped in an ExceptionGroup.
    await tg.__aenter__()
    try:
        await host._run(tg)
        yield host
    finally:
        try:
            await host._shutdown()
        finally:
            tg.cancel_scope.cancel()
            try:
                await tg.__aexit__(None, None, None)
            finally:
                host._close_transport()
                _runtime.current_host.reset(token)


__all__ = ["ActorRef", "AtollError", "ExcFactory", "Host", "open_host"]
