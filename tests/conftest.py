from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import atoll
from helpers import Echo


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _no_leaks(atoll_leak_check: None) -> None:
    """Every test fails if it leaves processes, sockets or temp dirs behind."""


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def echo(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An Echo actor shared by a module's tests (property tests: one host, many
    examples), on each backend. Such a module turns the per-test leak check off;
    the host's own exit is checked."""
    with atoll.blocking_host(request.param) as host:
        yield host.spawn(Echo)
