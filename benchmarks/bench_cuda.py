"""CUDA tensors: a 64 MiB and a 1 GiB float32 CUDA tensor to an actor and a
scalar back, beside a 16-byte call and torch.multiprocessing in the same run.

    python benchmarks/bench_cuda.py [--sizes 64M,1G] [--calls N] [--backend B]

Needs a CUDA GPU (it says so and exits otherwise). Rows, per size:
  atoll CUDA tensor      ``await ref.first(t)``: the tensor travels as a CUDA
                         IPC handle; the actor reads one element
  atoll 16-byte call     ``await ref.first(b"x" * 16)``, in ten rounds that
                         alternate with the row above; "16-byte call + X" is
                         the median of the rounds' differences
  torch.mp Queue         the same tensor to a torch.multiprocessing worker
                         through a Queue, a scalar back
and once: the blocking pyzmq round trip (the floor of any call).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

import anyio

import atoll

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tensors import _interleaved, _size, _torch_queue, zmq_floor


class Reader(atoll.Actor):
    async def first(self, x: Any) -> float:
        return float(x[0])


async def _rows(sizes: list[int], calls: int) -> list[tuple[float, float, float]]:
    import torch

    rows = []
    async with atoll.open_host() as host:
        await host.stop(await host.spawn(Reader))  # starts the fork server
        ref = await host.spawn(Reader)
        for nbytes in sizes:
            t = torch.ones(nbytes // 4, device="cuda")
            rows.append(
                await _interleaved(
                    10,
                    calls // 4,
                    functools.partial(ref.first, b"x" * 16),
                    functools.partial(ref.first, t),
                )
            )
            del t
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64M,1G")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    opts = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"bench_cuda needs a CUDA GPU; torch {torch.__version__} sees none")
    sizes = [_size(s) for s in opts.sizes.split(",")]
    floor = zmq_floor()
    rows = anyio.run(_rows, sizes, opts.calls, backend=opts.backend)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, backend {opts.backend}")
    print(f"{'zmq floor (16 B round trip)':34} {floor * 1e6:10.1f}us")
    for nbytes, (small, sent, over) in zip(sizes, rows, strict=True):
        label = f"{nbytes >> 20} MiB"
        queue = _torch_queue(torch.ones(nbytes // 4, device="cuda"), opts.calls)
        print(f"{'atoll 16-byte call':34} {small * 1e6:10.1f}us")
        print(
            f"{'atoll CUDA tensor, ' + label:34} {sent * 1e6:10.1f}us  "
            f"16-byte call + {over * 1e6:.1f}us"
        )
        print(f"{'torch.mp Queue, CUDA, ' + label:34} {queue * 1e6:10.1f}us")


if __name__ == "__main__":
    main()
