"""Sandboxed actors (``spawn(sandbox=atoll.Sandbox())``, real bubblewrap):
they try to read, write, connect, look and signal beyond their sandbox, and
fail; and they still do their work."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch

import atoll
from atoll.actors import _sandbox
from helpers import Echo, Prisoner

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (bwrap)"),
]


@pytest.fixture
def secrets(tmp_path: Path) -> Iterator[list[str]]:
    """A secret in the host's home and one in /tmp."""
    home = Path.home() / f".atoll-test-secret-{os.getpid()}"
    home.write_text("home secret")
    in_tmp = tmp_path / "secret"
    in_tmp.write_text("tmp secret")
    try:
        yield [str(home), str(in_tmp)]
    finally:
        home.unlink()


async def test_a_sandboxed_actor_cannot_read_the_hosts_files(secrets: list[str]) -> None:
    async with atoll.open_host() as host:
        prisoner = await host.spawn(Prisoner, sandbox=atoll.Sandbox())
        with anyio.fail_after(10):
            for path in [*secrets, "/etc/shadow", "/etc/hostname"]:
                assert not (await prisoner.read(path)).startswith("read"), path


async def test_a_sandboxed_actor_cannot_reach_the_hosts_control_and_debug_sockets() -> None:
    async with atoll.open_host() as host:
        prisoner = await host.spawn(Prisoner, name="prisoner", sandbox=atoll.Sandbox())
        directory = os.path.dirname(host._control.path)  # type: ignore[union-attr]
        with anyio.fail_after(20):
            # The key to the host's status is not there to read...
            assert await prisoner.read(os.path.join(directory, "control.key")) == (
                "FileNotFoundError"
            )
            # ...nor the control and debug sockets to connect to (the hub's is).
            status = b'{"key": "", "op": "status"}\n'
            for name in ("control", "debug"):
                got = await prisoner.ask_host(os.path.join(directory, name), status)
                assert got == "FileNotFoundError", name
            assert os.path.exists(os.path.join(directory, "hub"))
            assert "prisoner" in [a.name for a in (await host.status()).actors]


async def test_a_sandboxed_actor_writes_only_where_it_may(tmp_path: Path) -> None:
    allowed = tmp_path / "out"
    allowed.mkdir()
    async with atoll.open_host() as host:
        prisoner = await host.spawn(Prisoner, sandbox=atoll.Sandbox(writable=(str(allowed),)))
        with anyio.fail_after(10):
            # What it writes elsewhere lands in its own private folders, or nowhere.
            for path in (tmp_path / "escaped", Path.home() / "escaped", Path("/tmp/private")):
                await prisoner.write(str(path))
            assert await prisoner.write(str(allowed / "result")) == "written"
            assert await prisoner.write("/usr/escaped") != "written"
    assert not (tmp_path / "escaped").exists()
    assert not (Path.home() / "escaped").exists()
    assert not Path("/tmp/private").exists()
    assert (allowed / "result").read_text() == "escaped"


async def test_a_sandbox_reads_what_it_lists(tmp_path: Path) -> None:
    (tmp_path / "model.txt").write_text("weights")
    async with atoll.open_host() as host:
        prisoner = await host.spawn(Prisoner, sandbox=atoll.Sandbox(read_only=(str(tmp_path),)))
        with anyio.fail_after(10):
            assert await prisoner.read(str(tmp_path / "model.txt")) == "read: weights"
            assert await prisoner.write(str(tmp_path / "model.txt")) != "written"


async def test_a_sandboxed_actor_has_no_network() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        async with atoll.open_host() as host:
            jailed = await host.spawn(Prisoner, sandbox=atoll.Sandbox())
            networked = await host.spawn(Prisoner, sandbox=atoll.Sandbox(network=True))
            with anyio.fail_after(10):
                assert await jailed.connect(port) != "connected"
                assert await networked.connect(port) == "connected"
    finally:
        server.close()


async def test_a_sandboxed_actor_sees_no_other_process_and_no_shared_memory() -> None:
    async with atoll.open_host() as host:
        neighbour = await host.spawn(Echo)
        prisoner = await host.spawn(Prisoner, sandbox=atoll.Sandbox())
        atoll.share(torch.ones(1 << 16))  # a segment of the host's
        with anyio.fail_after(10):
            assert await prisoner.shm() == []
            pids = await prisoner.pids()
            assert os.getpid() not in pids and await neighbour.pid() not in pids
            environ = await prisoner.read(f"/proc/{os.getpid()}/environ")
            assert not environ.startswith("read"), environ
            assert await prisoner.signal(os.getpid()) == "ProcessLookupError"
            assert await neighbour.echo("alive") == "alive"


async def test_a_sandboxed_actor_still_does_its_work() -> None:
    async with atoll.open_host() as host:
        prisoner = await host.spawn(Prisoner, sandbox=atoll.Sandbox())
        neighbour = await host.spawn(Echo)
        events = host.subscribe("done")
        with anyio.fail_after(20):
            t = atoll.share(torch.arange(1 << 16, dtype=torch.float32))
            assert torch.equal(await prisoner.double(t), t * 2)
            # Zero-copy both ways: the segment is linked into its /dev/shm.
            assert (await prisoner.echo(t)).data_ptr() == t.data_ptr()
            made = await prisoner.make(1 << 16)
            assert float(made[0]) == 7.0
            # What it made goes on to an unconfined actor (copied for it once).
            assert torch.equal(await neighbour.echo(made), made)
            await prisoner.publish("done", ("ok", 1))
            async for event in events:
                assert event == ("ok", 1)
                break
        events.close()
        assert prisoner._id[:1] == b"s"  # untrusted too: its sends are plain


async def test_a_sandbox_sees_only_the_segments_it_was_handed() -> None:
    async with atoll.open_host() as host:
        prisoner = await host.spawn(Prisoner, sandbox=atoll.Sandbox())
        other = await host.spawn(Prisoner, sandbox=atoll.Sandbox())
        handed = atoll.share(torch.ones(1 << 16))
        kept = atoll.share(torch.zeros(1 << 16))
        arena = host._node.plane.arena
        handed_name, kept_name = (
            arena.find(t.data_ptr(), t.data_ptr() + 1).name  # type: ignore[union-attr]
            for t in (handed, kept)
        )
        with anyio.fail_after(20):
            await prisoner.double(handed)
            await other.double(kept)
            seen, seen_by_other = await prisoner.shm(), await other.shm()
        assert handed_name in seen and kept_name not in seen
        assert kept_name in seen_by_other and handed_name not in seen_by_other


async def test_a_sandbox_used_once_has_a_process_waiting_for_the_next_actor() -> None:
    async with atoll.open_host() as host:
        first = await host.spawn(Prisoner, sandbox=atoll.Sandbox())
        waiting = host._spawner._spares._waiting
        [(key, spare)] = waiting.items()
        with anyio.fail_after(20):
            await spare.ready.wait()
            second = await host.spawn(Prisoner, sandbox=atoll.Sandbox())
            assert second._id == spare.identity != first._id
            assert second._id[:1] == b"s"
            assert await second.pids() == [1, 2]  # a sandbox of its own: bubblewrap's init, it
            assert waiting[key] is not spare  # another one started behind it
            # Another sandbox does not take it.
            networked = await host.spawn(Prisoner, sandbox=atoll.Sandbox(network=True))
            assert networked._id != waiting[key].identity
            assert await networked.pids() == [1, 2]


async def test_gpu_passes_the_gpu_devices_through_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No GPU here: stand-ins for /dev/nvidia0 and /dev/nvidiactl, bound as
    # device nodes are.
    devices = [tmp_path / "nvidia0", tmp_path / "nvidiactl"]
    for device in devices:
        device.write_text("device")
    (tmp_path / "other").write_text("not a device")
    monkeypatch.setattr(_sandbox, "_GPU_DEVICES", (str(tmp_path / "nvidia*"),))
    async with atoll.open_host() as host:
        with anyio.fail_after(20):
            gpu = await host.spawn(Prisoner, sandbox=atoll.Sandbox(gpu=True))
            plain = await host.spawn(Prisoner, sandbox=atoll.Sandbox())
            for device in devices:
                assert await gpu.read(str(device)) == "read: device"
                assert await plain.read(str(device)) == "FileNotFoundError"
            assert await gpu.read(str(tmp_path / "other")) == "FileNotFoundError"


async def test_no_bubblewrap_is_an_error_that_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    _sandbox.bwrap.cache_clear()
    try:
        async with atoll.open_host() as host:
            with pytest.raises(atoll.SandboxUnavailableError, match="apt-get install bubblewrap"):
                await host.spawn(Prisoner, sandbox=atoll.Sandbox())
            with caplog.at_level(logging.WARNING, logger="atoll"):
                loose = await host.spawn(Prisoner, sandbox=atoll.Sandbox(required=False))
            assert "unconfined" in caplog.text
            with anyio.fail_after(10):
                assert loose._id[:1] == b"u"  # still untrusted
                assert os.getpid() in await loose.pids()  # and truly unconfined
    finally:
        _sandbox.bwrap.cache_clear()


async def test_a_sandboxed_actors_stacks_without_ending_its_sandbox() -> None:
    async with atoll.open_host() as host:
        prisoner = await host.spawn(Prisoner, sandbox=atoll.Sandbox())
        with anyio.fail_after(20):
            assert "most recent call first" in await host.dump_stacks(prisoner)
            assert await prisoner.pids() == [1, 2]  # alive, in its sandbox
