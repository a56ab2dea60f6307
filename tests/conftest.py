from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _no_leaks(atoll_leak_check: None) -> None:
    """Every test fails if it leaves processes, sockets or temp dirs behind."""
