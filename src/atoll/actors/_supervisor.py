"""Actors that come back: restarts under the same identity (alone or in
groups), lazy start and idle stop, health probes, reloads, and the events
that tell of each actor's life.

An actor spawned with ``restart=Restart(...)`` that dies (a signal, an exit,
a limit hit) is started again by the host: a new process, same class,
arguments, environment, sandbox and limits, and the *same identity*, so
every ref to it (the host's, other actors', lookups by name) keeps working.
Calls in flight when it died fail, saying it is being restarted; they are
never run again (but for ``@idempotent`` methods, which the caller makes
once more). What is sent to it while it restarts (calls from the host or
from actors) waits in the host (``_waiting``) and goes to the new process
once its actor is built. Too many deaths within the window and the host gives up: calls then
fail saying so.

The same waiting serves an actor with no process: a lazy one (spawned with
``lazy=True``) and one stopped for being idle (``idle_stop=``: no message to
or from it for that long, and no call running, which its process is asked).
The first message for it starts its process, and waits for it. With
``Restart(health_interval=...)`` the host asks the process how busy it is
that often; one whose event loop does not answer in time is killed (its
threads' stacks quoted in the error) and restarted. A reload starts the
actor's code as it is on disk in a trial process first, then swaps a new
process in once the old one's calls have ended.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .._errors import ActorClosedError, ActorDiedError, AtollError, SpawnError
from ..transport._hub import Hub
from ._lifecycle import LIFECYCLE, Lifecycle, Restart
from ._node import Node
from ._processes import ActorProcess, Processes, signal_process
from ._ref import STATUS_OID
from ._registry import Registry
from ._waiting import Waiting

_logger = logging.getLogger("atoll")

_EVICT_GRACE = 5.0
_WATCH_READY = 200
"""Milliseconds a file watcher takes to say it watches (and then, between its
looks at whether its actor is still watched)."""
"""Seconds an idle actor's ``on_stop`` may take."""


class _Watched:
    """One supervised actor: how to start it again, and its deaths."""

    def __init__(
        self,
        name: str,
        policy: Restart | None,
        relaunch: Callable[[], Awaitable[Any]],
        idle: float | None,
    ) -> None:
        self.name = name
        self.policy = policy
        """None: it is not restarted when it dies (it is lazy, or stops when idle)."""
        self.relaunch = relaunch
        self.idle = idle
        self.deaths: deque[float] = deque()
        self.incarnation = 0  # processes started so far
        self.stopped = False
        self.restarting: anyio.CancelScope | None = None
        self.ended = anyio.Event()  # set when a restart under way has ended
        self.asleep = False  # no process: the first message for it starts one
        self.waking = False
        self.evicted: ActorProcess | None = None  # its last process, stopped for idleness
        self.replacing: ActorProcess | None = None  # its last process, stopped for a new one
        self.group: tuple[str, list[bytes]] | None = None  # (strategy, members), if supervised
        self.launch: Callable[..., Awaitable[Any]] = relaunch  # a process of the same spec


class Supervisor:
    """Restarts, wakes and puts to sleep the actors that ask for it, for one
    host; and answers for actors that are not there."""

    def __init__(
        self,
        processes: Processes,
        hub: Hub,
        node: Node,
        registry: Registry,
        task_group: Callable[[], TaskGroup | None],
    ) -> None:
        self._node = node
        self._processes = processes
        self._hub = hub
        self._registry = registry
        self._task_group = task_group
        self._watched: dict[bytes, _Watched] = {}
        self.waiting = Waiting(hub, processes)
        self.waiting.on_held = self._on_held
        processes.on_death = self._on_death

    def started(
        self,
        identity: bytes,
        name: str,
        policy: Restart | None,
        launch: Callable[..., Awaitable[Any]],
        *,
        idle: float | None = None,
        lazy: bool = False,
    ) -> None:
        """``identity`` runs (``lazy``: will run once a message comes for
        it). ``launch(again=identity)`` starts it again: with a ``policy``
        when it dies; with ``idle``, for the next message after it was
        stopped for that many seconds without traffic; and to reload it."""
        relaunch = functools.partial(launch, again=identity)
        watched = self._watched[identity] = _Watched(name, policy, relaunch, idle)
        watched.launch = launch
        tg = self._task_group()
        assert tg is not None
        if policy is not None and policy.health_interval is not None:
            tg.start_soon(self._probe, identity, watched)
        if policy is not None and policy.rss_limit is not None:
            tg.start_soon(self._watch_rss, identity, watched)
        if idle is not None:
            self._hub.traffic[identity] = 0
            tg.start_soon(self._watch_idle, identity, watched)
        if lazy:
            self._put_to_sleep(identity, watched)
        else:
            watched.incarnation = 1
            self._publish("started", name, 1)

    def _put_to_sleep(self, identity: bytes, watched: _Watched) -> None:
        """No process for ``identity`` from now: what comes for it waits."""
        watched.asleep = True
        self.waiting.park(identity)

    def _on_held(self, identity: bytes) -> None:
        """A message waits for ``identity``: start its process if it sleeps."""
        watched = self._watched.get(identity)
        if watched is not None and watched.asleep and not watched.waking:
            tg = self._task_group()
            if tg is not None:
                watched.waking = True
                tg.start_soon(self._wake, identity, watched)

    async def _wake(self, identity: bytes, watched: _Watched) -> None:
        """Start a sleeping actor's process, for the messages that wait."""
        watched.waking = True
        try:
            if watched.evicted is not None:  # its last process must be gone first
                await watched.evicted.exited.wait()
                watched.evicted = None
            await watched.relaunch()
        except AtollError as exc:
            # What waited fails with the reason; the next message tries again.
            failed = exc
            self._node.peer_gone(identity, lambda: failed, restarting=True)
            self.waiting.fail(identity, failed, watched.name, keep=True)
            return
        finally:
            watched.waking = False
        if self._watched.get(identity) is not watched:  # stopped meanwhile
            actor = self._processes.actors.get(identity)
            if actor is not None:
                await self._processes.stop(actor, _EVICT_GRACE)
            return
        watched.asleep = False
        watched.incarnation += 1
        self._publish("started", watched.name, watched.incarnation)
        self.waiting.release(identity)

    async def _watch_idle(self, identity: bytes, watched: _Watched) -> None:
        """Stop ``identity`` once it has had no traffic for ``watched.idle``
        seconds and runs no call: it sleeps until the next message."""
        idle = watched.idle
        assert idle is not None
        traffic = self._hub.traffic
        last, quiet_since = -1, anyio.current_time()
        while self._watched.get(identity) is watched:
            await anyio.sleep(max(0.01, idle / 4))
            now = anyio.current_time()
            count = traffic.get(identity, 0)
            actor = self._processes.actors.get(identity)
            if count != last or actor is None or identity in self.waiting:
                last, quiet_since = count, now
                continue
            if now - quiet_since < idle:
                continue
            # What comes from now on waits; the probe goes behind whatever
            # came before, so its answer counts every call it still has.
            self._put_to_sleep(identity, watched)
            if await self._busy(identity, max(idle, 1.0)):
                watched.asleep = False
                self.waiting.release(identity)
                last = -1
                continue
            watched.evicted = actor
            await self._processes.stop(actor, _EVICT_GRACE, again=True)

    async def reload_on_change(self, identity: bytes, folder: str) -> None:
        """Reload ``identity`` whenever a file under ``folder`` changes; from
        when this returns, no change is missed."""
        try:
            import watchfiles
        except ImportError:
            raise ImportError(
                "load_extension(watch=True) needs watchfiles: pip install 'atoll[watch]'"
            ) from None
        tg = self._task_group()
        assert tg is not None
        await tg.start(self._reload_on_change, identity, folder, watchfiles.awatch)

    async def _reload_on_change(
        self, identity: bytes, folder: str, awatch: Any, *, task_status: Any
    ) -> None:
        watched = self._watched[identity]
        stop = anyio.Event()
        # It says it watches by a first empty batch, after rust_timeout.
        batches = awatch(folder, stop_event=stop, rust_timeout=_WATCH_READY, yield_on_timeout=True)
        ready = False
        async for changes in batches:
            if not ready:
                ready = True
                task_status.started()
            if self._watched.get(identity) is not watched:
                stop.set()  # stopped, or gone for good
                continue
            if not changes:
                continue
            try:
                await self.reload(identity, _EVICT_GRACE)
            except AtollError as exc:
                _logger.warning("atoll: %s was not reloaded: %s", watched.name, exc)

    async def _busy(self, identity: bytes, within: float) -> bool:
        """Whether ``identity`` runs or queues a call or streams (True if it
        does not answer ``within`` seconds: dying, or hung)."""
        try:
            with anyio.fail_after(within):
                calls, streams = await self._node.call(identity, STATUS_OID, "__call__", (), {})
        except (AtollError, TimeoutError):
            return True
        return bool(calls or streams)

    async def reload(self, identity: bytes, drain: float) -> None:
        """Start ``identity`` again from its code as it is now: first a trial
        process (if it fails, the actor keeps running, and this raises its
        error), then, once its calls have ended (``drain`` seconds at most), the
        new process in place of the old one."""
        watched = self._watched.get(identity)
        if watched is not None and watched.asleep:
            return  # its next process starts from the code as it is then
        actor = self._processes.actors.get(identity)
        if watched is None or actor is None or identity in self.waiting:
            raise ActorClosedError(f"reload(): {identity.decode()!r} has no process running")
        try:
            trial, _, _ = await watched.launch(trial=True)  # the new code, tried aside
        except AtollError as exc:
            raise SpawnError(
                f"reload(): the new code of {watched.name!r} failed to start (the old one "
                f"keeps running): {exc}"
            ) from exc
        tried = self._processes.actors.get(trial)
        if tried is not None:
            await self._processes.stop(tried, _EVICT_GRACE)
        self.waiting.park(identity)
        with anyio.move_on_after(drain):
            # Its calls end in its own process: ask again until none is left.
            while await self._busy(identity, drain):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await self._swap(identity, watched, actor, "reloaded")

    async def _swap(
        self, identity: bytes, watched: _Watched, actor: ActorProcess, event: str, why: str = ""
    ) -> None:
        """Replace ``actor`` (parked, and idle) by a new process under its
        identity, and tell of it as ``event``."""
        watched.replacing = actor
        await self._processes.stop(actor, _EVICT_GRACE, again=True)
        watched.replacing = None
        try:
            await watched.relaunch()
        except AtollError as exc:
            self._watched.pop(identity, None)
            self._end(identity, watched, exc)
            raise
        watched.incarnation += 1
        self._publish(event, watched.name, watched.incarnation, why)
        self.waiting.release(identity)

    async def _watch_rss(self, identity: bytes, watched: _Watched) -> None:
        """Restart ``identity`` at an idle moment once its resident memory
        is past its ``rss_limit``."""
        policy = watched.policy
        assert policy is not None and policy.rss_limit is not None
        limit = int(policy.rss_limit)
        while self._watched.get(identity) is watched:
            await anyio.sleep(policy.health_interval or 1.0)
            actor = self._processes.actors.get(identity)
            if identity in self.waiting or actor is None or actor.process is None:
                continue
            rss = resident_bytes(actor.process.pid)
            if rss <= limit:
                continue
            self.waiting.park(identity)
            if await self._busy(identity, policy.health_timeout):
                self.waiting.release(identity)  # in the middle of a call: later
                continue
            why = f"its resident memory, {rss >> 20} MiB, was past rss_limit ({limit >> 20} MiB)"
            try:
                await self._swap(identity, watched, actor, "restarted", why)
            except AtollError as exc:
                _logger.warning("atoll: %s could not be restarted: %s", watched.name, exc)
                return

    async def _probe(self, identity: bytes, watched: _Watched) -> None:
        """Probe ``identity`` every ``health_interval`` while it is watched;
        kill it if its event loop does not answer in time."""
        policy = watched.policy
        assert policy is not None and policy.health_interval is not None
        while self._watched.get(identity) is watched:
            await anyio.sleep(policy.health_interval)
            actor = self._processes.actors.get(identity)
            if identity in self.waiting or actor is None or actor.exited.is_set():
                continue  # restarting, or dying: nothing to probe now
            asked = anyio.current_time()
            with anyio.move_on_after(policy.health_timeout) as probe:
                try:
                    await self._node.call(identity, STATUS_OID, "__call__", (), {})
                except AtollError:
                    continue  # it died meanwhile: its death is handled there
            if actor.debugging or actor.debugged_until >= asked:
                continue  # stopped in a debugger: not hung
            if probe.cancelled_caught and self._watched.get(identity) is watched:
                why = f"it did not answer a health probe within {policy.health_timeout:g} s"
                await self._processes.kill_hung(actor, why)

    def _publish(self, event: str, name: str, incarnation: int, reason: str = "") -> None:
        self._registry.publish_now(LIFECYCLE, Lifecycle(event, name, incarnation, reason))

    def _on_death(self, actor: ActorProcess, error: Exception) -> Exception | None:
        watched = self._watched.get(actor.identity)
        reason = str(error).split("\n", 1)[0]
        if watched is not None and watched.evicted is actor:
            self._publish("evicted", watched.name, watched.incarnation, "idle")
            return ActorClosedError(f"actor {watched.name!r} was stopped while idle")
        if watched is not None and watched.replacing is actor:
            return ActorClosedError(f"actor {watched.name!r} is being replaced by a new process")
        if watched is not None and watched.policy is None and not actor.stopping:
            del self._watched[actor.identity]  # not restarted: it dies as any actor
            self._hub.traffic.pop(actor.identity, None)
            watched = None
        if actor.stopping or watched is None:
            if not actor.name.startswith(("warm-", "spare-", "trial-")):  # not an actor's own
                self._publish("stopped" if actor.stopping else "died", actor.name, 1, reason)
            return None
        self._publish("died", watched.name, watched.incarnation, reason)
        deaths = self._count_death(watched)
        tg = self._task_group()
        assert watched.policy is not None
        if deaths > watched.policy.limit or tg is None:
            del self._watched[actor.identity]
            gave_up = (
                f"it died {deaths} times within {watched.policy.window:g} s "
                f"(Restart(limit={watched.policy.limit})), and the host gave up restarting it"
            )
            self._publish("gave_up", watched.name, watched.incarnation, gave_up)
            actor.limit_hit = f"{actor.limit_hit + '; ' if actor.limit_hit else ''}{gave_up}"
            # (its group may have parked it)
            self.waiting.fail(actor.identity, ActorDiedError(watched.name, detail=gave_up), "host")
            return None
        self.waiting.park(actor.identity)
        tg.start_soon(self._restart, actor.identity, watched, deaths)
        if watched.group is not None and actor.brought_down_by is None:
            self._bring_down(actor.identity, watched)
        return ActorDiedError(
            watched.name,
            actor.exitcode,
            "\n".join(actor.stderr_tail),
            detail=f"{actor.limit_hit + '; ' if actor.limit_hit else ''}it is being restarted",
            restarting=True,
        )

    def supervise(self, identities: list[bytes], strategy: str) -> None:
        """Restart ``identities`` together as ``strategy`` says (OTP's):
        ``one_for_one`` each alone, ``one_for_all`` all when one dies,
        ``rest_for_one`` the one that died and those after it."""
        if strategy not in ("one_for_one", "one_for_all", "rest_for_one"):
            raise ValueError(
                f"supervise(strategy=...) takes one_for_one, one_for_all or rest_for_one, "
                f"got {strategy!r}"
            )
        members = [self._watched.get(identity) for identity in identities]
        for identity, watched in zip(identities, members, strict=True):
            if watched is None or watched.policy is None:
                raise ValueError(
                    f"supervise() restarts actors spawned with restart=atoll.Restart(...); "
                    f"{identity.decode()!r} was not"
                )
        group = (strategy, list(identities))
        for watched in members:
            assert watched is not None
            watched.group = group

    def _bring_down(self, identity: bytes, watched: _Watched) -> None:
        """Kill the members of ``watched``'s group its death takes along
        (each is restarted by its own death, which takes no one along)."""
        assert watched.group is not None
        strategy, members = watched.group
        if strategy == "one_for_one":
            return
        after = members[members.index(identity) + 1 :]
        for other in after if strategy == "rest_for_one" else members:
            actor = self._processes.actors.get(other)
            if other != identity and actor is not None and actor.process is not None:
                actor.brought_down_by = watched.name
                self.waiting.park(other)  # calls to it from now wait for the next
                actor.limit_hit = f"restarted with {watched.name!r}, which died ({strategy})"
                signal_process(actor.process, "kill")

    async def _restart(self, identity: bytes, watched: _Watched, deaths: int) -> None:
        policy = watched.policy
        assert policy is not None
        error: Exception | None = None
        watched.ended = anyio.Event()  # (parked since its death, until it is built)
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
            self.waiting.release(identity)

    def _count_death(self, watched: _Watched) -> int:
        """Count a death now; how many fall within the window."""
        now = anyio.current_time()
        deaths = watched.deaths
        deaths.append(now)
        assert watched.policy is not None
        while deaths and deaths[0] < now - watched.policy.window:
            deaths.popleft()
        return len(deaths)

    def _end(self, identity: bytes, watched: _Watched, error: Exception) -> None:
        """``identity`` will not come back: calls to it, and what waited, fail."""
        stopped = isinstance(error, ActorClosedError)
        self._processes.abandon(identity, watched.name, error, stopped=stopped)
        self.waiting.fail(identity, error, watched.name)
        if stopped:
            self._publish("stopped", watched.name, watched.incarnation)

    def watched(self, identity: bytes) -> _Watched | None:
        """What the supervisor keeps of ``identity`` (its incarnation, whether it sleeps)."""
        return self._watched.get(identity)

    def restarting(self, identity: bytes) -> bool:
        """Whether ``identity`` has no process now (restarting, asleep)."""
        return identity in self.waiting

    async def stop(self, identity: bytes) -> None:
        """Stop restarting ``identity`` (the host stops it): a restart under
        way is cancelled, and what waited for it fails."""
        watched = self._watched.pop(identity, None)
        if watched is None:
            return
        watched.stopped = True
        self._hub.traffic.pop(identity, None)
        if watched.restarting is not None:
            watched.restarting.cancel()
            await watched.ended.wait()
        elif watched.asleep:
            if watched.evicted is not None:
                await watched.evicted.exited.wait()
            self._end(identity, watched, ActorClosedError(f"actor {watched.name!r} was stopped"))

    def forget(self, identity: bytes) -> None:
        """The host stops ``identity`` while it runs: no more restarts."""
        watched = self._watched.pop(identity, None)
        if watched is not None:
            watched.stopped = True
            self._hub.traffic.pop(identity, None)


def resident_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` and the processes under it."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [pid]
    while todo:
        one = todo.pop()
        try:
            with open(f"/proc/{one}/statm") as f:
                total += int(f.read().split()[1]) * page
            with open(f"/proc/{one}/task/{one}/children") as f:
                todo += [int(child) for child in f.read().split()]
        except (OSError, ValueError, IndexError):
            pass  # gone meanwhile, or no such file here
    return total
