"""A task that belongs to an object rather than to the caller's task group.

A host started with ``await atoll.open_host()`` (a notebook cell, an
application's start-up hook) outlives the task that started it and may be
closed from another task or context. Its tasks therefore run under a task of
their own, owned by the :class:`~atoll.Host` and ended by ``Host.aclose()``.
AnyIO has no such task, so this is the one place that asks the event loop
itself: asyncio's ``create_task`` or trio's system nursery.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Awaitable, Callable
from typing import Any

_keep: set[Any] = set()  # asyncio keeps only weak references to its tasks


def start_background(fn: Callable[[], Awaitable[None]], name: str) -> None:
    """Run ``fn()`` in a new task of the running event loop, beside the
    caller's task rather than inside its task group.

    ``fn`` must not raise anything but cancellation: nobody is there to
    receive it (on trio, an error would end the whole run).
    """
    if "asyncio" in sys.modules:
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:

            async def run() -> None:
                await fn()

            task = loop.create_task(run(), name=name)
            _keep.add(task)
            task.add_done_callback(_keep.discard)
            return
    import trio

    trio.lowlevel.spawn_system_task(fn, name=name, context=contextvars.copy_context())
