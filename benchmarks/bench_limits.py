"""Does an actor hitting its limits slow its neighbours? One run, side by side.

    python benchmarks/bench_limits.py [--rounds R] [--calls N] [--backend B]

One host and a neighbour actor. Bursts of N no-op calls to the neighbour
alternate between a quiet machine and one where a limited actor is hitting
its limits meanwhile, R rounds, the order flipped every round; the ratio of
the two bursts of a round compares them on the machine as it was in that
second. Loads:

  memory       an actor with ``Limits(memory="128M")`` allocates 512 MiB, is
               killed by the kernel, and is spawned again, over and over
  fork bomb    an actor with ``Limits(processes=32)`` forks until it cannot,
               lets its children go, and starts again
  busy core    an actor with ``Limits()`` (only its lower CPU priority)
               spinning, for comparison: a machine with a core kept busy

A raw pyzmq floor (DEALER/ROUTER round trip, blocking) is measured first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from bench_tensors import zmq_floor
from bench_untrusted import _burst

import atoll


class Neighbour(atoll.Actor):
    async def noop(self) -> None:
        return None


class Greedy(atoll.Actor):
    async def eat(self, megabytes: int) -> int:
        blocks = [bytearray(1 << 20) for _ in range(megabytes)]
        return len(blocks)

    async def spin(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    async def fork_bomb(self) -> int:
        """Fork until the kernel refuses; then let every child go."""
        read_end, write_end = os.pipe()
        children = []
        try:
            while True:
                try:
                    pid = os.fork()
                except OSError:
                    break
                if pid == 0:
                    os.close(write_end)
                    os.read(read_end, 1)  # until the parent lets go
                    os._exit(0)
                children.append(pid)
        finally:
            os.close(write_end)
            os.close(read_end)
            for pid in children:
                os.waitpid(pid, 0)  # noqa: ASYNC222 (a bomb holds its loop on purpose)
        return len(children)


async def _memory(host: atoll.Host) -> None:
    while True:
        greedy = await host.spawn(Greedy, limits=atoll.Limits(memory="128M"))
        try:
            await greedy.eat(512)
        except atoll.ActorDiedError as exc:
            if "memory limit" not in str(exc):
                raise
        else:
            raise AssertionError("it allocated past its memory limit")


async def _fork_bomb(host: atoll.Host) -> None:
    greedy = await host.spawn(Greedy, limits=atoll.Limits(processes=32))
    try:
        while True:
            assert await greedy.fork_bomb() < 32
    finally:
        with anyio.CancelScope(shield=True):
            await host.stop(greedy)


async def _busy_core(host: atoll.Host) -> None:
    greedy = await host.spawn(Greedy, limits=atoll.Limits())
    try:
        while True:
            await greedy.spin(0.05)
    finally:
        with anyio.CancelScope(shield=True):
            await host.stop(greedy)


async def _loaded(
    load: Callable[[atoll.Host], Coroutine[Any, Any, None]],
    host: atoll.Host,
    call: Any,
    calls: int,
) -> float:
    async with anyio.create_task_group() as tg:
        tg.start_soon(load, host)
        await anyio.sleep(0.2)  # let it get going: a spawn, the first allocation
        sample = await _burst(call, calls)
        tg.cancel_scope.cancel()
    return sample


async def main(rounds: int, calls: int) -> None:
    floor = zmq_floor() * 1e6
    print(f"zmq floor, blocking: {floor:.1f} us (median)")
    print(f"{'neighbour no-op call, us':<28} {'quiet':>9} {'loaded':>9} {'loaded/quiet':>14}")
    async with atoll.open_host() as host:
        neighbour = await host.spawn(Neighbour)
        call = neighbour.noop
        for _ in range(200):
            await call()
        loads = (("memory", _memory), ("fork bomb", _fork_bomb), ("busy core", _busy_core))
        for name, load in loads:
            quiet: list[float] = []
            loaded: list[float] = []
            for i in range(rounds):
                if i % 2:
                    loaded.append(await _loaded(load, host, call, calls))
                    quiet.append(await _burst(call, calls))
                else:
                    quiet.append(await _burst(call, calls))
                    loaded.append(await _loaded(load, host, call, calls))
            ratios = [b / a for a, b in zip(quiet, loaded, strict=True)]
            q = statistics.quantiles(ratios, n=4)
            print(
                f"{name:<28} {statistics.median(quiet):9.1f} {statistics.median(loaded):9.1f}"
                f" {statistics.median(ratios):8.3f}x  [{q[0]:.3f}, {q[2]:.3f}]",
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--backend", default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.rounds, args.calls, backend=args.backend)
