"""Actors that come back (``spawn(..., restart=atoll.Restart(...))``): the same
ref works through each restart, from the host and from other actors; calls
in flight fail saying so, calls made meanwhile wait; the host gives up after
too many deaths; every step is a lifecycle event."""

from __future__ import annotations

from pathlib import Path
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


async def test_a_restart_takes_a_warm_process_when_one_waits() -> None:
    async with atoll.open_host() as host:
        again = atoll.Restart(limit=10, backoff=0.0)
        phoenix = await host.spawn(Phoenix, 10, name="phoenix", restart=again)
        caller = await host.spawn(Caller)
        with anyio.fail_after(30):
            await caller.keep(phoenix)
            for incarnation in (2, 3):
                await host.prewarm(count=1, imports=["colorsys"])  # (the second: its refill)
                assert not await phoenix.imported("colorsys")
                with pytest.raises(atoll.ActorDiedError, match="being restarted"):
                    await phoenix.crash()
                assert await phoenix.add(1) == 11
                # The warm process, serving under the dead one's identity:
                # the host's ref, another actor's and lookups all reach it.
                assert await phoenix.imported("colorsys"), incarnation
                assert await caller.add(1) == 12
                assert await (await host.lookup("phoenix")).add(1) == 13
                await phoenix.forget("colorsys")
            for _ in range(4):  # each takes the refill the last started, perhaps still starting
                with pytest.raises(atoll.ActorDiedError, match="being restarted"):
                    await phoenix.crash()
                assert await phoenix.add(1) == 11


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


async def test_a_hung_actor_is_killed_with_its_stacks_and_restarted() -> None:
    probed = atoll.Restart(backoff=0.0, health_interval=0.1, health_timeout=0.5)
    async with atoll.open_host() as host:
        phoenix = await host.spawn(Phoenix, restart=probed)
        with anyio.fail_after(30):
            assert await phoenix.add(1) == 1
            with pytest.raises(atoll.ActorDiedError) as caught:
                await phoenix.hang(120)
            said = str(caught.value)
            assert "did not answer a health probe within 0.5 s" in said
            assert "being restarted" in said
            assert "in hang" in said  # its main thread's stack, from faulthandler
            assert await phoenix.add(1) == 1


async def test_a_lazy_actor_starts_with_its_first_call() -> None:
    async with atoll.open_host() as host:
        events = host.subscribe("atoll.lifecycle")
        lazy = await host.spawn(Phoenix, 5, name="lazy", lazy=True)
        assert not host._processes.actors  # no process yet
        caller = await host.spawn(Caller, name="caller")
        with anyio.fail_after(20):
            await caller.keep(lazy)
            assert await caller.add(1) == 6  # an actor's call starts it too
            assert await lazy.add(1) == 7
            assert await (await host.lookup("lazy")).add(1) == 8
            assert await _events(events, 2) == [("started", "caller", 1), ("started", "lazy", 1)]
        events.close()


async def test_an_idle_actor_stops_and_the_next_call_starts_it_again() -> None:
    async with atoll.open_host() as host:
        events = host.subscribe("atoll.lifecycle")
        phoenix = await host.spawn(Phoenix, 1, name="napper", idle_stop=0.2)
        with anyio.fail_after(20):
            assert await phoenix.add(1) == 2
            first = await phoenix.pid()
            assert await _events(events, 2) == [("started", "napper", 1), ("evicted", "napper", 1)]
            assert phoenix._id not in host._processes.actors
            assert await phoenix.add(1) == 2  # a new process, from its constructor
            assert await phoenix.pid() != first
            assert await _events(events, 1) == [("started", "napper", 2)]
        events.close()


async def test_an_actor_busy_in_a_long_call_is_not_stopped_for_idleness() -> None:
    async with atoll.open_host() as host:
        phoenix = await host.spawn(Phoenix, idle_stop=0.1)
        with anyio.fail_after(20):
            first = await phoenix.pid()
            await phoenix.nap(1.0)  # ten idle periods without a message, in one call
            assert await phoenix.pid() == first


async def test_a_sleeping_actor_can_be_stopped() -> None:
    async with atoll.open_host() as host:
        lazy = await host.spawn(Phoenix, lazy=True)
        with anyio.fail_after(20):
            await host.stop(lazy)
            with pytest.raises(atoll.ActorClosedError):
                await lazy.add(1)
        with pytest.raises(ValueError, match="idle_stop"):
            await host.spawn(Phoenix, idle_stop=0)


async def test_reload_runs_the_code_on_disk_now_and_keeps_the_old_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "reloadable_actor.py"
    module.write_text(_VERSIONED.format(version=1))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    import reloadable_actor

    async with atoll.open_host() as host:
        events = host.subscribe("atoll.lifecycle")
        ref = await host.spawn(reloadable_actor.Versioned, name="versioned")
        caller = await host.spawn(Caller)
        with anyio.fail_after(30):
            await caller.keep(ref)
            assert await ref.version() == 1
            module.write_text(
                _VERSIONED.format(version=2)
                + "# grown: Python takes bytecode of the same size and second\n"
            )
            await host.reload(ref)
            assert await ref.version() == 2  # the same ref, the new code
            assert await caller.add(1) == 2  # and through another actor's ref
            module.write_text("raise ImportError('broken on purpose')\n")
            with pytest.raises(atoll.SpawnError, match="broken on purpose"):
                await host.reload(ref)
            assert await ref.version() == 2  # the old one still serves
            seen = [(e, i) for e, n, i in await _events(events, 3) if n == "versioned"]
            assert seen == [("started", 1), ("reloaded", 2)]
        events.close()


_VERSIONED = """
import atoll


class Versioned(atoll.Actor):
    async def version(self) -> int:
        return {version}

    async def add(self, k: int) -> int:
        return {version} * k
"""


@pytest.mark.parametrize(
    ("strategy", "dies", "restarted"),
    [("one_for_all", 0, {0, 1, 2}), ("rest_for_one", 1, {1, 2}), ("one_for_one", 1, {1})],
)
async def test_a_group_restarts_together_as_its_strategy_says(
    strategy: str, dies: int, restarted: set[int]
) -> None:
    async with atoll.open_host() as host:
        refs = [await host.spawn(Phoenix, i, restart=QUICK) for i in range(3)]
        host.supervise(refs, strategy)
        with anyio.fail_after(30):
            before = [await ref.pid() for ref in refs]
            with pytest.raises(atoll.ActorDiedError):
                await refs[dies].crash()
            after = [await ref.pid() for ref in refs]  # each waits for its new process
            assert {i for i in range(3) if after[i] != before[i]} == restarted
            assert [await ref.add(0) for ref in refs] == [0, 1, 2]
        with pytest.raises(ValueError, match="spawned with restart"):
            host.supervise([refs[0], await host.spawn(Phoenix)])
        with pytest.raises(ValueError, match="one_for_all"):
            host.supervise(refs, "all_for_none")


@pytest.mark.parametrize("method", ["first_try_dies", "first_try_dies_sync"])
async def test_an_idempotent_call_in_flight_is_run_again_on_the_new_process(
    tmp_path: Path, method: str
) -> None:
    async with atoll.open_host() as host:
        phoenix = await host.spawn(Phoenix, restart=QUICK)
        caller = await host.spawn(Caller)
        with anyio.fail_after(20):
            assert await getattr(phoenix, method)(str(tmp_path / "host")) == "done"
            with pytest.raises(atoll.ActorDiedError, match="being restarted") as caught:
                await phoenix.first_try_dies_unmarked(str(tmp_path / "unmarked"))
            assert caught.value.restarting
            await caller.keep(phoenix)  # and from another actor, through its ref
            assert await caller.call(method, str(tmp_path / "actor")) == "done"


async def test_an_actor_past_its_rss_limit_is_restarted_when_idle() -> None:
    budget = atoll.Restart(backoff=0.0, rss_limit="150M", health_interval=0.05)
    async with atoll.open_host() as host:
        events = host.subscribe("atoll.lifecycle")
        phoenix = await host.spawn(Phoenix, 3, name="grower", restart=budget)
        with anyio.fail_after(30):
            assert await phoenix.add(1) == 4
            await phoenix.grow(300)
            async for event in events:
                if event.event == "restarted":
                    assert "past rss_limit (150 MiB)" in event.reason
                    break
            assert await phoenix.add(0) == 3  # a new process: its memory, and state, anew
        events.close()
    with pytest.raises(ValueError, match=r"Restart\(rss_limit="):
        atoll.Restart(rss_limit="lots")


async def test_status_says_what_runs_and_what_waits() -> None:
    async with atoll.open_host() as host:
        runner = await host.spawn(Phoenix, name="runner", restart=QUICK)
        await host.spawn(Phoenix, name="sleeper", lazy=True)
        untrusted = await host.spawn(Phoenix, name="untrusted", trusted=False)
        with anyio.fail_after(20):
            pid = await runner.pid()
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner.nap, 30.0)
                await anyio.wait_all_tasks_blocked()
                status = await host.status()
                tg.cancel_scope.cancel()
            assert isinstance(status, atoll.HostStatus)
            run = status.actor("runner")
            assert (run.pid, run.state, run.trusted, run.incarnation) == (pid, "running", True, 1)
            assert run.calls_in_flight == 1
            assert run.uptime > 0 and run.resident_bytes > 1 << 20
            assert (status.actor("sleeper").state, status.actor("sleeper").pid) == ("asleep", None)
            assert not status.actor("untrusted").trusted
            with pytest.raises(atoll.ActorDiedError):
                await runner.crash()
            assert (await host.status()).actor("runner").state == "restarting"
            assert await untrusted.add(1) == 1
            assert await runner.add(0) == 0  # waits for the new process
            assert (await host.status()).actor("runner").incarnation == 2
            assert (await host.status()).actor("runner").calls_in_flight == 0


async def test_status_shows_the_calls_an_actor_serves_and_its_methods_figures() -> None:
    async with atoll.open_host() as host:
        phoenix = await host.spawn(Phoenix, name="phoenix")
        caller = await host.spawn(Caller, name="caller")
        hung = await host.spawn(Phoenix, name="hung")
        started = anyio.Event()
        hanging = anyio.Event()

        async def say_started() -> None:
            started.set()

        async def say_hanging() -> None:
            hanging.set()

        with anyio.fail_after(30):
            await caller.keep(phoenix)
            for _ in range(20):
                await phoenix.add(1)
            with pytest.raises(TypeError):
                await phoenix.add("one")
            async with anyio.create_task_group() as tg:
                tg.start_soon(caller.call, "nap_telling", say_started, 30.0)
                tg.start_soon(hung.hang_telling, say_hanging, 3.0)
                await started.wait()
                await hanging.wait()
                status = await host.status()
                tg.cancel_scope.cancel()
            served = status.actor("phoenix")
            assert served.answering and served.environment
            (call,) = served.calls
            assert (call.method, call.caller) == ("nap_telling", "caller")
            assert 0 <= call.age < 30
            (through,) = status.actor("caller").calls  # the same chain, one process up
            assert (through.method, through.caller, through.chain) == ("call", "host", call.chain)
            add = served.methods["add"]
            assert (add.calls, add.errors) == (21, 1)
            assert 0 < add.p50 <= add.p90 <= add.p99 <= add.max
            assert "nap_telling" not in served.methods  # still running: counted when it ends
            assert served.leases == 0
            blocked = status.actor("hung")
            assert blocked.state == "running" and not blocked.answering  # its loop is blocked
