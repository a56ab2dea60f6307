"""A cancelled caller cancels the remote call, and every call it made in turn."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import atoll
from helpers import Counter, Sleeper

pytestmark = pytest.mark.anyio


async def _started_event() -> tuple[anyio.Event, object]:
    started = anyio.Event()

    async def on_started() -> None:
        started.set()

    return started, on_started


async def test_timeout_cancels_remote_task_and_its_subcalls() -> None:
    async with atoll.open_host() as host:
        outer = await host.spawn(Sleeper)
        inner = await host.spawn(Sleeper)
        started, on_started = await _started_event()
        with anyio.fail_after(10):
            with anyio.move_on_after(60) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(outer.park_via, inner, on_started)
                    await started.wait()
                    scope.cancel()
            assert scope.cancelled_caught
            # Both levels saw the cancellation before answering anything else.
            while await inner.stats() != (1, 1) or await outer.stats() != (0, 1):
                await anyio.wait_all_tasks_blocked()
        assert await inner.stats() == (1, 1)
        assert await outer.stats() == (0, 1)


async def test_fail_after_raises_timeout_in_caller() -> None:
    async with atoll.open_host() as host:
        sleeper = await host.spawn(Sleeper)
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.2):
                await sleeper.park()
        with anyio.fail_after(10):
            while (await sleeper.stats())[1] != 1:
                await anyio.wait_all_tasks_blocked()


async def test_native_cancellation(anyio_backend: str) -> None:
    async with atoll.open_host() as host:
        sleeper = await host.spawn(Sleeper)
        started, on_started = await _started_event()
        if anyio_backend == "asyncio":
            import asyncio

            task = asyncio.ensure_future(sleeper.park(on_started))
            with anyio.fail_after(10):
                await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            import trio

            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sleeper.park, on_started)
                    with anyio.fail_after(10):
                        await started.wait()
                    scope.cancel()
            assert scope.cancelled_caught
        with anyio.fail_after(10):
            while (await sleeper.stats())[1] != 1:
                await anyio.wait_all_tasks_blocked()


async def test_actor_serves_new_calls_after_a_cancelled_one() -> None:
    async with atoll.open_host() as host:
        sleeper = await host.spawn(Sleeper)
        with anyio.move_on_after(0.1):
            await sleeper.park()
        with anyio.fail_after(10):
            assert (await sleeper.stats())[0] == 1
        assert isinstance(host, atoll.Host)


async def test_call_cancelled_while_waiting_for_its_turn_never_runs() -> None:
    async with atoll.open_host() as host:
        sleeper = await host.spawn(Sleeper)
        started, on_started = await _started_event()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sleeper.park, on_started)  # holds the actor's turn
                await started.wait()
                with anyio.move_on_after(0.2) as queued:
                    await sleeper.park()  # waits in the mailbox, then gives up
                assert queued.cancelled_caught
                tg.cancel_scope.cancel()
            # stats() waits for its own turn: by then both parks are settled.
            started_count, cancelled_count = await sleeper.stats()
        assert started_count == 1, "the cancelled call still ran"
        assert cancelled_count == 1


async def test_calls_after_one_that_swallowed_its_cancellation_are_not_cancelled() -> None:
    # Calls run in their worker's cancel scope: a cancelled one must not be
    # reused, even when the method ignored the cancellation and returned.
    async with atoll.open_host() as host:
        sleeper = await host.spawn(Sleeper)
        for round_ in range(1, 4):
            started, on_started = await _started_event()
            with anyio.fail_after(10):
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(sleeper.park_and_swallow, on_started)
                        await started.wait()
                        scope.cancel()
                while (await sleeper.stats())[1] != round_:
                    await anyio.wait_all_tasks_blocked()
                one_by_one = [await sleeper.nap(i) for i in range(10)]
                together: list[int] = []

                async def nap(i: int, together: list[int] = together) -> None:
                    together.append(await sleeper.nap(i))

                async with anyio.create_task_group() as tg:
                    for i in range(10):
                        tg.start_soon(nap, i)
            assert one_by_one == list(range(10))
            assert sorted(together) == list(range(10))
        assert await sleeper.stats() == (3, 3)


@pytest.mark.parametrize("method", ["park", "park_and_swallow"])
async def test_a_call_queued_behind_a_cancelled_one_runs_and_answers(method: str) -> None:
    # The queued call must not run in the cancelled call's scope, even when
    # the method ignored its cancellation and returned.
    async with atoll.open_host() as host:
        sleeper = await host.spawn(Sleeper)
        started, on_started = await _started_event()
        parked = anyio.CancelScope()
        answers: list[int] = []

        async def park() -> None:
            with parked:
                await getattr(sleeper, method)(on_started)  # holds the actor's turn

        async def nap() -> None:
            answers.append(await sleeper.nap(7))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(park)
                await started.wait()
                tg.start_soon(nap)
                # Sends are synchronous: once every task here waits, the nap
                # is on its way, ahead of the cancellation sent next.
                await anyio.wait_all_tasks_blocked()
                parked.cancel()
        assert answers == [7]
        assert await sleeper.stats() == (1, 1)


async def test_a_reply_read_while_sending_still_stops_a_cancelled_caller() -> None:
    # The host's thread held up inside the send for as long as the reply takes
    # (a busy machine): the reply is read before the call ever waits.
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter)
        send, socket, pending = host._node._transmit, host._hub.socket, host._node._pending

        def send_and_read_the_reply(dest: bytes, frames: list[object]) -> None:
            send(dest, frames)
            while pending and socket._poll(5.0):
                socket._catch_up()

        host._node._transmit = send_and_read_the_reply  # type: ignore[method-assign]
        with anyio.fail_after(10):
            assert await counter.add(1) == 1
            with anyio.CancelScope() as scope:
                scope.cancel()
                await counter.add(100)
                raise AssertionError("a cancelled caller went on")
            assert scope.cancelled_caught


async def test_a_quick_call_in_a_cancelled_scope_is_cancelled() -> None:
    # Replies read while polling never make the caller sleep: a cancelled
    # caller still stops at the call, not after it.
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter)
        with anyio.fail_after(10):
            for _ in range(3):
                await counter.add(1)
                with anyio.CancelScope() as scope:
                    scope.cancel()
                    await counter.add(100)
                    raise AssertionError("a cancelled caller went on")
                assert scope.cancelled_caught
            assert await counter.get() % 100 == 3


class Blocker(atoll.Actor):
    def __init__(self) -> None:
        self.log: list[str] = []

    def hold(self, started: Any, seconds: float) -> None:
        import time

        started()  # blocks this thread until the caller has heard
        time.sleep(seconds)  # the method's own work: a thread cannot be interrupted
        self.log.append("hold returned")

    async def seen(self) -> list[str]:
        return self.log


async def test_a_sync_method_whose_caller_gave_up_keeps_its_turn_until_it_returns() -> None:
    async with atoll.open_host() as host:
        blocker = await host.spawn(Blocker)
        started = anyio.Event()

        async def on_started() -> None:
            started.set()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(blocker.hold, on_started, 0.5)
                await started.wait()
                tg.cancel_scope.cancel()  # the caller gives up; the method runs on
            # The next call waits for the turn, which ends when hold() returns.
            assert await blocker.seen() == ["hold returned"]
