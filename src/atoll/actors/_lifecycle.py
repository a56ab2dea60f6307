"""What supervision looks like from outside: the :class:`Restart` policy an
actor is spawned with, and the :class:`Lifecycle` events the host publishes
(see ``_supervisor`` for what the host does with them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._limits import from_manifest, parse_size

LIFECYCLE = "atoll.lifecycle"
"""The topic of :class:`Lifecycle` events (``host.subscribe(LIFECYCLE)``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Restart:
    """How the host restarts an actor that dies: ``spawn(..., restart=Restart())``.

    At most ``limit`` restarts within ``window`` seconds; one more death
    and the host gives up. The first restart waits ``backoff`` seconds, each
    next one twice as long as the one before, up to ``max_backoff``.

    With ``health_interval``, the host probes the actor that often; one
    whose event loop does not answer within ``health_timeout`` seconds (a
    ``time.sleep`` in an async method, a deadlock) is killed, its threads'
    stacks quoted in the error its callers get, and restarted.

    With ``rss_limit`` (bytes, or a size such as ``"4G"``), an actor whose
    processes' resident memory grows past it is restarted at its next idle
    moment (checked every ``health_interval`` seconds, else every second),
    never in the middle of a call.
    """

    limit: int = 5
    window: float = 60.0
    backoff: float = 0.05
    max_backoff: float = 5.0
    health_interval: float | None = None
    health_timeout: float = 5.0
    rss_limit: int | str | None = None

    def __post_init__(self) -> None:
        if type(self.limit) is not int or self.limit < 0:
            raise ValueError(f"Restart(limit=...) must be an int >= 0, got {self.limit!r}")
        for name in ("window", "backoff", "max_backoff", "health_interval", "health_timeout"):
            value = getattr(self, name)
            if value is None and name == "health_interval":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"Restart({name}=...) must be a number >= 0, got {value!r}")
        if self.rss_limit is not None:
            object.__setattr__(
                self, "rss_limit", parse_size(self.rss_limit, "rss_limit", "Restart")
            )
        if self.health_interval is not None and not self.health_timeout > 0:
            raise ValueError("Restart(health_timeout=...) must be above 0")


@dataclasses.dataclass(frozen=True)
class Lifecycle:
    """What happened to an actor, published on ``"atoll.lifecycle"``.

    ``event`` is one of ``started``, ``died``, ``restarting``, ``restarted``,
    ``gave_up``, ``stopped``, ``evicted`` (stopped for being idle: the next
    call starts it again), ``reloaded``; ``incarnation`` counts its
    processes from 1;
    ``reason`` says why it died or why the host gave up.
    """

    event: str
    actor: str
    incarnation: int
    reason: str = ""


def check_idle(idle: float | None) -> None:
    if idle is not None and (isinstance(idle, bool) or not idle > 0):
        raise ValueError(f"idle_stop must be a number of seconds above 0, got {idle!r}")


def restart_for_extension(asked: dict[str, Any] | None, manifest: str) -> Restart | None:
    """``[tool.atoll.restart]`` of an extension's manifest, checked."""
    return from_manifest(Restart, asked, manifest, "restart")
