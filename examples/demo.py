"""atoll demo: actors in their own processes, called like local async objects,
and two extensions whose dependencies conflict (numpy 1.x and numpy 2.x), each
in its own uv-built environment, loaded side by side in one host.

python examples/demo.py            # asyncio and trio, one after the other

The first run builds the two environments (uv prints what it installs); later
runs reuse them from the cache (``~/.cache/atoll/envs``, or ``$ATOLL_CACHE_DIR``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import numpy as np

import atoll


class Counter(atoll.Actor):
    """State lives in the actor's process; calls take turns."""

    def __init__(self, start: int = 0) -> None:
        self.n = start

    async def add(self, k: int) -> int:
        self.n += k
        return self.n

    def pid(self) -> int:  # a plain method: runs in a worker thread
        return os.getpid()


class Worker(atoll.Actor):
    """Calls back into the host and into other actors, and streams results."""

    async def square_all(
        self, numbers: list[int], progress: Callable[[int, int], Awaitable[None]]
    ) -> list[int]:
        out = []
        for i, x in enumerate(numbers):
            out.append(x * x)
            await progress(i + 1, len(numbers))  # a callback into the host
        return out

    async def bump(self, counter: Counter, times: int) -> int:
        total = 0
        for _ in range(times):
            total = await counter.add(1)  # actor-to-actor, through the hub
        return total

    async def countdown(self, n: int) -> AsyncIterator[int]:
        for i in range(n, 0, -1):
            yield i

    async def fail(self) -> None:
        raise ValueError("something went wrong inside the worker")


async def main() -> None:
    async with atoll.open_host() as host:
        counter = await host.spawn(Counter, 10, name="counter")
        worker = await host.spawn(Worker, name="worker")
        print(f"  host pid {os.getpid()}, counter pid {await counter.pid()}")
        print(f"  counter.add(5) -> {await counter.add(5)}")

        async def progress(done: int, total: int) -> None:
            print(f"  progress from the worker: {done}/{total}")

        print(f"  worker.square_all -> {await worker.square_all([1, 2, 3], progress)}")
        print(f"  worker.bump(counter, 3) -> {await worker.bump(counter, 3)}")
        print(f"  worker.countdown(3) streams {[i async for i in worker.countdown(3)]}")
        try:
            await worker.fail()
        except ValueError as exc:
            print(f"  remote error re-raised as {type(exc).__name__}: {exc}")
    print("  host closed; every actor process has exited")


EXTENSIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "extensions")


async def extensions() -> None:
    async with atoll.open_host() as host:
        # Each folder's pyproject.toml names its dependencies and its actor class.
        old = await host.load_extension(os.path.join(EXTENSIONS, "old_numpy"))
        new = await host.load_extension(os.path.join(EXTENSIONS, "new_numpy"))
        print(f"  host numpy {np.__version__}")
        print(f"  old_numpy extension runs numpy {await old.version()}")
        print(f"  new_numpy extension runs numpy {await new.version()}")
        data = np.linspace(0.0, 1.0, 1_000_000)  # 8 MB: crosses as shared memory
        print(f"  old_numpy summarizes the host's array: {await old.summarize(data)}")
        scaled = await new.scale(data, 3.0)
        print(
            f"  new_numpy scales it: {type(scaled).__name__} of {scaled.size}, max {scaled.max()}"
        )
        print(f"  new_numpy uses numpy 2's np.strings: {await new.shout(['atoll', 'uv'])}")


if __name__ == "__main__":
    for backend in sys.argv[1:] or ["asyncio", "trio"]:
        print(f"[{backend}]")
        anyio.run(main, backend=backend)
        anyio.run(extensions, backend=backend)
