"""The public API is what ``atoll`` exports, and all of it is documented."""

from __future__ import annotations

import inspect
import subprocess
import sys

import anyio
import pytest

import atoll
from helpers import Echo

# What only a host uses: an actor process that imported them would start slower.
HOST_SIDE = [
    "atoll.actors._host",
    "atoll.actors._opener",
    "atoll.actors._spawner",
    "atoll.actors._processes",
    "atoll.actors._blocking",
    "atoll.venvs",
    "anyio.from_thread",
]


def test_public_names_exist_and_are_documented() -> None:
    assert atoll.__all__ == sorted(atoll.__all__)
    for name in atoll.__all__:
        obj = getattr(atoll, name)
        assert inspect.getdoc(obj), f"atoll.{name} has no docstring"


def test_importing_atoll_does_not_import_trio() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, atoll; print('trio' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_importing_atoll_leaves_the_hosts_side_for_later() -> None:
    code = f"import sys, atoll; print([m for m in {HOST_SIDE!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert atoll.open_host.__module__ == "atoll.actors._opener"
    assert "open_host" in dir(atoll)
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        atoll.nonesuch  # type: ignore[attr-defined]  # noqa: B018


@pytest.mark.anyio
async def test_an_actor_process_does_not_import_the_hosts_side() -> None:
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        with anyio.fail_after(10):
            assert await echo.loaded(HOST_SIDE) == []
            assert await echo.loaded(["atoll.actors._node"]) == ["atoll.actors._node"]
