"""Remote exceptions keep their type, traceback text and the actor's name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import atoll
from helpers import Broken, LocalError, Quitter

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


async def test_sys_exit_in_a_method_is_a_death_with_its_code_and_place(
    capfd: pytest.CaptureFixture[str],
) -> None:
    async with atoll.open_host() as host:
        for method in ("quit", "quit_sync"):
            quitter = await host.spawn(Quitter)
            with anyio.fail_after(20), pytest.raises(atoll.ActorDiedError) as caught:
                await getattr(quitter, method)(3)
            message = str(caught.value)
            assert caught.value.exitcode == 3
            assert "exited with code 3" in message
            assert f"{method}() called sys.exit(3) at " in message
            assert "helpers.py:" in message  # where it was called
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ExceptionGroup" not in err


async def test_keyboard_interrupt_in_a_method_is_reported_as_itself() -> None:
    async with atoll.open_host() as host:
        quitter = await host.spawn(Quitter)
        with anyio.fail_after(20), pytest.raises(atoll.RemoteError) as caught:
            await quitter.interrupt()
        assert caught.value.type_name == "builtins.KeyboardInterrupt"
        assert "raised by the method" in caught.value.message
        assert await quitter.ping() == "pong"  # it was one call's error, not a signal


_BY_VALUE_SCRIPT = '''
import linecache, sys, anyio, atoll

class FromScript(atoll.Actor):
    async def fail(self):
        raise ValueError("from the script")

CELL = """
class FromCell(atoll.Actor):
    async def fail(self):
        raise ValueError("from a cell")
"""
# What a notebook does: code compiled under a name no file has, its lines in linecache.
linecache.cache["<cell-7>"] = (len(CELL), None, CELL.splitlines(True), "<cell-7>")
exec(compile(CELL, "<cell-7>", "exec"))

async def main():
    async with atoll.open_host() as host:
        for cls in (FromScript, FromCell):
            actor = await host.spawn(cls)
            try:
                await actor.fail()
            except ValueError as exc:
                print(exc.__cause__.text)

anyio.run(main, backend=sys.argv[1])
'''


def test_remote_traceback_of_code_sent_by_value_shows_file_line_and_source(
    tmp_path: Path,
) -> None:
    script = tmp_path / "app.py"
    script.write_text(_BY_VALUE_SCRIPT)
    for backend in ("asyncio", "trio"):
        out = subprocess.run(
            [sys.executable, str(script), backend], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert f'File "{script}", line 6, in fail' in out.stdout
        assert 'raise ValueError("from the script")' in out.stdout
        assert 'File "<cell-7>", line 4, in fail' in out.stdout
        assert 'raise ValueError("from a cell")' in out.stdout
        assert "<dynamic-code>" not in out.stdout
        assert "atoll/actors" not in out.stdout  # the traceback starts in the user's code


async def test_private_attribute_of_a_ref_says_what_a_ref_is() -> None:
    async with atoll.open_host() as host:
        quitter = await host.spawn(Quitter, name="q")
        with pytest.raises(AttributeError, match=r"ref to actor 'q' only calls its public"):
            quitter._state  # noqa: B018
        with pytest.raises(AttributeError, match="interrupt, ping, quit, quit_sync"):
            quitter._state  # noqa: B018


async def test_a_call_after_the_host_closed_says_the_host_is_closed() -> None:
    async with atoll.open_host() as host:
        quitter = await host.spawn(Quitter)
    with pytest.raises(atoll.ActorClosedError, match="this host is closed"):
        await quitter.ping()
