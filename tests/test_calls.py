"""Spawning actors and calling them: the basic contract."""

from __future__ import annotations

import os

import anyio
import anyio.lowlevel
import pytest

import atoll
from helpers import Counter, Echo

pytestmark = pytest.mark.anyio


async def test_async_method_runs_in_another_process() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter, 10)
        assert await counter.add(5) == 15
        assert await counter.get() == 15
        echo = await host.spawn(Echo)
        assert await echo.pid() != os.getpid()


async def test_sync_method_is_callable_and_keeps_state() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter, 1)
        assert await counter.add_sync(2) == 3
        assert await counter.add(1) == 4


async def test_keyword_arguments_and_names() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter, start=7, name="seven")
        assert repr(counter) == "<ActorRef 'seven'>"
        assert await counter.add(k=1) == 8
        with pytest.raises(ValueError, match="seven"):
            await host.spawn(Counter, name="seven")


async def test_unknown_method_is_an_attribute_error() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter)
        with pytest.raises(AttributeError, match=r"no public method 'nope'$"):
            counter.nope  # noqa: B018
        with pytest.raises(AttributeError):
            counter._private  # noqa: B018


async def test_spawn_needs_an_actor_class() -> None:
    async with atoll.open_host() as host:
        with pytest.raises(TypeError, match=r"subclass of atoll\.Actor"):
            await host.spawn(dict)  # type: ignore[type-var]


async def test_many_concurrent_callers_share_one_ref() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter)
        results: list[int] = []

        async def caller() -> None:
            for _ in range(20):
                results.append(await counter.add(1))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(25):
                    tg.start_soon(caller)
        assert sorted(results) == list(range(1, 501))
        assert await counter.get() == 500


async def test_calls_after_host_closed_fail_clearly() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter)
    with pytest.raises(atoll.ActorClosedError):
        await counter.add(1)
    with pytest.raises(atoll.ActorClosedError, match="open_host"):
        await host.spawn(Counter)


async def test_stop_one_actor_leaves_others_running() -> None:
    async with atoll.open_host() as host:
        a = await host.spawn(Counter)
        b = await host.spawn(Counter)
        await host.stop(a)
        with pytest.raises(atoll.ActorClosedError, match="stopped"):
            await a.add(1)
        assert await b.add(1) == 1


async def test_large_bytes_round_trip() -> None:
    payload = os.urandom(3 * 1024 * 1024)
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        assert await echo.echo(payload) == payload
        assert await echo.echo([payload, bytearray(payload)]) == [payload, bytearray(payload)]
        assert await echo.echo(memoryview(payload)) == payload


async def test_numpy_arrays_round_trip() -> None:
    np = pytest.importorskip("numpy")
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        big = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)
        back = await echo.echo(big)
        assert back.dtype == big.dtype and np.array_equal(back, big)
        assert np.array_equal(await echo.echo(big.T), big.T)


async def test_reply_polling_can_be_turned_off() -> None:
    async with atoll.open_host(spin_us=0) as host:
        counter = await host.spawn(Counter, 1)
        assert await counter.add(1) == 2
    with pytest.raises(ValueError, match="spin_us"):
        async with atoll.open_host(spin_us=-1):
            pass


@pytest.mark.parametrize("spin_us", [150, 0])
async def test_a_loop_of_quick_calls_lets_other_tasks_run_and_can_be_cancelled(
    spin_us: float,
) -> None:
    # Replies that a polling caller reads itself never make it sleep; each call
    # still passes through the event loop once, so a timeout around a tight
    # loop of calls fires, and other tasks of the loop keep running.
    async with atoll.open_host(spin_us=spin_us) as host:
        counter = await host.spawn(Counter)
        ticks = 0
        calls = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(tick)
                with anyio.move_on_after(0.3) as scope:
                    while True:
                        await counter.add(1)
                        calls += 1
                tg.cancel_scope.cancel()
        assert scope.cancelled_caught
        assert calls > 10 and ticks >= calls // 2
        assert await counter.get() in (calls, calls + 1)  # the last one may have run


class Scoped(atoll.Actor):
    async def scoped(self) -> str:
        # Scopes entered before the method first suspends nest in the call's own.
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.sleep, 0.001)
        return "done"

    async def forever(self) -> None:
        await anyio.sleep_forever()  # trio enters a scope before it suspends


async def test_a_method_may_enter_cancel_scopes_before_it_first_suspends() -> None:
    async with atoll.open_host() as host:
        scoped = await host.spawn(Scoped)
        with anyio.fail_after(20):
            assert await scoped.scoped() == "done"
            with anyio.move_on_after(0.2) as gave_up:
                await scoped.forever()
            assert gave_up.cancelled_caught
            assert await scoped.scoped() == "done"  # the actor is fine after the cancel
