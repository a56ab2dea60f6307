"""Remote exceptions keep their type, traceback text and the actor's name."""

from __future__ import annotations

import pytest

import atoll
from helpers import Broken, LocalError

pytestmark = pytest.mark.anyio


async def test_remote_exception_reraises_as_its_own_type() -> None:
    async with atoll.open_host() as host:
        actor = await host.spawn(LocalError, name="failing")
        with pytest.raises(ValueError, match="bad value 42") as info:
            await actor.value_error()
        cause = info.value.__cause__
        assert isinstance(cause, atoll.RemoteTraceback)
        assert "value_error" in cause.text and "raise ValueError" in cause.text
        assert any("failing" in note for note in getattr(info.value, "__notes__", ["failing"]))


async def test_unimportable_exception_becomes_remote_error() -> None:
    async with atoll.open_host() as host:
        actor = await host.spawn(LocalError, name="local")
        with pytest.raises(atoll.RemoteError) as info:
            await actor.raise_local()
        err = info.value
        assert isinstance(err, atoll.AtollError)
        assert err.type_name.endswith("Unimportable")
        assert err.actor == "local"
        assert "from a class defined inside a method" in str(err)
        assert "raise_local" in err.remote_traceback


async def test_unpicklable_result_is_a_serialization_error() -> None:
    async with atoll.open_host() as host:
        actor = await host.spawn(LocalError)
        with pytest.raises(atoll.SerializationError, match="result"):
            await actor.unpicklable_result()


async def test_unpicklable_argument_fails_in_the_caller() -> None:
    import threading

    async with atoll.open_host() as host:
        actor = await host.spawn(LocalError)
        with pytest.raises(atoll.SerializationError, match="arguments of value_error"):
            await actor.value_error(threading.Lock())


async def test_constructor_error_is_a_spawn_error() -> None:
    async with atoll.open_host() as host:
        with pytest.raises(atoll.SpawnError, match="constructor failed on purpose") as info:
            await host.spawn(Broken)
        assert isinstance(info.value.__cause__, RuntimeError)


def test_every_error_derives_from_atoll_error() -> None:
    for name in atoll.__all__:
        obj = getattr(atoll, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, Exception)
            and obj is not atoll.RemoteTraceback
        ):
            assert issubclass(obj, atoll.AtollError), name
