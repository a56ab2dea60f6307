"""hypothesis strategies for values that cross a process boundary."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(max_size=64),
    st.complex_numbers(allow_nan=False),
)

big_bytes = st.one_of(
    st.binary(min_size=0, max_size=16),
    st.integers(min_value=0, max_value=4 * 1024 * 1024).map(
        lambda n: bytes(range(256)) * (n // 256)
    ),
)
"""bytes from 0 B to about 4 MB (patterned, so generation stays cheap)."""


def payloads(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Nested picklable containers of scalars, unicode, big ints and bytes."""
    return st.recursive(
        st.one_of(_scalars, big_bytes.map(bytearray), big_bytes),
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.tuples(children, children),
            st.dictionaries(st.text(max_size=8), children, max_size=5),
            st.sets(st.one_of(st.integers(), st.text(max_size=8)), max_size=5),
        ),
        max_leaves=max_leaves,
    )


def arrays() -> st.SearchStrategy[Any]:
    """numpy arrays of common dtypes and shapes, small and large."""
    import numpy as np
    from hypothesis.extra import numpy as hnp

    dtypes = st.sampled_from(
        ["bool", "int8", "int32", "int64", "uint8", "float32", "float64", "complex128"]
    )
    return st.one_of(
        hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6)),
        st.integers(min_value=0, max_value=1_000_000).map(lambda n: np.arange(n, dtype=np.float32)),
    )


TORCH_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)
"""Every plain-data dtype of torch, by name."""

NUMPY_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    ">i4",
    "datetime64[ns]",
)
"""Every plain-data dtype kind of numpy, with a big-endian one and a datetime."""

_SHAPES = st.lists(st.integers(min_value=0, max_value=6), max_size=3)
_BIG = st.integers(min_value=70_000, max_value=700_000).map(lambda n: [n])
"""1-D sizes that put a float32 region above the shared-memory threshold."""


def _view_ops(draw: Any, ndim: int, negative: bool) -> list[tuple[str, int, int, int]]:
    """Slices with a start and step, and transposes, to apply to a base."""
    steps = st.integers(min_value=-3 if negative else 1, max_value=3).filter(bool)
    ops = []
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        if ndim and draw(st.booleans()):
            dim = draw(st.integers(min_value=0, max_value=ndim - 1))
            ops.append(("slice", dim, draw(st.integers(0, 4)), draw(steps)))
        elif ndim >= 2:
            ops.append(("transpose", 0, ndim - 1, 0))
    return ops


@st.composite
def tensor_views(draw: Any) -> tuple[Any, Any]:
    """A torch tensor and a view of it (strided slices, transposes, storage
    offsets, conjugates) over every dtype, 0-d and zero-size shapes included,
    some large enough to go through shared memory."""
    import torch

    dtype = getattr(torch, draw(st.sampled_from(TORCH_DTYPES)))
    shape = draw(st.one_of(_SHAPES, _BIG))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    values = torch.randn(shape, generator=gen) * 50
    if dtype.is_complex:
        base = torch.complex(values, values.flip(-1) if values.dim() else values).to(dtype)
    elif dtype is torch.bool:
        base = values > 0
    else:
        base = (values.abs() if dtype is torch.uint8 else values).to(dtype)
    view = base
    for op, a, b, step in _view_ops(draw, base.dim(), negative=False):
        if op == "slice":
            index = [slice(None)] * view.dim()
            index[a] = slice(b, None, step)
            view = view[tuple(index)]
        else:
            view = view.transpose(a, b)
    if dtype.is_complex and draw(st.booleans()):
        view = view.conj()  # a lazy conjugate: the same memory, read conjugated
    return base, view


@st.composite
def array_views(draw: Any) -> tuple[Any, Any]:
    """A numpy array and a view of it, negative strides included."""
    import numpy as np

    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = draw(st.one_of(_SHAPES, _BIG))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    base = raw.view(dtype).reshape(shape)
    if dtype.kind == "f":
        base[np.isnan(base)] = 0  # NaN payloads differ: keep comparisons exact
    if dtype.kind == "b":
        base = (raw[: base.size] > 127).reshape(shape)
    view = base
    for op, a, b, step in _view_ops(draw, base.ndim, negative=True):
        if op == "slice":
            index = [slice(None)] * view.ndim
            index[a] = slice(b, None, step) if step > 0 else slice(None, None, step)
            view = view[tuple(index)]
        else:
            view = view.swapaxes(a, b)
    return base, view
