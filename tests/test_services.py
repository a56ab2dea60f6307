"""Singletons: named services that every process reaches, and published events."""

from __future__ import annotations

import os

import anyio
import pytest

import atoll
from atoll.testing._leaks import _descendants
from helpers import Client, Relay, Sleeper, Tally, pid_of

pytestmark = pytest.mark.anyio


async def test_host_service_is_shared_by_every_process() -> None:
    async with atoll.open_host() as host:
        a = await host.spawn(Client, "a")
        b = await host.spawn(Client, "b")
        processes = _descendants()
        tally = host.register("tally", Tally())
        assert _descendants() == processes, "a host service must not start a process"
        assert await a.hit("tally") == 1
        assert await b.hit("tally") == 2
        assert await a.hit_by_class() == 3
        assert await tally.hit("host") == 4
        assert await tally.pid() == os.getpid()
        assert await (await atoll.lookup(Tally)).total() == 4


async def test_spawned_actor_is_a_service_whatever_the_order() -> None:
    async with atoll.open_host() as host:
        client = await host.spawn(Client, "c")
        assert "no actor or service is named 'late'" in await client.lookup_error("late")
        await host.spawn(Tally, name="late")  # registered after the client exists
        assert await client.hit("late") == 1
        early = await host.spawn(Tally, name="early")
        late_client = await host.spawn(Client, "d")  # created after the service
        assert await late_client.hit("early") == 1
        assert await early.total() == 1
        with pytest.raises(LookupError, match="several actors"):
            await atoll.lookup(Tally)


async def test_taken_name_is_refused_naming_the_holder() -> None:
    async with atoll.open_host() as host:
        await host.spawn(Tally, name="db")
        with pytest.raises(
            ValueError, match=r"'db' is taken by an actor process \(helpers\.Tally\)"
        ):
            host.register("db", Tally())
        host.register("cache", Tally())
        with pytest.raises(ValueError, match="a service of the host"):
            await host.spawn(Tally, name="cache")
        host.unregister("cache")
        host.register("cache", Tally())


async def test_nested_services_and_chains_across_them() -> None:
    """A calls S (in the host), S calls back into A, then S calls T (an actor
    process), which calls A again: no deadlock anywhere along the chain."""
    async with atoll.open_host() as host:
        await host.spawn(Relay, None, name="t")
        host.register("s", Relay("t"))
        a = await host.spawn(Client, "a")
        await a.remember_me(a)
        s = await atoll.lookup("s")
        t = await s.next_service()  # a service handing out another's ref
        assert await t.next_service() is None
        with anyio.fail_after(20):
            assert await a.start_chain("s", 1) == ["relay:a", "relay:a"]


async def test_service_killed_mid_call() -> None:
    async with atoll.open_host() as host:
        await host.spawn(Sleeper, name="svc")
        client = await host.spawn(Client, "c")
        started = anyio.Event()

        async def on_started() -> None:
            started.set()

        failures: list[BaseException] = []

        async def call() -> None:
            try:
                await client.call_service_slowly("svc", on_started)
            except atoll.ActorDiedError as exc:
                failures.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await started.wait()
                os.kill(pid_of(host, "svc"), 9)
        assert len(failures) == 1
        assert "'svc' was killed by signal 9" in str(failures[0])
        with pytest.raises(atoll.ActorDiedError, match="svc"):
            await atoll.lookup("svc")
        with pytest.raises(atoll.ActorDiedError, match="svc"):
            await client.hit("svc")  # the lookup inside the client fails alike
        replacement = await host.spawn(Sleeper, name="svc")  # the name is free again
        assert await (await atoll.lookup("svc")).stats() == (0, 0)
        assert replacement == await atoll.lookup(Sleeper)


async def test_events_reach_subscribers_without_blocking_publishers() -> None:
    async with atoll.open_host() as host:
        client = await host.spawn(Client, "p")
        progress = host.subscribe("progress")
        seen_by_callback: list[object] = []
        got_all = anyio.Event()

        async def on_event(value: object) -> None:
            seen_by_callback.append(value)
            if len(seen_by_callback) == 4:
                got_all.set()

        host.subscribe("progress", on_event)
        with anyio.fail_after(10):
            assert await client.publish("progress", [1, 2, 3]) == 3
            await client.publish_sync("progress", "done")
            assert [await progress.receive() for _ in range(4)] == [1, 2, 3, "done"]
            await got_all.wait()
        assert seen_by_callback == [1, 2, 3, "done"]
        # Nobody reads this one: the publisher still never waits.
        ignored = host.subscribe("flood")
        with anyio.fail_after(10):
            assert await client.publish("flood", list(range(1500))) == 1500
            await client.publish("progress", ["after flood"])
            assert await progress.receive() == "after flood"
        assert ignored.dropped == 500


async def test_service_scoped_to_a_block() -> None:
    async with atoll.open_host() as host:
        client = await host.spawn(Client, "c")
        with host.registered("scoped", Tally()) as tally:
            assert await client.hit("scoped") == 1
        assert "no actor or service is named 'scoped'" in await client.lookup_error("scoped")
        with pytest.raises(atoll.ActorClosedError, match="scoped"):
            await tally.total()
