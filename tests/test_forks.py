"""Actor processes forked from a fork server."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

import atoll
from helpers import Echo

pytestmark = pytest.mark.anyio


class Probe(atoll.Actor):
    async def parent(self) -> int:
        return os.getppid()

    async def pid(self) -> int:
        return os.getpid()

    async def env(self, key: str) -> str | None:
        return os.environ.get(key)

    async def cwd(self) -> str:
        return os.getcwd()

    async def counted(self) -> int:
        return len(await anyio.to_thread.run_sync(os.listdir, "/proc/self/fd"))


async def test_spawns_after_the_first_are_forks_of_one_server() -> None:
    async with atoll.open_host() as host:
        # The first starts from scratch, its environment's fork server beside it.
        first = await host.spawn(Probe)
        assert await first.parent() == os.getpid()
        second = await host.spawn(Probe)
        third = await host.spawn(Probe)
        server = await second.parent()
        assert server != os.getpid()
        assert await third.parent() == server
        assert await second.pid() != await third.pid()


async def test_concurrent_first_spawns_wait_for_the_server() -> None:
    async with atoll.open_host() as host:
        probes: list[Probe] = []

        async def spawn() -> None:
            probes.append(await host.spawn(Probe))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(spawn)
        parents = [await p.parent() for p in probes]
        assert parents.count(os.getpid()) == 1  # the first; the rest are forks
        assert len(set(parents)) == 2


async def test_fork_server_off_starts_each_from_scratch() -> None:
    async with atoll.open_host(fork_server=False) as host:
        probe = await host.spawn(Probe)
        assert await probe.parent() == os.getpid()


async def test_a_fork_takes_the_hosts_environment_at_its_spawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with atoll.open_host() as host:
        await host.spawn(Probe)  # the fork server starts beside this one
        before = await host.spawn(Probe)
        assert await before.parent() != os.getpid()
        monkeypatch.setenv("ATOLL_TEST_LATE", "set after the server started")
        monkeypatch.delenv("HOME", raising=False)
        monkeypatch.chdir(tmp_path)
        after = await host.spawn(Probe)
        assert await after.parent() == await before.parent()  # still a fork
        assert await after.env("ATOLL_TEST_LATE") == "set after the server started"
        assert await after.env("HOME") is None
        assert await after.cwd() == str(tmp_path)
        assert await before.env("ATOLL_TEST_LATE") is None


async def test_a_changed_startup_variable_starts_from_scratch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with atoll.open_host() as host:
        await host.spawn(Probe)
        forked = await host.spawn(Probe)
        assert await forked.parent() != os.getpid()
        monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
        probe = await host.spawn(Probe)
        assert await probe.parent() == os.getpid()
        assert await probe.env("PYTHONWARNINGS") == "error::DeprecationWarning"


async def test_a_fork_has_only_its_own_descriptors() -> None:
    async with atoll.open_host() as host:
        await host.spawn(Probe)
        first = await host.spawn(Probe)
        assert await first.parent() != os.getpid()
        alone = await first.counted()
        crowd = [await host.spawn(Probe) for _ in range(3)]
        # Forked after three siblings: none of their pipes or pidfds came along.
        assert await crowd[-1].counted() == alone


async def test_a_killed_fork_server_is_replaced_and_its_children_live_on() -> None:
    async with atoll.open_host() as host:
        await host.spawn(Probe)
        old = await host.spawn(Echo)
        victim = await host.spawn(Probe)
        server = await victim.parent()
        assert server != os.getpid()
        os.kill(server, signal.SIGKILL)
        with anyio.fail_after(10):
            await host.spawn(Probe)  # from scratch, or a new server's first fork
            new = await host.spawn(Probe)
        assert await new.parent() not in (server, os.getpid())
        assert await old.echo("still here") == "still here"
        # Its death is still noticed, though its exit status went with the server.
        with anyio.fail_after(10):
            with pytest.raises(atoll.ActorDiedError):
                await old.kill_self()
        with pytest.raises(atoll.ActorDiedError):
            await old.echo("gone")


async def test_no_fork_server_where_start_up_leaves_threads_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A sitecustomize (or .pth file) that starts a thread: forking would
    # freeze it wherever it was, so every actor starts from scratch instead.
    (tmp_path / "sitecustomize.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
    )
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    async with atoll.open_host() as host:
        with anyio.fail_after(20):
            probes = [await host.spawn(Probe) for _ in range(3)]
            assert [await p.parent() for p in probes] == [os.getpid()] * 3
    assert "no fork server" in caplog.text


async def test_spawns_cancelled_at_any_point_leave_nothing_behind() -> None:
    # The leak check (every test's) finds any pipe, pidfd or process left over.
    async with atoll.open_host() as host:
        await host.spawn(Probe)
        await host.spawn(Probe)  # the server is up
        for delay_ms in range(0, 30, 2):
            with anyio.move_on_after(delay_ms / 1000):
                await host.spawn(Probe)
        with anyio.fail_after(10):
            probe = await host.spawn(Probe)
            assert await probe.parent() != os.getpid()
