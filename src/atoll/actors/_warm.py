"""Warm pools: actor processes started ahead of need (``host.prewarm``).

Per environment, processes that have started, imported what the
application asked (torch takes seconds) and said hello, but serve no actor
yet. A spawn for that environment takes one and only builds its actor
there; a restart takes one too, and has it reconnect under the dead
actor's identity (``_boot_spec.Become``). Each process taken is replaced in
the background.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import anyio
from anyio.abc import TaskGroup

from .._errors import AtollError
from ..transport._hub import Hub
from ..venvs import BuiltEnv
from ._boot_spec import Become, encode_become
from ._node import Node
from ._processes import ActorProcess, Processes

_logger = logging.getLogger(__name__)


class WarmPools:
    """The host's warm processes, by environment (see the module's text)."""

    def __init__(
        self,
        hub: Hub,
        node: Node,
        processes: Processes,
        new_identity: Callable[[], bytes],
        boot: Callable[[ActorProcess, BuiltEnv | None, Sequence[str]], Awaitable[None]],
        await_hello: Callable[[ActorProcess], Awaitable[None]],
        closed: Callable[[], bool],
        task_group: Callable[[], TaskGroup | None],
    ) -> None:
        self._hub = hub
        self._node = node
        self._processes = processes
        self._new_identity = new_identity
        self._boot = boot
        self._await_hello = await_hello
        self._closed = closed
        self._task_group = task_group
        self._warm: dict[str | None, deque[ActorProcess]] = {}
        self._imports: dict[str | None, tuple[str, ...]] = {}

    async def prewarm(self, built: BuiltEnv | None, count: int, imports: Sequence[str]) -> None:
        """Have ``count`` processes for ``built`` waiting (see Host.prewarm)."""
        key = pool_key(built)
        self._imports[key] = tuple(imports)
        waiting = [a for a in self._warm.get(key, ()) if not a.exited.is_set()]
        errors: list[Exception] = []

        async def one(actor: ActorProcess | None) -> None:
            try:
                await (self._add(built) if actor is None else self._await_hello(actor))
            except AtollError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for actor in [*waiting[:count], *[None] * (count - len(waiting))]:
                tg.start_soon(one, actor)
        if errors:
            raise errors[0]

    async def _add(self, built: BuiltEnv | None) -> None:
        key = pool_key(built)
        actor = ActorProcess(self._new_identity(), f"warm-{key or 'host'}")
        # In the pool while it starts: a spawn that comes meanwhile takes it
        # and waits for its hello, rather than starting a cold process.
        pool = self._warm.setdefault(key, deque())
        pool.append(actor)
        try:
            await self._boot(actor, built, self._imports.get(key, ()))
        except BaseException:
            if actor in pool:
                pool.remove(actor)
            raise

    async def _refill(self, built: BuiltEnv | None) -> None:
        try:
            await self._add(built)
        except Exception as exc:  # nobody waits for a refill: say it here
            if not self._closed():
                _logger.warning("atoll: could not start a warm actor process: %s", exc)

    def take(self, built: BuiltEnv | None) -> ActorProcess | None:
        """A warm process for ``built`` (perhaps still starting: wait for its
        hello), or None; its replacement is started."""
        pool = self._warm.get(pool_key(built))
        while pool:
            actor = pool.popleft()
            if not actor.exited.is_set():
                tg = self._task_group()
                assert tg is not None
                tg.start_soon(self._refill, built)
                return actor
        return None

    async def become(self, actor: ActorProcess, identity: bytes, name: str) -> ActorProcess | None:
        """Make warm process ``actor`` the new incarnation of ``identity``:
        it reconnects under that identity, proving a new secret. None if it
        could not be used (start one from scratch instead)."""
        try:
            await self._await_hello(actor)  # it may still be starting
        except AtollError as exc:
            _logger.warning("atoll: a warm process for %s was lost: %s", name, exc)
            return None
        process = actor.process
        assert process is not None and process.stdin is not None
        self._hub.forget(actor.identity)
        self._processes.actors.pop(actor.identity, None)
        self._node.peer_names.pop(actor.identity, None)
        secret = os.urandom(32)
        actor.identity, actor.name = identity, name
        # A new wait for its hello (compatible it stays: the same process;
        # the start that made it may only now see its first hello).
        actor.ready = anyio.Event()
        self._processes.actors[identity] = actor
        self._node.peer_names[identity] = name
        self._hub.expect(identity, secret, actor.on_hello)
        try:
            await process.stdin.send(encode_become(Become(identity.decode(), secret)))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # it exited meanwhile: the wait for its hello says how
        return actor


def pool_key(built: BuiltEnv | None) -> str | None:
    """Which pool serves spawns into ``built`` (None: this interpreter)."""
    return built.key if built is not None else None
