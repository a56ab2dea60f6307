"""A host's life: started and closed from any task, never hanging on the way
out, and keeping no more than it must about actors that are gone."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import atoll
from atoll.actors import _node, _processes, _registry, _spawner
from atoll.testing._leaks import wait_for_exit
from helpers import Echo, Holder, Sleepy, SlowStart, Stubborn, pid_of

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(script: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with this directory importable; fail if it outlives ``timeout``."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), HERE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_gone(pids: list[int]) -> None:
    assert not wait_for_exit(set(pids), 10), f"still running: {pids}"


# -- hosts whose task is cancelled from outside ----------------------------------


def test_host_cancelled_by_asyncio_run_exits_promptly() -> None:
    """``asyncio.run`` cancels the tasks left when ``main()`` returns, the
    host's and its watchers alike, with a call in flight. (asyncio only:
    trio never cancels a task behind its cancel scopes' back.)"""
    out = run_script(
        """
        import asyncio, sys
        sys.path.insert(0, sys.argv[1])
        import atoll
        from helpers import Holder

        async def serve(ready):
            async with atoll.open_host() as host:
                holder = await host.spawn(Holder)
                print(await holder.pid(), flush=True)
                ready.set()
                await holder.park()

        async def main():
            ready = asyncio.Event()
            asyncio.get_running_loop().create_task(serve(ready))
            await ready.wait()

        asyncio.run(main())
        print("exited", flush=True)
        """,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    pid, last = out.stdout.split()
    assert last == "exited"
    assert_gone([int(pid)])
    assert "Traceback" not in out.stderr


# -- hosts opened and closed in different tasks and contexts ---------------------


@pytest.mark.anyio
async def test_host_opened_in_one_task_is_closed_in_another() -> None:
    hosts: list[atoll.Host] = []

    async def open_one() -> None:
        hosts.append(await atoll.open_host())

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(open_one)
        host = hosts[0]
        echo = await host.spawn(Echo, name="shared")
        assert await echo.echo(1) == 1
        # This task's context never saw the host: lookup finds the one open here.
        assert await atoll.lookup("shared") == echo
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.aclose)
        with pytest.raises(atoll.ActorClosedError, match="host is closed"):
            await echo.echo(2)
        await host.aclose()  # again: nothing to do


@pytest.mark.anyio
async def test_open_host_block_entered_and_left_in_different_tasks() -> None:
    opener = atoll.open_host()
    hosts: list[atoll.Host] = []

    async def enter() -> None:
        hosts.append(await opener.__aenter__())

    async def leave() -> None:
        await opener.__aexit__(None, None, None)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(enter)
        echo = await hosts[0].spawn(Echo)
        assert await echo.echo("x") == "x"
        async with anyio.create_task_group() as tg:
            tg.start_soon(leave)
    with pytest.raises(atoll.ActorClosedError, match="host is closed"):
        await hosts[0].spawn(Echo)


@pytest.mark.anyio
async def test_start_host_and_aclose() -> None:
    with anyio.fail_after(30):
        host = await atoll.start_host(stop_timeout=1.0)
        echo = await host.spawn(Echo)
        pid = await echo.pid()
        await host.aclose()
    assert_gone([pid])


# -- the blocking facade ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_blocking_host_never_closed_does_not_hang_the_interpreter(backend: str) -> None:
    out = run_script(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import atoll
        from helpers import Echo

        host = atoll.blocking_host(sys.argv[2])  # never closed, no with block
        print(host.spawn(Echo).pid(), flush=True)
        """,
        backend,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert_gone([int(out.stdout)])


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_blocking_host_used_after_close_says_it_is_closed(backend: str) -> None:
    with atoll.blocking_host(backend) as host:
        echo = host.spawn(Echo)
        assert echo.echo(3) == 3
    assert host.closed
    with pytest.raises(atoll.ActorClosedError, match="host is closed"):
        host.spawn(Echo)
    with pytest.raises(atoll.ActorClosedError, match="host is closed"):
        echo.echo(4)
    host.close()  # again: nothing to do


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_blocking_host_is_closed_when_collected(backend: str) -> None:
    host = atoll.blocking_host(backend)
    pid = host.spawn(Echo).pid()
    del host
    gc.collect()
    assert_gone([pid])


# -- every stop path has a deadline ----------------------------------------------


@pytest.mark.anyio
async def test_leaving_with_a_host_callback_still_running_is_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entered = threading.Event()
    release = threading.Event()

    def slow_callback() -> None:
        entered.set()
        release.wait(30)

    async def call(echo: Any) -> None:
        try:
            await echo.call(slow_callback)
        except atoll.ActorClosedError:
            pass

    try:
        with anyio.fail_after(20), caplog.at_level(logging.WARNING, "atoll"):
            async with atoll.open_host(stop_timeout=0.5) as host:
                echo = await host.spawn(Echo)
                host._tg.start_soon(call, echo)  # type: ignore[union-attr]
                assert await anyio.to_thread.run_sync(entered.wait, 10)
                started = time.monotonic()
        assert time.monotonic() - started < 5
        assert "slow_callback" in caplog.text and "waiting up to 0.5 s" in caplog.text
        assert "no longer waits" in caplog.text
    finally:
        release.set()


@pytest.mark.anyio
async def test_stop_kills_an_actor_that_ignores_bye_and_sigterm() -> None:
    with anyio.fail_after(20):
        async with atoll.open_host(stop_timeout=0.3) as host:
            stubborn = await host.spawn(Stubborn)
            frozen = anyio.Event()

            async def on_frozen() -> None:
                frozen.set()

            async def freeze() -> None:
                try:
                    await stubborn.freeze(on_frozen, 60)
                except atoll.ActorClosedError:
                    pass

            async with anyio.create_task_group() as tg:
                tg.start_soon(freeze)
                await frozen.wait()
                pid = pid_of(host, "Stubborn-1")
                started = time.monotonic()
                await host.stop(stubborn)
                assert 0.3 < time.monotonic() - started < 5
    assert_gone([pid])


@pytest.mark.anyio
async def test_stop_gives_up_on_a_process_that_never_exits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Signals that change nothing (as for a process stuck in the kernel):
    the stop still ends, at its deadline, and says so."""
    monkeypatch.setattr(_processes, "signal_process", lambda process, how: None)
    frozen = anyio.Event()

    async def on_frozen() -> None:
        frozen.set()

    with anyio.fail_after(30), caplog.at_level(logging.WARNING, "atoll"):
        async with atoll.open_host(stop_timeout=0.2) as host:
            stubborn = await host.spawn(Stubborn)

            async def freeze() -> None:
                with pytest.raises(atoll.ActorClosedError):
                    await stubborn.freeze(on_frozen, 60)

            host._tg.start_soon(freeze)  # type: ignore[union-attr]
            await frozen.wait()
            pid = pid_of(host, "Stubborn-1")
            started = time.monotonic()
            await host.stop(stubborn)
            assert time.monotonic() - started < 5
            assert "no longer waiting for it" in caplog.text
            os.kill(pid, signal.SIGKILL)  # what the stop could not do
            assert_gone([pid])


@pytest.mark.anyio
async def test_an_actor_stops_on_time_while_a_sync_method_runs_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The actor waits for its worker thread within the grace, then exits by
    itself (code 0, not killed), leaving the thread to die with it."""
    with anyio.fail_after(20):
        async with atoll.open_host(stop_timeout=0.5) as host:
            sleepy = await host.spawn(Sleepy)
            pid = await sleepy.pid()
            dozing = anyio.Event()

            async def started() -> None:
                dozing.set()

            async def doze() -> None:
                with pytest.raises(atoll.ActorClosedError):
                    await sleepy.doze(started, 60)

            async with anyio.create_task_group() as tg:
                tg.start_soon(doze)
                await dozing.wait()  # the method runs in its thread
                actor = host._processes.actors[sleepy._id]  # type: ignore[attr-defined]
                started = time.monotonic()
                await host.stop(sleepy)
                assert time.monotonic() - started < 1.5
                assert actor.exitcode == 0
    assert_gone([pid])


@pytest.mark.anyio
async def test_closing_is_bounded_when_a_fork_server_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from atoll.actors import _forks

    real_aclose = _forks.ForkServer.aclose
    servers: list[Any] = []

    async def never(self: Any, grace: float = 1.0) -> None:
        servers.append(self)
        await anyio.sleep_forever()

    with anyio.fail_after(20):
        async with atoll.open_host() as host:
            await host.spawn(Echo)
            await host.spawn(Echo)  # a fork: the server is up
            monkeypatch.setattr(_forks.ForkServer, "aclose", never)
            started = time.monotonic()
        assert time.monotonic() - started < _spawner.FORK_SERVER_WAIT + 2
        for server in servers:
            await real_aclose(server)  # what the host gave up on


# -- spawns are bounded ------------------------------------------------------------


@pytest.mark.anyio
async def test_spawn_timeout_bounds_a_hanging_constructor() -> None:
    with anyio.fail_after(30):
        async with atoll.open_host(spawn_timeout=1.0) as host:
            started = time.monotonic()
            with pytest.raises(atoll.SpawnError, match=r"spawn_timeout=1 s"):
                await host.spawn(SlowStart, 60)
            assert time.monotonic() - started < 5
            assert await (await host.spawn(Echo)).echo(1) == 1  # the host carries on


@pytest.mark.anyio
async def test_spawn_timeout_bounds_a_hanging_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "slow_import.py").write_text(
        textwrap.dedent(
            f"""
            import os, time
            import atoll
            if os.getpid() != {os.getpid()}:
                time.sleep(60)  # only in the actor's process

            class Late(atoll.Actor):
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from slow_import import Late  # type: ignore[import-not-found]

    with anyio.fail_after(30):
        async with atoll.open_host(spawn_timeout=1.0) as host:
            with pytest.raises(atoll.SpawnError, match="import of its class"):
                await host.spawn(Late)


# -- what the host keeps of actors that are gone -----------------------------------


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.anyio
async def test_dead_actors_leave_bounded_bookkeeping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_node, "_GONE_KEPT", 8)
    monkeypatch.setattr(_registry, "TOMBSTONES_KEPT", 8)
    with anyio.fail_after(120):
        async with atoll.open_host() as host:
            await host.stop(await host.spawn(Echo))  # the fork server is up
            gc.collect()
            fds = _descriptors()
            for i in range(40):
                echo = await host.spawn(Echo)
                if i % 2:
                    with pytest.raises(atoll.ActorDiedError):
                        await echo.kill_self()
                else:
                    await host.stop(echo)
            gc.collect()
            assert host._processes.actors == {}
            assert len(host._node._gone) <= 8 and len(host._node.peer_names) <= 8
            assert len(host._registry._entries) <= 8 + 1  # tombstones, and the registry
            assert _descriptors() <= fds + 2
            with pytest.raises(atoll.ActorDiedError):
                await echo.echo(1)  # the latest dead one still says how it died


# -- SIGTERM and process titles ----------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_host_terminated_by_sigterm_removes_its_private_directory(backend: str) -> None:
    script = textwrap.dedent(
        """
        import sys, anyio, atoll

        async def main():
            async with atoll.open_host() as host:
                print(host._hub.dir, flush=True)
                await anyio.sleep(60)

        anyio.run(main, backend=sys.argv[2])
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, HERE, backend], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        directory = process.stdout.readline().strip()
        assert os.path.isdir(directory)
        process.terminate()
        assert process.wait(20) == -signal.SIGTERM
        assert not os.path.exists(directory)
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.anyio
async def test_actor_processes_are_titled_with_their_names() -> None:
    with anyio.fail_after(30):
        async with atoll.open_host() as host:
            first = await host.spawn(Holder, name="first")
            second = await host.spawn(Holder, name="second")  # a fork
            for ref, name in ((first, "first"), (second, "second")):
                pid = await ref.pid()
                title = _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()
                assert title == f"atoll: {name} [host {os.getpid()}]"
                assert _read(f"/proc/{pid}/comm").strip() == f"atoll {name}"
            servers = [s.process.pid for s in host._spawner.fork_servers.values()]
            assert servers
            title = _read(f"/proc/{servers[0]}/cmdline")
            assert title.startswith(f"atoll: fork server [host {os.getpid()}]")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
