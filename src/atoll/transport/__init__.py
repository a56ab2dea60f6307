"""ZeroMQ transport on AnyIO: sockets, wire messages, codec and the hub.

This layer knows nothing about actors.
"""

from ._codec import Codec as Codec
from ._socket import AsyncSocket as AsyncSocket
from ._socket import PeerUnreachableError as PeerUnreachableError
