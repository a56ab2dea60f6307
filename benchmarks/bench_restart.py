"""How long an actor that dies is away (``spawn(..., restart=atoll.Restart())``).

    python benchmarks/bench_restart.py [--rounds R] [--times N] [--backend B]

Rows, each the median over R alternating rounds of N, beside the raw pyzmq
floor of the same run; the four ways of starting a process alternate within
each round, as the machine's speed moves:

  spawn to first reply       ``host.spawn`` plus a first call
  death to next reply        from a call that makes the actor's process exit
                             (``os._exit``) to the first reply of its new
                             incarnation, through the same ref: the death
                             seen, a new process started, its actor built

for each of: a fork of the environment's fork server (the default), a
process from the warm pool (``host.prewarm()``; refilled, untimed, before
each), and both again with ``open_host(fork_server=False)``, where a cold
process is a new interpreter.
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


async def _measure(times: int, fork_server: bool, warm: bool) -> tuple[list[float], list[float]]:
    spawns: list[float] = []
    restarts: list[float] = []
    forever = atoll.Restart(limit=times + 1, backoff=0.0)
    async with atoll.open_host(fork_server=fork_server) as host:
        for _ in range(times):
            if warm:
                await host.prewarm()
            start = time.perf_counter()
            ref = await host.spawn(Phoenix)
            await ref.noop()
            spawns.append((time.perf_counter() - start) * 1e3)
            await host.stop(ref)
        phoenix = await host.spawn(Phoenix, restart=forever)
        await phoenix.noop()
        for _ in range(times):
            if warm:
                await host.prewarm()
            start = time.perf_counter()
            try:
                await phoenix.crash()
            except atoll.ActorDiedError:
                pass
            await phoenix.noop()
            restarts.append((time.perf_counter() - start) * 1e3)
    return spawns, restarts


WAYS = {
    "fork server": (True, False),
    "warm pool": (True, True),
    "no fork server": (False, False),
    "warm, no fork server": (False, True),
}


async def main(rounds: int, times: int) -> None:
    print(f"zmq floor, blocking: {zmq_floor() * 1e6:.1f} us (median)")
    spawns: dict[str, list[float]] = {way: [] for way in WAYS}
    restarts: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(rounds):
        for way, (fork_server, warm) in WAYS.items():
            got = await _measure(times, fork_server, warm)
            spawns[way].append(statistics.median(got[0]))
            restarts[way].append(statistics.median(got[1]))
    print(f"{'ms, median of rounds':24} {'spawn to reply':>15} {'death to reply':>15}")
    for way in WAYS:
        spawn, restart = statistics.median(spawns[way]), statistics.median(restarts[way])
        print(f"{way:24} {spawn:15.1f} {restart:15.1f}")
    print(f"zmq floor, blocking, after: {zmq_floor() * 1e6:.1f} us (median)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--times", type=int, default=10)
    parser.add_argument("--backend", default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.rounds, args.times, backend=args.backend)
