"""Every message is bound to its sender.

Call ids are sequential and object ids small, so a peer can guess them: here
a forger, a peer the hub admitted (it proved a secret, as an untrusted actor
does), writes its own frames. It answers, ends and fails calls that went to
another actor, announces a live actor's death, stops an actor, calls and
gives back callbacks handed to someone else, and sends 100,000 malformed and
mis-addressed messages of every type while legitimate calls run. None of it
takes effect: each is dropped and counted, and every legitimate call gets its
own answer.
"""

from __future__ import annotations

import itertools
import os
import pickle
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread
import pytest
import zmq

import atoll
from atoll.actors._errors_wire import pack_error
from atoll.transport import _messages as m
from atoll.transport._codec import Codec
from atoll.transport._hub import HOST
from helpers import Answerer, Bomb, Echo

pytestmark = pytest.mark.anyio

SECRET = b"the forger's secret"


class Forger:
    """A peer admitted to the hub, untrusted, that writes its own frames."""

    def __init__(self, host: atoll.Host, identity: bytes = b"u-forger") -> None:
        self.host = host
        self.identity = identity
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Forger:
        self._ctx = zmq.Context()
        sock = self.sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.SNDTIMEO, 30_000)  # a host that stops reading fails the test
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 16)  # what it sends is read soon after
        sock.setsockopt(zmq.SNDBUF, 16384)
        admitted = anyio.Event()
        self.host._hub.expect(self.identity, SECRET, lambda hello: admitted.set())
        sock.connect(self.host.endpoint)
        self.send(HOST, m.Hello(SECRET, os.getpid(), m.WIRE_VERSION))
        await admitted.wait()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.host._hub.forget(self.identity)
        self.sock.close(linger=0)
        self._ctx.term()

    def send(self, dest: bytes, msg: m.Message, *frames: bytes) -> None:
        self.sock.send_multipart([dest, m.encode(msg), *frames])

    async def answer(self, msg: m.Call, dest: bytes = HOST) -> m.Result | m.Error:
        """Send ``msg`` and return its answer (everything else that came is
        dropped). The host reads one peer's messages in order: when it
        answers, it has handled every message sent before."""
        self.send(dest, msg)
        while True:
            if await anyio.to_thread.run_sync(self.sock.poll, 500):
                frames = self.sock.recv_multipart()
                try:
                    reply = m.decode(frames[1])
                except m.DecodeError:
                    continue
                if type(reply) in (m.Result, m.Error) and reply.call_id == msg.call_id:  # type: ignore[union-attr]
                    return reply  # type: ignore[return-value]

    async def barrier(self) -> None:
        """Return once the host has handled every message sent before."""
        call_id = 1 << 50 | next(self._ids)
        reply = await self.answer(m.Call(call_id, 0, call_id, 999_999, "nothing", b""))
        assert type(reply) is m.Error


def _plain(value: Any) -> bytes:
    payload, frames = Codec(plain_only=True).dumps_value(value, lambda v: v, "value", HOST)
    assert not frames
    return payload


PLAIN_ERROR = pack_error(ValueError("forged"), "forger", plain=True)


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "ran"
    yield str(path)
    assert not path.exists(), "a pickle from an untrusted peer was unpickled"


async def test_only_the_peer_a_call_went_to_answers_it() -> None:
    async with atoll.open_host() as host, Forger(host) as forger:
        relay = await host.spawn(Answerer)
        ready = anyio.Event()

        async def wait_ready() -> None:
            await ready.wait()

        answers: list[Any] = []

        async def call() -> None:
            answers.append(await relay.when(wait_ready, "right"))

        async def stream() -> None:
            answers.append([i async for i in relay.count_when(wait_ready, 3)])

        before = dict(host.dropped)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                tg.start_soon(stream)
                await anyio.wait_all_tasks_blocked()
                pending = list(host._node._pending)
                assert len(pending) == 2
                for call_id in pending:
                    forger.send(HOST, m.Result(call_id, _plain("forged")))
                    forger.send(HOST, m.Error(call_id, PLAIN_ERROR))
                    forger.send(HOST, m.StreamItem(call_id, _plain(-1)))
                    forger.send(HOST, m.StreamEnd(call_id))
                forger.send(HOST, m.Died(relay._id, PLAIN_ERROR))  # to the host
                forger.send(relay._id, m.Died(HOST, PLAIN_ERROR))  # to the actor
                forger.send(relay._id, m.Bye())  # only the host stops an actor
                await forger.barrier()
                await forger.answer(m.Call(7, 0, 7, 999_999, "nothing", b""), relay._id)
                ready.set()
            assert sorted(answers, key=str) == [[0, 1, 2], "right"]
            dropped = host.dropped
            assert dropped.get("misaddressed", 0) - before.get("misaddressed", 0) == 8
            assert dropped.get("unentitled", 0) - before.get("unentitled", 0) == 1
            assert await relay.when(wait_ready, "still here") == "still here"


async def test_an_untrusted_peer_uses_only_callbacks_handed_to_it() -> None:
    async with atoll.open_host() as host, Forger(host) as forger:
        holder = await host.spawn(Answerer, trusted=False)

        async def hello() -> str:
            return "hello"

        with anyio.fail_after(20):
            await holder.keep(hello)
            [oid] = [oid for oid, e in host._node._exports.items() if e.obj is hello]
            args = _plain(((), {}))
            reply = await forger.answer(m.Call(1, 0, 1, oid, "__call__", args))
            assert type(reply) is m.Error
            assert b"was not handed to you" in reply.payload
            forger.send(HOST, m.Release(oid, 1 << 20))  # all the weight the holder has
            forger.send(HOST, m.Release(oid, 1 << 40))
            await forger.barrier()
            assert host.dropped["unentitled"] == 3  # the call and both releases
            assert await holder.call_kept() == "hello"  # its holder still calls it
            assert oid in host._node._exports


def _fuzz(
    rng: random.Random, dests: list[bytes], hot: Callable[[], list[int]], bomb: bytes
) -> Iterator[list[bytes]]:
    """Messages of every type, well formed and not, to each destination;
    half their ids from ``hot()``, calls of the host's waiting for answers."""
    ints = [0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, *range(1, 64)]
    pending = [1]

    def an_int() -> int:
        r = rng.random()
        if r < 0.5:
            return rng.choice(pending)
        return rng.choice(ints) if r < 0.85 else rng.randrange(-(2**40), 2**40)

    def payload() -> bytes:
        r = rng.random()
        if r < 0.3:
            return _plain(rng.choice([None, 1, "x", [1, 2], {"k": b"v"}]))
        if r < 0.45:
            return bomb
        if r < 0.55:
            return PLAIN_ERROR
        return rng.randbytes(rng.randrange(0, 40))

    makers = [
        lambda: m.Hello(rng.randbytes(8), an_int(), an_int()),
        lambda: m.Call(
            an_int(),
            an_int(),
            an_int(),
            rng.choice([0, 1, 2, 16, 17, 99]),
            rng.choice(["echo", "__call__", "nothing", "", "__init__"]),
            payload(),
            rng.choice([0, 0, 1, 16]),
        ),
        lambda: m.Result(an_int(), payload(), tuple(an_int() for _ in range(rng.randrange(3)))),
        lambda: m.Error(an_int(), payload()),
        lambda: m.Cancel(an_int()),
        lambda: m.StreamItem(an_int(), payload()),
        lambda: m.StreamEnd(an_int()),
        lambda: m.Credit(an_int(), an_int()),
        lambda: m.Release(an_int(), an_int()),
        lambda: m.Unlease(tuple(an_int() for _ in range(rng.randrange(4)))),
        lambda: m.Died(rng.choice(dests), payload()),
        lambda: m.Bye(rng.random() * 5),
    ]
    for n in itertools.count():
        if n % 20 == 0:
            pending = hot() or pending
        dest = rng.choice(dests)
        header = m.encode(rng.choice(makers)())
        r = rng.random()
        if r < 0.15:  # mutated: bytes flipped, cut short, or grown
            b = bytearray(header)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            header = bytes(b[: rng.randrange(1, len(b) + 1)]) + rng.randbytes(rng.randrange(3))
        elif r < 0.2:
            header = rng.randbytes(rng.randrange(0, 30))
        extra = [rng.randbytes(rng.randrange(0, 64))] if rng.random() < 0.1 else []
        if rng.random() < 0.02:
            yield [dest]  # no header at all
        else:
            yield [dest, header, *extra]


async def test_a_flood_of_forged_and_malformed_messages_changes_no_answer(marker: str) -> None:
    count = 100_000
    async with atoll.open_host() as host, Forger(host) as forger:
        echo = await host.spawn(Echo)
        other = await host.spawn(Echo, trusted=False)
        bomb = pickle.dumps(Bomb(marker))

        def hot() -> list[int]:  # read from the flood's thread: retried if it changed meanwhile
            while True:
                try:
                    return list(host._node._pending)
                except RuntimeError:
                    pass

        dests = [HOST, echo._id, other._id, forger.identity, b"a-nobody"]
        messages = _fuzz(random.Random(20261203), dests, hot, bomb)
        sent = 0

        def flood() -> None:
            nonlocal sent
            for frames in itertools.islice(messages, count):
                forger.sock.send_multipart(frames)  # never reads what comes back
                sent += 1

        answered = 0
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                done = anyio.Event()

                async def flood_then_stop() -> None:
                    await anyio.to_thread.run_sync(flood)
                    done.set()

                async def calls(k: int) -> None:
                    nonlocal answered
                    for i in itertools.count():
                        if done.is_set() and i >= 20:
                            return
                        assert await echo.echo(("call", k, i)) == ("call", k, i)
                        assert await other.echo([k, i, b"x"]) == [k, i, b"x"]
                        answered += 1

                tg.start_soon(flood_then_stop)
                for k in range(8):  # several calls pending at once, to be forged answers to
                    tg.start_soon(calls, k)
            assert sent == count
            await forger.barrier()
            # Both actors and the host still answer, and the host counted what it dropped.
            assert await echo.echo("after") == "after"
            assert await other.echo("after") == "after"
            assert sum(host.dropped.values()) > count // 10
