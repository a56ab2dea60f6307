"""Property-based: arbitrary picklable payloads come back equal through an actor."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from atoll.testing.strategies import arrays, payloads

_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(autouse=True)
def _no_leaks() -> None:
    """The module-scoped host outlives single tests; its own exit is checked."""


@_settings
@given(value=payloads())
def test_payloads_round_trip(echo: Any, value: Any) -> None:
    assert echo.echo(value) == value
    assert echo.echo_sync(value) == value


@_settings
@given(array=arrays())
def test_numpy_arrays_round_trip(echo: Any, array: Any) -> None:
    np = pytest.importorskip("numpy")
    back = echo.echo(array)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    assert np.array_equal(back, array, equal_nan=array.dtype.kind in "fc")
