"""CUDA tensors through CUDA IPC, on a real GPU (skipped without one). The
same paths run everywhere on the meta device in ``test_device_tensors.py``."""

from __future__ import annotations

import gc
import os
import signal
from typing import Any

import anyio
import pytest

import atoll

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False)",
)


class Gpu(atoll.Actor):
    def __init__(self) -> None:
        self.kept: list[Any] = []

    async def where(self, t: Any) -> tuple[str, int, tuple[int, ...], tuple[int, ...]]:
        return (t.device.type, t.device.index, tuple(t.shape), t.stride())

    async def total(self, t: Any) -> float:
        return float(t.double().sum())

    async def fill(self, t: Any, value: float) -> None:
        t.fill_(value)
        torch.cuda.current_stream(t.device).synchronize()  # before the reply says it's done

    async def echo(self, value: Any) -> Any:
        return value

    async def keep(self, t: Any) -> None:
        self.kept.append(t)

    async def drop(self) -> None:
        self.kept.clear()
        gc.collect()

    async def total_of_kept_at(self, other: Any) -> float:
        return float(await other.total(self.kept[0]))

    async def make(self, n: int, value: float) -> Any:
        return torch.full((n,), value, device="cuda")

    async def kill_self(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.anyio
async def test_a_cuda_tensor_arrives_on_its_device_as_the_same_memory() -> None:
    t = torch.zeros(1 << 20, device="cuda")
    async with atoll.open_host() as host:
        g = await host.spawn(Gpu)
        with anyio.fail_after(30):
            assert await g.where(t[::2]) == ("cuda", t.device.index, ((1 << 19),), (2,))
            await g.fill(t, 2.0)  # the actor's write lands in our memory
        assert float(t.sum()) == 2.0 * (1 << 20)


@pytest.mark.anyio
async def test_a_cuda_tensor_sent_back_to_its_owner_is_the_original() -> None:
    t = torch.arange(1000, device="cuda", dtype=torch.float32)
    async with atoll.open_host() as host:
        g = await host.spawn(Gpu)
        with anyio.fail_after(30):
            back = await g.echo(t[10:])
    assert back.untyped_storage() is t.untyped_storage()
    assert back.data_ptr() == t[10:].data_ptr()


@pytest.mark.anyio
async def test_the_receiver_waits_for_the_senders_stream() -> None:
    n = 1 << 24
    t = torch.zeros(n, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    async with atoll.open_host() as host:
        g = await host.spawn(Gpu)
        with anyio.fail_after(60), torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # a long kernel, then the write
            t.fill_(3.0)
            # Sent while the write is still queued on `side`, the current
            # stream: the message's marker is recorded there.
            assert await g.total(t) == 3.0 * n


@pytest.mark.anyio
async def test_leases_on_cuda_memory_end_with_the_receivers_views_or_its_death() -> None:
    t = torch.ones(1 << 16, device="cuda")
    async with atoll.open_host() as host:
        plane = host._node.plane
        g = await host.spawn(Gpu)
        with anyio.fail_after(30):
            await g.keep(t)
            assert plane.device_leases() == 1
            await g.drop()
            await plane.wait_device_leases()
            await g.keep(t)
            with pytest.raises(atoll.ActorDiedError):
                await g.kill_self()
            await plane.wait_device_leases()


@pytest.mark.anyio
async def test_a_received_cuda_tensor_reaches_a_third_process() -> None:
    t = torch.full((4096,), 5.0, device="cuda")
    async with atoll.open_host() as host:
        a = await host.spawn(Gpu)
        b = await host.spawn(Gpu)
        with anyio.fail_after(30):
            await a.keep(t)
            assert await a.total_of_kept_at(b) == 5.0 * 4096


@pytest.mark.anyio
async def test_cuda_and_cpu_tensors_in_one_message_and_an_actors_own_tensor() -> None:
    cpu = torch.arange(1 << 16, dtype=torch.float32)
    gpu = torch.arange(1 << 16, dtype=torch.float32, device="cuda")
    async with atoll.open_host() as host:
        g = await host.spawn(Gpu)
        with anyio.fail_after(30):
            got_cpu, got_gpu = await g.echo((cpu, gpu))
            made = await g.make(100, 1.5)
            assert float(made.sum()) == 150.0
            del made
            gc.collect()
    assert torch.equal(got_cpu, cpu)
    assert got_gpu.untyped_storage() is gpu.untyped_storage()


@pytest.mark.anyio
async def test_a_stopping_actor_keeps_its_cuda_memory_valid_until_its_views_are_dropped() -> None:
    async with atoll.open_host(stop_timeout=0.5, device_lease_timeout=60) as host:
        g = await host.spawn(Gpu)
        record = host._processes.actors[g._id]
        with anyio.fail_after(60):
            made = await g.make(1 << 20, 4.0)
            async with anyio.create_task_group() as tg:
                tg.start_soon(host.stop, g)
                await record.holding.wait()
                with anyio.move_on_after(1.0):  # twice the grace: it must not exit in it
                    await record.exited.wait()
                assert not record.exited.is_set()
                assert float(made.sum()) == 4.0 * (1 << 20)  # its memory is still there
                del made
                gc.collect()
                await record.exited.wait()
    assert record.exitcode == 0


@pytest.mark.anyio
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
async def test_the_device_index_travels() -> None:
    t = torch.ones(10, device="cuda:1")
    async with atoll.open_host() as host:
        g = await host.spawn(Gpu)
        with anyio.fail_after(30):
            assert (await g.where(t))[:2] == ("cuda", 1)
