"""Array adapters: what the plane knows of numpy arrays and torch tensors.

For each of the two: whether a value is handled, where its bytes lie (``lo``/``hi``
absolute addresses, ``key`` naming the allocation it is a view of, so views
of one allocation travel as one region), and how to rebuild it over a buffer.
numpy and torch are only imported by the side that meets one of their values.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from .._errors import SerializationError

_NUMPY_KINDS = frozenset("biufcmM")
"""numpy dtype kinds that are plain bytes: bool, ints, floats, complex, datetimes."""


class Extent(NamedTuple):
    ptr: int
    """Address of the element at index 0 (what rebuilds the view)."""
    lo: int
    hi: int
    key: Any


def array_extent(a: Any) -> Extent | None:
    """Where an ndarray's bytes lie; None for dtypes that are not plain bytes."""
    dtype = a.dtype
    if dtype.kind not in _NUMPY_KINDS or dtype.hasobject:
        return None
    ptr = a.__array_interface__["data"][0]
    lo = hi = ptr
    for n, stride in zip(a.shape, a.strides, strict=True):
        if stride < 0:
            lo += (n - 1) * stride
        else:
            hi += (n - 1) * stride
    hi += dtype.itemsize
    root = a
    while isinstance(root.base, type(a)):
        root = root.base
    owner = root if root.base is None else root.base
    if type(owner) is memoryview and owner.obj is not None:
        owner = owner.obj  # np.frombuffer makes a memoryview per call: its exporter is shared
    return Extent(ptr, lo, hi, ("array", id(owner)))


def tensor_handled(t: Any) -> bool:
    """A dense CPU tensor whose bytes can be shared as they are."""
    return bool(t.is_cpu and t.layout is torch_strided() and not dtype_info(t.dtype).quantized)


class DtypeInfo(NamedTuple):
    name: str
    """``torch.<name>`` is the dtype."""
    itemsize: int
    complex: bool
    quantized: bool


dtype_infos: dict[Any, DtypeInfo] = {}
"""What :func:`dtype_info` learnt, by torch dtype."""


def dtype_info(dtype: Any) -> DtypeInfo:
    """What the tensor plane needs to know of a torch dtype (cached)."""
    info = dtype_infos.get(dtype)
    if info is None:
        name = str(dtype).removeprefix("torch.")
        quantized = name.startswith("qu") or name.startswith("qi")
        info = dtype_infos[dtype] = DtypeInfo(name, dtype.itemsize, dtype.is_complex, quantized)
    return info


def torch_strided() -> Any:
    return _torch().strided


def _torch() -> Any:
    torch = sys.modules.get("torch")
    if torch is None:
        torch = _import("torch", "a torch tensor", "pip install torch")
    return torch


def _numpy() -> Any:
    np = sys.modules.get("numpy")
    if np is None:
        np = _import("numpy", "a numpy array", "pip install numpy")
    return np


def _import(module: str, what: str, fix: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise SerializationError(
            f"received {what}, but {module} cannot be imported in this process "
            f"({exc}). Add {module} to this environment ({fix}), or send plain "
            "bytes or lists instead"
        ) from exc


def rebuild_array(
    base: Any, offset: int, dtype: str, shape: tuple[int, ...], strides: tuple[int, ...], wr: bool
) -> Any:
    np = _numpy()
    a = np.ndarray(shape, _array_dtype(np, dtype), buffer=base, offset=offset, strides=strides)
    if not wr:
        a.flags.writeable = False
    return a


def empty_array(dtype: str, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
    np = _numpy()
    return np.ndarray(shape, _array_dtype(np, dtype), buffer=b"", strides=strides)


def _array_dtype(np: Any, name: str) -> Any:
    """The numpy dtype ``name``, if its items are plain bytes: an array of
    Python objects over received memory would read pointers from it."""
    try:
        dtype = np.dtype(name)
    except TypeError as exc:
        raise SerializationError(f"an array arrived with dtype {name!r}: {exc}") from None
    if dtype.kind not in _NUMPY_KINDS or dtype.hasobject:
        raise SerializationError(f"an array arrived with dtype {name!r}, which is not plain bytes")
    return dtype


def storage_of(base: Any) -> Any:
    """One untyped storage over ``base``, for every tensor of a region to share."""
    return _torch().frombuffer(base, dtype=_torch().uint8).untyped_storage()


_torch_dtypes: dict[str, tuple[Any, int]] = {}
"""torch dtypes by name, with their item sizes."""


def _torch_dtype(name: str) -> tuple[Any, int]:
    """``torch.<name>`` and its item size, learnt (callers look in ``_torch_dtypes`` first)."""
    torch = _torch()
    dt = getattr(torch, name, None) if type(name) is str else None
    if not isinstance(dt, torch.dtype):
        raise SerializationError(f"a tensor arrived with dtype {name!r}: not a torch dtype")
    found = _torch_dtypes[name] = (dt, dt.itemsize)
    return found


def tensor_span(shape: Sequence[int], stride: Sequence[int]) -> int:
    """How many items from a tensor's first item to its last (its bytes are
    ``(span + 1) * itemsize``), or -1 for a tensor with no items."""
    if len(shape) == 1:
        return (shape[0] - 1) * stride[0] if shape[0] else -1
    span = 0
    for n, step in zip(shape, stride, strict=True):
        if not n:
            return -1
        span += (n - 1) * step
    return span


def tensor_over(buffer: Any, dtype: str, shape: Any, stride: Any) -> Any:
    """A tensor that starts at the first byte of ``buffer`` and ends at its
    last; a 1-d ``shape`` and ``stride`` are plain ints."""
    dt = (_torch_dtypes.get(dtype) or _torch_dtype(dtype))[0]
    root = _torch().frombuffer(buffer, dtype=dt)
    if type(shape) is int:
        return root if stride == 1 else root.as_strided((shape,), (stride,))
    return root.as_strided(shape, stride)


def rebuild_tensor(
    region: tuple[Any, int, dict[Any, Any], int, int],
    ptr: int,
    dtype: str,
    shape: Sequence[int],
    stride: Sequence[int],
    requires_grad: bool,
    parameter: bool,
    conj: bool = False,
) -> Any:
    """The tensor that sat at sender address ``ptr``, over a received region
    (see ``_Incoming.bases``). Tensors rebuilt over one region share one
    storage: ``roots`` keeps, per dtype, a flat tensor over the whole region
    that the others are strided views of. Each torch call costs several
    microseconds when caches are cold, so a tensor that is its region's whole
    flat root is that root, in one call."""
    buffer, origin, roots, start, size = region
    dt, itemsize = _torch_dtypes.get(dtype) or _torch_dtype(dtype)
    offset = (ptr - origin - start) // itemsize
    root = roots.get(dt)
    if root is None:
        torch = _torch()
        if not roots and not size % itemsize:
            if not start and size == len(buffer):
                root = roots[dt] = torch.frombuffer(buffer, dtype=dt)  # (fewer to parse)
            else:
                root = roots[dt] = torch.frombuffer(
                    buffer, dtype=dt, count=size // itemsize, offset=start
                )
            if (
                not offset
                and len(shape) == 1
                and shape[0] * itemsize == size
                and stride[0] == 1
                and not (requires_grad or parameter or conj)
            ):
                return root
        else:
            # Another dtype over the same bytes: the same storage still. The
            # storage holds the whole region, so a region whose size this
            # dtype does not divide starts with a byte root.
            if not roots:
                roots[torch.uint8] = torch.frombuffer(
                    buffer, dtype=torch.uint8, count=size, offset=start
                )
            storage = next(iter(roots.values())).untyped_storage()
            root = roots[dt] = torch.empty((0,), dtype=dt).set_(storage, 0, (size // itemsize,))
    t = root.as_strided(shape, stride, offset)
    if conj:
        t = t.conj()
    if requires_grad or parameter:
        return _finish_tensor(_torch(), t, requires_grad, parameter)
    return t


def nested_tensor(parts: list[Any]) -> Any:
    """A nested tensor of ``parts`` (copied into one buffer)."""
    return _torch().nested.nested_tensor(parts)


def empty_tensor(
    dtype: str,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    parameter: bool,
    device: str = "cpu",
) -> Any:
    torch = _torch()
    if 0 not in shape:
        raise SerializationError(f"an empty tensor arrived with items: shape {shape!r}")
    dt = (_torch_dtypes.get(dtype) or _torch_dtype(dtype))[0]
    t = torch.empty_strided(shape, stride, dtype=dt, device=device)
    return _finish_tensor(torch, t, requires_grad, parameter)


def tensor_on(
    storage: Any,
    dtype: str,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    offset: int,
    requires_grad: bool,
    parameter: bool,
    conj: bool,
) -> Any:
    """A tensor over ``storage`` (device memory received, or our own sent back)."""
    torch = _torch()
    dt = getattr(torch, dtype)
    t = torch.empty((0,), dtype=dt, device=storage.device).set_(storage, offset, shape, stride)
    if conj:
        t = t.conj()
    if requires_grad or parameter:
        return _finish_tensor(torch, t, requires_grad, parameter)
    return t


def _finish_tensor(torch: Any, t: Any, requires_grad: bool, parameter: bool) -> Any:
    if parameter:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    if requires_grad:
        t.requires_grad_(True)
    return t
