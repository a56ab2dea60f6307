"""Actor processes that die, and hosts that die."""

from __future__ import annotations

import os
import signal
import textwrap
import time

import anyio
import pytest

import atoll
from helpers import (
    Counter,
    Echo,
    Parent,
    Sleeper,
    host_process,
    kill_and_watch,
    parent_of,
    pid_of,
)

pytestmark = pytest.mark.anyio


async def test_sigkill_fails_pending_calls_quickly() -> None:
    async with atoll.open_host() as host:
        sleeper = await host.spawn(Sleeper, name="victim")
        echo = await host.spawn(Echo)
        pid = await echo.pid()
        started = anyio.Event()

        async def on_started() -> None:
            started.set()

        failure: list[BaseException] = []
        elapsed: list[float] = []

        async def park() -> None:
            try:
                await sleeper.park(on_started)
            except atoll.ActorDiedError as exc:
                failure.append(exc)
                elapsed.append(time.perf_counter())

        async with anyio.create_task_group() as tg:
            tg.start_soon(park)
            with anyio.fail_after(10):
                await started.wait()
            sleeper_pid = pid_of(host, "victim")
            killed_at = time.perf_counter()
            os.kill(sleeper_pid, signal.SIGKILL)
        assert failure, "the pending call did not fail"
        err = failure[0]
        assert isinstance(err, atoll.ActorDiedError)
        assert err.exitcode == -signal.SIGKILL
        assert "victim" in str(err) and "signal 9" in str(err)
        # Generous bound for a loaded machine; the benchmark reports the real figure.
        assert elapsed[0] - killed_at < 1.0
        with pytest.raises(atoll.ActorDiedError):
            await sleeper.stats()
        assert await echo.pid() == pid  # others keep working


async def test_died_error_carries_stderr_tail() -> None:
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        with pytest.raises(atoll.ActorDiedError) as info:
            await echo.write_stderr_and_die("last words from the actor")
        assert "last words from the actor" in info.value.stderr_tail


async def test_peer_actor_sees_death_of_the_actor_it_calls() -> None:
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        victim = await host.spawn(Echo, name="victim")
        with anyio.fail_after(10), pytest.raises(atoll.ActorDiedError, match="victim"):
            await echo.call_method(victim, "kill_self")
        with pytest.raises(atoll.ActorDiedError, match="victim"):
            await echo.call_method(victim, "pid")


HOST_SCRIPT = textwrap.dedent(
    """
    import sys, anyio, atoll
    sys.path.insert(0, sys.argv[1])
    from helpers import Echo

    async def main():
        async with atoll.open_host() as host:
            await host.spawn(Echo)  # its fork server starts beside it
            e = await host.spawn(Echo)
            print(await e.pid(), flush=True)
            await anyio.sleep_forever()

    anyio.run(main, backend=sys.argv[2])
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_no_orphans_when_the_host_is_killed(backend: str) -> None:
    with host_process(HOST_SCRIPT, backend) as host:
        assert host.stdout is not None
        child_pid = int(host.stdout.readline())
        assert parent_of(child_pid) != host.pid  # forked by the host's fork server
        exited = kill_and_watch(host, child_pid, 2.0)
        assert exited, "the actor or its fork server outlived its host by 2 s"


async def test_counter_unaffected_by_dead_neighbour() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter)
        doomed = await host.spawn(Echo)
        with pytest.raises(atoll.ActorDiedError):
            await doomed.kill_self()
        assert await counter.add(2) == 2


async def test_name_of_a_dead_actor_can_be_used_again() -> None:
    async with atoll.open_host() as host:
        first = await host.spawn(Echo, name="phoenix")
        with pytest.raises(atoll.ActorDiedError):
            await first.kill_self()
        second = await host.spawn(Echo, name="phoenix")
        assert await second.pid() != os.getpid()
        with pytest.raises(atoll.ActorDiedError):
            await first.pid()


@pytest.mark.parametrize("end", ["stop", "crash"])
async def test_what_an_actor_started_dies_with_it(end: str) -> None:
    async with atoll.open_host() as host:
        parent = await host.spawn(Parent)
        with anyio.fail_after(20):
            pids = await parent.children(3)
            # Watched by pidfd: readable once the process has ended, reaped or not.
            pidfds = [os.pidfd_open(pid) for pid in pids]
            try:
                if end == "stop":
                    await host.stop(parent)
                else:
                    with pytest.raises(atoll.ActorDiedError):
                        await parent.crash()
                for fd in pidfds:
                    await anyio.wait_readable(fd)
            finally:
                for fd in pidfds:
                    os.close(fd)
