"""Nodes joined in memory, without processes or sockets: what the
transport does, minus ZeroMQ (the way httpcore tests its connection pool
against a mock backend). For fast tests of the RPC engine itself."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from atoll.actors._node import Node
from atoll.tensors import Plane, _shm
from atoll.transport._socket import run_job


class Wire:
    """Delivers each node's messages to their destination node in order, in
    a task per node (as a socket's reader would), running the jobs they
    return in tasks of their own."""

    def __init__(self, tg: TaskGroup) -> None:
        self._tg = tg
        self.nodes: dict[bytes, Node] = {}
        self._inboxes: dict[bytes, MemoryObjectSendStream[tuple[bytes, list[bytes]]]] = {}
        self.sent: list[tuple[bytes, bytes, bytes]] = []
        """(source, destination, header) of every message, in order."""
        self._prefix = _shm.host_prefix()

    def node(self, name: str) -> Node:
        identity = f"n{len(self.nodes) + 1}".encode()
        plane = Plane(_shm.owner_prefix(self._prefix, os.getpid()), transfer="inline")

        def transmit(dest: bytes, frames: Sequence[Any]) -> None:
            # Copied, as the wire would: sender and receiver never share buffers.
            copied = [bytes(frame) for frame in frames]
            self.sent.append((identity, dest, copied[0]))
            self._inboxes[dest].send_nowait((identity, copied))

        node = Node(identity, len(self.nodes) + 1, name, transmit, plane)
        send, receive = anyio.create_memory_object_stream[tuple[bytes, list[bytes]]](1000)
        self.nodes[identity] = node
        self._inboxes[identity] = send
        node.start(self._tg)
        self._tg.start_soon(self._deliver, node, receive)
        return node

    async def _deliver(self, node: Node, inbox: Any) -> None:
        async with inbox:
            async for src, frames in inbox:
                job = node.on_message(src, frames)
                if job is not None:
                    self._tg.start_soon(run_job, job)

    def close(self) -> None:
        for inbox in self._inboxes.values():
            inbox.close()
        for node in self.nodes.values():
            node.plane.close()


@asynccontextmanager
async def wire() -> AsyncIterator[Wire]:
    """A wire whose tasks end with the block."""
    async with anyio.create_task_group() as tg:
        joined = Wire(tg)
        try:
            yield joined
        finally:
            joined.close()
            tg.cancel_scope.cancel()
