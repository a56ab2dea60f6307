"""Async-generator methods are streams, with credit-based backpressure."""

from __future__ import annotations

import anyio
import pytest

import atoll
from atoll.actors._calling import STREAM_WINDOW
from helpers import Streamer

pytestmark = pytest.mark.anyio


async def test_stream_yields_every_item_in_order() -> None:
    async with atoll.open_host() as host:
        s = await host.spawn(Streamer)
        with anyio.fail_after(10):
            assert [i async for i in s.count(100)] == list(range(100))
            assert [i async for i in s.count(0)] == []


async def test_slow_consumer_bounds_the_producer() -> None:
    produced: list[tuple[int, int]] = []  # (item index, items consumed at that moment)
    consumed = 0
    progress = anyio.Event()

    async def report(i: int) -> None:
        nonlocal progress
        produced.append((i, consumed))
        progress.set()
        progress = anyio.Event()

    async with atoll.open_host() as host:
        s = await host.spawn(Streamer)
        stream = s.endless(report)
        with anyio.fail_after(20):
            async for item in stream:
                assert item == consumed
                consumed += 1
                # Give the producer every chance to run ahead: wait until it
                # has produced as far as the window lets it.
                while produced[-1][0] < consumed + STREAM_WINDOW // 2:
                    await progress.wait()
                if consumed == 60:
                    break
            await stream.aclose()
            while not await s.was_closed():
                await anyio.wait_all_tasks_blocked()
    ahead = max(i - seen for i, seen in produced)
    assert ahead <= STREAM_WINDOW + 1, f"producer ran {ahead} items ahead"


async def test_error_in_stream_reaches_consumer_after_items() -> None:
    async with atoll.open_host() as host:
        s = await host.spawn(Streamer)
        got: list[int] = []
        with pytest.raises(KeyError, match="stream broke"):
            async for i in s.fail_after_items(5):
                got.append(i)
        assert got == [0, 1, 2, 3, 4]


async def test_awaiting_a_stream_method_is_an_error() -> None:
    async with atoll.open_host() as host:
        s = await host.spawn(Streamer)
        with pytest.raises(TypeError):
            await s.count(3)


async def test_stream_to_dead_host_is_closed_error() -> None:
    async with atoll.open_host() as host:
        s = await host.spawn(Streamer)
    with pytest.raises(atoll.ActorClosedError):
        async for _ in s.count(3):
            pass
