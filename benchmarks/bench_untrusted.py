"""What running an actor untrusted costs (``spawn(trusted=False)``), in one run.

    python benchmarks/bench_untrusted.py [--rounds R] [--calls N] [--backend B]

One host, one trusted and one untrusted actor of the same class; bursts of
N calls alternate between them, R rounds, the order flipped every round. A
burst's median is a sample; each round's ratio compares the two on the
machine as it was in that second. Rows:

  zmq floor              DEALER/ROUTER round trip, blocking pyzmq both ends
  no-op                  ``await ref.noop()``: its result travels pickled
                         (trusted) or plain (untrusted)
  16-byte call           ``await ref.take(b"x" * 16)``
  pre-shared tensor      ``await ref.take(t)``, ``t`` 1 MiB and 64 MiB, already
                         in shared memory: what it adds to the 16-byte call
  no-op, sandboxed       the same for an actor in a bubblewrap sandbox
  sandboxed 64 MiB       a pre-shared 64 MiB tensor to the sandboxed actor
                         (linked into its /dev/shm once, then zero-copy)
  spawn to first reply   ``host.spawn`` plus the first call: trusted (a fork),
                         untrusted (a fork too: never a warm process), and
                         sandboxed once its sandbox has been used (the spare
                         process started in it is ready) and cold (a new
                         interpreter in a new sandbox: the first spawn)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from bench_tensors import zmq_floor

import atoll


class Subject(atoll.Actor):
    async def noop(self) -> None:
        return None

    async def take(self, value: Any) -> None:
        return None


async def _burst(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    clock = time.perf_counter
    times = []
    for _ in range(calls):
        start = clock()
        await call()
        times.append(clock() - start)
    return statistics.median(times) * 1e6


async def _alternate(
    one: Callable[[], Awaitable[Any]],
    other: Callable[[], Awaitable[Any]],
    rounds: int,
    calls: int,
) -> tuple[list[float], list[float]]:
    for _ in range(100):
        await one()
        await other()
    a: list[float] = []
    b: list[float] = []
    for i in range(rounds):
        if i % 2:
            b.append(await _burst(other, calls))
            a.append(await _burst(one, calls))
        else:
            a.append(await _burst(one, calls))
            b.append(await _burst(other, calls))
    return a, b


def _row(name: str, a: list[float], b: list[float], *, diff: bool = False) -> str:
    if diff:
        pairs = [y - x for x, y in zip(a, b, strict=True)]
        compared = f"{statistics.median(pairs):+8.1f} us"
    else:
        pairs = [y / x for x, y in zip(a, b, strict=True)]
        compared = f"{statistics.median(pairs):8.3f}x"
    return f"{name:<44} {statistics.median(a):9.1f} {statistics.median(b):9.1f} {compared}"


async def main(rounds: int, calls: int) -> None:
    import torch

    floor = zmq_floor() * 1e6
    print(f"zmq floor, blocking: {floor:.1f} us (median)")
    print(f"{'':<44} {'first':>9} {'second':>9} {'second vs first':>12}")
    async with atoll.open_host() as host:
        trusted = await host.spawn(Subject)
        untrusted = await host.spawn(Subject, trusted=False)
        a, b = await _alternate(trusted.noop, untrusted.noop, rounds, calls)
        print(_row("no-op: trusted, untrusted", a, b), flush=True)
        small = b"x" * 16
        for size, label in ((1 << 18, "1 MiB"), (1 << 24, "64 MiB")):
            t = atoll.share(torch.ones(size))

            def with_small(ref: Any = untrusted) -> Any:
                return ref.take(small)

            def with_tensor(ref: Any = untrusted, t: Any = t) -> Any:
                return ref.take(t)

            a, b = await _alternate(with_small, with_tensor, rounds, calls)
            print(_row(f"untrusted: 16-byte call, pre-shared {label}", a, b, diff=True))

            def trusted_tensor(ref: Any = trusted, t: Any = t) -> Any:
                return ref.take(t)

            a, b = await _alternate(trusted_tensor, with_tensor, rounds, calls)
            print(_row(f"pre-shared {label}: trusted, untrusted", a, b), flush=True)
        sandboxed = await host.spawn(Subject, sandbox=atoll.Sandbox())
        a, b = await _alternate(trusted.noop, sandboxed.noop, rounds, calls)
        print(_row("no-op: trusted, sandboxed", a, b), flush=True)
        big = atoll.share(torch.ones(1 << 24))  # 64 MiB

        def boxed_small(ref: Any = sandboxed) -> Any:
            return ref.take(small)

        def boxed_big(ref: Any = sandboxed, t: Any = big) -> Any:
            return ref.take(t)

        def trusted_big(ref: Any = trusted, t: Any = big) -> Any:
            return ref.take(t)

        a, b = await _alternate(boxed_small, boxed_big, rounds, calls)
        print(_row("sandboxed: 16-byte call, pre-shared 64 MiB", a, b, diff=True))
        a, b = await _alternate(trusted_big, boxed_big, rounds, calls)
        print(_row("pre-shared 64 MiB: trusted, sandboxed", a, b), flush=True)
        cold = time.perf_counter()
        first = await host.spawn(Subject, sandbox=atoll.Sandbox(read_only=("/usr/share",)))
        await first.noop()
        cold = (time.perf_counter() - cold) * 1e3
        await host.stop(first)
        spares = host._spawner._spares._waiting  # the spare each sandbox used has
        spawns: dict[str, list[float]] = {"trusted": [], "untrusted": [], "sandboxed": []}
        kinds: dict[str, dict[str, Any]] = {
            "trusted": {},
            "untrusted": {"trusted": False},
            "sandboxed": {"sandbox": atoll.Sandbox()},
        }
        for i in range(10):
            for kind in list(kinds)[:: 1 if i % 2 else -1]:
                for spare in list(spares.values()):
                    await spare.ready.wait()
                start = time.perf_counter()
                ref = await host.spawn(Subject, **kinds[kind])
                await ref.noop()
                spawns[kind].append((time.perf_counter() - start) * 1e3)
                await host.stop(ref)
        print(
            "spawn to first reply: "
            + ", ".join(f"{kind} {statistics.median(ms):.1f} ms" for kind, ms in spawns.items())
            + f"; sandboxed, cold: {cold:.1f} ms"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--backend", default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.rounds, args.calls, backend=args.backend)
