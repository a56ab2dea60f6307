"""The host: the user's process, which owns the hub and every actor process.

:class:`Host` is the public API; each method hands its work to the part
that does it (``_spawner``, ``_processes``, ``_supervisor``, ``_registry``).
Its docstrings are the API's documentation, which is why this module is
allowed a little over the size the others keep to.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, overload

import anyio
import anyio.lowlevel
import anyio.to_thread
import zmq
from anyio.abc import TaskGroup

from .._errors import (
    ActorClosedError,
    EnvBuildError,
    ExtensionError,
    SpawnError,
    TransportError,
)
from ..tensors import Plane, _shm, check_transfer
from ..transport._codec import Codec
from ..transport._hub import HOST, Hub
from ..transport._socket import Job
from ..venvs import Env, read_extension
from . import _runtime, _signals
from ._actor import Actor, method_kinds, ref_kinds
from ._background import start_background
from ._class_spec import ByValue, installed
from ._control import Control
from ._debugger import Debugger
from ._lifecycle import Restart, check_idle, restart_for_extension
from ._limits import Limits, limits_for_extension
from ._node import Node
from ._options import HostOptions
from ._output import LogSink, Output
from ._processes import Processes, host_closed_error
from ._ref import ACTOR_OID, LOG_OID, SPAN_OID, ActorRef
from ._registry import REGISTRY_OID, Registry, RegistryService, Subscription, class_key
from ._sandbox import Sandbox, for_extension, sandbox_of
from ._spawner import Launched, Spawner, close_deadline
from ._status import HostStatus, Observer
from ._supervisor import Supervisor
from ._tracing import trace_host

A = TypeVar("A", bound=Actor)

_logger = logging.getLogger(__name__)


class Host:
    """Owns the hub and the actor processes; made by :func:`open_host`."""

    def __init__(self, options: HostOptions) -> None:
        self.options = options
        self._stop_timeout = options.stop_timeout
        self._device_lease_timeout = float(options.device_lease_timeout)
        _shm.sweep_dead_hosts()
        self._shm_prefix = _shm.host_prefix()
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._hub = Hub(self._ctx)
        transfer = check_transfer(options.transfer)
        plane = Plane(_shm.owner_prefix(self._shm_prefix, os.getpid()), transfer=transfer)
        self._node = Node(HOST, 0, "host", self._transmit, plane)
        self._hub.socket.spin = options.spin_us * 1e-6
        self._node.codec.plain.limits = options.plain_limits
        self._node.poll_for = self._hub.socket.poll_for
        self._registry = Registry(self._node)
        self._node.export(RegistryService(self._registry), "registry", oid=REGISTRY_OID, actor=True)
        self._node.export(LogSink(), "log", oid=LOG_OID, actor=True)
        trace_host(self._node, SPAN_OID, options.tracer_provider)
        self._processes = Processes(
            self._hub, self._node, self._registry, self._shm_prefix, Output(options.output)
        )
        self._node.on_bye = self._processes.on_bye
        self._spawner = Spawner(options, self._hub, self._node, self._processes, self._shm_prefix)
        self._supervisor = Supervisor(
            self._processes, self._hub, self._node, self._registry, lambda: self._tg
        )
        self._waiting, self._names = self._supervisor.waiting, itertools.count(1)
        self._observer = Observer(
            self._registry, self._processes, self._supervisor, self._node, lambda: self.dropped
        )
        self._control = Control(self._hub.dir, self._observer) if options.control else None
        self._debugger = Debugger(self._hub.dir, self._hub, self._processes)
        self._traffic, self._held = self._hub.traffic, self._waiting.held  # read on each send
        self._tg: TaskGroup | None = None
        self._closed = False
        self._crash: BaseException | None = None
        self._ready, self._close_requested = anyio.Event(), anyio.Event()  # ready: tasks run
        self._finished = anyio.Event()  # stopped, and its transport closed
        self._context_token: Any = None

    def _transmit(self, dest: bytes, frames: Sequence[Any]) -> None:
        if dest != HOST:
            if self._traffic and dest in self._traffic:
                self._traffic[dest] += 1
            if self._held and self._waiting.hold(dest, HOST, frames):
                return  # it is being restarted, or sleeps: this waits for it
            self._hub.send(dest, frames)
            return
        # A call to a service of the host, or its reply: loop back, copying the
        # buffers as the wire would, so caller and service never share memory.
        socket = self._hub.socket
        copied: list[Any] = [frames[0], *(bytes(b) for b in frames[1:])]
        job = self._node.on_message(HOST, copied)
        if job is not None:
            socket.submit(job)

    def register(self, name: str, service: Any) -> Any:
        """Make ``service`` (an Actor, or any object) a named service living in
        the host, reachable with :func:`atoll.lookup` from every actor process.

        It takes turns like an actor. Returns its ref; raises ``ValueError`` if
        the name is taken.
        """
        self._check_open()
        self._registry.check_free(name)
        oid = self._node.export(service, name, actor=True)
        kinds = method_kinds(type(service))
        self._registry.add(name, HOST, oid, kinds, class_key(type(service)))
        return ActorRef(self._node, HOST, name, kinds, oid)

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
        entry = self._registry.remove(name)
        if entry is not None and entry.identity == HOST:
            self._node.unexport(entry.oid)

    async def lookup(self, target: str | type[A]) -> Any:
        """Like :func:`atoll.lookup`, for this host."""
        await anyio.lowlevel.checkpoint()
        return self._registry.find(_runtime._key(target))

    def subscribe(self, topic: str, callback: Callable[[Any], Any] | None = None) -> Subscription:
        """Receive the events actors publish on ``topic`` with :func:`atoll.publish`.

        Iterate the returned subscription, or pass ``callback`` (sync or async)
        to have it called with each event. Close it to stop.
        """
        subscription = self._registry.subscribe(topic)
        if callback is not None:
            assert self._tg is not None
            self._tg.start_soon(subscription.deliver, callback)
        return subscription

    async def dump_stacks(self, ref: Any) -> str:
        """The stack of each thread of an actor's process, and the task tree
        of its event loop (if the loop answers), without stopping it."""
        return await self._observer.stacks(self._id_of(ref, "dump_stacks"))

    async def status(self) -> HostStatus:
        """Every actor's process, state, memory, calls and methods' figures."""
        return await self._observer.status()

    @property
    def dropped(self) -> dict[str, int]:
        """Messages dropped so far, by reason (unknown peer, malformed, ...)."""
        return dict(self._hub.dropped + self._node.dropped)

    @property
    def endpoint(self) -> str:
        """The hub's ZeroMQ endpoint."""
        return self._hub.endpoint

    async def spawn(
        self,
        cls: type[A],
        /,
        *args: Any,
        name: str | None = None,
        env: Env | None = None,
        trusted: bool = True,
        sandbox: Sandbox | None = None,
        limits: Limits | None = None,
        restart: Restart | None = None,
        idle_stop: float | None = None,
        lazy: bool = False,
        **kwargs: Any,
    ) -> A:
        """Start ``cls(*args, **kwargs)`` in a new process and return its ref.

        Without ``env`` the process runs this interpreter and sees what this
        process sees; the class may live in any importable module or in
        ``__main__``. With an :class:`atoll.Env` it runs in that environment
        (built with uv on first use, then reused from the cache) and sees its
        dependencies, atoll, and nothing else of the host's: the class then
        travels by value unless it comes from an installed package, and the
        modules it imports must be installed in the environment.

        With ``trusted=False`` nothing the actor sends is ever unpickled, in
        this process or any other: its results, errors, stream items, events
        and calls travel on the plain wire (plain values, arrays and tensors,
        refs and callbacks it was handed, and types registered with
        :func:`atoll.wire_type`). What it sends that the plain wire cannot
        carry fails in the actor, naming the type. ``sandbox`` (an
        :class:`atoll.Sandbox`, by default the ``env``'s) confines its
        process, and implies ``trusted=False``. ``limits``
        (:class:`atoll.Limits`) bounds its memory, processes, files, CPU.
        ``restart`` (:class:`atoll.Restart`) starts it again when it dies,
        under the same ref. ``lazy=True`` returns the ref at once: the first
        call starts the process. ``idle_stop`` stops the process after that
        many seconds without a call; the next call starts it again.

        Raises :class:`SpawnError` if the class cannot be imported there or its
        constructor (or ``on_start``) raises, :class:`EnvBuildError` if the
        environment cannot be built.

        For type checkers the returned :class:`ActorRef` has the class's type,
        so method signatures are checked as the class declares them.
        """
        self._check_open()
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise TypeError(f"spawn() needs a subclass of atoll.Actor, got {cls!r}")
        check_idle(idle_stop)
        name = name or f"{cls.__name__}-{next(self._names)}"
        self._registry.check_free(name)
        built = await self._spawner.built(env)  # checks that env is an Env
        sandbox = sandbox or sandbox_of(env)
        spec, _ = Codec().dumps(
            ByValue(cls) if built is not None and not installed(cls) else cls,
            f"actor class {cls.__qualname__}",
        )
        launch = functools.partial(
            self._spawner.launch, spec, cls.__qualname__, args, kwargs, name, built, []
        )
        launch = functools.partial(launch, trusted=trusted, sandbox=sandbox, limits=limits)
        if lazy:
            identity = self._spawner.new_identity(trusted and not sandbox, sandbox is not None)
            launched: Launched = (identity, ref_kinds(cls), class_key(cls))
        else:
            launched = await launch()
        ref: A = self._registered(name, launched, launch, restart, idle_stop, lazy)
        return ref  # typed as the actor class: see atoll.mypy

    @overload
    async def load_extension(
        self,
        path: str | os.PathLike[str],
        /,
        *args: Any,
        name: str | None = None,
        actor_class: type[A],
        trusted: bool = True,
        sandbox: Sandbox | None = None,
        limits: Limits | None = None,
        restart: Restart | None = None,
        idle_stop: float | None = None,
        watch: bool = False,
        **kwargs: Any,
    ) -> A: ...
    @overload
    async def load_extension(
        self,
        path: str | os.PathLike[str],
        /,
        *args: Any,
        name: str | None = None,
        trusted: bool = True,
        sandbox: Sandbox | None = None,
        limits: Limits | None = None,
        restart: Restart | None = None,
        idle_stop: float | None = None,
        watch: bool = False,
        **kwargs: Any,
    ) -> ActorRef[Any]: ...
    async def load_extension(
        self,
        path: str | os.PathLike[str],
        /,
        *args: Any,
        name: str | None = None,
        actor_class: type[A] | None = None,
        trusted: bool = True,
        sandbox: Sandbox | None = None,
        limits: Limits | None = None,
        restart: Restart | None = None,
        idle_stop: float | None = None,
        watch: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load the extension folder at ``path`` and return a ref to its actor.

        The folder's ``pyproject.toml`` gives the environment (``[project]
        dependencies``, built with uv and cached) and the actor class (the
        entry point ``[project.entry-points.atoll] actor = "module:Class"``,
        imported from the folder in the actor's process). ``args`` and
        ``kwargs`` go to its constructor; ``name`` defaults to the project's
        name. A bad manifest is an :class:`ExtensionError` naming the file and
        the fix.

        ``actor_class``, the class the entry point names (importable here
        too), types the ref for type checkers; an entry point that names
        another class is an :class:`ExtensionError`. Without it the ref is
        an ``ActorRef[Any]``.

        ``trusted=False``, or ``trusted = false`` under ``[tool.atoll]`` in
        the manifest, runs it untrusted, as :meth:`spawn` says; either one
        is enough. It runs sandboxed in ``sandbox``, else the host's
        ``open_host(sandbox=...)``, else what ``[tool.atoll.sandbox]`` asks
        for; limited by ``limits``, else ``[tool.atoll.limits]``.
        ``restart`` and ``idle_stop`` are as for :meth:`spawn`. ``watch=True``
        reloads it (:meth:`reload`) when a file in its folder changes (needs
        ``atoll[watch]``); a failed reload is logged, the old code running on.
        """
        self._check_open()
        check_idle(idle_stop)
        extension = read_extension(path)
        restart = restart or restart_for_extension(extension.restart, extension.manifest)
        name = name or extension.name
        self._registry.check_free(name)
        where = f"extension {extension.name!r} ({extension.manifest})"
        try:
            built = await self._spawner.built(extension.env)
        except EnvBuildError as exc:
            raise EnvBuildError(f"{where}: {exc}", exc.dependencies, exc.output) from None
        spec, _ = Codec().dumps(extension.entry_point)
        launch = functools.partial(
            self._spawner.launch,
            spec,
            extension.entry_point,
            args,
            kwargs,
            name,
            built,
            extension.paths,
            trusted=trusted and extension.trusted,
            sandbox=for_extension(
                extension.sandbox, sandbox or self.options.sandbox, extension.manifest
            ),
            limits=limits or limits_for_extension(extension.limits, extension.manifest),
        )
        try:
            launched = await launch()
        except SpawnError as exc:
            if isinstance(exc.__cause__, ExtensionError):
                raise ExtensionError(f"{extension.manifest}: {exc.__cause__}") from None
            raise SpawnError(f"{where}: {exc}") from exc.__cause__
        ref = self._registered(name, launched, launch, restart, idle_stop)
        loaded = self._registry.class_of(name)
        if actor_class is not None and loaded != class_key(actor_class):
            await self.stop(ref)
            raise ExtensionError(
                f"{extension.manifest}: its entry point {extension.entry_point!r} is "
                f"{loaded}, not {class_key(actor_class)} (actor_class=): fix one of them"
            )
        if watch:
            await self._supervisor.reload_on_change(ref._id, os.path.dirname(extension.manifest))
        return ref

    async def prewarm(
        self,
        env: Env | str | os.PathLike[str] | None = None,
        *,
        count: int = 1,
        imports: Sequence[str] = (),
    ) -> None:
        """Have ``count`` processes for ``env`` started and waiting, with
        ``imports`` imported, to be taken by later :meth:`spawn` calls for that
        environment; returns once they are all ready.

        A spawn then skips the interpreter's start and those imports (torch
        takes seconds): it only builds the actor. Each process taken is
        replaced in the background, so the pool stays ``count`` strong; call
        this again to wait for the replacements. ``imports`` apply to the
        processes started from then on. ``env`` may also be an extension
        folder: its environment is prewarmed for :meth:`load_extension`.
        """
        self._check_open()
        if count < 1:
            raise ValueError(f"prewarm() needs count >= 1, got {count}")
        if isinstance(imports, str):
            raise TypeError(f"prewarm(imports=...) takes a list of module names, got {imports!r}")
        if isinstance(env, (str, os.PathLike)):
            env = read_extension(env).env
        built = await self._spawner.built(env)
        await self._spawner.warm.prewarm(built, count, imports)

    def _registered(
        self,
        name: str,
        launched: Launched,
        launch: Any,
        restart: Restart | None,
        idle: float | None,
        lazy: bool = False,
    ) -> Any:
        """Register a spawned actor under ``name``; its ref. It is started
        (again) by ``launch(again=its identity)``, as ``_supervisor`` says."""
        identity, kinds, cls_key = launched
        self._registry.add(name, identity, ACTOR_OID, kinds, cls_key)
        self._node.peer_names[identity] = name
        self._supervisor.started(identity, name, restart, launch, idle=idle, lazy=lazy)
        return ActorRef(self._node, identity, name, kinds)

    def supervise(self, refs: Sequence[Any], strategy: str = "one_for_all") -> None:
        """Restart ``refs`` (spawned with ``restart=``) together, as OTP's
        ``one_for_all``, ``rest_for_one`` or ``one_for_one`` says."""
        self._supervisor.supervise([self._id_of(ref, "supervise") for ref in refs], strategy)

    async def reload(self, ref: Any, *, drain: float = 30.0) -> None:
        """Start an actor again, same ref, from its code as it is on disk now:
        tried aside first (if it fails, the old code runs on and this raises
        why), then swapped in once its calls end (``drain`` seconds at most)."""
        await self._supervisor.reload(self._id_of(ref, "reload"), drain)

    def _id_of(self, ref: Any, what: str) -> bytes:
        if not isinstance(ref, ActorRef) or ref._node is not self._node:
            raise TypeError(f"{what}() takes a ref spawned by this host, got {ref!r}")
        return ref._id

    async def stop(self, ref: Any) -> None:
        """Stop one actor: gracefully, then terminate, then kill, each with a
        deadline. Calls to it in flight fail with :class:`ActorClosedError`."""
        self._id_of(ref, "stop")
        if self._supervisor.restarting(ref._id):
            await self._supervisor.stop(ref._id)
            return
        self._supervisor.forget(ref._id)
        actor = self._processes.actors.get(ref._id)
        if actor is not None:
            await self._processes.stop(actor, self._stop_timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise host_closed_error()

    # -- the hub's traffic for the host ---------------------------------

    def _on_message(self, src: bytes, frames: list[zmq.Frame]) -> Job | None:
        return self._node.on_message(src, frames)

    # -- the host's lifetime ------------------------------------------

    async def _start(self) -> None:
        """Start the host's own task (see :meth:`_serve`) and wait until it runs."""
        start_background(self._serve, f"atoll host {os.getpid()}")
        try:
            await self._ready.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        if self._finished.is_set():
            await self.aclose()  # raises what stopped it
        _runtime.host_opened(self)
        _signals.watch(id(self), self._remove_files)

    async def _serve(self) -> None:
        """The host's own task: it owns every task of the host (the hub's
        reader, the actors' watchers) until :meth:`aclose` asks it to stop.

        Not a task of the caller's task group: the host may be closed from
        another task or context than the one that opened it (two notebook
        cells). Cancelled from outside (``asyncio.run`` cancels the tasks left
        when ``main()`` returns), it stops everything within the deadlines.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._tg = self._processes.tg = self._spawner.tg = tg
                self._node.start(tg)
                tg.start_soon(self._hub.serve, self._on_message, self._waiting.unroutable)
                tg.start_soon(self._processes.output.serve)
                tg.start_soon(self._debugger.serve)
                if self._control is not None:
                    tg.start_soon(self._control.serve)
                self._ready.set()
                try:
                    await self._close_requested.wait()
                finally:
                    await self._shutdown()
                    self._processes.output.flush()
                    tg.cancel_scope.cancel()
        except Exception as exc:  # a failed reader: aclose() raises it
            self._crash = exc
        finally:
            self._closed = True
            try:
                self._close_transport()
            finally:
                self._finished.set()
                self._ready.set()

    async def aclose(self) -> None:
        """Stop every actor and close the host: what leaving ``async with
        open_host()`` does. Calls still in flight fail with
        :class:`ActorClosedError`; later calls and spawns say the host is
        closed. Safe to call more than once, from any task of the host's
        event loop; it returns within the stop deadlines."""
        self._closed = True
        self._close_requested.set()
        with anyio.CancelScope(shield=True):
            deadline = close_deadline(self._stop_timeout, self._device_lease_timeout)
            with anyio.move_on_after(deadline):
                await self._finished.wait()
            if not self._finished.is_set():
                _logger.warning(
                    "atoll: the host did not finish closing within %g s; leaving it", deadline
                )
        _runtime.host_closed(self)
        _signals.unwatch(id(self))
        crash, self._crash = self._crash, None
        if crash is not None:
            raise TransportError(f"the host stopped after an internal error: {crash!r}") from crash

    async def _shutdown(self) -> None:
        self._closed = self._spawner.closed = True
        self._registry.close_subscriptions()
        with anyio.CancelScope(shield=True):
            await self._processes.stop_all(self._stop_timeout)
            await self._spawner.close_fork_servers()
            self._node.close(
                lambda: ActorClosedError("the host was closed while this call was in flight"),
                later=host_closed_error,
            )
            await self._node.finish_threads(self._stop_timeout)

    def _remove_files(self) -> None:
        """What a SIGTERM must not leave behind: the private directory, the segments."""
        shutil.rmtree(self._hub.dir, ignore_errors=True)
        _shm.sweep(self._shm_prefix)

    def _close_transport(self) -> None:
        self._hub.close()
        self._ctx.term()
        self._node.plane.close()
        _shm.sweep(self._shm_prefix)


__all__ = ["Host"]
