"""The AnyIO ZeroMQ socket, the codec, and the hub's defences."""

from __future__ import annotations

import pickle
from typing import Any
from unittest import mock

import anyio
import pytest
import zmq

import atoll
from atoll import SerializationError
from atoll.transport import AsyncSocket, Codec
from atoll.transport._codec import OOB_THRESHOLD, prepare
from helpers import Counter

pytestmark = pytest.mark.anyio


@pytest.fixture
def pair() -> object:
    ctx = zmq.Context()
    a = ctx.socket(zmq.DEALER)
    b = ctx.socket(zmq.DEALER)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    sa, sb = AsyncSocket(a), AsyncSocket(b)
    yield sa, sb
    sa.close()
    sb.close()
    ctx.term()


async def test_messages_flow_both_ways_without_loss(pair: tuple[AsyncSocket, AsyncSocket]) -> None:
    """Sends from other tasks consume the descriptor's edge; nothing may be lost."""
    a, b = pair
    n = 2000
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    done = anyio.Event()

    def on_a(frames: list[zmq.Frame]) -> None:
        got_a.append(frames[0].bytes)
        if len(got_a) == n and len(got_b) == n:
            done.set()

    def on_b(frames: list[zmq.Frame]) -> None:
        got_b.append(frames[0].bytes)
        a_reply = frames[0].bytes  # echo back to a while a is sending too
        b.send([a_reply])
        if len(got_a) == n and len(got_b) == n:
            done.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.serve, on_a)
            tg.start_soon(b.serve, on_b)

            async def sender() -> None:
                for i in range(n):
                    a.send([b"%d" % i])
                    if i % 50 == 0:
                        await anyio.lowlevel.checkpoint()

            tg.start_soon(sender)
            await done.wait()
            tg.cancel_scope.cancel()
    assert got_b == [b"%d" % i for i in range(n)]
    assert got_a == got_b


async def test_second_owner_is_refused(pair: tuple[AsyncSocket, AsyncSocket]) -> None:
    a, _ = pair
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.serve, lambda frames: None)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="owner"):
            await a.serve(lambda frames: None)
        tg.cancel_scope.cancel()


async def test_close_wakes_the_owner() -> None:
    ctx = zmq.Context()
    s = AsyncSocket(ctx.socket(zmq.DEALER))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(s.serve, lambda frames: None)
            await anyio.wait_all_tasks_blocked()
            s.close()
    ctx.term()


async def test_send_before_peer_connects_is_kept_until_it_does() -> None:
    ctx = zmq.Context()
    a = AsyncSocket(ctx.socket(zmq.DEALER))
    a.send([b"early"])  # no peer yet: goes to the backlog
    raw = ctx.socket(zmq.DEALER)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    a.zmq_socket.connect(f"tcp://127.0.0.1:{port}")
    b = AsyncSocket(raw)
    got = anyio.Event()
    seen: list[bytes] = []

    def on_b(frames: list[zmq.Frame]) -> None:
        seen.append(frames[0].bytes)
        got.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.serve, lambda frames: None)
            tg.start_soon(b.serve, on_b)
            await got.wait()
            tg.cancel_scope.cancel()
    assert seen == [b"early"]
    a.close()
    b.close()
    ctx.term()


def test_codec_sends_large_buffers_out_of_band() -> None:
    codec = Codec()
    big = b"x" * OOB_THRESHOLD
    data, buffers = codec.dumps(prepare([big, bytearray(big), memoryview(big)]))
    assert len(buffers) == 3
    assert len(data) < 200
    assert codec.loads(data, buffers) == [big, bytearray(big), big]
    small, none = codec.dumps(prepare(b"y" * 10))
    assert none == [] and codec.loads(small, []) == b"y" * 10


def test_codec_hooks_still_see_what_the_plain_fast_path_leaves() -> None:
    seen: list[Any] = []

    def reducer(obj: Any) -> Any:
        seen.append(obj)
        return NotImplemented

    codec = Codec({memoryview: reducer})
    plain = ((1, "a", [2.5, None]), {"k": b"z" * 10, "j": (True,)})
    data, buffers = codec.dumps(plain)
    assert buffers == [] and seen == [] and codec.loads(data, []) == plain
    # Deep, long, or keyed by a tuple: the hook sees the memoryview at the
    # bottom, as it would without the fast path.
    view = memoryview(b"v")
    for value in ([[[[view]]]], [*range(100), view], {(1, 2): view}):
        seen.clear()
        data, buffers = codec.dumps(value)
        assert any(obj is view for obj in seen), value
        assert codec.loads(data, buffers) == value
    data, buffers = codec.dumps(prepare(b"b" * OOB_THRESHOLD))
    assert len(buffers) == 1


def test_codec_refuses_a_payload_it_did_not_make() -> None:
    with pytest.raises(SerializationError, match="not a payload atoll makes"):
        Codec().loads(b"\x05garbage", [], "result")


def test_codec_uses_cloudpickle_only_when_needed() -> None:
    codec = Codec()
    plain, _ = codec.dumps({"a": 1})
    assert b"cloudpickle" not in plain
    fn = lambda x: x + 1  # noqa: E731
    data, _ = codec.dumps(fn)
    assert codec.loads(data, [])(1) == 2
    assert pickle.loads(plain) == {"a": 1}


def test_codec_pickles_a_class_defined_in_main_once() -> None:
    from atoll.transport import _by_value

    point = type("Point", (), {"__module__": "__main__", "__init__": _set_xy})
    codec = Codec()
    with mock.patch.object(_by_value, "dumps", wraps=_by_value.dumps) as dumps:
        payloads = [codec.dumps([point(i, -i), point(0, 0)])[0] for i in range(3)]
    assert dumps.call_count == 1  # the class, once; the instances by plain pickle
    assert codec._cloud_pickler_cls is None
    for i, payload in enumerate(payloads):
        p, q = codec.loads(payload, [])
        assert type(p) is type(q) is point and (p.x, p.y) == (i, -i)


def _set_xy(self: Any, x: int, y: int) -> None:
    self.x, self.y = x, y


def test_codec_reports_what_it_cannot_pickle() -> None:
    import threading

    with pytest.raises(atoll.SerializationError, match="cannot pickle the thing"):
        Codec().dumps(threading.Lock(), "thing")


async def test_hub_drops_unknown_and_malformed_frames() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter)
        ctx = zmq.Context()
        intruder = ctx.socket(zmq.DEALER)
        intruder.setsockopt(zmq.IDENTITY, b"intruder")
        intruder.connect(host.endpoint)
        intruder.send_multipart([b"@", b"not msgpack at all"])
        intruder.send_multipart([b"only-one-frame"])
        stranger = ctx.socket(zmq.DEALER)
        stranger.setsockopt(zmq.IDENTITY, b"a99")
        stranger.connect(host.endpoint)
        stranger.send_multipart([b"@", b"\x00garbage"])
        with anyio.fail_after(10):
            while sum(host.dropped.values()) < 3:
                assert await counter.add(1) > 0  # the host keeps serving meanwhile
        intruder.close(linger=0)
        stranger.close(linger=0)
        ctx.term()
        assert await counter.get() >= 1


async def test_peer_with_wrong_secret_is_not_trusted() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter)
        ctx = zmq.Context()
        impostor = ctx.socket(zmq.DEALER)
        impostor.setsockopt(zmq.IDENTITY, b"a7")
        hub = host._hub
        hub.expect(b"a7", b"right secret", lambda hello: None)
        impostor.connect(host.endpoint)
        from atoll.transport import _messages as m

        impostor.send_multipart([b"@", m.encode(m.Hello(b"wrong secret", 1, m.WIRE_VERSION))])
        impostor.send_multipart([b"a1", m.encode(m.Call(1, 0, 1, 0, "add", b""))])
        with anyio.fail_after(10):
            while host.dropped.get("unproved", 0) < 2:
                assert await counter.add(1) > 0
        assert not hub.is_routable(b"a7")
        hub.forget(b"a7")
        impostor.close(linger=0)
        ctx.term()
