"""Untrusted actors (``spawn(trusted=False)``): nothing they send is ever
unpickled, by the host or by another actor, and they still do their work.

Each attack is a pickle whose unpickling would create a marker file; the
actor sends it as a hostile one could (its codec told to pickle after all).
The marker must never appear, the caller gets a ProtocolError for that
message alone, and the next call works.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch

import atoll
from helpers import Echo, Hostile, Point3

pytestmark = pytest.mark.anyio


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "ran"
    yield str(path)
    assert not path.exists(), "a pickle from an untrusted actor was unpickled"


async def _still_works(hostile: Any) -> None:
    assert await hostile.echo((1, "x")) == (1, "x")


@pytest.mark.parametrize(
    ("method", "says"),
    [("bomb_result", "not a plain payload"), ("bomb_error", "error .* is not plain")],
)
async def test_a_pickled_result_or_exception_is_refused_unread(
    marker: str, method: str, says: str
) -> None:
    async with atoll.open_host() as host:
        hostile = await host.spawn(Hostile, trusted=False)
        with anyio.fail_after(10):
            with pytest.raises(atoll.ProtocolError, match=says):
                await getattr(hostile, method)(marker)
            await _still_works(hostile)


async def test_a_pickled_stream_item_is_refused_unread(marker: str) -> None:
    async with atoll.open_host() as host:
        hostile = await host.spawn(Hostile, trusted=False)
        with anyio.fail_after(10):
            with pytest.raises(atoll.ProtocolError):
                async for _ in hostile.bomb_stream(marker):
                    pass
            await _still_works(hostile)


async def test_a_pickled_event_is_refused_unread(marker: str) -> None:
    async with atoll.open_host() as host:
        hostile = await host.spawn(Hostile, trusted=False)
        events = host.subscribe("news")
        with anyio.fail_after(10):
            with pytest.raises(atoll.ProtocolError):  # its answer, pickled too
                await hostile.bomb_event(marker, "news")
            await hostile.publish("news", "plain news")  # sent after the bomb
            async for event in events:
                assert event == "plain news"  # the bomb never arrived
                break
        events.close()


async def test_a_pickled_callback_argument_is_refused_unread(marker: str) -> None:
    called: list[Any] = []

    async def callback(value: Any) -> None:
        called.append(value)

    async with atoll.open_host() as host:
        hostile = await host.spawn(Hostile, trusted=False)
        with anyio.fail_after(10):
            # The host refuses the call (a ProtocolError the actor gets), and
            # then the actor's answer, pickled too.
            with pytest.raises(atoll.ProtocolError):
                await hostile.bomb_callback(marker, callback)
            await _still_works(hostile)
    assert called == []


async def test_a_pickled_call_to_another_actor_is_refused_unread(marker: str) -> None:
    async with atoll.open_host() as host:
        hostile = await host.spawn(Hostile, trusted=False)
        echo = await host.spawn(Echo)
        with anyio.fail_after(10):
            with pytest.raises(atoll.ProtocolError):
                await hostile.bomb_peer(marker, echo)
            assert await echo.echo("still here") == "still here"
            await _still_works(hostile)


async def test_what_the_plain_wire_cannot_carry_fails_in_the_actor_naming_the_type() -> None:
    async with atoll.open_host() as host:
        hostile = await host.spawn(Hostile, trusted=False)
        with anyio.fail_after(10):
            with pytest.raises(atoll.SerializationError, match=r"builtins\.object.*wire_type"):
                await hostile.unregistered()
            await _still_works(hostile)


async def test_an_untrusted_actor_still_does_its_work() -> None:
    async with atoll.open_host() as host:
        hostile = await host.spawn(Hostile, trusted=False)
        echo = await host.spawn(Echo)
        events = host.subscribe("work")
        with anyio.fail_after(20):
            values = (
                None, True, -(2**70), 1.5, 2 - 3j, "s", b"b", bytearray(b"ba"),
                [1, (2, 3)], {"k": {1, 2}}, {(1, 2): frozenset({3})},
            )  # fmt: skip
            assert await hostile.echo(values) == values
            # Tensors and arrays: zero-copy both ways, as for a trusted actor.
            t = atoll.share(torch.arange(1 << 16, dtype=torch.float32))
            back = await hostile.echo(t)
            assert back.data_ptr() == t.data_ptr()
            assert torch.equal(await hostile.double(t), t * 2)
            a = np.arange(12).reshape(3, 4)
            assert np.array_equal(await hostile.echo(a), a)
            # A registered wire type, refs, services and events.
            assert await hostile.point(Point3(1, 2, 3)) == Point3(2, 3, 4)
            assert await hostile.ask(echo, "via a peer") == "via a peer"
            await hostile.publish("work", {"done": 1})
            async for event in events:
                assert event == {"done": 1}
                break
            # Builtin exceptions keep their type and arguments.
            with pytest.raises(ValueError) as raised:
                await hostile.fail()
            assert raised.value.args == ("plain", 7)
        events.close()


async def test_an_untrusted_actors_identity_says_so() -> None:
    async with atoll.open_host() as host:
        trusted = await host.spawn(Echo)
        untrusted = await host.spawn(Echo, trusted=False)
        assert trusted._id[:1] != b"u"
        assert untrusted._id[:1] == b"u"
        with anyio.fail_after(10):
            assert await untrusted.pid() != os.getpid()
