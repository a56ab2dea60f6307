"""What a host runs, right now: ``host.status()``.

A snapshot, made on the host's event loop without asking any actor: for
each actor its name, process, trust, state, age, incarnation, resident
memory and the host's calls to it in flight; and what the host dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio


@dataclasses.dataclass(frozen=True)
class ActorStatus:
    """One actor, as :meth:`Host.status` sees it."""

    name: str
    pid: int | None
    """Its process (None: it has none now: asleep, or restarting)."""
    state: str
    """``running``, ``restarting``, ``asleep`` (lazy, or stopped for being idle)."""
    trusted: bool
    sandboxed: bool
    uptime: float
    """Seconds since its process started (0 without one)."""
    incarnation: int
    """Its processes so far, this one included (restarts, reloads, wakes)."""
    resident_bytes: int
    """Resident memory of its process and those it started."""
    calls_in_flight: int
    """The host's own calls to it not yet answered."""


@dataclasses.dataclass(frozen=True)
class HostStatus:
    """What :meth:`Host.status` returns."""

    actors: tuple[ActorStatus, ...]
    dropped: dict[str, int]
    """Messages the host dropped, by reason (see ``Host.dropped``)."""
    output_dropped: int
    """Lines of actors' output dropped because their destination was slow."""

    def actor(self, name: str) -> ActorStatus:
        """The status of the actor called ``name``; KeyError if none."""
        for one in self.actors:
            if one.name == name:
                return one
        raise KeyError(f"no actor called {name!r} in this host's status")


def snapshot(
    registry: Any, processes: Any, supervisor: Any, node: Any, dropped: dict[str, int]
) -> HostStatus:
    """The status of every actor registered in ``registry``."""
    from ..transport._plain import SANDBOXED, UNTRUSTED_MARKS
    from ._supervisor import resident_bytes

    now = anyio.current_time()
    pending: dict[bytes, int] = {}
    for p in node._pending.values():
        pending[p.dest] = pending.get(p.dest, 0) + 1
    actors = []
    for name, identity in registry.actors():
        actor = processes.actors.get(identity)
        running = actor is not None and actor.process is not None and not actor.exited.is_set()
        watched = supervisor.watched(identity)
        if running:
            state = "running"
        elif watched is not None and watched.asleep:
            state = "asleep"
        else:
            state = "restarting"
        actors.append(
            ActorStatus(
                name=name,
                pid=actor.process.pid if running else None,
                state=state,
                trusted=identity[:1] not in UNTRUSTED_MARKS,
                sandboxed=identity[:1] == SANDBOXED,
                uptime=now - actor.started if running else 0.0,
                incarnation=watched.incarnation if watched is not None else 1,
                resident_bytes=resident_bytes(actor.process.pid) if running else 0,
                calls_in_flight=pending.get(identity, 0),
            )
        )
    return HostStatus(tuple(actors), dropped, processes.output.dropped)
