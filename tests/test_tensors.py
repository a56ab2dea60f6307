"""The tensor plane: arrays and tensors cross processes as views of shared memory."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import anyio
import msgspec
import pytest

import atoll
from atoll.actors._runtime import current_plane
from atoll.tensors import _arena, _plane, _shm
from atoll.tensors._arena import segment_size
from atoll.tensors._lifting import Alone, AloneInArgs, Values
from atoll.transport import _messages as m
from atoll.transport._codec import Codec
from helpers import Echo, Holder, Mirror, host_process, kill_and_watch, pid_of

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

pytestmark = pytest.mark.anyio

MIB = 1 << 20


def _segments_of(prefix: str) -> list[str]:
    return [name for name in os.listdir(_shm.SHM_DIR) if name.startswith(prefix)]


# -- what arrives ---------------------------------------------------------------


async def test_parameters_and_gradients() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        back = await echo.echo(p)
        assert type(back) is torch.nn.Parameter and back.requires_grad
        assert back.grad is None  # gradients are not shared
        computed = (torch.ones(3, requires_grad=True) * 2).sum()
        assert (await echo.echo(computed)).requires_grad  # a non-leaf arrives as a leaf


# -- tensors as arguments and results, beside plain values --------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return type(b) is type(a) and (b.dtype, b.shape) == (a.dtype, a.shape) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and b.dtype == a.dtype and np.array_equal(a, b)
    if isinstance(a, tuple | list):
        return type(b) is type(a) and all(map(_same, a, b))
    return type(b) is type(a) and b == a


async def test_tensors_and_plain_arguments_keep_their_places_and_types() -> None:
    small = torch.tensor([1.5, 2.5], dtype=torch.float64)
    array = np.arange(1 << 15, dtype=np.int16)
    plain = [3, -(1 << 63), (1 << 64) - 1, 2.5, "x", "ü", b"ab", None, True]
    async with atoll.open_host() as host:
        mirror = await host.spawn(Mirror)
        big = atoll.share(torch.arange(1 << 18, dtype=torch.float32))
        back = await mirror.arguments(big, small, *plain, array, a=small, b=7, c=big[2:9])
        sent = [big, small, *plain, array, ("a", small), ("b", 7), ("c", big[2:9])]
        assert len(back) == len(sent) and all(map(_same, sent, back))
        for values in ([big, 1, small], [array, "y"]):
            assert _same(tuple(values), await mirror.tuple_of(*values))
            assert _same(values, await mirror.list_of(*values))
        assert _same(big, await mirror.one(big)) and _same(array, await mirror.one(array))


async def test_tensors_beside_scalars_travel_without_pickle() -> None:
    async with atoll.open_host() as host:
        codec, mark = host._node.codec, host._node.mark
        t = atoll.share(torch.ones(1 << 16))
        lifted, _ = codec.dumps_call((t, 1, "x"), {"k": t[2:]}, mark, "arguments", b"peer")
        nested, _ = codec.dumps_call(([t],), {}, mark, "arguments", b"peer")
        assert msgspec.msgpack.decode(lifted, type=Values | Alone | AloneInArgs).shape == 3
        assert nested[0] == 0  # a pickle with tensor descriptors beside it


async def test_a_tensor_alone_or_beside_scalars_travels_as_flat_fields() -> None:
    async with atoll.open_host() as host:
        codec, mark = host._node.codec, host._node.mark
        t = atoll.share(torch.ones(1 << 16))
        call, _ = codec.dumps_call((1, t, "x"), {}, mark, "arguments", b"peer")
        value, _ = codec.dumps_value(t.view(256, 256), mark, "result", b"peer")
        assert type(msgspec.msgpack.decode(call, type=Values | Alone | AloneInArgs)) is AloneInArgs
        assert type(msgspec.msgpack.decode(value, type=Values | Alone | AloneInArgs)) is Alone


def _alone_cases() -> list[Any]:
    shared = atoll.share(torch.arange(1 << 18, dtype=torch.float32))
    return [
        shared,
        shared[::3],
        shared[100:],
        shared[1:].view(torch.int16)[1:],  # starts 6 bytes into a float, off any 64-byte line
        shared.view(512, 512),
        shared.view(512, 512).t(),
        shared.view(64, 64, 64)[:, 1:, ::2],
        torch.arange(1 << 18, dtype=torch.float32),  # not shared: copied once
        *(torch.ones(1 << 17, dtype=d) for d in (torch.bool, torch.int8, torch.uint8)),
        *(torch.ones(1 << 16, dtype=d) for d in (torch.float16, torch.bfloat16, torch.int64)),
    ]


async def test_a_tensor_alone_arrives_in_every_layout_and_dtype() -> None:
    async with atoll.open_host() as host:
        mirror = await host.spawn(Mirror)
        for t in _alone_cases():
            key, back, text = await mirror.arguments(7, t, "x")
            assert (key, text) == (7, "x")
            assert (back.dtype, back.shape, back.stride()) == (t.dtype, t.shape, t.stride())
            assert torch.equal(back, t)
            again = await mirror.one(t)
            assert (again.dtype, again.stride()) == (t.dtype, t.stride())
            assert torch.equal(again, t)
        del t, back, again
        host._node.plane.drain()  # what came back is gone: the mirror lets go of it...
        await mirror.one(None)  # ...before this reply, which says so
        assert host._node.plane.stats()["leases"] == 0


async def test_an_object_passed_twice_arrives_as_one_object() -> None:
    async with atoll.open_host() as host:
        mirror = await host.spawn(Mirror)
        t = atoll.share(torch.ones(1 << 16))
        assert await mirror.firsts(t, 1, t, a=t) == [0, 1, 0, 0]
        assert await mirror.firsts(t, t.clone(), t.view(2, -1)) == [0, 1, 2]
        assert await mirror.storages(t, t[5:], t.view(torch.int32), t.clone()) == [0, 0, 0, 3]
        back = await mirror.tuple_of(t, t)
        assert back[0] is back[1]


async def test_values_beside_tensors_that_msgpack_cannot_carry_arrive_intact() -> None:
    # Tuples in lists, ints past 64 bits, lone surrogates, complex numbers, a
    # copy_on_send wrapper, numpy arrays of objects: the pickler takes these.
    t = torch.arange(6.0)
    odd = [(1, 2), [3, (4,)], {"k": (5,)}, 1 << 70, -(1 << 63) - 1, "\ud800", 1j]
    objects = np.array([{"a": 1}, None], dtype=object)
    async with atoll.open_host() as host:
        mirror = await host.spawn(Mirror)
        for value in odd:
            back = await mirror.arguments(t, value)
            assert _same([t, value], back), value
        back = await mirror.arguments(t, **{"\ud800": t})
        assert _same(("\ud800", t), back[1])
        back = await mirror.arguments(t, objects)
        assert back[1].tolist() == objects.tolist()
        shared = atoll.share(torch.zeros(1 << 16))
        copy = await mirror.one(atoll.copy_on_send(shared))
        copy[0] = 1.0
        assert float(shared[0]) == 0.0


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
async def test_sparse_and_nested_tensors_arrive_intact() -> None:
    sparse = torch.arange(6.0).view(2, 3).to_sparse()
    csr = torch.arange(6.0).view(2, 3).to_sparse_csr()
    parts = [torch.ones(2), torch.arange(3.0)]
    nested = [torch.nested.nested_tensor(parts, layout=layout) for layout in (None, torch.jagged)]
    async with atoll.open_host() as host:
        mirror = await host.spawn(Mirror)
        for t in (sparse, csr):
            for back in (await mirror.one(t), (await mirror.arguments(t, 1))[0]):
                assert back.layout == t.layout and torch.equal(back.to_dense(), t.to_dense())
        for t in nested:
            # There and back twice: what arrived is sent on again.
            for back in (await mirror.one(await mirror.one(t)), (await mirror.arguments(t, 1))[0]):
                assert type(back) is type(t) and back.is_nested
                assert all(map(torch.equal, back.unbind(), parts))
        # One torch cannot pickle: a clear error, not torch's own.
        with pytest.raises(atoll.SerializationError, match="cannot pickle the arguments"):
            await mirror.one(torch.ones(3).to_mkldnn())


async def test_empty_tensors_and_arrays_arrive_as_arguments() -> None:
    empties = [torch.ones(0), torch.ones(3, 0, dtype=torch.int64), np.ones((0, 4), np.float32)]
    async with atoll.open_host() as host:
        mirror = await host.spawn(Mirror)
        back = await mirror.arguments(*empties)
        assert all(map(_same, empties, back))
        assert [b.stride() for b in back[:2]] == [e.stride() for e in empties[:2]]
        assert back[2].strides == empties[2].strides


# -- sharing, writes, aliasing across processes ------------------------------


async def test_a_shared_tensor_is_not_copied_and_writes_are_shared() -> None:
    async with atoll.open_host() as host:
        holder = await host.spawn(Holder)
        t = atoll.share(torch.zeros(1 << 20))
        before = host._node.plane.stats()["segment_bytes"]
        await holder.fill(t[10:20], 5.0)
        assert float(t[10]) == 5.0 and float(t[9]) == 0.0
        a = atoll.share(np.zeros(1 << 20))
        await holder.fill(a, 2.0)
        assert a[123] == 2.0
        assert host._node.plane.stats()["segment_bytes"] == before + segment_size(8 * MIB)


async def test_views_of_one_storage_in_several_dtypes_arrive_sharing_it() -> None:
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        holder = await host.spawn(Holder)
        base = atoll.share(torch.arange(1 << 16, dtype=torch.float32))
        views = [base[8:40], base.view(torch.int32)[100:108], base.view(torch.uint8)[3:11], base]
        assert await holder.storages(views) == 1
        assert await holder.storages([v.clone() for v in views]) == 4
        for sent in (views, [v.clone() for v in views[:3]] + [base.clone()]):
            back = await echo.echo(sent)
            for v, w in zip(sent, back, strict=True):
                assert (w.dtype, w.shape, w.stride()) == (v.dtype, v.shape, v.stride())
                assert torch.equal(v, w)
            if sent is views:  # one storage sent, one storage back
                ptrs = {w.untyped_storage().data_ptr() for w in back}
                assert ptrs == {base.untyped_storage().data_ptr()}


async def test_views_in_dtypes_that_do_not_divide_their_storage_arrive_together() -> None:
    # 10 bytes (inline) and 128 KiB + 2 (shared memory), seen as bytes and as
    # float32 over the first 8: the region is not a whole number of floats.
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        for n in (10, (1 << 17) + 2):
            raw = torch.arange(n, dtype=torch.uint8)
            floats = raw[:8].view(torch.float32)
            for sent in ([floats, raw], [raw, floats]):
                back = await echo.echo(sent)
                for v, w in zip(sent, back, strict=True):
                    assert (w.dtype, w.shape) == (v.dtype, v.shape) and torch.equal(v, w)
                assert back[0].untyped_storage().data_ptr() == back[1].untyped_storage().data_ptr()


async def test_lazy_conjugates_negations_and_unaligned_tensors_arrive_intact() -> None:
    # Each is not plain memory as it stands: a conjugate view (a lazy bit), the
    # imaginary part of one (a lazy negation), a float32 at an odd address.
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        holder = await host.spawn(Holder)
        for n in (4, 1 << 15):  # inline, and shared memory
            ramp = torch.arange(n, dtype=torch.float32)
            z = torch.complex(ramp, -ramp)
            back = await echo.echo(z.conj())
            assert back.is_conj() and torch.equal(back, z.conj())
            imaginary = z.conj().imag
            assert imaginary.is_neg() and torch.equal(await echo.echo(imaginary), -z.imag)
            odd = torch.frombuffer(bytearray(4 * n + 1), dtype=torch.float32, offset=1, count=n)
            odd.copy_(ramp)
            assert torch.equal(await echo.echo(odd), ramp)
        shared = atoll.share(torch.zeros(1 << 15, dtype=torch.complex64))
        await holder.fill(shared.conj(), 1 + 2j)  # a view of this memory, conjugate there too
        assert complex(shared[7]) == 1 - 2j


async def test_arrays_made_by_separate_frombuffer_calls_on_one_buffer_stay_aliased() -> None:
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        for n in (10, 40_000):  # inline, and shared memory
            buf = bytearray(8 * n + 3)
            floats = np.frombuffer(buf, dtype=np.float64, offset=3, count=n)
            floats[:] = np.arange(n)
            raw = np.frombuffer(buf, dtype=np.uint8)
            back_floats, back_raw = await echo.echo((floats, raw))
            assert back_floats.tobytes() == floats.tobytes() and back_raw.tobytes() == bytes(buf)
            assert np.shares_memory(back_floats, back_raw)


async def test_a_whole_flat_tensor_sent_before_its_views_stays_apart_from_them() -> None:
    # The first tensor of a region that spans all of it is built in one step
    # (it is the region's root): the views after it must still be their own
    # tensors, aliased to it, with their own autograd flags.
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        flat = atoll.share(torch.arange(1 << 16, dtype=torch.float32))
        whole, part, again = await echo.echo([flat, flat[8:40], flat])
        assert whole is again and part is not whole
        assert (part.shape, part.storage_offset()) == ((32,), 8)
        part[0] = -1.0
        assert float(whole[8]) == -1.0 == float(flat[8])
        tracked = flat.detach().requires_grad_(True)
        whole, part = await echo.echo([tracked, flat[1:3]])
        assert whole.requires_grad and whole.is_leaf and not part.requires_grad
        assert part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


async def test_copy_on_send_keeps_the_senders_memory_private() -> None:
    async with atoll.open_host() as host:
        holder = await host.spawn(Holder)
        t = atoll.share(torch.zeros(1 << 20))
        await holder.fill(atoll.copy_on_send(t), 5.0)
        assert float(t.abs().sum()) == 0.0
        echo = await host.spawn(Echo)
        [back] = await echo.echo(atoll.copy_on_send([t]))
        back[0] = 1.0
        assert back.data_ptr() != t.data_ptr() and float(t[0]) == 0.0
        assert (await echo.echo(t)).data_ptr() == t.data_ptr()  # without it: shared


@pytest.mark.parametrize("threads", ["threads", "no-threads"])
def test_big_copies_split_among_threads_are_exact(
    threads: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Odd sizes, and a machine that will not start another thread.
    if threads == "no-threads":
        monkeypatch.setattr(_arena.threading.Thread, "start", _refuse_thread)
    monkeypatch.setattr(_arena, "_COPY_THREADS", 4)
    rng = np.random.default_rng(3)
    for nbytes in (1000, 8 * MIB - 1, 8 * MIB, 17 * MIB + 4097):
        src = rng.integers(0, 256, nbytes, dtype=np.uint8)
        dst = np.zeros(nbytes + 2, dtype=np.uint8)
        _arena.copy(dst.ctypes.data + 1, src.ctypes.data, nbytes)
        assert np.array_equal(dst[1:-1], src) and dst[0] == dst[-1] == 0


def _refuse_thread(self: Any) -> None:
    raise RuntimeError("can't start new thread")


def test_mappings_no_view_uses_are_kept_up_to_a_bound_most_recent_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_arena, "_IDLE_MAPPINGS", 2)
    sender, receiver = _plane.Plane(_shm.host_prefix()), _plane.Plane(_shm.host_prefix())
    send, recv = Codec({}, sender), Codec({}, receiver)
    try:
        tensors = [sender.share(torch.full((1 << 16,), float(i))) for i in range(4)]
        names = [sender.arena.find(t.data_ptr(), t.data_ptr() + 1).name for t in tensors]
        for i in (0, 1, 2, 0, 3):
            payload, frames = send.dumps_value(tensors[i], lambda x: x, "value", b"receiver")
            assert float(recv.loads(payload, frames, "value", b"a-sender")[0]) == i
            receiver.drain()  # the view is gone: its mapping is idle
        assert sorted(receiver.arena._mappings) == sorted([names[0], names[3]])
        assert receiver.arena._idle_bytes == receiver.stats()["mapped_bytes"]
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize(
    "shape", ["alone", "beside a scalar", "two in a tuple", "in a dict (pickled)"]
)
def test_a_payload_never_read_gives_its_leases_back(shape: str) -> None:
    sender, receiver = _plane.Plane(_shm.host_prefix()), _plane.Plane(_shm.host_prefix())
    back: list[Any] = []
    receiver.connect(b"receiver", lambda dest, frames: back.append(m.decode(frames[0])))
    send = Codec({}, sender)
    try:
        t = torch.ones(1 << 16)
        value = {
            "alone": t,
            "beside a scalar": (t, 1),
            "two in a tuple": (t, np.ones(1 << 14)),
            "in a dict (pickled)": {"t": t},
        }[shape]
        payload, _ = send.dumps_value(value, lambda x: x, "value", b"receiver")
        assert sender.stats()["leases"] >= 1
        Codec({}, receiver).discard(payload, b"a-sender")  # its call was dropped, say
        receiver.drain()
        for unlease in back:
            sender.unlease(b"receiver", unlease.leases)
        assert sender.stats()["leases"] == 0
    finally:
        sender.close()
        receiver.close()


async def test_a_call_given_up_while_it_waits_its_turn_gives_its_leases_back() -> None:
    async with atoll.open_host() as host:
        holder = await host.spawn(Holder)
        plane = host._node.plane
        parked, queued = anyio.CancelScope(), anyio.CancelScope()

        async def park() -> None:
            with parked:
                await holder.park()

        async def keep() -> None:
            with queued:
                await holder.keep("t", torch.ones(MIB))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(park)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(keep)  # one call at a time: it waits behind park()
                await anyio.wait_all_tasks_blocked()
                assert plane.stats()["leases"] == 1
                queued.cancel()
                # trio wakes cancelled tasks in random order: let keep() send its
                # Cancel before park() ends, or keep() may start first and run.
                await anyio.wait_all_tasks_blocked()
                parked.cancel()
            assert "t" not in await holder.keys()  # its releases come before this reply
        assert plane.stats()["leases"] == 0


async def test_stream_items_never_read_give_their_leases_back() -> None:
    async with atoll.open_host() as host:
        holder = await host.spawn(Holder)
        with anyio.fail_after(10):
            stream = holder.yield_tensors(100, MIB // 4)
            async for first in stream:
                assert float(first[0]) == 0.0
                break
            await stream.aclose()  # items that came meanwhile are dropped
            del first
            await holder.pid()  # what it sent before this reply has arrived
            stats = await holder.plane_stats()  # and our releases went before this call
        assert stats["leases"] == 0


async def test_a_fresh_tensor_is_copied_into_a_reused_segment() -> None:
    async with atoll.open_host() as host:
        holder = await host.spawn(Holder)
        t = torch.ones(1 << 20)
        for _ in range(5):
            assert await holder.first(t) == 1.0
        stats = host._node.plane.stats()
        assert stats["segments"] == 1 and stats["leases"] == 0
        await holder.fill(t, 5.0)  # writes into the copy, not into the caller's own
        assert float(t.max()) == 1.0


async def test_return_to_sender_is_the_same_memory() -> None:
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        t = atoll.share(torch.arange(1 << 20))
        back = await echo.echo(t)
        assert back.data_ptr() == t.data_ptr()
        back[0] = -1
        assert int(t[0]) == -1


async def test_a_received_tensor_forwarded_to_a_third_process_is_the_same_memory() -> None:
    async with atoll.open_host() as host:
        a = await host.spawn(Holder)
        b = await host.spawn(Holder)
        t = atoll.share(torch.zeros(1 << 20))
        await a.forward_fill(b, t, 7.0)
        assert float(t.min()) == 7.0
        # Every lease along the way is given back.
        assert (await a.plane_stats())["leases"] == 0
        assert host._node.plane.stats()["leases"] == 0


async def test_a_tensor_made_by_an_actor_outlives_the_actor() -> None:
    async with atoll.open_host() as host:
        holder = await host.spawn(Holder, name="maker")
        pid = pid_of(host, "maker")
        t = await holder.make(1 << 20, 3.0)
        assert _segments_of(_shm.owner_prefix(host._shm_prefix, pid))
        await host.stop(holder)
        # Its segment is unlinked with it; the mapping here stays valid.
        assert not _segments_of(_shm.owner_prefix(host._shm_prefix, pid))
        assert float(t.sum()) == 3.0 * (1 << 20)
        assert host._node.plane.stats()["mappings"] == 1
        del t  # the last view: now nothing of it is mapped here either
        host._node.plane.drain()
        assert host._node.plane.stats()["mappings"] == 0


async def test_an_actor_that_mapped_our_memory_and_exited_unlinks_nothing() -> None:
    async with atoll.open_host() as host:
        t = atoll.share(torch.ones(1 << 20))
        [name] = _segments_of(host._shm_prefix)
        first = await host.spawn(Holder)
        assert await first.first(t) == 1.0
        await host.stop(first)  # a clean exit of a process that attached
        assert _segments_of(host._shm_prefix) == [name]
        second = await host.spawn(Holder)
        assert await second.first(t) == 1.0


async def test_streams_yield_tensors() -> None:
    async with atoll.open_host() as host:
        holder = await host.spawn(Holder)
        got = [t async for t in holder.yield_tensors(20, 1 << 17)]
        assert [float(t[-1]) for t in got] == [float(i) for i in range(20)]


async def test_big_buffers_come_back_through_shared_memory() -> None:
    data = bytes(range(256)) * 8192
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        back = await echo.echo([data, bytearray(data), memoryview(data)])
        assert [type(x) for x in back] == [bytes, bytearray, memoryview]
        assert all(bytes(x) == data for x in back)
        assert host._node.plane.stats()["segments"] >= 1


# -- leases --------------------------------------------------------------------


async def test_a_shared_tensor_dropped_here_frees_its_segment() -> None:
    # Views of this process's own segments (share(), a tensor sent back to us)
    # hold the segment; dropping the last one puts it back in the free pool.
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        plane = host._node.plane
        t = atoll.share(torch.ones(MIB // 4))
        back = await echo.echo(t)
        assert back.data_ptr() == t.data_ptr()
        assert plane.stats()["free_bytes"] == 0
        del t, back
        plane.drain()  # our views are gone: the echo's lease on it goes back to it...
        await echo.pid()  # ...which lets go of its view before this reply, and says so in it
        assert plane.stats()["free_bytes"] == segment_size(MIB)


def _keep(holder: Any, key: Any, fill: float, alone: bool) -> Any:
    """Have ``holder`` keep a fresh 4 MiB tensor of ``fill``: alone (with
    scalars) or in a tuple, which travel in different ways."""
    t = torch.full((1 << 20,), fill)
    return holder.keep(key, t, fill) if alone else holder.keep(key, (t, fill))


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "in-a-tuple"])
async def test_memory_is_reused_only_after_its_lease_is_released(alone: bool) -> None:
    async with atoll.open_host() as host:
        holder = await host.spawn(Holder)
        plane = host._node.plane
        await _keep(holder, "a", 1.0, alone)
        assert plane.stats()["leases"] == 1
        await _keep(holder, "b", 2.0, alone)
        assert plane.stats()["segments"] == 2  # the first is still leased
        assert await holder.damaged() == []
        await holder.drop("a")
        await holder.drop("b")
        assert plane.stats()["leases"] == 0
        await _keep(holder, "c", 3.0, alone)
        assert plane.stats()["segments"] == 2  # reused, not a third
        assert await holder.damaged() == []


async def test_leases_of_a_dead_actor_are_released() -> None:
    async with atoll.open_host() as host:
        holder = await host.spawn(Holder, name="victim")
        await holder.keep("a", (torch.ones(1 << 20), 1.0))
        assert host._node.plane.stats()["leases"] == 1
        os.kill(pid_of(host, "victim"), signal.SIGKILL)
        with anyio.fail_after(10), pytest.raises(atoll.ActorDiedError):
            await holder.damaged()
        stats = host._node.plane.stats()
        assert stats["leases"] == 0 and stats["free_bytes"] == stats["segment_bytes"]


async def test_an_actor_killed_while_holding_its_own_and_borrowed_memory() -> None:
    async with atoll.open_host() as host:
        holder = await host.spawn(Holder, name="victim")
        pid = pid_of(host, "victim")
        t = await holder.make(1 << 20, 4.0)  # its memory, lent to us
        await holder.keep("x", (torch.ones(1 << 20), 1.0))  # ours, lent to it
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(10), pytest.raises(atoll.ActorDiedError):
            await holder.damaged()
        assert not _segments_of(_shm.owner_prefix(host._shm_prefix, pid))
        assert float(t[0]) == 4.0


async def test_lease_stress_random_order_keeps_memory_bounded_and_values_intact() -> None:
    import random

    rng = random.Random(7)
    async with atoll.open_host() as host:
        plane = host._node.plane
        plane.arena.pool_bytes = 16 * MIB
        holders = [await host.spawn(Holder) for _ in range(2)]
        live: dict[int, tuple[Any, int]] = {}
        for step in range(300):
            if live and (len(live) > 12 or rng.random() < 0.45):
                key = rng.choice(list(live))
                who, _ = live.pop(key)
                await who.drop(key)
            else:
                nbytes = rng.choice([300_000, 1_000_000, 3_000_000])
                who = rng.choice(holders)
                value = float(step)
                t = torch.full((nbytes // 4,), value)
                # Alone with scalars, or in a tuple: they travel in different ways.
                await (who.keep(step, t, value) if step % 2 else who.keep(step, (t, value)))
                live[step] = (who, nbytes)
            if step % 10 == 0:
                for who in holders:
                    assert await who.damaged() == []
            stats = plane.stats()
            leased = sum(segment_size(n) for _, n in live.values())
            assert stats["leases"] == len(live)
            assert stats["segment_bytes"] - stats["free_bytes"] == leased
            assert stats["free_bytes"] <= 16 * MIB
        for key, (who, _) in list(live.items()):
            await who.drop(key)
        assert plane.stats()["leases"] == 0


# -- settings, missing torch, errors ----------------------------------------


async def test_inline_transfer_uses_no_shared_memory() -> None:
    async with atoll.open_host(transfer="inline") as host:
        echo = await host.spawn(Echo)
        t = torch.arange(1 << 20)
        assert torch.equal(await echo.echo(t), t)
        assert host._node.plane.stats()["segments"] == 0
        assert not _segments_of(host._shm_prefix)


async def test_an_unknown_transfer_is_an_error() -> None:
    with pytest.raises(ValueError, match="'shared_memory', 'inline'"):
        async with atoll.open_host(transfer="shared-memory"):
            pass


async def test_without_torch_arrays_work_and_tensors_fail_clearly() -> None:
    async with atoll.open_host() as host:
        holder = await host.spawn(Holder)
        await holder.forget_torch()
        assert await holder.first(np.arange(1, 1 << 20)) == 1.0
        with pytest.raises(atoll.SerializationError, match="torch cannot be imported"):
            await holder.first(torch.ones(3))
        assert await holder.first(np.ones(3)) == 1.0  # still serving


async def test_share_takes_arrays_and_tensors_only() -> None:
    with pytest.raises(RuntimeError, match="inside open_host"):
        atoll.share(torch.ones(3))
    async with atoll.open_host():
        with pytest.raises(TypeError, match="numpy array or a CPU torch tensor"):
            atoll.share([1, 2, 3])
        t = torch.ones(3)
        assert atoll.share(t) is t and atoll.share(t) is t


async def test_a_full_dev_shm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        monkeypatch.setattr(os, "posix_fallocate", full)
        with pytest.raises(atoll.SharedMemoryError, match="transfer='inline'"):
            await echo.echo(torch.ones(1 << 20))
        monkeypatch.undo()
        assert float((await echo.echo(torch.ones(1 << 20)))[0]) == 1.0


async def test_the_plane_of_the_current_process() -> None:
    async with atoll.open_host() as host:
        assert current_plane("x") is host._node.plane


# -- clean-up after crashes --------------------------------------------------


def test_segments_of_dead_hosts_are_swept() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"atoll-{dead.pid}-abcdef-{dead.pid}-1"
    with open(os.path.join(_shm.SHM_DIR, name), "wb") as f:
        f.write(b"x")
    _shm.sweep_dead_hosts()
    assert not os.path.exists(os.path.join(_shm.SHM_DIR, name))


HOST_SCRIPT = textwrap.dedent(
    """
    import sys, anyio, atoll, torch
    sys.path.insert(0, sys.argv[1])
    from helpers import Holder

    async def main():
        async with atoll.open_host() as host:
            h = await host.spawn(Holder)
            mine = await h.make(1 << 20, 1.0)
            await h.keep("x", (atoll.share(torch.ones(1 << 20)), 1.0))
            print(host._shm_prefix, await h.pid(), flush=True)
            await anyio.sleep_forever()

    anyio.run(main, backend=sys.argv[2])
    """
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_nothing_is_left_in_dev_shm_when_the_host_is_killed(backend: str) -> None:
    with host_process(HOST_SCRIPT, backend) as host:
        assert host.stdout is not None
        prefix, child = host.stdout.readline().split()
        assert len(_segments_of(prefix)) == 2  # one each side
        assert kill_and_watch(host, int(child), 5.0), "the actor outlived its host"
        assert _segments_of(prefix) == []
