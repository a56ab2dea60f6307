"""Call latency and throughput: atoll next to a raw pyzmq floor, in one run.

    python benchmarks/bench_calls.py [--calls N] [--rounds R]

Rows:
  zmq floor, blocking   DEALER/ROUTER round trip, blocking pyzmq both ends
  zmq floor, anyio/X    same echo server; client on atoll's AnyIO socket
  atoll no-op, X        ``await ref.noop()`` through a real actor process (with the
                        default reply polling, and with ``spin_us=0``)
  atoll __main__ class  ``await ref.take(Point(1.0, 2.0))``: an instance of a class
                        defined in ``__main__`` (this script), which the actor
                        cannot import (a class from a notebook or script)
  atoll 100 in flight   calls/s with 100 concurrent callers on one ref
  spawn to first reply  ``host.spawn`` plus the first call, per actor, forked from
                        the host's fork server; a new host's first spawn (which
                        starts the fork server) beside the floor of any process
                        started from scratch (``python -c`` importing pyzmq,
                        msgspec and anyio and running an empty event loop);
                        with ``fork_server=False`` (a new
                        interpreter each time); taking a process that
                        ``host.prewarm()`` started beforehand
  death detected        SIGKILL of an actor to ActorDiedError in its caller

Each latency row is the median (and p99) of per-call times, best median over
``--rounds`` rounds so that a noisy neighbour inflates fewer numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import anyio
import zmq

import atoll
from atoll.transport import AsyncSocket


def _echo_server(endpoint: str, ready: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.set()
    while True:
        frames = sock.recv_multipart()
        if frames[1] == b"stop":
            break
        sock.send_multipart(frames)
    sock.close(linger=0)
    ctx.term()


class EchoServer:
    """A blocking pyzmq ROUTER echo in its own process: the floor's far end."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        mp = multiprocessing.get_context("spawn")
        ready = mp.Event()
        self.proc = mp.Process(target=_echo_server, args=(endpoint, ready), daemon=True)
        self.proc.start()
        ready.wait(10)

    def stop(self) -> None:
        ctx: zmq.Context[Any] = zmq.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.connect(self.endpoint)
        s.send(b"stop")
        self.proc.join(5)
        s.close(linger=0)


def _summary(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def raw_blocking(endpoint: str, n: int) -> list[float]:
    ctx: zmq.Context[Any] = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.connect(endpoint)
    for _ in range(200):
        s.send(b"x")
        s.recv()
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        s.send(b"x")
        s.recv()
        out.append(clock() - t)
    s.close(linger=0)
    return out


async def raw_anyio(endpoint: str, n: int) -> list[float]:
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    s = AsyncSocket(sock)
    got = anyio.Event()

    def on_message(frames: list[zmq.Frame]) -> None:
        got.set()

    out = []
    clock = time.perf_counter
    async with anyio.create_task_group() as tg:
        tg.start_soon(s.serve, on_message)
        for i in range(n + 200):
            t = clock()
            s.send([b"x"])
            await got.wait()
            got = anyio.Event()
            if i >= 200:
                out.append(clock() - t)
        tg.cancel_scope.cancel()
    s.close()
    return out


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Noop(atoll.Actor):
    async def noop(self) -> None:
        return None

    async def take(self, value: Any) -> None:
        return None


async def _noop_actor(host: atoll.Host) -> Any:
    """A Noop actor as most are: forked from the host's fork server. (The
    first spawn starts the server beside it; measuring while it starts would
    measure the machine's other core being busy.)"""
    await host.stop(await host.spawn(Noop))
    return await host.spawn(Noop)


async def atoll_latency(n: int, spin_us: float = 150, value: Any = None) -> list[float]:
    async with atoll.open_host(spin_us=spin_us) as host:
        ref = await _noop_actor(host)
        call = ref.noop if value is None else lambda: ref.take(value)
        for _ in range(200):
            await call()
        out = []
        clock = time.perf_counter
        for _ in range(n):
            t = clock()
            await call()
            out.append(clock() - t)
        return out


async def atoll_throughput(n: int, in_flight: int = 100) -> float:
    async with atoll.open_host() as host:
        ref = await _noop_actor(host)
        per_task = n // in_flight

        async def worker() -> None:
            for _ in range(per_task):
                await ref.noop()

        async with anyio.create_task_group() as tg:
            for _ in range(in_flight):
                tg.start_soon(worker)  # warm-up
        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(in_flight):
                tg.start_soon(worker)
        return per_task * in_flight / (time.perf_counter() - t)


async def spawn_to_first_reply(n: int, how: str = "forked") -> list[float]:
    """``how``: "forked" (from the host's fork server, started before the
    timing), "fresh" (``fork_server=False``: a new interpreter each time), or
    "prewarm" (taking a process ``host.prewarm()`` started beforehand)."""
    out = []
    async with atoll.open_host(fork_server=how != "fresh") as host:
        if how == "forked":
            await host.stop(await host.spawn(Noop))  # starts the fork server
        for _ in range(n):
            if how == "prewarm":
                await host.prewarm()  # a started process waits (not timed)
            t = time.perf_counter()
            ref = await host.spawn(Noop)
            await ref.noop()
            out.append(time.perf_counter() - t)
            await host.stop(ref)
    return out


# What every process started from scratch pays before atoll's code runs: the
# interpreter, atoll's dependencies, and an event loop.
_START_FLOOR = "import zmq, msgspec, anyio\nasync def main(): pass\nanyio.run(main)"


def start_floor() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", _START_FLOOR], check=True)
    return time.perf_counter() - t


async def first_spawn() -> float:
    """A new host's first spawn and call: from scratch, its fork server starting beside it."""
    async with atoll.open_host() as host:
        t = time.perf_counter()
        ref = await host.spawn(Noop)
        await ref.noop()
        return time.perf_counter() - t


class Victim(atoll.Actor):
    async def pid(self) -> int:
        return os.getpid()

    async def hang(self) -> None:
        await anyio.sleep_forever()


async def _time_death(host: atoll.Host) -> float:
    ref = await host.spawn(Victim)
    pid = await ref.pid()
    killed_at = 0.0
    detected_at = 0.0

    async def call() -> None:
        nonlocal detected_at
        try:
            await ref.hang()
        except atoll.ActorDiedError:
            detected_at = time.perf_counter()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        killed_at = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
    return detected_at - killed_at


async def death_detection(n: int) -> list[float]:
    async with atoll.open_host() as host:
        return [await _time_death(host) for _ in range(n)]


def best_of(rounds: int, fn: Callable[[], list[float]]) -> tuple[float, float]:
    return min((_summary(fn()) for _ in range(rounds)), key=lambda r: r[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    n, rounds = opts.calls, opts.rounds

    workdir = tempfile.TemporaryDirectory(prefix="atoll-bench-")
    endpoint = f"ipc://{workdir.name}/echo"
    server = EchoServer(endpoint)
    rows: list[tuple[str, float, float]] = []
    try:
        floor, p99 = best_of(rounds, lambda: raw_blocking(endpoint, n))
        rows.append(("zmq floor, blocking", floor, p99))
        for backend in ("asyncio", "trio"):
            med, p99 = best_of(
                rounds, functools.partial(anyio.run, raw_anyio, endpoint, n, backend=backend)
            )
            rows.append((f"zmq floor, atoll AsyncSocket/{backend}", med, p99))
    finally:
        server.stop()
        workdir.cleanup()
    for backend in ("asyncio", "trio"):
        med, p99 = best_of(rounds, functools.partial(anyio.run, atoll_latency, n, backend=backend))
        rows.append((f"atoll no-op call, {backend}", med, p99))
        med, p99 = best_of(
            rounds, functools.partial(anyio.run, atoll_latency, n, 0, backend=backend)
        )
        rows.append((f"atoll no-op call, {backend}, spin_us=0", med, p99))
        med, p99 = best_of(
            rounds,
            functools.partial(anyio.run, atoll_latency, n, 150, Point(1.0, 2.0), backend=backend),
        )
        rows.append((f"atoll call, __main__ dataclass, {backend}", med, p99))

    print(f"python {sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")
    print(f"{'':42} {'median':>10} {'p99':>10} {'x floor':>8}")
    for label, med, p99 in rows:
        print(f"{label:42} {med * 1e6:8.1f}us {p99 * 1e6:8.1f}us {med / floor:8.2f}")
    for backend in ("asyncio", "trio"):
        rate = max(anyio.run(atoll_throughput, n * 4, backend=backend) for _ in range(rounds))
        print(f"{'atoll 100 calls in flight, ' + backend:42} {rate:10,.0f} calls/s")
    for backend in ("asyncio", "trio"):

        def run(fn: Callable[..., Any], *args: Any, b: str = backend) -> Any:
            return anyio.run(fn, *args, backend=b)

        pairs = [(run(first_spawn), start_floor()) for _ in range(8)]  # alternating
        spawns = [
            (f"spawn to first reply, {backend}", run(spawn_to_first_reply, 20, "forked")),
            ("  a new host's first (from scratch)", [p[0] for p in pairs]),
            ("  floor: python, its imports, a loop", [p[1] for p in pairs]),
            ("  fork_server=False", run(spawn_to_first_reply, 20, "fresh")),
            ("  from host.prewarm()", run(spawn_to_first_reply, 20, "prewarm")),
        ]
        for label, times in spawns:
            med, p99 = _summary(times)
            print(f"{label:42} {med * 1e3:8.1f}ms {p99 * 1e3:8.1f}ms")
        med, p99 = _summary(anyio.run(death_detection, 10, backend=backend))
        print(f"{'SIGKILL to ActorDiedError, ' + backend:42} {med * 1e3:8.1f}ms {p99 * 1e3:8.1f}ms")


if __name__ == "__main__":
    main()
