"""pytest plugin: fail any test that leaves atoll's resources behind.

Enable with ``-p atoll.testing.plugin``; then request ``atoll_leak_check`` in a
test, or make it autouse in your ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._leaks import snapshot


@pytest.fixture
def atoll_leak_check() -> Iterator[None]:
    """Fails the test if it leaves child processes, sockets, pipes, temp dirs
    or shared-memory segments behind."""
    before = snapshot()
    yield
    leaks = before.leaks()
    if leaks:
        pytest.fail(f"the test leaked: {leaks}", pytrace=False)
