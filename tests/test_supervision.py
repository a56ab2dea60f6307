"""Actors that come back (``spawn(..., restart=atoll.Restart(...))``): the same
ref works through each restart, from the host and from other actors; calls
in flight fail saying so, calls made meanwhile wait; the host gives up after
too many deaths; every step is a lifecycle event."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import atoll
from helpers import Caller, Phoenix

pytestmark = pytest.mark.anyio

QUICK = atoll.Restart(backoff=0.0)


async def _events(subscription: Any, n: int) -> list[tuple[str, str, int]]:
    got = []
    async for event in subscription:
        got.append((event.event, event.actor, event.incarnation))
        if len(got) == n:
            return got
    raise AssertionError(f"the subscription ended after {got}")


async def test_a_restarted_actor_answers_under_the_same_ref() -> None:
    async with atoll.open_host() as host:
        events = host.subscribe("atoll.lifecycle")
        phoenix = await host.spawn(Phoenix, 10, name="phoenix", restart=QUICK)
        with anyio.fail_after(20):
            assert await phoenix.add(1) == 11
            first = await phoenix.pid()
            with pytest.raises(atoll.ActorDiedError, match="being restarted"):
                await phoenix.crash()
            assert host._supervisor.restarting(phoenix._id)
            assert await phoenix.add(1) == 11  # waited for the new one: state from its start
            assert await phoenix.pid() != first
            assert await (await host.lookup("phoenix")).add(1) == 12
            assert await host.lookup(Phoenix) is not None
            assert await _events(events, 4) == [
                ("started", "phoenix", 1),
                ("died", "phoenix", 1),
                ("restarting", "phoenix", 2),
                ("restarted", "phoenix", 2),
            ]
        events.close()


async def test_other_actors_keep_their_ref_through_a_restart() -> None:
    async with atoll.open_host() as host:
        phoenix = await host.spawn(Phoenix, name="phoenix", restart=QUICK)
        caller = await host.spawn(Caller)
        with anyio.fail_after(20):
            await caller.keep(phoenix)
            assert await caller.add(2) == 2
            with pytest.raises(atoll.ActorDiedError):
                await phoenix.crash()
            # Sent while it restarts: the host keeps it for the new process.
            assert host._supervisor.restarting(phoenix._id)
            assert await caller.add(5) == 5
            assert await caller.add_by_name("phoenix", 1) == 6


async def test_the_host_gives_up_after_too_many_deaths() -> None:
    async with atoll.open_host() as host:
        events = host.subscribe("atoll.lifecycle")
        phoenix = await host.spawn(Phoenix, restart=atoll.Restart(limit=1, backoff=0.0))
        with anyio.fail_after(20):
            with pytest.raises(atoll.ActorDiedError, match="being restarted"):
                await phoenix.crash()
            assert await phoenix.add(1) == 1
            with pytest.raises(atoll.ActorDiedError, match="gave up restarting it"):
                await phoenix.crash()
            with pytest.raises(atoll.ActorDiedError, match="gave up restarting it"):
                await phoenix.add(1)
            seen = [event for event, _, _ in await _events(events, 6)]
            assert seen == ["started", "died", "restarting", "restarted", "died", "gave_up"]
        events.close()


async def test_stopping_an_actor_while_it_restarts_ends_it() -> None:
    async with atoll.open_host() as host:
        phoenix = await host.spawn(Phoenix, restart=atoll.Restart(backoff=30.0))
        with anyio.fail_after(20):
            with pytest.raises(atoll.ActorDiedError):
                await phoenix.crash()
            async with anyio.create_task_group() as tg:
                waiting: list[BaseException] = []

                async def call() -> None:
                    try:
                        await phoenix.add(1)
                    except atoll.ActorClosedError as exc:
                        waiting.append(exc)

                tg.start_soon(call)
                await anyio.wait_all_tasks_blocked()  # held, for a restart 30 s away
                await host.stop(phoenix)
            assert len(waiting) == 1  # the call that waited fails: it was stopped
            with pytest.raises(atoll.ActorClosedError):
                await phoenix.add(1)


async def test_a_stopped_actor_is_not_restarted() -> None:
    async with atoll.open_host() as host:
        phoenix = await host.spawn(Phoenix, restart=QUICK)
        with anyio.fail_after(20):
            await host.stop(phoenix)
            assert not host._supervisor.restarting(phoenix._id)
            with pytest.raises(atoll.ActorClosedError):
                await phoenix.add(1)


def test_restart_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="limit"):
        atoll.Restart(limit=-1)
    with pytest.raises(ValueError, match="backoff"):
        atoll.Restart(backoff=-1.0)


async def test_every_actor_says_when_it_starts_dies_and_stops() -> None:
    async with atoll.open_host() as host:
        events = host.subscribe("atoll.lifecycle")
        mortal = await host.spawn(Phoenix, name="mortal")
        stopped = await host.spawn(Phoenix, name="stopped", restart=QUICK)
        with anyio.fail_after(20):
            with pytest.raises(atoll.ActorDiedError, match="exited with code 3"):
                await mortal.crash()
            await host.stop(stopped)
            got = await _events(events, 4)
        assert got == [
            ("started", "mortal", 1),
            ("started", "stopped", 1),
            ("died", "mortal", 1),
            ("stopped", "stopped", 1),
        ]
        events.close()
