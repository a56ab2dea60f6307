"""Functions that work wherever they are called: in the host or in an actor."""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from ..transport._hub import HOST
from ._registry import REGISTRY_OID, Registry, class_key

if TYPE_CHECKING:
    from ..tensors import Plane
    from ._node import Node


class Host(Protocol):
    """What these functions use of a host (``_host.Host``, which this module
    does not import: actor processes import this one, never the host's side)."""

    _registry: Registry
    _node: Node
    _closed: bool
    _context_token: Any


A = TypeVar("A")
V = TypeVar("V")

current_host: ContextVar[Host | None] = ContextVar("atoll_current_host", default=None)
child_node: Node | None = None
"""The RPC node of this process, when it is an actor process."""

_open_hosts: list[Host] = []


def host_opened(host: Host) -> None:
    """``host`` is open: the current context's host from now on."""
    _open_hosts.append(host)
    host._context_token = current_host.set(host)


def host_closed(host: Host) -> None:
    """``host`` is closed: it is nobody's current host any more."""
    if host in _open_hosts:
        _open_hosts.remove(host)
    token, host._context_token = host._context_token, None
    if token is not None:
        try:
            current_host.reset(token)
            return
        except ValueError:
            pass  # closed in another context than it was opened in (another task, a later cell)
    if current_host.get() is host:
        current_host.set(None)


def host_here() -> Host | None:
    """The host of the current context, or else the only host open on this
    thread (one opened in another task or context: a notebook's earlier cell)."""
    host = current_host.get()
    if host is not None and not host._closed:
        return host
    thread = threading.get_ident()
    here = [h for h in _open_hosts if h._node._loop_thread == thread]
    return here[0] if len(here) == 1 else None


def _key(target: str | type[Any]) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, type):
        return "class:" + class_key(target)
    raise TypeError(f"lookup() takes a name or a class, got {target!r}")


@overload
async def lookup(target: type[A]) -> A: ...
@overload
async def lookup(target: str) -> Any: ...
async def lookup(target: str | type[Any]) -> Any:
    """The ref of the actor or service registered under a name, or of the one
    instance of a class; from the host or from any actor process.

    Raises :class:`LookupError` if none is registered (or, for a class,
    several are), and :class:`atoll.ActorDiedError` if it died.
    """
    key = _key(target)
    host = host_here()
    if host is not None:
        return host._registry.find(key)
    if child_node is not None:
        return await child_node.call(HOST, REGISTRY_OID, "lookup", (key,), {})
    raise RuntimeError("atoll.lookup() works inside open_host() or in an actor process")


def publish(topic: str, value: Any) -> None:
    """Publish ``value`` on ``topic`` to the host's subscribers, without waiting.

    Callable from async and sync code, in the host or in an actor process; the
    value is pickled here, so an unpicklable one raises here.
    """
    host = host_here()
    if host is not None:
        host._registry.publish_now(topic, value)
        return
    node = child_node
    if node is None:
        raise RuntimeError("atoll.publish() works inside open_host() or in an actor process")
    if threading.get_ident() == node._loop_thread:
        node.notify(HOST, REGISTRY_OID, "publish", (topic, value), {})
    else:
        import anyio.from_thread  # only threads need it; actor processes start without it

        anyio.from_thread.run_sync(
            node.notify, HOST, REGISTRY_OID, "publish", (topic, value), {}, token=node._token
        )


def current_plane(what: str) -> Plane:
    """The tensor plane of the host in context, or of this actor process."""
    host = host_here()
    if host is not None:
        return host._node.plane
    if child_node is not None:
        return child_node.plane
    raise RuntimeError(f"atoll.{what}() works inside open_host() or in an actor process")


def share(value: V) -> V:
    """Move a numpy array or a CPU torch tensor into this process's shared
    memory, so that sending it later costs the same whatever its size.

    A tensor is moved in place (it keeps its identity; other views of its old
    storage keep the old memory); an array cannot be, so a new array over the
    shared copy is returned. Use what this returns. Values already in shared
    memory (shared before, or received from another process) are returned as
    they are, and so are CUDA tensors, which always travel by IPC handle.
    """
    return current_plane("share").share(value)  # type: ignore[no-any-return]
