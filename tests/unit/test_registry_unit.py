"""The registry: names, classes, tombstones of dead actors, subscriptions."""

from __future__ import annotations

import anyio
import pytest

from atoll import ActorDiedError
from atoll.actors import _registry
from atoll.actors._actor import Kind
from atoll.actors._registry import Registry

pytestmark = pytest.mark.anyio


class _Nothing:
    """Stands in for the node: refs are only built, never called here."""


def _registry_with(*names: str) -> Registry:
    registry = Registry(_Nothing())  # type: ignore[arg-type]
    for i, name in enumerate(names):
        registry.add(name, f"a{i}".encode(), 0, {"ping": Kind.ASYNC}, f"m.{name.title()}")
    return registry


async def test_names_and_classes_find_their_refs() -> None:
    registry = _registry_with("cache", "store")
    assert registry.find("cache")._name == "cache"  # type: ignore[attr-defined]
    assert registry.find("class:m.Store")._name == "store"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="taken"):
        registry.add("cache", b"x", 0, {}, "m.Other")
    with pytest.raises(LookupError, match="registered: cache, store"):
        registry.find("nothing")


async def test_a_dead_actors_name_says_how_it_died_until_reused() -> None:
    registry = _registry_with("worker")
    registry.mark_gone(b"a0", lambda: ActorDiedError("worker", -9))
    with pytest.raises(ActorDiedError, match="signal 9"):
        registry.find("worker")
    registry.add("worker", b"a9", 0, {}, "m.Worker")  # the name is free again
    assert registry.find("worker")._id == b"a9"  # type: ignore[attr-defined]


async def test_a_stopped_actor_leaves_no_tombstone() -> None:
    registry = _registry_with("worker")
    registry.mark_gone(b"a0", None)
    with pytest.raises(LookupError, match="no actor or service is named"):
        registry.find("worker")


async def test_tombstones_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "TOMBSTONES_KEPT", 3)
    registry = _registry_with(*[f"w{i}" for i in range(10)])
    for i in range(10):
        registry.mark_gone(f"a{i}".encode(), lambda: ActorDiedError("w", 1))
    assert sorted(registry._entries) == ["w7", "w8", "w9"]


async def test_a_slow_subscriber_misses_the_newest_events_and_counts_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = Registry(_Nothing())  # type: ignore[arg-type]
    subscription = registry.subscribe("t")
    for i in range(_registry.SUBSCRIPTION_BUFFER + 5):
        registry.publish_now("t", i)
    assert subscription.dropped == 5
    with anyio.fail_after(5):
        assert await subscription.receive() == 0
    registry.close_subscriptions()
