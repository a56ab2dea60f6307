"""Actors: the Actor base class, refs, the host and its actor processes."""

from typing import TYPE_CHECKING, Any

from ._actor import Actor as Actor

if TYPE_CHECKING:
    from ._host import Host as Host
    from ._opener import open_host as open_host
    from ._ref import ActorRef as ActorRef


def __getattr__(name: str) -> Any:
    # Loaded on first use, as in the package above: actor processes skip the host.
    import atoll

    if name in ("Host", "open_host", "ActorRef"):
        return getattr(atoll, name)
    raise AttributeError(f"module 'atoll.actors' has no attribute {name!r}")
