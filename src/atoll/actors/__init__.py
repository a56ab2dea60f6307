"""Actors: the Actor base class, refs, the host and its actor processes."""

from ._actor import Actor as Actor
from ._host import Host as Host
from ._host import open_host as open_host
from ._ref import ActorRef as ActorRef
