"""Tensor plane: a big float32 tensor to an actor and a scalar back, beside its floors.

    python benchmarks/bench_tensors.py [--sizes 64M,1G] [--calls N] [--backend B]
                                       [--crossover SIZES]

Needs torch (``pip install torch==2.13.0``) and numpy. For each size:
  atoll, pre-shared     ``await ref.first(t)`` with ``t = atoll.share(...)``: sent
                        by descriptor, whatever its size
  atoll, fresh          the same tensor, not shared: copied once into the arena
                        (a copy of 8 MiB or more is split among up to four threads)
  memcpy, warm          the floor of a fresh send: one copy of the same size into
                        memory that is already faulted in, by one thread (in
                        rounds that alternate with the fresh rows)
  torch.mp Queue        torch.multiprocessing: the same pre-shared tensor to a
                        worker process through a Queue, a scalar back
  atoll 16-byte call    ``await ref.first(b"x" * 16)``, timed in rounds that
                        alternate with the pre-shared rows; what a pre-shared
                        call adds to it is the median of the rounds' differences
and once per run:
  zmq floor             blocking pyzmq DEALER/ROUTER round trip, 16 bytes
Then the crossover that sets the inline threshold: one array of each size sent
inline (copied into the message) and through shared memory.

Latencies are medians over ``--calls`` calls, in one run, on one machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np

import atoll

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_calls import EchoServer, raw_blocking

_clock = time.perf_counter


class Reader(atoll.Actor):
    async def first(self, x: Any) -> float:
        return float(x[0])


def _copies(nbytes: int, calls: int) -> int:
    """How many times to time a copy of ``nbytes``: fewer for big ones."""
    return max(5, min(calls, (1 << 32) // nbytes))


async def _median(n: int, fn: Callable[[], Awaitable[Any]]) -> float:
    for _ in range(min(n, 20)):
        await fn()
    samples = []
    for _ in range(n):
        t = _clock()
        await fn()
        samples.append(_clock() - t)
    return statistics.median(samples)


def _mp_worker(inbox: Any, outbox: Any) -> None:
    while True:
        t = inbox.get()
        if t is None:
            return
        outbox.put(float(t[0]))


def _torch_queue(t: Any, n: int) -> float:
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    worker = ctx.Process(target=_mp_worker, args=(inbox, outbox), daemon=True)
    worker.start()
    t.share_memory_()
    try:
        samples = []
        for i in range(n + 5):
            start = _clock()
            inbox.put(t)
            outbox.get()
            if i >= 5:
                samples.append(_clock() - start)
        return statistics.median(samples)
    finally:
        inbox.put(None)
        worker.join(10)


async def _interleaved(
    rounds: int, calls: int, a: Callable[[], Awaitable[Any]], b: Callable[[], Awaitable[Any]]
) -> tuple[float, float, float]:
    """Medians of ``a`` and ``b`` timed in alternating rounds (the median of
    the rounds' medians), so a slow spell of the machine hits both alike;
    and the median of what ``b`` took over ``a`` round by round."""
    ma, mb = [], []
    for _ in range(rounds):
        ma.append(await _median(calls, a))
        mb.append(await _median(calls, b))
    over = statistics.median(y - x for x, y in zip(ma, mb, strict=True))
    return statistics.median(ma), statistics.median(mb), over


async def _atoll_rows(
    sizes: list[int], calls: int
) -> list[tuple[float, float, float, float, float]]:
    """Per size: the 16-byte call and the pre-shared tensor, timed in
    alternating rounds; the fresh tensor and a warm memcpy, likewise."""
    import torch

    async with atoll.open_host() as host:
        # The first spawn starts the fork server beside it: measure a fork,
        # as most actors are, once the server is up.
        await host.stop(await host.spawn(Reader))
        ref = await host.spawn(Reader)
        rows = []
        for nbytes in sizes:
            fresh_t = torch.ones(nbytes // 4)
            src, dst = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)

            async def memcpy(src: Any = src, dst: Any = dst) -> None:
                np.copyto(dst, src)  # dst is faulted in by the warm-up copies

            copy, fresh, _ = await _interleaved(
                3, _copies(nbytes, calls), memcpy, functools.partial(ref.first, fresh_t)
            )
            del fresh_t, src, dst
            shared_t = atoll.share(torch.ones(nbytes // 4))
            small, shared, over = await _interleaved(
                10,
                calls // 4,
                functools.partial(ref.first, b"x" * 16),
                functools.partial(ref.first, shared_t),
            )
            del shared_t
            rows.append((small, shared, over, fresh, copy))
        return rows


async def _crossover(sizes: list[int], calls: int) -> list[tuple[int, float, float]]:
    out = []
    for transfer in ("inline", "shared_memory"):
        async with atoll.open_host(transfer=transfer) as host:
            host._node.plane.sender.threshold = 0  # every size through the plane's choice
            ref = await host.spawn(Reader)
            for i, nbytes in enumerate(sizes):
                a = np.ones(nbytes // 8)
                med = await _median(calls, functools.partial(ref.first, a))
                if transfer == "inline":
                    out.append((nbytes, med, 0.0))
                else:
                    out[i] = (nbytes, out[i][1], med)
    return out


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].isalpha() else int(text)


def zmq_floor() -> float:
    """The blocking pyzmq round trip of 16 bytes: the median of five rounds.
    For a moment after the echo server starts, threads that numpy's BLAS
    starts there spin, and a core that never idles answers in half the time."""
    workdir = tempfile.TemporaryDirectory(prefix="atoll-bench-")
    server = EchoServer(f"ipc://{workdir.name}/echo")
    try:
        return statistics.median(
            statistics.median(raw_blocking(server.endpoint, 1000)) for _ in range(5)
        )
    finally:
        server.stop()
        workdir.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64M,1G")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--crossover", default="16K,64K,128K,256K,512K,1M,4M")
    opts = parser.parse_args()
    sizes = [_size(s) for s in opts.sizes.split(",")]

    import torch

    floor = zmq_floor()
    rows = anyio.run(_atoll_rows, sizes, opts.calls, backend=opts.backend)

    print(f"torch {torch.__version__}, numpy {np.__version__}, backend {opts.backend}")
    print(f"{'zmq floor (16 B round trip)':34} {floor * 1e6:10.1f}us")
    for nbytes, (small, shared, over, fresh, memcpy) in zip(sizes, rows, strict=True):
        label = f"{nbytes >> 20} MiB"
        print(f"{'atoll 16-byte call':34} {small * 1e6:10.1f}us")
        queue = _torch_queue(torch.ones(nbytes // 4), opts.calls)
        print(
            f"{'atoll pre-shared, ' + label:34} {shared * 1e6:10.1f}us  "
            f"16-byte call + {over * 1e6:.1f}us"
        )
        print(f"{'torch.mp Queue pre-shared, ' + label:34} {queue * 1e6:10.1f}us")
        print(
            f"{'atoll fresh, ' + label:34} {fresh * 1e3:10.2f}ms  {fresh / memcpy:.2f}x warm memcpy"
        )
        print(f"{'memcpy into warm memory, ' + label:34} {memcpy * 1e3:10.2f}ms")
    crossover = anyio.run(
        _crossover, [_size(s) for s in opts.crossover.split(",")], 200, backend=opts.backend
    )
    print(f"{'array size':>12} {'inline':>10} {'shared':>10}")
    for nbytes, inline, shared in crossover:
        print(f"{nbytes >> 10:>10}Ki {inline * 1e6:8.1f}us {shared * 1e6:8.1f}us")


if __name__ == "__main__":
    main()
