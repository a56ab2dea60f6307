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
