"""Actors that come back: restarts under the same identity, and the events
that tell of each actor's life.

An actor spawned with ``restart=Restart(...)`` that dies (a signal, an exit,
a limit hit) is started again by the host: a new process, same class,
arguments, environment, sandbox and limits, and the *same identity*, so
every ref to it (the host's, other actors', lookups by name) keeps working.
Calls in flight when it died fail, saying it is being restarted; they are
never run again. What is sent to it while it restarts (calls from the host
or from actors) waits here and goes to the new process once its actor is
built. Too many deaths within the window and the host gives up: calls then
fail saying so.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .._errors import ActorClosedError, ActorDiedError, AtollError
from ..transport import _messages as m
from ..transport._hub import HOST, Hub
from ._errors_wire import pack_error
from ._processes import ActorProcess, Processes
from ._ref import BOOT_OID
from ._registry import Registry

_logger = logging.getLogger("atoll")

LIFECYCLE = "atoll.lifecycle"
"""The topic of :class:`Lifecycle` events (``host.subscribe(LIFECYCLE)``)."""

HELD_MAX = 10_000
"""Messages kept for an actor while it restarts; past it, calls fail."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Restart:
    """How the host restarts an actor that dies: ``spawn(..., restart=Restart())``.

    At most ``limit`` restarts within ``window`` seconds; one more death
    and the host gives up. The first restart waits ``backoff`` seconds, each
    next one twice as long as the one before, up to ``max_backoff``.
    """

    limit: int = 5
    window: float = 60.0
    backoff: float = 0.05
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if type(self.limit) is not int or self.limit < 0:
            raise ValueError(f"Restart(limit=...) must be an int >= 0, got {self.limit!r}")
        for name in ("window", "backoff", "max_backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"Restart({name}=...) must be a number >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Lifecycle:
    """What happened to an actor, published on ``"atoll.lifecycle"``.

    ``event`` is one of ``started``, ``died``, ``restarting``, ``restarted``,
    ``gave_up``, ``stopped``; ``incarnation`` counts its processes from 1;
    ``reason`` says why it died or why the host gave up.
    """

    event: str
    actor: str
    incarnation: int
    reason: str = ""


class _Watched:
    """One supervised actor: how to start it again, and its deaths."""

    def __init__(self, name: str, policy: Restart, relaunch: Callable[[], Awaitable[Any]]) -> None:
        self.name = name
        self.policy = policy
        self.relaunch = relaunch
        self.deaths: deque[float] = deque()
        self.incarnation = 1
        self.stopped = False
        self.restarting: anyio.CancelScope | None = None
        self.ended = anyio.Event()  # set when a restart under way has ended


class Supervisor:
    """Restarts the actors spawned with a :class:`Restart`, for one host."""

    def __init__(
        self,
        processes: Processes,
        hub: Hub,
        registry: Registry,
        task_group: Callable[[], TaskGroup | None],
    ) -> None:
        self._processes = processes
        self._hub = hub
        self._registry = registry
        self._task_group = task_group
        self._watched: dict[bytes, _Watched] = {}
        self.held: dict[bytes, deque[tuple[bytes, Sequence[Any]]]] = {}
        """What waits for each actor that restarts: ``(sender, frames)``."""
        processes.on_death = self._on_death

    def started(
        self,
        identity: bytes,
        name: str,
        policy: Restart | None,
        relaunch: Callable[[], Awaitable[Any]],
    ) -> None:
        """``identity`` runs; with a ``policy``, restart it by ``relaunch()``
        when it dies."""
        if policy is not None:
            self._watched[identity] = _Watched(name, policy, relaunch)
        self._publish("started", name, 1)

    def _publish(self, event: str, name: str, incarnation: int, reason: str = "") -> None:
        self._registry.publish_now(LIFECYCLE, Lifecycle(event, name, incarnation, reason))

    def _on_death(self, actor: ActorProcess, error: Exception) -> Exception | None:
        watched = self._watched.get(actor.identity)
        reason = str(error).split("\n", 1)[0]
        if actor.stopping or watched is None:
            if not actor.name.startswith(("warm-", "spare-")):  # never an actor
                self._publish("stopped" if actor.stopping else "died", actor.name, 1, reason)
            return None
        self._publish("died", watched.name, watched.incarnation, reason)
        deaths = self._count_death(watched)
        tg = self._task_group()
        if deaths > watched.policy.limit or tg is None:
            del self._watched[actor.identity]
            gave_up = (
                f"it died {deaths} times within {watched.policy.window:g} s "
                f"(Restart(limit={watched.policy.limit})), and the host gave up restarting it"
            )
            self._publish("gave_up", watched.name, watched.incarnation, gave_up)
            actor.limit_hit = f"{actor.limit_hit + '; ' if actor.limit_hit else ''}{gave_up}"
            return None
        self.held[actor.identity] = deque()
        tg.start_soon(self._restart, actor.identity, watched, deaths)
        return ActorDiedError(
            watched.name,
            actor.exitcode,
            "\n".join(actor.stderr_tail),
            detail=f"{actor.limit_hit + '; ' if actor.limit_hit else ''}it is being restarted",
        )

    async def _restart(self, identity: bytes, watched: _Watched, deaths: int) -> None:
        policy = watched.policy
        error: Exception | None = None
        self._hub.parked.add(identity)  # routed through the host until it is built
        watched.ended = anyio.Event()
        try:
            with anyio.CancelScope() as scope:
                watched.restarting = scope
                while True:
                    self._publish("restarting", watched.name, watched.incarnation + 1)
                    await anyio.sleep(min(policy.max_backoff, policy.backoff * 2 ** (deaths - 1)))
                    try:
                        await watched.relaunch()
                        error = None
                        break
                    except AtollError as exc:  # it died starting: a death like another
                        error = exc
                        deaths = self._count_death(watched)
                        if deaths > policy.limit:
                            break
                        _logger.warning("atoll: restarting %s failed: %s", watched.name, exc)
        finally:
            watched.restarting = None
            watched.ended.set()
            self._hub.parked.discard(identity)
        if scope.cancelled_caught or watched.stopped:
            self._end(identity, watched, ActorClosedError(f"actor {watched.name!r} was stopped"))
        elif error is not None:
            if self._watched.get(identity) is watched:
                del self._watched[identity]
            reason = f"the host gave up restarting it: {error}"
            self._publish("gave_up", watched.name, watched.incarnation, reason)
            self._end(identity, watched, ActorDiedError(watched.name, detail=reason))
        else:
            watched.incarnation += 1
            self._publish("restarted", watched.name, watched.incarnation)
            self._deliver(identity)

    def _count_death(self, watched: _Watched) -> int:
        """Count a death now; how many fall within the window."""
        now = anyio.current_time()
        deaths = watched.deaths
        deaths.append(now)
        while deaths and deaths[0] < now - watched.policy.window:
            deaths.popleft()
        return len(deaths)

    def _deliver(self, identity: bytes) -> None:
        """Hand what waited to the new process, in the order it came."""
        for src, frames in self.held.pop(identity, ()):
            try:
                if src == HOST:
                    self._hub.send(identity, frames)
                else:
                    self._hub.socket.send([identity, src, *frames])
            except AtollError:
                pass  # gone again: its death fails what waits on it

    def _end(self, identity: bytes, watched: _Watched, error: Exception) -> None:
        """``identity`` will not come back: calls to it, and what waited, fail."""
        held = self.held.pop(identity, ())
        stopped = isinstance(error, ActorClosedError)
        self._processes.abandon(identity, watched.name, error, stopped=stopped)
        for src, frames in held:
            if src != HOST:
                self._refuse(src, frames, error, watched.name)
        if stopped:
            self._publish("stopped", watched.name, watched.incarnation)

    def _refuse(self, src: bytes, frames: Sequence[Any], error: Exception, name: str) -> None:
        try:
            msg = m.decode(frames[0])
        except m.DecodeError:
            return
        if type(msg) is m.Call:
            try:
                self._hub.send(src, [m.encode(m.Error(msg.call_id, pack_error(error, name)))])
            except AtollError:
                pass

    def hold(self, dest: bytes, src: bytes, frames: Sequence[Any]) -> bool:
        """Keep a message for ``dest`` while it restarts; False if it does
        not (or the message is its new process's boot, which goes now)."""
        held = self.held.get(dest)
        if held is None:
            return False
        if src == HOST:
            try:
                msg = m.decode(frames[0])
            except m.DecodeError:
                return False
            if type(msg) is m.Call and msg.target == BOOT_OID:
                return False
        if len(held) >= HELD_MAX:
            return False  # it fails as a message to a missing peer would
        held.append((src, [bytes(f) if not isinstance(f, bytes) else f for f in frames]))
        return True

    def restarting(self, identity: bytes) -> bool:
        return identity in self.held

    async def stop(self, identity: bytes) -> None:
        """Stop restarting ``identity`` (the host stops it): a restart under
        way is cancelled, and what waited for it fails."""
        watched = self._watched.pop(identity, None)
        if watched is None:
            return
        watched.stopped = True
        if watched.restarting is not None:
            watched.restarting.cancel()
            await watched.ended.wait()

    def forget(self, identity: bytes) -> None:
        """The host stops ``identity`` while it runs: no more restarts."""
        watched = self._watched.pop(identity, None)
        if watched is not None:
            watched.stopped = True
