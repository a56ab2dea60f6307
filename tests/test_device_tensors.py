"""The plane's device path (CUDA IPC on a GPU), run here on torch's ``meta``
device with a stand-in for CUDA's handles (``fake_device``): tokens and
leases, a storage sent back to its owner, aliasing, a third process, death.
``test_cuda.py`` runs the same paths on a real GPU."""

from __future__ import annotations

import gc
import os
import signal
import types
from typing import Any

import anyio
import pytest

import atoll
from atoll.actors._runtime import current_plane
from atoll.tensors import _devices, _shm
from atoll.tensors import _plane as _plane_mod
from atoll.transport import _messages as m
from atoll.transport._codec import Codec

torch = pytest.importorskip("torch")

from fake_device import OPS  # noqa: E402  (registers the meta device's ops)
from helpers import Echo  # noqa: E402


class Holder(atoll.Actor):
    def __init__(self) -> None:
        self.kept: list[Any] = []

    async def describe(self, t: Any) -> tuple[Any, ...]:
        return (t.device.type, tuple(t.shape), t.stride(), t.storage_offset(), str(t.dtype))

    async def echo(self, value: Any) -> Any:
        return value

    async def keep(self, value: Any) -> None:
        self.kept.append(value)

    async def drop(self) -> None:
        self.kept.clear()
        gc.collect()

    async def shares_storage_with_kept(self, t: Any) -> bool:
        return t.untyped_storage() is self.kept[0].untyped_storage()

    async def same_storage(self, a: Any, b: Any) -> bool:
        return a.untyped_storage() is b.untyped_storage()

    async def forward_kept(self, other: Any) -> Any:
        return await other.describe(self.kept[0])

    async def make(self, n: int) -> Any:
        self.kept.append(torch.empty(n, device="meta"))
        return self.kept[-1]

    async def give(self, other: Any, n: int) -> None:
        self.kept.append(torch.empty(n, device="meta"))
        await other.keep(self.kept[-1])

    async def record(self) -> tuple[list[Any], list[Any], list[Any]]:
        return OPS.opened, OPS.settled, OPS.waited

    async def pid(self) -> int:
        return os.getpid()

    async def opened_storages(self) -> int:
        return int(current_plane("test").stats()["device_storages_opened"])

    async def kill_self(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def _plane(host: atoll.Host) -> Any:
    return host._node.plane


@pytest.mark.anyio
async def test_a_device_tensor_arrives_with_its_layout_and_comes_back_as_itself() -> None:
    base = torch.empty(100, 4, device="meta")
    view = base.t()[1:, 2:]
    async with atoll.open_host() as host:
        h = await host.spawn(Holder)
        with anyio.fail_after(10):
            assert await h.describe(view) == (
                "meta",
                tuple(view.shape),
                view.stride(),
                view.storage_offset(),
                str(view.dtype),
            )
            back = await h.echo(view)
            opened, _, waited = await h.record()
            empty = await h.echo(torch.empty(0, 3, device="meta", requires_grad=True))
    assert back.untyped_storage() is base.untyped_storage()  # the owner's own storage
    assert (back.shape, back.stride(), back.storage_offset()) == (
        view.shape,
        view.stride(),
        view.storage_offset(),
    )
    assert (empty.device.type, empty.shape, empty.requires_grad) == ("meta", (0, 3), True)
    assert [owner for owner, _ in opened] == [os.getpid()] * 2  # a storage of ours, twice
    assert waited and all(marker[0] == os.getpid() for marker in waited)  # our stream's marker
    assert OPS.opened == []  # the host never opened its own memory


@pytest.mark.anyio
async def test_views_of_one_storage_stay_one_storage_across_messages() -> None:
    base = torch.empty(64, device="meta")
    async with atoll.open_host() as host:
        h = await host.spawn(Holder)
        with anyio.fail_after(10):
            assert await h.same_storage(base[:10], base[20:])  # one message
            await h.keep(base[:5])
            opened, settled, _ = await h.record()
            assert await h.shares_storage_with_kept(base[30:])  # the next one
            opened_after, settled_after, _ = await h.record()
    assert len(opened) == 2  # by each message: the first one's views had died
    assert opened_after == opened  # the storage still open here was used again
    assert settled_after == [*settled, opened[0]]  # and the new token let go of


@pytest.mark.anyio
async def test_leases_end_when_the_receivers_views_die_or_it_does() -> None:
    t = torch.empty(8, device="meta")
    async with atoll.open_host() as host:
        plane = _plane(host)
        h = await host.spawn(Holder)
        with anyio.fail_after(10):
            await h.echo(t)
            await plane.wait_device_leases()  # the echo's view died in the actor
            await h.keep(t)
            await h.keep(t[2:])
            assert plane.device_leases() == 2
            assert await h.opened_storages() == 1
            await h.drop()
            assert await h.opened_storages() == 0
            await plane.wait_device_leases()
            await h.keep(t)
            assert plane.device_leases() == 1
            with pytest.raises(atoll.ActorDiedError):
                await h.kill_self()
            await plane.wait_device_leases()  # released by its death
        assert plane.device_leases() == 0


@pytest.mark.anyio
async def test_a_received_storage_sent_to_a_third_process_is_copied_once() -> None:
    t = torch.empty(16, device="meta")
    async with atoll.open_host() as host:
        a = await host.spawn(Holder)
        b = await host.spawn(Holder)
        with anyio.fail_after(10):
            await a.keep(t)
            assert (await a.forward_kept(b))[0] == "meta"
            a_pid = await a.pid()
            opened, _, _ = await b.record()
    assert [owner for owner, _ in opened] == [a_pid]  # b opened a's copy, not ours


@pytest.mark.anyio
async def test_copy_on_send_gives_the_receiver_its_own_storage() -> None:
    t = torch.empty(16, device="meta")
    async with atoll.open_host() as host:
        h = await host.spawn(Holder)
        with anyio.fail_after(10):
            back = await h.echo(atoll.copy_on_send(t))
    assert back.untyped_storage() is not t.untyped_storage()
    assert back.shape == t.shape


@pytest.mark.anyio
async def test_device_and_cpu_tensors_travel_in_one_message() -> None:
    cpu = torch.arange(100_000, dtype=torch.float32)
    meta = torch.empty(3, 3, device="meta")
    async with atoll.open_host() as host:
        h = await host.spawn(Holder)
        with anyio.fail_after(10):
            got_cpu, got_meta = await h.echo((cpu, meta))
    assert torch.equal(got_cpu, cpu)
    assert got_meta.untyped_storage() is meta.untyped_storage()


@pytest.mark.anyio
async def test_an_actors_own_device_tensor_reaches_the_host() -> None:
    async with atoll.open_host() as host:
        h = await host.spawn(Holder)
        with anyio.fail_after(10):
            r = await h.make(12)
            assert r.device.type == "meta" and r.shape == (12,)
            assert await h.shares_storage_with_kept(r)  # back to its owner: its own storage
            del r
            gc.collect()
            await host.stop(h)  # no view of its memory is left: it stops at once


@pytest.mark.anyio
async def test_a_process_that_cannot_open_device_memory_says_so() -> None:
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)  # its process never registered the meta device
        settled = len(OPS.settled)
        with anyio.fail_after(10), pytest.raises(atoll.SerializationError, match="meta"):
            await echo.echo(torch.empty(4, device="meta"))
        assert _plane(host).device_leases() == 0  # the lease was given back
        # as a token never opened: what its export took for the reader, we let go of
        assert [pid for pid, _ in OPS.settled[settled:]] == [os.getpid()]


@pytest.mark.anyio
async def test_a_stopping_actor_waits_past_the_grace_for_views_of_its_device_memory() -> None:
    async with atoll.open_host(stop_timeout=0.5, device_lease_timeout=60) as host:
        owner = await host.spawn(Holder)
        other = await host.spawn(Holder)
        record = host._processes.actors[owner._id]
        with anyio.fail_after(30):
            mine = await owner.make(12)  # a view held by the host
            await owner.give(other, 8)  # and one by another actor
            async with anyio.create_task_group() as tg:
                tg.start_soon(host.stop, owner)
                await record.holding.wait()
                with anyio.move_on_after(1.0):  # twice the grace: it must not exit in it
                    await record.exited.wait()
                assert not record.exited.is_set()
                await other.drop()
                del mine
                gc.collect()
                await record.exited.wait()
    assert record.exitcode == 0  # it exited by itself, was not terminated
    assert "peers hold 2 views of its device memory; waiting up to 60 s" in "\n".join(
        record.stderr_tail
    )


@pytest.mark.anyio
async def test_an_actor_whose_device_memory_is_still_viewed_exits_at_its_deadline_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with atoll.open_host(stop_timeout=0.5, device_lease_timeout=0.5) as host:
        h = await host.spawn(Holder)
        record = host._processes.actors[h._id]
        with anyio.fail_after(30):
            kept = await h.make(12)
            await host.stop(h)
    assert record.exitcode == 0
    said = "\n".join(record.stderr_tail)
    assert "waiting up to 0.5 s for them to be dropped" in said
    assert "1 views of its device memory are still held by peers" in said
    assert "exited while this process holds views of 1 of its device storages" in caplog.text
    assert kept.shape == (12,)


@pytest.mark.anyio
async def test_device_lease_timeout_is_checked() -> None:
    with pytest.raises(ValueError, match="device_lease_timeout must be a number of seconds"):
        async with atoll.open_host(device_lease_timeout=-1):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a process without a GPU")
def test_cuda_memory_arriving_where_there_is_no_gpu_is_a_clear_error() -> None:
    ops = _devices.ops_for("cuda")
    assert ops is not None
    # What UntypedStorage._share_cuda_ makes: device, handle, size, offset,
    # reference counter and its offset, event handle, whether to wait for it.
    token = (0, bytes(64), 4096, 0, b"/torch_1_2", 0, bytes(64), True)
    with pytest.raises(RuntimeError, match=r"no CUDA device .* send it as t\.cpu\(\)"):
        ops.open(token)


class _RecordingTorch:
    """What ``CudaOps`` uses of torch, recording each call."""

    __version__ = "recording"

    def __init__(self) -> None:
        calls: list[tuple[Any, ...]] = []
        self.calls = calls

        class UntypedStorage:
            @staticmethod
            def _new_shared_cuda(*token: Any) -> str:
                calls.append(("open", *token))
                return "storage"

            @staticmethod
            def _release_ipc_counter(counter: bytes, offset: int, *, device: int) -> None:
                calls.append(("release", counter, offset, device))

        class Event:
            @staticmethod
            def from_ipc_handle(device: int, handle: bytes) -> tuple[str, bytes]:
                calls.append(("open event", device, handle))
                return ("event", handle)

        class Stream:
            def __init__(self, device: int) -> None:
                self.device = device

            def wait_event(self, event: Any) -> None:
                calls.append(("wait", self.device, event))

        self.UntypedStorage = UntypedStorage
        self.cuda = types.SimpleNamespace(
            is_available=lambda: True,
            _lazy_init=lambda: calls.append(("init",)),
            Event=Event,
            current_stream=Stream,
        )


def test_cuda_tokens_are_opened_and_settled_as_torchs_own_multiprocessing_does() -> None:
    fake = _RecordingTorch()
    ops = _devices.CudaOps(fake)
    token = (1, b"h" * 64, 4096, 512, b"/torch_9_9", 8, b"e" * 64, True)
    assert ops.identity(token) == (b"h" * 64, 512)  # torch's shared_cache key
    assert ops.open(token) == "storage"
    ops.settle(token)
    assert fake.calls == [("init",), ("open", *token), ("release", b"/torch_9_9", 8, 1)]


def test_peers_cuda_events_are_opened_once_and_the_least_recently_used_let_go() -> None:
    fake = _RecordingTorch()
    ops = _devices.CudaOps(fake)
    first, second, *rest = [i.to_bytes(64, "big") for i in range(_devices._OPENED_EVENTS + 1)]

    def opened() -> list[bytes]:
        return [call[2] for call in fake.calls if call[0] == "open event"]

    for marker in [first, second, *rest[:-1], first]:  # as many as are kept
        ops.wait(0, marker)
    assert opened() == [first, second, *rest[:-1]]  # the first only once
    assert fake.calls[-1] == ("wait", 0, ("event", first))
    ops.wait(0, rest[-1])  # one more: the least recently used one is let go
    ops.wait(0, first)
    assert opened() == [first, second, *rest]
    ops.wait(0, second)  # opened again
    assert opened() == [first, second, *rest, second]


def test_a_device_token_in_a_message_never_read_is_settled_by_its_sender() -> None:
    sender, receiver = _plane_mod.Plane(_shm.host_prefix()), _plane_mod.Plane(_shm.host_prefix())
    back: list[Any] = []
    receiver.connect(b"receiver", lambda dest, frames: back.append(m.decode(frames[0])))
    try:
        payload, _ = Codec({}, sender).dumps_value(
            (torch.empty(8, device="meta"), 1), lambda x: x, "value", b"receiver"
        )
        assert sender.device_leases() == 1
        settled = len(OPS.settled)
        Codec({}, receiver).discard(payload, b"a-sender")  # its call was dropped, say
        receiver.drain()
        (unlease,) = back
        sender.unlease(b"receiver", unlease.leases)
        assert sender.device_leases() == 0
        assert len(OPS.settled) == settled + 1
    finally:
        sender.close()
        receiver.close()
