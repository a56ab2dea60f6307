"""Limits the kernel enforces (``spawn(limits=atoll.Limits(...))``): an actor
that goes past one fails or dies saying which, and the host and the other
actors keep answering."""

from __future__ import annotations

import os

import anyio
import pytest

import atoll
from atoll.actors import _limits
from helpers import Echo, Greedy

pytestmark = pytest.mark.anyio

needs_cgroups = pytest.mark.skipif(
    _limits._own_cgroup("memory") is None and _limits._own_cgroup("") is None,
    reason="needs a cgroup this process may write to",
)


@needs_cgroups
async def test_an_actor_past_its_memory_limit_dies_saying_so() -> None:
    async with atoll.open_host() as host:
        greedy = await host.spawn(Greedy, limits=atoll.Limits(memory="200M"))
        neighbour = await host.spawn(Echo)
        with anyio.fail_after(30):
            assert await greedy.eat(20) == 20  # within its limit
            with pytest.raises(atoll.ActorDiedError, match="memory limit"):
                await greedy.eat(2000)
            assert await neighbour.echo("still here") == "still here"


@needs_cgroups
async def test_a_fork_bomb_stays_inside_its_limit() -> None:
    async with atoll.open_host() as host:
        bomber = await host.spawn(Greedy, limits=atoll.Limits(processes=16))
        neighbour = await host.spawn(Echo)
        with anyio.fail_after(60):
            # Two children each, 7 deep: 254 processes if nothing stopped it.
            assert await bomber.fork_bomb(7) < 16
            assert await bomber.ping() == "pong"
            assert await neighbour.echo("still here") == "still here"


async def test_open_files_are_limited() -> None:
    async with atoll.open_host() as host:
        greedy = await host.spawn(Greedy, limits=atoll.Limits(open_files=64))
        with anyio.fail_after(10):
            assert await greedy.open_files(500) < 64


async def test_shared_memory_is_limited() -> None:
    async with atoll.open_host() as host:
        greedy = await host.spawn(Greedy, limits=atoll.Limits(shared_memory="8M"))
        with anyio.fail_after(30):
            assert await greedy.share(4) == 4 << 18
            with pytest.raises(atoll.SharedMemoryError, match="shared_memory"):
                await greedy.share(16)
            assert await greedy.ping() == "pong"


@needs_cgroups
async def test_an_actors_cgroups_go_with_it() -> None:
    async with atoll.open_host() as host:
        greedy = await host.spawn(Greedy, limits=atoll.Limits(memory="500M", processes=32))
        cgroup = host._processes.actors[greedy._id].cgroup
        assert cgroup is not None
        paths = list(cgroup.paths.values())
        assert all(os.path.isdir(p) for p in paths)
        procs = await anyio.Path(paths[0], "cgroup.procs").read_text()
        assert int(procs.split()[0]) > 0
        await host.stop(greedy)
    assert not any(os.path.exists(p) for p in paths)


async def test_cpu_time_is_limited() -> None:
    async with atoll.open_host() as host:
        spinner = await host.spawn(Greedy, limits=atoll.Limits(cpu_seconds=2))
        with anyio.fail_after(30):
            with pytest.raises(atoll.ActorDiedError, match="CPU time"):
                await spinner.spin(20)


def test_limits_are_checked_and_sizes_read() -> None:
    limits = atoll.Limits(memory="1.5G", shared_memory=4096, processes=8)
    assert limits.memory == 3 << 29 and limits.shared_memory == 4096
    with pytest.raises(ValueError, match="memory"):
        atoll.Limits(memory="lots")
    with pytest.raises(ValueError, match="processes"):
        atoll.Limits(processes=0)


async def test_a_limited_actor_yields_the_cpu_to_the_others() -> None:
    with pytest.raises(ValueError, match="from 0 to 19"):
        atoll.Limits(nice=20)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    async with atoll.open_host() as host:
        limited = await host.spawn(Greedy, limits=atoll.Limits(open_files=512))
        kept = await host.spawn(Greedy, limits=atoll.Limits(open_files=512, nice=0))
        free = await host.spawn(Greedy)
        with anyio.fail_after(10):
            nice, group = await limited.priority()
            assert nice == min(19, base + 10)
            if group:  # the kernel groups sessions: its own, less urgent too
                assert group.rstrip().endswith("nice 10"), group
            assert (await kept.priority())[0] == base
            assert (await free.priority())[0] == base
