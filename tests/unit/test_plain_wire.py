"""The plain wire's reader, without processes: what it builds, and that
malformed input is a ProtocolError for that payload, never anything else."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import atoll
from atoll.transport._codec import Codec
from atoll.transport._plain import PlainLimits

UNTRUSTED_PEER = b"u7"

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**200), 2**200)
    | st.floats(allow_nan=False)
    | st.complex_numbers(allow_nan=False)
    | st.text(max_size=16)
    | st.binary(max_size=64)
)
_hashable = st.recursive(
    _scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=8
)
_values = st.recursive(
    _scalars | st.binary(max_size=64).map(bytearray),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=5).map(tuple)
        | st.sets(_hashable, max_size=5)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5)
        | st.dictionaries(_hashable, inner, max_size=5)
    ),
    max_leaves=30,
)


def _send(value: Any) -> bytes:
    payload, frames = Codec(plain_only=True).dumps_value(value, lambda v: v, "value", b"")
    assert frames == []
    return payload


def _read(payload: bytes, limits: PlainLimits | None = None) -> Any:
    codec = Codec()
    if limits is not None:
        codec.plain.limits = limits
    return codec.loads(payload, [], "value", UNTRUSTED_PEER)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_plain_values_arrive_as_they_were_sent(value: Any) -> None:
    assert _read(_send(value)) == value


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_a_protocol_error_or_a_plain_value(data: bytes) -> None:
    try:
        _read(data)
    except atoll.ProtocolError:
        pass


@settings(max_examples=500, deadline=None)
@given(_values, st.data())
def test_mutated_payloads_are_a_protocol_error_or_a_plain_value(value: Any, data: Any) -> None:
    payload = bytearray(_send(value))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(1, len(payload) - 1)) if len(payload) > 1 else 0
        payload[at] = data.draw(st.integers(0, 255))
    try:
        _read(bytes(payload))
    except atoll.ProtocolError:
        pass


def test_a_pickle_from_an_untrusted_peer_is_refused_unread() -> None:
    import pickle

    with pytest.raises(atoll.ProtocolError, match="not a plain payload"):
        _read(pickle.dumps(1))


@pytest.mark.parametrize(
    ("value", "limits", "what"),
    [
        (b"x" * 1000, PlainLimits(max_bytes=100), "over the limit"),
        ([[[[1]]]], PlainLimits(max_depth=2), "nested more than 2"),
        ([1] * 50, PlainLimits(max_items=10), "more than 10 items"),
        ((1,) * 50, PlainLimits(max_items=10), "more than 10 items"),
    ],
)
def test_reading_is_bounded(value: Any, limits: PlainLimits, what: str) -> None:
    with pytest.raises(atoll.ProtocolError, match=what):
        _read(_send(value), limits)


def test_a_deep_payload_is_a_protocol_error_not_a_crash() -> None:
    deep = b"\x91" * 100_000 + b"\xc0"  # a list in a list ... 100,000 deep
    with pytest.raises(atoll.ProtocolError):
        _read(b"\x01\x92\xc0" + deep)


def test_names_that_nothing_here_rebuilds_are_refused() -> None:
    Ext = msgspec.msgpack.Ext
    for code, body in [
        (9, ["builtins.eval", ["1"]]),
        (9, ["os.system", ["true"]]),
        (10, ["not.Registered", {}]),
    ]:
        payload = b"\x01" + msgspec.msgpack.encode([None, Ext(code, msgspec.msgpack.encode(body))])
        with pytest.raises(atoll.ProtocolError):
            _read(payload)


@dataclasses.dataclass
class _Unregistered:
    x: int


def test_unregistered_types_fail_at_send_time_naming_the_type() -> None:
    with pytest.raises(atoll.SerializationError, match=r"_Unregistered.*atoll\.wire_type"):
        _send(_Unregistered(1))


def test_registered_types_travel_by_name() -> None:
    @dataclasses.dataclass
    class Pixel:
        x: int
        y: int

    atoll.wire_type(Pixel, name="tests.Pixel")
    assert _read(_send([Pixel(1, 2)])) == [Pixel(1, 2)]

    class Opaque:
        def __init__(self, n: int) -> None:
            self.n = n

    atoll.wire_type(Opaque, (lambda o: o.n, Opaque), name="tests.Opaque")
    assert _read(_send(Opaque(5))).n == 5
    with pytest.raises(TypeError, match="convert="):
        atoll.wire_type(type("Plain", (), {}))


@pytest.mark.parametrize(
    "segment",
    [
        "../" * 20 + "etc/hostname",
        "/etc/hostname",
        "atoll-" + "../" * 20 + "etc/hostname",
        "atoll-link",
    ],
)
def test_a_region_outside_shared_memory_is_never_mapped(
    segment: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer names the segment its tensors lie in: a path elsewhere, or a
    link in /dev/shm to a file elsewhere, is refused before it is opened."""
    from atoll.tensors import Plane, _shm
    from atoll.tensors._descriptors import Head, Shared, encode_head
    from atoll.tensors._receiving import rebuild_buffer

    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 4096)
    link = tmp_path / "atoll-link"
    link.symlink_to(secret)
    monkeypatch.setattr(_shm, "SHM_DIR", str(tmp_path))  # the link is "in /dev/shm"
    plane = Plane(_shm.host_prefix())
    try:
        name = f"{rebuild_buffer.__module__}.{rebuild_buffer.__qualname__}"
        head = encode_head(Head(0, [Shared(0, segment, 0, 16, 1)]))
        value = msgspec.msgpack.Ext(9, msgspec.msgpack.encode([name, [0, 0, 16, "bytes"]]))
        payload = b"\x01" + msgspec.msgpack.encode([head, value])
        with pytest.raises((atoll.ProtocolError, atoll.SerializationError)):
            Codec({}, plane).loads(payload, [], "value", UNTRUSTED_PEER)
        assert plane.stats()["mappings"] == 0
    finally:
        plane.close()
