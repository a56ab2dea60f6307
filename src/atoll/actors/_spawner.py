"""Starting actor processes: environments, warm pools (``_warm``), fork
servers, the code table, and building the actor in its new process.

A spawn takes a process from the environment's warm pool if one waits,
else a fork of the environment's fork server, else a process started from
scratch (which starts the fork server for the spawns after it). The process
reads its boot description, connects to the hub and says hello; the actor
is then built in it by an ordinary call, all within ``spawn_timeout``.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread
import msgspec
from anyio.abc import Process, TaskGroup

from .._errors import (
    ActorClosedError,
    ActorDiedError,
    SandboxUnavailableError,
    SerializationError,
    SpawnError,
    TransportError,
)
from ..transport._hub import Hub
from ..transport._plain import SANDBOXED, UNTRUSTED, UNTRUSTED_MARKS
from ..venvs import BuiltEnv, Env, build
from ..venvs._env import user_cache_dir
from ._actor import Kind
from ._boot_spec import BootSpec, encode_boot
from ._code_table import cached_table, write_table
from ._forks import ForkServer, ForkServerError, supported
from ._limits import Limits, rlimits
from ._node import Node
from ._options import HostOptions
from ._processes import (
    KILL_WAIT,
    TERMINATE_WAIT,
    ActorProcess,
    Processes,
    host_closed_error,
    signal_process,
    stderr_tail_text,
)
from ._ref import BOOT_OID
from ._sandbox import Confined, Sandbox, bwrap
from ._spares import SpareKey, Spares
from ._warm import WarmPools, pool_key

_logger = logging.getLogger(__name__)

Launched = tuple[bytes, dict[str, Kind], str]
"""A started actor: its process's identity, its methods and its class."""

FORK_SERVER_WAIT = 2.0
"""How long closing waits for a fork server to end."""
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_SRC_ROOT = os.path.dirname(_PACKAGE_DIR)
_BOOT_SCRIPT = os.path.join(_PACKAGE_DIR, "actors", "_boot.py")


class Spawner:
    """Starts the host's actor processes and builds actors in them."""

    def __init__(
        self,
        options: HostOptions,
        hub: Hub,
        node: Node,
        processes: Processes,
        shm_prefix: str,
    ) -> None:
        self._hub = hub
        self._node = node
        self._processes = processes
        self._shm_prefix = shm_prefix
        self._spawn_timeout = options.spawn_timeout
        self._stop_timeout = options.stop_timeout
        self._spin_us = options.spin_us
        self._transfer = options.transfer
        self._device_lease_timeout = float(options.device_lease_timeout)
        self._env_cache = options.env_cache
        self._build_progress = options.build_progress
        self._use_forks = options.fork_server and supported()
        self._numbers = itertools.count(1)
        self._envs: dict[Env, BuiltEnv] = {}
        self._code_table: str | None = None
        self._code_table_lock = anyio.Lock()
        self.fork_servers: dict[str | None, ForkServer] = {}
        self._fork_starting: dict[str | None, anyio.Event] = {}
        self._fork_failed: set[str | None] = set()
        self.tg: TaskGroup | None = None
        """The host's task group, once it runs."""
        self.closed = False
        """The host is closing: no more processes."""
        self.warm = WarmPools(
            hub,
            node,
            processes,
            self.new_identity,
            self._boot,
            self._await_hello,
            lambda: self.closed,
            lambda: self.tg,
        )
        self._spares = Spares(
            lambda: ActorProcess(self.new_identity(False, True), "spare-sandboxed"),
            lambda actor, built, confined: self._boot(actor, built, (), confined),
            lambda: self.closed,
            lambda: self.tg,
        )

    def _check_open(self) -> None:
        if self.closed:
            raise host_closed_error()

    async def close_fork_servers(self) -> None:
        for server in self.fork_servers.values():
            with anyio.move_on_after(FORK_SERVER_WAIT):
                await server.aclose()

    async def built(self, env: Env | None) -> BuiltEnv | None:
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

    def new_identity(self, trusted: bool = True, sandboxed: bool = False) -> bytes:
        """A fresh identity; an untrusted or sandboxed actor's says so (see
        ``transport._plain``)."""
        mark = SANDBOXED if sandboxed else b"a" if trusted else UNTRUSTED
        return mark + b"%d" % next(self._numbers)

    async def launch(
        self,
        spec: bytes,
        label: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str,
        built: BuiltEnv | None,
        paths: list[str],
        *,
        trusted: bool = True,
        sandbox: Sandbox | None = None,
        limits: Limits | None = None,
        again: bytes | None = None,
        trial: bool = False,
    ) -> Launched:
        """Start ``spec`` (a class, or an entry point's name) as actor ``name``
        in a process for ``built``: its identity, methods and class. An
        untrusted or sandboxed actor gets a process of its own (warm ones
        are trusted and unconfined). ``again``: the identity of an actor
        that died, for its new incarnation (a warm process if one waits,
        else a new process from scratch).
        ``trial``: a process to try an actor's code in, stopped after."""
        if trial:
            name = f"trial-{name}"  # its own name: the actor's stays with the actor
        if (trial or again is not None) and paths:
            # Its code may have changed within the second its bytecode was
            # written, at the same size: Python would take the stale bytecode.
            await anyio.to_thread.run_sync(drop_bytecode, paths)
        if sandbox is not None:
            trusted = False
            try:
                bwrap()
            except SandboxUnavailableError as exc:
                if sandbox.required:
                    raise
                _logger.warning("atoll: %s runs untrusted but unconfined: %s", name, exc)
                sandbox = None
        # Warm processes are trusted, unconfined and unlimited; a sandbox
        # used before has a spare process started in it.
        confined = Confined(sandbox, paths, limits)
        if sandbox is not None:
            spare: SpareKey = (pool_key(built), sandbox, tuple(paths), limits)
            actor = None if again is not None else self._spares.take(spare)
        else:
            actor = self.warm.take(built) if trusted and limits is None else None
        if again is not None and actor is not None:
            actor = await self.warm.become(actor, again, name)
        if again is not None and actor is None:
            actor = ActorProcess(again, name)
            actor.node_no = next(self._numbers)  # call ids unlike its last incarnation's
            fresh = True
        elif actor is None:
            actor = ActorProcess(self.new_identity(trusted, sandbox is not None), name)
            fresh = True
        else:
            actor.name = name
            self._node.peer_names[actor.identity] = name
            fresh = False
        actor.env = built.path if built is not None else sys.prefix
        try:
            with anyio.fail_after(self._spawn_timeout):
                if fresh:
                    await self._boot(actor, built, (), confined)
                else:
                    await self._await_hello(actor)
                kinds, cls_key = await self._build(actor, spec, paths, args, kwargs, label)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._processes.stop(actor, grace=0)
            if isinstance(exc, SpawnError):
                raise
            if isinstance(exc, TimeoutError):
                raise SpawnError(
                    f"actor {name!r} ({label}) did not start within spawn_timeout="
                    f"{self._spawn_timeout:g} s: its process, the import of its class, its "
                    "constructor or on_start() hung; it was killed" + stderr_tail_text(actor)
                ) from None
            if isinstance(exc, (ActorDiedError, TransportError)):
                raise SpawnError(f"actor {name!r} ({label}) failed to start: {exc}") from exc
            raise
        if sandbox is not None and again is None:
            self._spares.start(spare, built, confined)
        return actor.identity, kinds, cls_key

    async def _boot(
        self,
        actor: ActorProcess,
        built: BuiltEnv | None,
        imports: Sequence[str],
        confined: Confined | None = None,
    ) -> None:
        """Start ``actor``'s process and wait for its hello, ``confined`` as it says."""
        self._check_open()
        self._processes.actors[actor.identity] = actor
        self._node.peer_names[actor.identity] = actor.name
        secret = os.urandom(32)
        self._hub.expect(actor.identity, secret, actor.on_hello)
        try:
            await self._start_process(actor, secret, built, imports, confined)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._processes.stop(actor, grace=0)
            raise
        await self._await_hello(actor)

    async def _await_hello(self, actor: ActorProcess) -> None:
        try:
            with anyio.fail_after(self._spawn_timeout):
                await actor.ready.wait()
            if actor.exited.is_set():
                raise actor.gone_error()
            if not actor.compatible:
                raise SpawnError(
                    f"actor {actor.name!r} speaks another wire version; is atoll the same "
                    "version in its environment?"
                )
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._processes.stop(actor, grace=0)
            if isinstance(exc, TimeoutError):
                raise SpawnError(
                    f"actor process {actor.name!r} did not connect within spawn_timeout="
                    f"{self._spawn_timeout:g} s; it was killed" + stderr_tail_text(actor)
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
        actor: ActorProcess,
        secret: bytes,
        built: BuiltEnv | None,
        imports: Sequence[str],
        confined: Confined | None = None,
    ) -> None:
        env = dict(os.environ)
        confined = confined or Confined()
        limits = confined.limits
        name = actor.identity.decode()
        box, cgroup = confined.prepare(actor, self._shm_prefix, self._node.plane.arena.boxes)
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
            trusted=actor.identity[:1] not in UNTRUSTED_MARKS,
            secret=secret,
            node=actor.node_no,
            name=actor.name,
            host_pid=os.getpid(),
            sys_path=sys_path,
            isolated=built is not None,
            imports=list(imports),
            spin_us=self._spin_us,
            shm_prefix=self._shm_prefix if box is None else f"{self._shm_prefix}{name}-",
            transfer=self._transfer,
            sandboxed=box is not None,
            rlimits={} if limits is None else rlimits(limits, cgroup),
            nice=0 if limits is None else limits.nice,
            log_level=logging.getLogger("atoll.actor").getEffectiveLevel(),
            tracing=self._node.tracer is not None,
            debug=os.path.join(self._hub.dir, "debug") if box is None else "",
            shm_limit=None if limits is None else limits.shared_memory_bytes,
            stop_timeout=self._stop_timeout,
            device_lease_timeout=self._device_lease_timeout,
        )
        process: Process | None = None
        if confined.sandbox is not None:
            # Of the host's private directory, only the hub's socket: not its
            # control socket and key, nor the debug socket (``_control``).
            hub = self._hub.endpoint.removeprefix("ipc://")
            also = [
                _SRC_ROOT,
                *([hub] if hub != self._hub.endpoint else []),
                *[table][: bool(table)],
            ]
            if built is not None:
                also += [built.path, self._overlay()]
            assert box is not None
            argv = confined.argv(argv, sys_path, also, box)
        # Twice at most: a server found gone on the first try has its
        # replacement started by the second (this spawn waits for it only if
        # another spawn started it already; else it starts from scratch).
        for _ in range(2 if confined.sandbox is None else 0):  # a sandbox starts from scratch
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
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # its process group: what it forks dies with it
            )
        actor.process = process
        if cgroup is not None:
            cgroup.join(process.pid)  # before its actor's code runs: it waits for the boot
        assert self.tg is not None and process.stdin is not None
        self._processes.watch(actor)
        if actor.stopping or self.closed:
            # Stopped while it was being started (the host closing under a
            # warm pool's refill): nobody else will, so end it now.
            signal_process(process, "kill")
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
        key = pool_key(built)
        server = self.fork_servers.get(key)
        if server is None or not server.alive:
            if key in self._fork_failed:
                return None
            starting = self._fork_starting.get(key)
            if starting is None:
                self._fork_starting[key] = anyio.Event()
                assert self.tg is not None
                self.tg.start_soon(self._start_fork_server, key, built, argv, env)
                return None
            await starting.wait()
            server = self.fork_servers.get(key)
            if server is None:
                return None
        return server if server.can_fork(env) else None

    async def _start_fork_server(
        self, key: str | None, built: BuiltEnv | None, argv: list[str], env: dict[str, str]
    ) -> None:
        assert self.tg is not None
        try:
            with anyio.fail_after(self._spawn_timeout):
                server = await ForkServer.start(argv, env, self.tg)
        except (ForkServerError, TimeoutError) as exc:
            self._fork_failed.add(key)
            _logger.warning(
                "atoll: no fork server for %s (%s); its actor processes start from scratch",
                built.path if built is not None else sys.executable,
                str(exc) or f"not ready within {self._spawn_timeout} s",
            )
        else:
            if self.closed:  # the host closed meanwhile
                await server.aclose()
            else:
                self.fork_servers[key] = server
        finally:
            self._fork_starting.pop(key).set()

    async def _build(
        self,
        actor: ActorProcess,
        spec: bytes,
        paths: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        label: str,
    ) -> tuple[dict[str, Kind], str]:
        """Have ``actor``'s process build the actor, by an ordinary call to
        what it serves at ``BOOT_OID``; its methods and class."""
        try:
            kinds, cls_key = await self._node.call(
                actor.identity, BOOT_OID, label, (actor.name, spec, paths, *args), kwargs
            )
        except (ActorDiedError, SerializationError, TransportError):
            raise
        except Exception as exc:
            raise SpawnError(f"actor {actor.name!r} failed to start: {exc!r}") from exc
        return {k: Kind(v) for k, v in kinds.items()}, cls_key


def close_deadline(stop_timeout: float, device_lease_timeout: float) -> float:
    """How long closing a host may take at most: each stop path's deadlines, added up."""
    return (
        2 * stop_timeout
        + device_lease_timeout
        + TERMINATE_WAIT
        + KILL_WAIT
        + FORK_SERVER_WAIT
        + 1.0
    )


def drop_bytecode(folders: Sequence[str]) -> None:
    """Remove the compiled bytecode (``__pycache__/*.pyc``) under ``folders``."""
    for folder in folders:
        for where, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if os.path.basename(where) == "__pycache__":
                for file in files:
                    if file.endswith(".pyc"):
                        try:
                            os.unlink(os.path.join(where, file))
                        except OSError:
                            pass  # gone, or not ours to remove: it is checked as usual
