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
@given(pair=tensor_views())
def test_a_tensor_view_sent_alone_round_trips_exactly(echo: Any, pair: Any) -> None:
    # Alone, a big one travels as flat fields rather than in a list.
    _, view = pair
    _same_tensor(view, echo.echo(view))


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


_REINTERPRET = ["uint8", "int16", "int32", "float32", "float64", "complex128", "bfloat16"]


@st.composite
def _one_storage_in_several_dtypes(draw: Any) -> list[Any]:
    """Bytes (inline or shared-memory sized), and views of slices of them in
    other dtypes, in any order: a storage whose size need not divide by the
    views' item sizes."""
    n = draw(st.one_of(st.integers(1, 300), st.integers(1 << 16, (1 << 16) + 300)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    views = [raw]
    for name in draw(st.lists(st.sampled_from(_REINTERPRET), min_size=1, max_size=3)):
        dtype = getattr(torch, name)
        count = n // dtype.itemsize
        if count:
            a = draw(st.integers(0, count - 1))
            b = draw(st.integers(a + 1, count))
            views.append(raw[a * dtype.itemsize : b * dtype.itemsize].view(dtype))
    return draw(st.permutations(views))


@_settings
@given(views=_one_storage_in_several_dtypes())
def test_views_of_one_storage_in_several_dtypes_round_trip(echo: Any, views: Any) -> None:
    back = echo.echo(views)
    raw_back = next(w for v, w in zip(views, back, strict=True) if v.dtype == torch.uint8)
    start = views[[v.dtype for v in views].index(torch.uint8)].data_ptr()
    for v, w in zip(views, back, strict=True):
        assert (w.dtype, w.shape, w.stride()) == (v.dtype, v.shape, v.stride())
        assert torch.equal(w.view(torch.uint8), v.view(torch.uint8))  # bitwise: NaNs too
        assert w.untyped_storage().data_ptr() == raw_back.untyped_storage().data_ptr()
        assert w.data_ptr() - raw_back.data_ptr() == v.data_ptr() - start
