"""Two revisions of atoll side by side, in one run: is a change faster or slower?

    python benchmarks/bench_ab.py BASE [--new REV] [--rounds R] [--calls N]

BASE (and REV, by default the working tree) are checked out into temporary
git worktrees. For each workload and backend, one process per revision opens
a host and spawns an actor, then the two take turns: a burst of N calls
each, R times, the order flipped every round. A burst's median is one
sample; the ratio of the two bursts of one round compares the revisions on
the machine as it was in that second. Reported: the medians of each side's
samples, and the median (and quartiles) of the per-round ratios, new / base.
A raw pyzmq floor (DEALER/ROUTER echo, blocking) runs in the same rounds, to
show how fast the machine was.

Workloads:
  noop      ``await ref.noop()``
  tensor    ``await ref.take(t)``, ``t`` a 1 MiB tensor already in shared memory
  roundtrip ``await ref.echo(t)``: that tensor sent and returned
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import anyio

import atoll

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = ("noop", "tensor", "roundtrip")


# -- the worker: runs in a process of its own, with one revision's atoll ----


class Subject(atoll.Actor):
    async def noop(self) -> None:
        return None

    async def take(self, t: Any) -> None:
        return None

    async def echo(self, t: Any) -> Any:
        return t


def _worker(workload: str, backend: str) -> None:
    async def main() -> None:
        async with atoll.open_host() as host:
            ref = await host.spawn(Subject)
            call: Any
            if workload == "noop":
                call = ref.noop
            else:
                import torch

                t = atoll.share(torch.ones(1 << 18))  # 1 MiB of float32
                method = ref.take if workload == "tensor" else ref.echo

                def call() -> Any:
                    return method(t)

            for _ in range(200):
                await call()
            _serve_bursts_ready()
            clock = time.perf_counter
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                if not line.strip():
                    return
                times = []
                for _ in range(int(line)):
                    start = clock()
                    await call()
                    times.append(clock() - start)
                print(f"{statistics.median(times) * 1e6:.2f}", flush=True)

    anyio.run(main, backend=backend)


def _serve_bursts_ready() -> None:
    print("ready", flush=True)


def _floor_worker() -> None:
    import multiprocessing

    import zmq

    endpoint = f"ipc://{tempfile.mkdtemp()}/floor"
    ready = multiprocessing.Event()
    echo = multiprocessing.Process(target=_echo, args=(endpoint, ready), daemon=True)
    echo.start()
    ready.wait()
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    for _ in range(200):
        sock.send(b"x")
        sock.recv()
    _serve_bursts_ready()
    clock = time.perf_counter
    for line in sys.stdin:
        if not line.strip():
            break
        times = []
        for _ in range(int(line)):
            start = clock()
            sock.send(b"x")
            sock.recv()
            times.append(clock() - start)
        print(f"{statistics.median(times) * 1e6:.2f}", flush=True)
    echo.kill()


def _echo(endpoint: str, ready: Any) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.set()
    while True:
        sock.send_multipart(sock.recv_multipart())


# -- the driver --------------------------------------------------------------


@contextlib.contextmanager
def _checked_out(rev: str | None) -> Iterator[str]:
    """The ``src`` folder of revision ``rev`` (None: the working tree)."""
    root = subprocess.check_output(["git", "-C", HERE, "rev-parse", "--show-toplevel"], text=True)
    root = root.strip()
    if rev is None:
        yield os.path.join(root, "src")
        return
    with tempfile.TemporaryDirectory(prefix="atoll-ab-") as tmp:
        tree = os.path.join(tmp, "tree")
        subprocess.run(
            ["git", "-C", root, "worktree", "add", "--detach", "-q", tree, rev], check=True
        )
        try:
            yield os.path.join(tree, "src")
        finally:
            subprocess.run(["git", "-C", root, "worktree", "remove", "--force", tree], check=True)


class _Side:
    def __init__(self, src: str | None, *args: str) -> None:
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = src
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"worker {args} did not start (said {line!r})")
        self.samples: list[float] = []

    def burst(self, calls: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{calls}\n")
        self.proc.stdin.flush()
        sample = float(self.proc.stdout.readline())
        self.samples.append(sample)
        return sample

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write("\n")
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _row(name: str, base: list[float], new: list[float], floor: list[float]) -> str:
    ratios = [n / b for b, n in zip(base, new, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return (
        f"{name:<22} {statistics.median(base):9.1f} {statistics.median(new):9.1f} "
        f"{statistics.median(ratios):7.3f}  [{q1:.3f}, {q3:.3f}]  "
        f"{statistics.median(floor):8.1f}"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--floor":
        _floor_worker()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", help="the revision to compare against (a commit, a tag)")
    parser.add_argument("--new", default=None, help="the revision measured (default: the tree)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--backends", default="asyncio,trio")
    args = parser.parse_args()
    print(
        f"base {args.base}, new {args.new or 'working tree'}: median us per call, "
        f"{args.rounds} rounds x {args.calls} calls, ratio new/base [quartiles], zmq floor",
        flush=True,
    )
    print(f"{'':<22} {'base':>9} {'new':>9} {'ratio':>7}  {'':<16}  {'floor':>8}")
    with _checked_out(args.base) as base_src, _checked_out(args.new) as new_src:
        for workload in args.workloads.split(","):
            for backend in args.backends.split(","):
                floor = _Side(None, "--floor")
                sides = [
                    _Side(base_src, "--worker", workload, backend),
                    _Side(new_src, "--worker", workload, backend),
                ]
                try:
                    for i in range(args.rounds):
                        floor.burst(args.calls)
                        for side in sides if i % 2 == 0 else sides[::-1]:
                            side.burst(args.calls)
                finally:
                    for side in (*sides, floor):
                        side.close()
                name = f"{workload}, {backend}"
                print(_row(name, sides[0].samples, sides[1].samples, floor.samples), flush=True)


if __name__ == "__main__":
    main()
