"""The host: the user's process, which owns the hub and every actor process."""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, overload

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec
import zmq
from anyio.abc import Process, TaskGroup

from .._errors import (
    ActorClosedError,
    ActorDiedError,
    AtollError,
    EnvBuildError,
    ExtensionError,
    SpawnError,
    TransportError,
)
from ..tensors import Plane, _shm, check_transfer
from ..transport import _messages as m
from ..transport._codec import Codec, prepare_args
from ..transport._hub import HOST, Hub
from ..transport._socket import Job
from ..venvs import BuiltEnv, Env, build, read_extension
from ..venvs._env import user_cache_dir
from . import _runtime, _signals
from ._actor import Actor, Kind, method_kinds
from ._background import start_background
from ._boot_spec import BootSpec, encode_boot
from ._code_table import cached_table, write_table
from ._errors_wire import pack_error, unpack_error
from ._forks import ForkServer, ForkServerError, supported
from ._node import Node, _fresh, _Pending
from ._options import HostOptions, keywords_of
from ._ref import ACTOR_OID, ActorRef
from ._registry import REGISTRY_OID, Registry, RegistryService, Subscription, class_key

A = TypeVar("A", bound=Actor)

_logger = logging.getLogger(__name__)

_STDERR_TAIL_LINES = 20
_TERMINATE_WAIT = 1.0  # how long a stop waits after SIGTERM, and then after SIGKILL
_KILL_WAIT = 1.0
_FORK_SERVER_WAIT = 2.0
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_SRC_ROOT = os.path.dirname(_PACKAGE_DIR)
_BOOT_SCRIPT = os.path.join(_PACKAGE_DIR, "actors", "_boot.py")


class _ActorProcess:
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
        self.trusted = False
        self.stopping = False
        self.holding = anyio.Event()  # it waits for peers' views of its device memory
        self.hold_until = 0.0  # until then (anyio.current_time())
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

    def __init__(self, options: HostOptions) -> None:
        self.options = options
        self._device_lease_timeout = float(options.device_lease_timeout)
        self._spin_us = options.spin_us
        self._transfer = check_transfer(options.transfer)
        self._stop_timeout = options.stop_timeout
        self._spawn_timeout = options.spawn_timeout
        _shm.sweep_dead_hosts()
        self._shm_prefix = _shm.host_prefix()
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._hub = Hub(self._ctx)
        plane = Plane(_shm.owner_prefix(self._shm_prefix, os.getpid()), transfer=self._transfer)
        self.node = Node(HOST, 0, "host", self._transmit, plane)
        self._hub.socket.spin = self._spin_us * 1e-6
        self.node.poll_for = self._hub.socket.poll_for
        self.node.on_bye = self._on_bye
        self._actors: dict[bytes, _ActorProcess] = {}
        self._numbers = itertools.count(1)
        self._names = itertools.count(1)
        self._env_cache = options.env_cache
        self._build_progress = options.build_progress
        self._envs: dict[Env, BuiltEnv] = {}
        self._warm: dict[str | None, deque[_ActorProcess]] = {}
        self._warm_imports: dict[str | None, tuple[str, ...]] = {}
        self._tg: TaskGroup | None = None
        self._closed = False
        self._ready = anyio.Event()  # its tasks run (or failed to start)
        self._close_requested = anyio.Event()
        self._finished = anyio.Event()  # stopped, and its transport closed
        self._crash: BaseException | None = None
        self._context_token: Any = None
        self._code_table: str | None = None
        self._code_table_lock = anyio.Lock()
        self._use_forks = options.fork_server and supported()
        self._fork_servers: dict[str | None, ForkServer] = {}
        self._fork_starting: dict[str | None, anyio.Event] = {}
        self._fork_failed: set[str | None] = set()
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
        self.registry.add(name, HOST, oid, kinds, class_key(type(service)))
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

    async def spawn(
        self,
        cls: type[A],
        /,
        *args: Any,
        name: str | None = None,
        env: Env | None = None,
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

        Raises :class:`SpawnError` if the class cannot be imported there or its
        constructor (or ``on_start``) raises, :class:`EnvBuildError` if the
        environment cannot be built.

        For type checkers the returned :class:`ActorRef` has the class's type,
        so method signatures are checked as the class declares them.
        """
        self._check_open()
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise TypeError(f"spawn() needs a subclass of atoll.Actor, got {cls!r}")
        name = name or f"{cls.__name__}-{next(self._names)}"
        self.registry.check_free(name)
        built = await self._built(env)
        spec, _ = Codec().dumps(
            _ByValue(cls) if built is not None and not _installed(cls) else cls,
            f"actor class {cls.__qualname__}",
        )
        ref: A = await self._launch(spec, cls.__qualname__, args, kwargs, name, built, [])
        return ref  # typed as the actor class: see the docstring

    @overload
    async def load_extension(
        self,
        path: str | os.PathLike[str],
        /,
        *args: Any,
        name: str | None = None,
        actor_class: type[A],
        **kwargs: Any,
    ) -> A: ...
    @overload
    async def load_extension(
        self, path: str | os.PathLike[str], /, *args: Any, name: str | None = None, **kwargs: Any
    ) -> ActorRef[Any]: ...
    async def load_extension(
        self,
        path: str | os.PathLike[str],
        /,
        *args: Any,
        name: str | None = None,
        actor_class: type[A] | None = None,
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
        """
        self._check_open()
        extension = read_extension(path)
        name = name or extension.name
        self.registry.check_free(name)
        where = f"extension {extension.name!r} ({extension.manifest})"
        try:
            built = await self._built(extension.env)
        except EnvBuildError as exc:
            raise EnvBuildError(f"{where}: {exc}", exc.dependencies, exc.output) from None
        spec, _ = Codec().dumps(extension.entry_point)
        try:
            ref = await self._launch(
                spec, extension.entry_point, args, kwargs, name, built, extension.paths
            )
        except SpawnError as exc:
            if isinstance(exc.__cause__, ExtensionError):
                raise ExtensionError(f"{extension.manifest}: {exc.__cause__}") from None
            raise SpawnError(f"{where}: {exc}") from exc.__cause__
        loaded = self.registry.class_of(name)
        if actor_class is not None and loaded != class_key(actor_class):
            await self.stop(ref)
            raise ExtensionError(
                f"{extension.manifest}: its entry point {extension.entry_point!r} is "
                f"{loaded}, not {class_key(actor_class)} (actor_class=): fix one of them"
            )
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
        built = await self._built(env)
        key = _pool_key(built)
        self._warm_imports[key] = tuple(imports)
        waiting = [a for a in self._warm.get(key, ()) if not a.exited.is_set()]
        errors: list[Exception] = []

        async def one(actor: _ActorProcess | None) -> None:
            try:
                await (self._add_warm(built) if actor is None else self._await_hello(actor))
            except AtollError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for actor in [*waiting[:count], *[None] * (count - len(waiting))]:
                tg.start_soon(one, actor)
        if errors:
            raise errors[0]

    async def _add_warm(self, built: BuiltEnv | None) -> None:
        key = _pool_key(built)
        actor = _ActorProcess(self._new_identity(), f"warm-{key or 'host'}")
        # In the pool while it starts: a spawn that comes meanwhile takes it
        # and waits for its hello, rather than starting a cold process.
        pool = self._warm.setdefault(key, deque())
        pool.append(actor)
        try:
            await self._boot(actor, built, self._warm_imports.get(key, ()))
        except BaseException:
            if actor in pool:
                pool.remove(actor)
            raise

    async def _refill(self, built: BuiltEnv | None) -> None:
        try:
            await self._add_warm(built)
        except Exception as exc:  # nobody waits for a refill: say it here
            if not self._closed:
                _logger.warning("atoll: could not start a warm actor process: %s", exc)

    def _take_warm(self, built: BuiltEnv | None) -> _ActorProcess | None:
        pool = self._warm.get(_pool_key(built))
        while pool:
            actor = pool.popleft()
            if not actor.exited.is_set():
                assert self._tg is not None
                self._tg.start_soon(self._refill, built)
                return actor  # perhaps still starting: the caller waits for its hello
        return None

    async def _built(self, env: Env | None) -> BuiltEnv | None:
        if env is None:
            return None
        if not isinstance(env, Env):
            raise TypeError(f"env= takes an atoll.Env, got {env!r}")
        built = self._envs.get(env)
        if built is None:
            built = await build(env, cache_dir=self._env_cache, progress=self._build_progress)
            os.utime(built.path)  # when it was last used, for `atoll env prune --unused-days`
            self._envs[env] = built
        return built

    def _new_identity(self) -> bytes:
        return b"a%d" % next(self._numbers)

    async def _launch(
        self,
        spec: bytes,
        label: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str,
        built: BuiltEnv | None,
        paths: list[str],
    ) -> Any:
        actor = self._take_warm(built)
        if actor is None:
            actor = _ActorProcess(self._new_identity(), name)
            fresh = True
        else:
            actor.name = name
            self.node.peer_names[actor.identity] = name
            fresh = False
        try:
            payload, buffers = self.node.codec.dumps(
                (name, spec, paths, *prepare_args(args, kwargs, self.node.mark)),
                f"arguments of {label}()",
                actor.identity,
            )
            with anyio.fail_after(self._spawn_timeout):
                if fresh:
                    await self._boot(actor, built, ())
                else:
                    await self._await_hello(actor)
                kinds, cls_key = await self._init(actor, payload, buffers)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._stop(actor, grace=0)
            if isinstance(exc, SpawnError):
                raise
            if isinstance(exc, TimeoutError):
                raise SpawnError(
                    f"actor {name!r} ({label}) did not start within spawn_timeout="
                    f"{self._spawn_timeout:g} s: its process, the import of its class, its "
                    "constructor or on_start() hung; it was killed" + _tail(actor)
                ) from None
            if isinstance(exc, (ActorDiedError, TransportError)):
                raise SpawnError(f"actor {name!r} ({label}) failed to start: {exc}") from exc
            raise
        self.registry.add(name, actor.identity, ACTOR_OID, kinds, cls_key)
        return ActorRef(self.node, actor.identity, name, kinds)

    async def _boot(
        self,
        actor: _ActorProcess,
        built: BuiltEnv | None,
        imports: Sequence[str],
    ) -> None:
        """Start ``actor``'s process and wait for its hello."""
        self._check_open()
        self._actors[actor.identity] = actor
        self.node.peer_names[actor.identity] = actor.name
        secret = os.urandom(32)
        self._hub.expect(actor.identity, secret, actor.on_hello)
        try:
            await self._start_process(actor, secret, built, imports)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._stop(actor, grace=0)
            raise
        await self._await_hello(actor)

    async def _await_hello(self, actor: _ActorProcess) -> None:
        try:
            with anyio.fail_after(self._spawn_timeout):
                await actor.ready.wait()
            if actor.exited.is_set():
                raise actor.gone_error()
            if not actor.trusted:
                raise SpawnError(
                    f"actor {actor.name!r} speaks another wire version; is atoll the same "
                    "version in its environment?"
                )
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._stop(actor, grace=0)
            if isinstance(exc, TimeoutError):
                raise SpawnError(
                    f"actor process {actor.name!r} did not connect within spawn_timeout="
                    f"{self._spawn_timeout:g} s; it was killed" + _tail(actor)
                ) from None
            if isinstance(exc, (ActorDiedError, TransportError)):
                raise SpawnError(f"actor {actor.name!r} failed to start: {exc}") from exc
            raise

    async def _write_code_table(self) -> str:
        """The compiled code of atoll's modules for actor processes (see
        ``_boot``): from the user's cache, written there on first use; in this
        host's private directory if the cache can't be written."""
        async with self._code_table_lock:
            if self._code_table is None:
                try:
                    path = await anyio.to_thread.run_sync(
                        cached_table, _PACKAGE_DIR, user_cache_dir("code")
                    )
                except OSError:
                    path = os.path.join(self._hub.dir, "code")
                    try:
                        await anyio.to_thread.run_sync(write_table, path, _PACKAGE_DIR)
                    except OSError:
                        path = ""  # atoll's sources aren't files here: actors import as usual
                self._code_table = path
        return self._code_table

    def _overlay(self) -> str:
        """A directory holding only atoll (a link to this process's copy): what
        an isolated actor process gets of the host's packages."""
        overlay = os.path.join(self._hub.dir, "lib")
        if not os.path.isdir(overlay):
            os.mkdir(overlay)
            os.symlink(_PACKAGE_DIR, os.path.join(overlay, "atoll"))
        return overlay

    async def _start_process(
        self,
        actor: _ActorProcess,
        secret: bytes,
        built: BuiltEnv | None,
        imports: Sequence[str],
    ) -> None:
        env = dict(os.environ)
        table = await self._write_code_table()
        if built is None:
            argv = [sys.executable, _BOOT_SCRIPT, "", table]
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC_ROOT, env.get("PYTHONPATH")) if p)
            sys_path = sys.path
        else:
            # -I: no PYTHONPATH, no user site, no current directory; only the
            # environment's own packages, and atoll through the overlay.
            argv = [built.python, "-I", _BOOT_SCRIPT, self._overlay(), table]
            env.pop("VIRTUAL_ENV", None)
            sys_path = []
        boot = BootSpec(
            hub=self._hub.endpoint,
            identity=actor.identity.decode(),
            secret=secret,
            node=int(actor.identity[1:]),
            name=actor.name,
            host_pid=os.getpid(),
            sys_path=sys_path,
            isolated=built is not None,
            imports=list(imports),
            spin_us=self._spin_us,
            shm_prefix=self._shm_prefix,
            transfer=self._transfer,
            stop_timeout=self._stop_timeout,
            device_lease_timeout=self._device_lease_timeout,
        )
        process: Process | None = None
        # Twice at most: a server found gone on the first try has its
        # replacement started by the second (this spawn waits for it only if
        # another spawn started it already; else it starts from scratch).
        for _ in range(2):
            server = await self._fork_server(built, argv, env)
            if server is None:
                break
            with anyio.move_on_after(self._spawn_timeout):
                process = await server.fork()
            if process is not None or server.alive:
                break
        if process is not None:
            # A fork of the server: it takes on this spawn's environment itself.
            boot = msgspec.structs.replace(boot, environ=env, cwd=os.getcwd())
        else:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=None,
                stderr=subprocess.PIPE,
                env=env,
            )
        actor.process = process
        assert self._tg is not None and process.stdin is not None
        self._tg.start_soon(self._supervise, actor)
        if actor.stopping or self._closed:
            # Stopped while it was being started (the host closing under a
            # warm pool's refill): nobody else will, so end it now.
            _signal(process, "kill")
            raise ActorClosedError(f"actor {actor.name!r} was stopped while it started")
        # The secret goes through the pipe, never argv. The pipe then stays
        # open: the child exits when it reads EOF, i.e. when this process dies.
        try:
            await process.stdin.send(encode_boot(boot))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # it exited at once: its supervisor says how, and the wait for its hello ends

    async def _fork_server(
        self, built: BuiltEnv | None, argv: list[str], env: dict[str, str]
    ) -> ForkServer | None:
        """The fork server for processes in ``built``, or None where this
        process must start from scratch: fork servers are off or unsupported
        here, this one failed to start, ``env`` differs in what only counts at
        an interpreter's start, or there is none yet. The first spawn for an
        environment starts its server beside it, for the spawns after; those
        that come while it starts wait for it."""
        if not self._use_forks:
            return None
        key = _pool_key(built)
        server = self._fork_servers.get(key)
        if server is None or not server.alive:
            if key in self._fork_failed:
                return None
            starting = self._fork_starting.get(key)
            if starting is None:
                self._fork_starting[key] = anyio.Event()
                assert self._tg is not None
                self._tg.start_soon(self._start_fork_server, key, built, argv, env)
                return None
            await starting.wait()
            server = self._fork_servers.get(key)
            if server is None:
                return None
        return server if server.can_fork(env) else None

    async def _start_fork_server(
        self, key: str | None, built: BuiltEnv | None, argv: list[str], env: dict[str, str]
    ) -> None:
        assert self._tg is not None
        try:
            with anyio.fail_after(self._spawn_timeout):
                server = await ForkServer.start(argv, env, self._tg)
        except (ForkServerError, TimeoutError) as exc:
            self._fork_failed.add(key)
            _logger.warning(
                "atoll: no fork server for %s (%s); its actor processes start from scratch",
                built.path if built is not None else sys.executable,
                str(exc) or f"not ready within {self._spawn_timeout} s",
            )
        else:
            if self._closed:  # the host closed meanwhile
                await server.aclose()
            else:
                self._fork_servers[key] = server
        finally:
            self._fork_starting.pop(key).set()

    async def _init(
        self, actor: _ActorProcess, payload: bytes, buffers: list[Any]
    ) -> tuple[dict[str, Kind], str]:
        """Have ``actor``'s process build the actor; returns its methods and class."""
        node = self.node
        call_id = node._next_id()
        pending = _Pending(actor.identity)
        node._pending[call_id] = pending
        self._hub.send(actor.identity, [m.encode(m.Init(call_id, payload)), *buffers])
        try:
            await pending.wait()
        finally:
            node._pending.pop(call_id, None)
        if pending.error is not None:
            raise pending.error
        assert pending.header is not None
        if type(pending.header) is m.Error:
            cause = unpack_error(pending.header.payload)
            raise SpawnError(f"actor {actor.name!r} failed to start: {cause!r}") from cause
        kinds, cls_key = Codec().loads(pending.header.payload, [], "actor description")
        return {k: Kind(v) for k, v in kinds.items()}, cls_key

    async def _supervise(self, actor: _ActorProcess) -> None:
        process = actor.process
        assert process is not None
        try:
            # Shielded: the exit is reported even when the host's tasks are
            # cancelled; the stop path makes sure the process does exit.
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
        finally:
            actor.watch_ended.set()

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
        if actor.exited.is_set():
            return  # reported already (a watcher late after the stop gave up on it)
        self._hub.forget(actor.identity)
        if actor.process is not None:
            # Its segments: views of them stay valid where they are mapped.
            prefix = _shm.owner_prefix(self._shm_prefix, actor.process.pid)
            _shm.sweep(prefix)
            self.node.plane.forget_owner(prefix)
        error = actor.gone_error()

        def make_exc() -> Exception:
            return _fresh(error)  # not the record itself: it is let go of now

        self.registry.mark_gone(actor.identity, None if actor.stopping else make_exc)
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
        self._actors.pop(actor.identity, None)

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
        """Stop ``actor``: ``Bye`` and ``grace`` seconds (longer if it waits for
        views of its device memory), then SIGTERM, then SIGKILL; every wait
        has a deadline, and none depends on another task still running."""
        with anyio.CancelScope(shield=True):
            if not actor.exited.is_set():
                actor.stopping = True
                # Calls to it fail now; leases with it are settled until it
                # exits (it may be waiting for views of its device memory).
                self.node.peer_gone(actor.identity, actor.gone_error, exited=False)
                process = actor.process
                if actor.trusted and grace > 0:
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
                    _signal(process, "terminate")
                    if not await self._wait_exit(actor, _TERMINATE_WAIT):
                        _signal(process, "kill")
                        if not await self._wait_exit(actor, _KILL_WAIT):
                            _logger.warning(
                                "atoll: actor %r (pid %d) has not exited %g s after SIGKILL; "
                                "no longer waiting for it",
                                actor.name,
                                process.pid,
                                _KILL_WAIT,
                            )
                            self._on_exit(actor)
            self._actors.pop(actor.identity, None)

    async def _wait_exit(self, actor: _ActorProcess, seconds: float) -> bool:
        """Wait up to ``seconds`` for ``actor``'s process to end; whether it has."""
        with anyio.move_on_after(seconds):
            await actor.watch_ended.wait()
            if not actor.exited.is_set():
                # Its watcher was cancelled before the exit came (asyncio.run
                # cancels every task it finds left): watch the process here.
                await _process_ended(actor.process)
                self._on_exit(actor)
        return actor.exited.is_set()

    def _on_bye(self, src: bytes, bye: m.Bye) -> None:
        actor = self._actors.get(src)
        if actor is not None and actor.stopping and bye.hold > 0:
            # Its own deadline, and a second to exit after it.
            actor.hold_until = anyio.current_time() + bye.hold + 1.0
            actor.holding.set()

    def _check_open(self) -> None:
        if self._closed:
            raise _host_closed_error()

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

    def _on_message(self, src: bytes, frames: list[zmq.Frame]) -> Job | None:
        return self.node.on_message(src, frames)

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

        It is not a task of the caller's task group, so the host may be
        closed from another task or context than the one that opened it (two
        notebook cells). Cancelled from outside (``asyncio.run`` cancels the
        tasks left when ``main()`` returns), it stops everything all the same,
        within the stop deadlines.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self.node.start(tg)
                tg.start_soon(self._hub.serve, self._on_message, self._unroutable)
                self._ready.set()
                try:
                    await self._close_requested.wait()
                finally:
                    await self._shutdown()
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
            with anyio.move_on_after(self._close_deadline()):
                await self._finished.wait()
            if not self._finished.is_set():
                _logger.warning(
                    "atoll: the host did not finish closing within %g s; leaving it",
                    self._close_deadline(),
                )
        _runtime.host_closed(self)
        _signals.unwatch(id(self))
        crash, self._crash = self._crash, None
        if crash is not None:
            raise TransportError(f"the host stopped after an internal error: {crash!r}") from crash

    def _close_deadline(self) -> float:
        """How long closing may take at most: each stop path's deadlines, added up."""
        return (
            2 * self._stop_timeout
            + self._device_lease_timeout
            + _TERMINATE_WAIT
            + _KILL_WAIT
            + _FORK_SERVER_WAIT
            + 1.0
        )

    async def _shutdown(self) -> None:
        self._closed = True
        self.registry.close_subscriptions()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for actor in list(self._actors.values()):
                    tg.start_soon(self._stop, actor, self._stop_timeout)
            for server in self._fork_servers.values():
                with anyio.move_on_after(_FORK_SERVER_WAIT):
                    await server.aclose()
            self.node.close(
                lambda: ActorClosedError("the host was closed while this call was in flight"),
                later=_host_closed_error,
            )
            await self.node.finish_threads(self._stop_timeout)

    def _remove_files(self) -> None:
        """What a SIGTERM must not leave behind: the private directory, the segments."""
        shutil.rmtree(self._hub.dir, ignore_errors=True)
        _shm.sweep(self._shm_prefix)

    def _close_transport(self) -> None:
        self._hub.close()
        self._ctx.term()
        self.node.plane.close()
        _shm.sweep(self._shm_prefix)


def _tail(actor: _ActorProcess) -> str:
    if not actor.stderr_tail:
        return ""
    return "\nlast lines of its stderr:\n" + "\n".join(actor.stderr_tail)


def _host_closed_error() -> ActorClosedError:
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


def _pool_key(built: BuiltEnv | None) -> str | None:
    """Which warm pool serves spawns into ``built`` (None: this interpreter)."""
    return built.key if built is not None else None


class _ByValue:
    """Pickles a class by value (its code travels), for an actor process that
    cannot import the module the class lives in."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __reduce__(self) -> tuple[Any, ...]:
        import cloudpickle

        from ..transport import _by_value

        module = sys.modules[self.cls.__module__]
        by_value = module.__name__ != "__main__"
        if by_value:
            cloudpickle.register_pickle_by_value(module)
        try:
            data = _by_value.dumps(self.cls)
        finally:
            if by_value:
                cloudpickle.unregister_pickle_by_value(module)
        return (pickle.loads, (data,))


def _installed(cls: type) -> bool:
    """Whether ``cls`` comes from atoll or an installed package (by reference
    then), rather than from the application's own files (by value)."""
    if cls.__module__ == "atoll" or cls.__module__.startswith("atoll."):
        return True
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if file is None:
        return False
    real = os.path.realpath(file)
    return any(real.startswith(d + os.sep) for d in _install_dirs())


def _install_dirs() -> set[str]:
    paths = sysconfig.get_paths()
    return {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")}


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


@keywords_of(HostOptions)
def open_host(options: HostOptions) -> HostOpener:
    """Open a host: the hub and a scope for actor processes.

    Use it as ``async with atoll.open_host() as host:``; leaving the block
    stops every actor (gracefully, then terminate, then kill, each with a
    deadline); calls still in flight fail with :class:`ActorClosedError`.
    Where one block cannot hold the host's whole life (a notebook, whose
    cells are separate tasks; an application's start-up and shut-down
    hooks), await it instead and close it yourself, from any task::

        host = await atoll.open_host()   # or atoll.start_host()
        ...
        await host.aclose()

    Works on asyncio and trio, including inside an event loop that is
    already running. A host whose task is cancelled from outside still
    stops everything within the stop deadlines.

    The options are those of :class:`atoll.HostOptions`, each documented
    there; an option out of range is a ``ValueError`` naming it.
    """
    return HostOpener(options)


class HostOpener:
    """What :func:`open_host` returns: an async context manager, or an
    awaitable for a host you close yourself with :meth:`Host.aclose`."""

    def __init__(self, options: HostOptions) -> None:
        self._options = options
        self._host: Host | None = None

    async def _open(self) -> Host:
        host = Host(self._options)
        await host._start()
        return host

    def __await__(self) -> Generator[Any, None, Host]:
        return self._open().__await__()

    async def __aenter__(self) -> Host:
        if self._host is not None:
            raise RuntimeError("this open_host() was entered already: call open_host() again")
        self._host = await self._open()
        return self._host

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._host is not None
        await self._host.aclose()


@keywords_of(HostOptions)
async def start_host(options: HostOptions) -> Host:
    """Open a host that you close yourself: ``await atoll.open_host(...)``.

    For notebooks and applications whose start and end are in different
    tasks; ``await host.aclose()`` stops it. The options are those of
    :class:`atoll.HostOptions`.
    """
    return await HostOpener(options)


__all__ = ["Host", "HostOpener", "open_host", "start_host"]
