"""Spare sandboxed processes: one started ahead of need per sandbox in use.

A sandboxed actor cannot be forked from the host's fork server (its sandbox
must hold from the first instruction its process runs), and a new
interpreter in a new sandbox takes a while to start. So once a sandbox has
been used, one process is started in it ahead of need: the next spawn with
the same sandbox, environment, folders and limits takes it and only builds
its actor there, and another spare is started behind it. Each spare is a
sandbox of its own, exactly as a process started for that spawn would be.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from anyio.abc import TaskGroup

from ._limits import Limits
from ._processes import ActorProcess
from ._sandbox import Confined, Sandbox

_logger = logging.getLogger("atoll")

SpareKey = tuple[Any, Sandbox, tuple[str, ...], Limits | None]
"""What a spare serves: an environment's pool key, the sandbox, the
folders it shows, the limits."""

MAX_KINDS = 8
"""Sandboxes (keys) a host keeps a spare for, at most."""


class Spares:
    """At most one waiting process per :data:`SpareKey`."""

    def __init__(
        self,
        new_actor: Callable[[], ActorProcess],
        boot: Callable[[ActorProcess, Any, Confined], Awaitable[None]],
        closed: Callable[[], bool],
        task_group: Callable[[], TaskGroup | None],
    ) -> None:
        self._new_actor = new_actor
        self._boot = boot
        self._closed = closed
        self._task_group = task_group
        self._waiting: dict[SpareKey, ActorProcess] = {}

    def take(self, key: SpareKey) -> ActorProcess | None:
        """The spare for ``key`` (perhaps still starting: wait for its
        hello); None if there is none."""
        actor = self._waiting.pop(key, None)
        return None if actor is None or actor.exited.is_set() else actor

    def start(self, key: SpareKey, built: Any, confined: Confined) -> None:
        """Start a spare for ``key`` in the background, unless one waits
        (after a spawn: not to compete with it for the CPU)."""
        tg = self._task_group()
        if tg is None or key in self._waiting or self._closed():
            return
        if len(self._waiting) >= MAX_KINDS:
            return
        actor = self._waiting[key] = self._new_actor()
        tg.start_soon(self._add, key, actor, built, confined)

    async def _add(
        self, key: SpareKey, actor: ActorProcess, built: Any, confined: Confined
    ) -> None:
        try:
            await self._boot(actor, built, confined)
        except Exception as exc:  # nobody waits for a spare: say it here
            if self._waiting.get(key) is actor:
                del self._waiting[key]
            if not self._closed():
                _logger.warning("atoll: could not start a spare sandboxed process: %s", exc)
