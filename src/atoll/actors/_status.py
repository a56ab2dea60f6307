"""What a host runs, right now: ``await host.status()``.

For each actor what the host knows (its name, process, environment, trust,
state, age, incarnation, resident memory, the host's calls to it in
flight), and what its process reports when asked, each within
``REPORT_WAIT`` (the calls it serves now, from any caller, with their age
and chain; per-method counts and latency percentiles; shared memory and
leases); and what the host dropped. A process that does not answer in time
(its event loop blocked) is shown as such: that is worth knowing too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

REPORT_WAIT = 1.0
"""How long the status waits for each actor process's report."""


@dataclasses.dataclass(frozen=True)
class CallInFlight:
    """A call an actor serves now."""

    method: str
    age: float
    """Seconds since it started."""
    chain: int
    """The call chain it belongs to (re-entrant calls share it)."""
    caller: str
    """Who called: an actor's name, or ``host``."""


@dataclasses.dataclass(frozen=True)
class MethodStatus:
    """One method's calls so far; latencies (seconds) of its last 512."""

    calls: int
    errors: int
    """Calls that raised, or were cancelled."""
    p50: float
    p90: float
    p99: float
    max: float


class _Report(msgspec.Struct):
    """What an actor process says of itself (checked: it may be untrusted)."""

    calls: list[tuple[str, float, int, str]]
    methods: dict[str, tuple[int, int, float, float, float, float]]
    leases: int
    shared_memory_bytes: int


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
    environment: str = ""
    """Its environment's folder (``sys.prefix`` of the host's own)."""
    answering: bool = False
    """Its process answered the status in time; the fields below are its answer."""
    calls: tuple[CallInFlight, ...] = ()
    """The calls it serves now, from any caller, oldest first."""
    methods: dict[str, MethodStatus] = dataclasses.field(default_factory=dict)
    """Its methods' calls so far."""
    leases: int = 0
    """Its shared memory that peers hold views of."""
    shared_memory_bytes: int = 0
    """Shared memory it owns (its arena's segments)."""


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


class Observer:
    """What ``host.status()``, ``host.dump_stacks()`` and the control socket
    (``_control``) show: made from the host's records and the actors' reports."""

    def __init__(
        self,
        registry: Any,
        processes: Any,
        supervisor: Any,
        node: Any,
        dropped: Callable[[], dict[str, int]],
    ) -> None:
        self._registry = registry
        self._processes = processes
        self._supervisor = supervisor
        self._node = node
        self._dropped = dropped

    async def status(self) -> HostStatus:
        """The status of every actor registered."""
        return await _snapshot(
            self._registry, self._processes, self._supervisor, self._node, self._dropped()
        )

    async def stacks(self, identity: bytes) -> str:
        """Every thread's stack of ``identity``'s process, then the task tree
        of its event loop if the loop answers within ``REPORT_WAIT``."""
        from ._ref import REPORT_OID

        processes = self._processes
        stacks = await processes.stacks(identity)
        tasks = None
        actor = processes.actors.get(identity)
        if actor is not None and actor.compatible and not actor.exited.is_set():
            with anyio.move_on_after(REPORT_WAIT):
                try:
                    tasks = await self._node.call(identity, REPORT_OID, "report", ("tasks",), {})
                except Exception:
                    pass
        if not isinstance(tasks, str):
            tasks = "(its event loop did not answer: blocked, or gone)"
        return f"{stacks}\n\nTasks of its event loop:\n{tasks}"

    async def stacks_of(self, name: str) -> str:
        """:meth:`stacks` of the actor registered as ``name``."""
        for registered, identity in self._registry.actors():
            if registered == name:
                return await self.stacks(identity)
        raise KeyError(f"no actor called {name!r} in this host")


async def _snapshot(
    registry: Any, processes: Any, supervisor: Any, node: Any, dropped: dict[str, int]
) -> HostStatus:
    """The status of every actor registered in ``registry``."""
    from ..transport._plain import SANDBOXED, UNTRUSTED_MARKS
    from ._ref import REPORT_OID
    from ._supervisor import resident_bytes

    now = anyio.current_time()
    pending: dict[bytes, int] = {}
    for p in node._pending.values():
        pending[p.dest] = pending.get(p.dest, 0) + 1
    listed = list(registry.actors())
    reports: dict[bytes, _Report] = {}

    async def ask(identity: bytes) -> None:
        with anyio.move_on_after(REPORT_WAIT):
            try:
                raw = await node.call(identity, REPORT_OID, "report", ("status",), {})
                reports[identity] = msgspec.convert(raw, _Report)
            except Exception:  # gone, or an answer that is not a report
                pass

    names = {identity: name for name, identity in listed}
    async with anyio.create_task_group() as tg:
        for _, identity in listed:
            actor = processes.actors.get(identity)
            if actor is not None and actor.compatible and not actor.exited.is_set():
                tg.start_soon(ask, identity)
    actors = []
    for name, identity in listed:
        actor = processes.actors.get(identity)
        running = actor is not None and actor.process is not None and not actor.exited.is_set()
        watched = supervisor.watched(identity)
        if running:
            state = "running"
        elif watched is not None and watched.asleep:
            state = "asleep"
        else:
            state = "restarting"
        report = reports.get(identity)
        extra: dict[str, Any] = {}
        if report is not None:
            extra = dict(
                answering=True,
                calls=tuple(
                    CallInFlight(method, age, chain, _caller(caller, names))
                    for method, age, chain, caller in report.calls
                ),
                methods={k: MethodStatus(*v) for k, v in report.methods.items()},
                leases=report.leases,
                shared_memory_bytes=report.shared_memory_bytes,
            )
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
                environment=actor.env if actor is not None else "",
                **extra,
            )
        )
    return HostStatus(tuple(actors), dropped, processes.output.dropped)


def _caller(identity: str, names: dict[bytes, str]) -> str:
    from ..transport._hub import HOST

    if identity == HOST.decode():
        return "host"
    return names.get(identity.encode(), identity)
