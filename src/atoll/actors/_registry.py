"""The host's registry: names of actors and services, and event topics.

Every actor process reaches it as object ``REGISTRY_OID`` of the host, which
is how :func:`atoll.lookup` and :func:`atoll.publish` work from anywhere.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..transport._hub import HOST
from ._actor import Kind
from ._node import Node
from ._node_state import ExcFactory
from ._ref import ActorRef

REGISTRY_OID = 1
"""Object id of the registry in the host (the host exports it first)."""

TOMBSTONES_KEPT = 256
"""Names of dead actors whose lookup says how they died (older ones: not found)."""

SUBSCRIPTION_BUFFER = 1000
"""Events a subscriber may fall behind by before new ones are dropped for it."""


def class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclasses.dataclass
class _Entry:
    name: str
    identity: bytes
    oid: int
    kinds: dict[str, Kind]
    cls_key: str
    gone: ExcFactory | None = None


class Subscription:
    """Events published on one topic, as an async iterator.

    A subscriber that falls more than ``SUBSCRIPTION_BUFFER`` events behind
    misses the newest ones; :attr:`dropped` counts them. Publishers never wait.
    """

    def __init__(self, registry: Registry, topic: str) -> None:
        self.topic = topic
        self.dropped = 0
        self._registry = registry
        self._send: MemoryObjectSendStream[Any]
        self._receive: MemoryObjectReceiveStream[Any]
        self._send, self._receive = anyio.create_memory_object_stream[Any](SUBSCRIPTION_BUFFER)

    def _offer(self, value: Any) -> None:
        try:
            self._send.send_nowait(value)
        except anyio.WouldBlock:
            self.dropped += 1
        except anyio.BrokenResourceError:
            pass  # closed meanwhile

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._receive.__aiter__()

    async def receive(self) -> Any:
        """The next event; raises ``anyio.EndOfStream`` once closed."""
        return await self._receive.receive()

    async def deliver(self, callback: Callable[[Any], Any]) -> None:
        """Call ``callback`` (sync or async) with each event until closed."""
        async for value in self:
            result = callback(value)
            if inspect.isawaitable(result):
                await result

    def close(self) -> None:
        """Stop receiving events; iteration ends after those already queued."""
        self._registry._unsubscribe(self)
        self._send.close()


class RegistryService:
    """What actor processes may ask of the registry; exported at REGISTRY_OID.

    Only these two methods: registering and removing names is the host's.
    """

    max_concurrency = math.inf  # lookups and publishes never wait for a turn

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def lookup(self, key: str) -> ActorRef[Any]:
        """The ref registered under ``key``: a name, or ``class:module.QualName``."""
        return self._registry.find(key)

    async def publish(self, topic: str, value: Any) -> None:
        """Hand ``value`` to every subscriber of ``topic``."""
        self._registry.publish_now(topic, value)


class Registry:
    """Names to refs, for one host; also the hub of published events."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._entries: dict[str, _Entry] = {}
        self._tombstones: deque[str] = deque()  # names of dead actors, oldest first
        self._topics: dict[str, list[Subscription]] = {}

    def publish_now(self, topic: str, value: Any) -> None:
        for subscription in self._topics.get(topic, ()):
            subscription._offer(value)

    def subscribe(self, topic: str) -> Subscription:
        subscription = Subscription(self, topic)
        self._topics.setdefault(topic, []).append(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        subs = self._topics.get(subscription.topic, [])
        if subscription in subs:
            subs.remove(subscription)

    def close_subscriptions(self) -> None:
        for subs in list(self._topics.values()):
            for subscription in list(subs):
                subscription.close()

    def check_free(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is not None and entry.gone is None:
            holder = "a service of the host" if entry.oid else "an actor process"
            raise ValueError(
                f"the name {name!r} is taken by {holder} ({entry.cls_key}); "
                "pick another name, or stop or unregister the holder first"
            )

    def add(
        self, name: str, identity: bytes, oid: int, kinds: dict[str, Kind], cls_key: str
    ) -> None:
        self.check_free(name)
        self._entries[name] = _Entry(name, identity, oid, kinds, cls_key)

    def remove(self, name: str) -> _Entry | None:
        return self._entries.pop(name, None)

    def mark_gone(self, identity: bytes, gone: ExcFactory | None) -> None:
        """An actor process ended: a death leaves a tombstone, a stop nothing."""
        for name, entry in list(self._entries.items()):
            if entry.identity == identity:
                if gone is None:
                    del self._entries[name]
                else:
                    entry.gone = gone
                    self._tombstones.append(name)
        while len(self._tombstones) > TOMBSTONES_KEPT:
            name = self._tombstones.popleft()
            oldest = self._entries.get(name)
            if oldest is not None and oldest.gone is not None:
                del self._entries[name]

    def actors(self) -> list[tuple[str, bytes]]:
        """``(name, identity)`` of each registered actor that is not gone
        (services living in the host aside)."""
        return [
            (name, e.identity)
            for name, e in self._entries.items()
            if e.gone is None and e.identity != HOST
        ]

    def class_of(self, name: str) -> str | None:
        """The class (``module.QualName``) of what is registered as ``name``."""
        entry = self._entries.get(name)
        return entry.cls_key if entry is not None else None

    def find(self, key: str) -> ActorRef[Any]:
        if key.startswith("class:"):
            wanted = key[len("class:") :]
            live = [e for e in self._entries.values() if e.cls_key == wanted and e.gone is None]
            if len(live) > 1:
                names = ", ".join(sorted(e.name for e in live))
                raise LookupError(f"several actors are {wanted}: {names}; look one up by name")
            if not live:
                dead = [e for e in self._entries.values() if e.cls_key == wanted]
                if dead and dead[0].gone is not None:
                    raise dead[0].gone()
                raise LookupError(f"no actor or service of class {wanted} is registered")
            entry = live[0]
        else:
            found = self._entries.get(key)
            if found is None:
                known = ", ".join(sorted(self._entries)) or "none"
                raise LookupError(f"no actor or service is named {key!r} (registered: {known})")
            if found.gone is not None:
                raise found.gone()
            entry = found
        return ActorRef(self._node, entry.identity, entry.name, entry.kinds, entry.oid)


__all__ = [
    "REGISTRY_OID",
    "Registry",
    "RegistryService",
    "Subscription",
    "class_key",
]
