"""Sync code calls actors: plain scripts, worker threads, running loops."""

from __future__ import annotations

import threading

import anyio
import anyio.to_thread
import pytest

import atoll
from helpers import Counter, Streamer


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_blocking_host_for_plain_sync_code(backend: str) -> None:
    with atoll.blocking_host(backend) as host:
        counter = host.spawn(Counter, 10)
        assert counter.add(5) == 15
        assert counter.add_sync(1) == 16
        streamer = host.spawn(Streamer)
        assert list(streamer.count(5)) == [0, 1, 2, 3, 4]
        host.stop(counter)
        with pytest.raises(atoll.ActorClosedError):
            counter.add(1)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_blocking_refs_from_many_threads(backend: str) -> None:
    with atoll.blocking_host(backend) as host:
        counter = host.spawn(Counter)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(20):
                    counter.add(1)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert counter.get() == 100


@pytest.mark.anyio
async def test_ref_blocks_when_called_from_a_worker_thread() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter, 1)

        def in_thread() -> int:
            return int(counter.add(2))

        with anyio.fail_after(10):
            assert await anyio.to_thread.run_sync(in_thread) == 3


def test_blocking_host_inside_a_running_event_loop() -> None:
    """Like a notebook cell: sync code on a thread whose loop is running."""
    import asyncio

    async def cell() -> int:
        with atoll.blocking_host() as host:
            return int(host.spawn(Counter, 40).add(2))

    assert asyncio.run(cell()) == 42
