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

from ._errors import ActorClosedError as ActorClosedError
from ._errors import ActorDiedError as ActorDiedError
from ._errors import AtollError as AtollError
from ._errors import EnvBuildError as EnvBuildError
from ._errors import ExtensionError as ExtensionError
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteError as RemoteError
from ._errors import RemoteTraceback as RemoteTraceback
from ._errors import SerializationError as SerializationError
from ._errors import SpawnError as SpawnError
from ._errors import TransportError as TransportError
from .actors import Actor as Actor
from .actors import ActorRef as ActorRef
from .actors import Host as Host
from .actors import open_host as open_host
from .actors._blocking import BlockingHost as BlockingHost
from .actors._blocking import blocking_host as blocking_host
from .actors._registry import Subscription as Subscription
from .actors._runtime import lookup as lookup
from .actors._runtime import publish as publish
from .actors._runtime import share as share
from .tensors import SharedMemoryError as SharedMemoryError
from .tensors import copy_on_send as copy_on_send
from .venvs import Env as Env

__version__ = "0.1.0"

__all__ = [
    "Actor",
    "ActorClosedError",
    "ActorDiedError",
    "ActorRef",
    "AtollError",
    "BlockingHost",
    "Env",
    "EnvBuildError",
    "ExtensionError",
    "Host",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "SharedMemoryError",
    "SpawnError",
    "Subscription",
    "TransportError",
    "blocking_host",
    "copy_on_send",
    "lookup",
    "open_host",
    "publish",
    "share",
]
