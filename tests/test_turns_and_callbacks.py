"""Turns, call-chain re-entrancy, and callbacks into the caller."""

from __future__ import annotations

import anyio
import pytest

import atoll
from helpers import Counter, Echo, Ping, Turns, Wide

pytestmark = pytest.mark.anyio


async def _overlap(host: atoll.Host, cls: type[Turns], callers: int) -> int:
    """Start ``callers`` calls that each hold the actor until all have started
    or a turn limit stops them; return the peak concurrency the actor saw."""
    turns = await host.spawn(cls)
    entered = 0
    gate = anyio.Event()
    limit = min(callers, cls.max_concurrency)

    async def release() -> None:
        nonlocal entered
        entered += 1
        if entered >= limit:
            gate.set()
        await gate.wait()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(turns.hold, release)
    return await turns.peak_seen()


async def test_one_call_at_a_time_by_default() -> None:
    async with atoll.open_host() as host:
        assert await _overlap(host, Turns, 4) == 1


async def test_actor_can_opt_into_concurrent_turns() -> None:
    async with atoll.open_host() as host:
        assert await _overlap(host, Wide, 6) == 4


async def test_callback_reenters_the_actor_along_the_chain() -> None:
    """A calls the host, the host calls A back while A waits: no deadlock."""
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter, 0)
        echo = await host.spawn(Echo)

        async def back_into_echo(x: int) -> int:
            # echo is busy running call() and waits for us: a re-entrant turn.
            return int(await echo.echo(x)) + 1

        with anyio.fail_after(10):
            assert await echo.call(back_into_echo, 41) == 42
            assert await echo.call(counter.add, 3) == 3


async def test_recursion_fifty_levels_between_two_actors() -> None:
    async with atoll.open_host() as host:
        a = await host.spawn(Ping)
        b = await host.spawn(Ping)
        await a.set_peer(b)
        await b.set_peer(a)
        with anyio.fail_after(30):
            trail = await a.bounce(50, [])
        assert len(trail) == 51
        assert len(set(trail)) == 2
        assert trail[0] != trail[1]


async def test_sync_and_async_callbacks_reach_the_host() -> None:
    seen: list[str] = []

    def sync_cb(x: str) -> str:
        seen.append(x)
        return x.upper()

    async def async_cb(x: str) -> str:
        seen.append(x)
        return x * 2

    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        assert await echo.call(async_cb, "ab") == "abab"
        assert await echo.call_sync(sync_cb, "cd") == "CD"  # blocking proxy in a worker thread
        assert seen == ["ab", "cd"]


async def test_callback_sent_back_to_its_owner_is_the_original() -> None:
    def marker() -> None: ...

    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        assert await echo.echo(marker) is marker
        bound = [1].append
        assert await echo.echo(bound) == bound


async def test_actor_ref_passed_to_another_actor() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter, 5)
        echo = await host.spawn(Echo)
        assert await echo.call_method(counter, "add", 2) == 7
        assert await echo.echo(counter) == counter
