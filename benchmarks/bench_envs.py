"""Environments: building one, and spawning actors into one, beside the floors.

    python benchmarks/bench_envs.py [--spawns N] [--builds N] [--backend B] [--no-torch]

Rows (medians, one run, one machine):
  floor: python -I -c pass      start and exit of a bare interpreter
  floor: python -I -c 'import zmq'
                                the same, importing pyzmq: the least an actor
                                process does before it can say hello
  cold build                    a small environment (six) built by uv into an
                                empty atoll cache; uv's own download cache is
                                warm after the first round
  cached spawn                  host.spawn(A, env=...) into a built environment,
                                to its first reply (the first spawn starts from
                                scratch and starts the environment's fork server;
                                the median is the forks after it)
  warm-pool spawn               the same, taking a process host.prewarm() started
  torch spawn, cold             share_torch=True, to a first reply that needs
                                torch imported (torch not imported beforehand)
  torch spawn, warm pool        the same from host.prewarm(env, imports=["torch"])
The ratios are to the ``import zmq`` floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import atoll
from atoll.venvs import Env, build, find_uv

_clock = time.perf_counter


class Probe(atoll.Actor):
    async def ping(self) -> int:
        return 1

    async def torch_version(self) -> str:
        import torch

        return str(torch.__version__)


def _process_floor(python: str, code: str, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = _clock()
        subprocess.run([python, "-I", "-c", code], check=True)
        samples.append(_clock() - t0)
    return statistics.median(samples)


async def _spawns(
    host: atoll.Host,
    n: int,
    env: Env,
    first_call: Callable[[Any], Awaitable[Any]],
    warm: list[str] | None = None,
) -> float:
    samples = []
    for _ in range(n):
        if warm is not None:
            await host.prewarm(env, imports=warm)  # not timed: the pool is ready
        t0 = _clock()
        ref = await host.spawn(Probe, env=env)
        await first_call(ref)
        samples.append(_clock() - t0)
        await host.stop(ref)
    return statistics.median(samples)


async def run(args: argparse.Namespace) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-envs-") as cache:
        small = Env(["six==1.16.0"], name="bench-small")
        builds = []
        for i in range(args.builds):
            t0 = _clock()
            await build(small, cache_dir=os.path.join(cache, f"cold{i}"), progress=False)
            builds.append(_clock() - t0)
        rows.append(("cold build, six (uv download cache warm)", statistics.median(builds)))
        built = await build(small, cache_dir=cache, progress=False)
        rows.insert(0, ("floor: python -I -c pass", _process_floor(built.python, "pass", 10)))
        rows.insert(
            1, ("floor: python -I -c 'import zmq'", _process_floor(built.python, "import zmq", 10))
        )
        async with atoll.open_host(env_cache=cache, build_progress=False) as host:

            async def ping(ref: Any) -> Any:
                return await ref.ping()

            rows.append(
                ("cached spawn to first reply", await _spawns(host, args.spawns, small, ping))
            )
            rows.append(
                (
                    "warm-pool spawn to first reply",
                    await _spawns(host, args.spawns, small, ping, []),
                )
            )
            if not args.no_torch:
                torchy = Env(["numpy"], share_torch=True, name="bench-torch")
                await build(torchy, cache_dir=cache, progress=False)

                async def torch_version(ref: Any) -> Any:
                    return await ref.torch_version()

                n = max(3, args.spawns // 3)
                rows.append(("torch spawn, cold", await _spawns(host, n, torchy, torch_version)))
                rows.append(
                    (
                        "torch spawn, warm pool",
                        await _spawns(host, n, torchy, torch_version, ["torch"]),
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spawns", type=int, default=15)
    parser.add_argument("--builds", type=int, default=3)
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    print(f"python {sys.version.split()[0]}, uv at {find_uv()}")
    for backend in backends:
        rows = anyio.run(run, args, backend=backend)
        floor = rows[1][1]
        print(f"[{backend}]{'':36} {'median':>10} {'x import zmq':>13}")
        for label, seconds in rows:
            print(f"{label:44} {seconds * 1e3:8.1f}ms {seconds / floor:13.2f}")


if __name__ == "__main__":
    main()
