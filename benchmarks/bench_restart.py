"""How long an actor that dies is away (``spawn(..., restart=atoll.Restart())``).

    python benchmarks/bench_restart.py [--times N] [--backend B]

Rows, each the median of N, beside the raw pyzmq floor of the same run:

  spawn to first reply       ``host.spawn`` plus a first call (the fork server)
  death to next reply        from a call that makes the actor's process exit
                             (``os._exit``) to the first reply of its new
                             incarnation, through the same ref: the death
                             seen, a new process forked, its actor built
  ... without fork server    the same with ``open_host(fork_server=False)``:
                             a new interpreter each time
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import anyio
from bench_tensors import zmq_floor

import atoll


class Phoenix(atoll.Actor):
    async def noop(self) -> None:
        return None

    async def crash(self) -> None:
        os._exit(3)


async def _measure(times: int, fork_server: bool) -> tuple[list[float], list[float]]:
    spawns: list[float] = []
    restarts: list[float] = []
    forever = atoll.Restart(limit=times + 1, backoff=0.0)
    async with atoll.open_host(fork_server=fork_server) as host:
        for _ in range(times):
            start = time.perf_counter()
            ref = await host.spawn(Phoenix)
            await ref.noop()
            spawns.append((time.perf_counter() - start) * 1e3)
            await host.stop(ref)
        phoenix = await host.spawn(Phoenix, restart=forever)
        await phoenix.noop()
        for _ in range(times):
            start = time.perf_counter()
            try:
                await phoenix.crash()
            except atoll.ActorDiedError:
                pass
            await phoenix.noop()
            restarts.append((time.perf_counter() - start) * 1e3)
    return spawns, restarts


async def main(times: int) -> None:
    print(f"zmq floor, blocking: {zmq_floor() * 1e6:.1f} us (median)")
    spawns, restarts = await _measure(times, fork_server=True)
    print(f"spawn to first reply:           {statistics.median(spawns):7.1f} ms")
    print(f"death to next reply:            {statistics.median(restarts):7.1f} ms")
    spawns, restarts = await _measure(times, fork_server=False)
    print(f"spawn, without fork server:     {statistics.median(spawns):7.1f} ms")
    print(f"restart, without fork server:   {statistics.median(restarts):7.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--times", type=int, default=20)
    parser.add_argument("--backend", default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.times, backend=args.backend)
