"""atoll: async actors in isolated processes, over ZeroMQ, on asyncio and trio.

Run each extension as an actor process and call it as a local async object::

    class Counter(atoll.Actor):
        def __init__(self, start: int = 0) -> None:
            self.n = start

        async def add(self, k: int) -> int:
            self.n += k
            return self.n

    async with atoll.open_host() as host:
        c = await host.spawn(Counter, 10)
        assert await c.add(5) == 15
"""

from typing import TYPE_CHECKING, Any

from ._errors import ActorClosedError as ActorClosedError
from ._errors import ActorDiedError as ActorDiedError
from ._errors import AtollError as AtollError
from ._errors import EnvBuildError as EnvBuildError
from ._errors import ExtensionError as ExtensionError
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteError as RemoteError
from ._errors import RemoteTraceback as RemoteTraceback
from ._errors import SandboxUnavailableError as SandboxUnavailableError
from ._errors import SerializationError as SerializationError
from ._errors import SpawnError as SpawnError
from ._errors import TransportError as TransportError
from .actors._actor import Actor as Actor
from .actors._actor import idempotent as idempotent

if TYPE_CHECKING:
    from .actors._blocking import BlockingHost as BlockingHost
    from .actors._blocking import blocking_host as blocking_host
    from .actors._host import Host as Host
    from .actors._lifecycle import Lifecycle as Lifecycle
    from .actors._lifecycle import Restart as Restart
    from .actors._limits import Limits as Limits
    from .actors._opener import HostOpener as HostOpener
    from .actors._opener import open_host as open_host
    from .actors._opener import start_host as start_host
    from .actors._options import HostOptions as HostOptions
    from .actors._ref import ActorRef as ActorRef
    from .actors._registry import Subscription as Subscription
    from .actors._runtime import lookup as lookup
    from .actors._runtime import publish as publish
    from .actors._runtime import share as share
    from .actors._sandbox import Sandbox as Sandbox
    from .actors._status import ActorStatus as ActorStatus
    from .actors._status import HostStatus as HostStatus
    from .tensors._sending import copy_on_send as copy_on_send
    from .tensors._shm import SharedMemoryError as SharedMemoryError
    from .transport._plain import PlainLimits as PlainLimits
    from .transport._plain import wire_type as wire_type
    from .venvs._env import Env as Env

# The rest is imported on first use. An actor process imports this package
# (its class derives from Actor) but never builds environments, spawns or
# blocks a thread: importing the host's side too would cost it tens of
# milliseconds before its first call.
_LAZY = {
    "ActorRef": "atoll.actors._ref",
    "ActorStatus": "atoll.actors._status",
    "BlockingHost": "atoll.actors._blocking",
    "Env": "atoll.venvs._env",
    "Host": "atoll.actors._host",
    "HostOpener": "atoll.actors._opener",
    "HostOptions": "atoll.actors._options",
    "HostStatus": "atoll.actors._status",
    "Lifecycle": "atoll.actors._lifecycle",
    "Limits": "atoll.actors._limits",
    "PlainLimits": "atoll.transport._plain",
    "Restart": "atoll.actors._lifecycle",
    "Sandbox": "atoll.actors._sandbox",
    "SharedMemoryError": "atoll.tensors._shm",
    "Subscription": "atoll.actors._registry",
    "blocking_host": "atoll.actors._blocking",
    "copy_on_send": "atoll.tensors._sending",
    "lookup": "atoll.actors._runtime",
    "open_host": "atoll.actors._opener",
    "publish": "atoll.actors._runtime",
    "share": "atoll.actors._runtime",
    "start_host": "atoll.actors._opener",
    "wire_type": "atoll.transport._plain",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'atoll' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "Actor",
    "ActorClosedError",
    "ActorDiedError",
    "ActorRef",
    "ActorStatus",
    "AtollError",
    "BlockingHost",
    "Env",
    "EnvBuildError",
    "ExtensionError",
    "Host",
    "HostOpener",
    "HostOptions",
    "HostStatus",
    "Lifecycle",
    "Limits",
    "PlainLimits",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "Restart",
    "Sandbox",
    "SandboxUnavailableError",
    "SerializationError",
    "SharedMemoryError",
    "SpawnError",
    "Subscription",
    "TransportError",
    "blocking_host",
    "copy_on_send",
    "idempotent",
    "lookup",
    "open_host",
    "publish",
    "share",
    "start_host",
    "wire_type",
]
