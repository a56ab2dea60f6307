"""Property-based: tensors and arrays round-trip exactly through an actor, views included."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atoll.testing.strategies import array_views, tensor_views

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")


@pytest.fixture(autouse=True)
def _no_leaks() -> None:
    """The module-scoped host outlives single tests; its own exit is checked."""


_settings = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _same_tensor(a: Any, b: Any) -> None:
    assert (b.dtype, b.shape, b.stride()) == (a.dtype, a.shape, a.stride())
    assert b.requires_grad == a.requires_grad
    assert torch.equal(b.detach(), a.detach())


@_settings
@given(pair=tensor_views(), grad=st.booleans())
def test_tensor_views_round_trip_exactly_and_stay_aliased(echo: Any, pair: Any, grad: bool) -> None:
    base, view = pair
    if grad and base.dtype.is_floating_point:
        base.requires_grad_(True)
        view = view.detach().requires_grad_(True) if view is not base else base
    back_base, back_view = echo.echo([base, view])
    _same_tensor(base, back_base)
    _same_tensor(view, back_view)
    if base.numel() and view.numel():
        assert back_view.untyped_storage().data_ptr() == back_base.untyped_storage().data_ptr()
        assert back_view.data_ptr() - back_base.data_ptr() == view.data_ptr() - base.data_ptr()


@_settings
@given(pair=array_views())
def test_array_views_round_trip_exactly_and_stay_aliased(echo: Any, pair: Any) -> None:
    base, view = pair
    back_base, back_view = echo.echo({"nested": [(base,), {"view": view}]})["nested"]
    back_base, back_view = back_base[0], back_view["view"]
    for a, b in ((base, back_base), (view, back_view)):
        assert (b.dtype, b.shape, b.strides) == (a.dtype, a.shape, a.strides)
        assert b.tobytes() == a.tobytes()
    if base.size and view.size:
        offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        got = back_view.__array_interface__["data"][0] - back_base.__array_interface__["data"][0]
        assert got == offset
        assert np.shares_memory(back_base, back_view)
