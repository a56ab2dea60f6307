"""A host application whose actors stop at ``breakpoint()``: run on a
pseudo-terminal by ``test_debugger.py`` (``python debug_app.py BACKEND``)."""

from __future__ import annotations

import sys

import anyio

import atoll


class Stopper(atoll.Actor):
    async def async_stop(self, x: int) -> int:
        y = x * 2
        breakpoint()  # blocks its event loop: the health probe must not mind
        return y + 1

    def sync_stop(self, x: int) -> int:
        y = x * 3
        breakpoint()
        return y

    async def untrusted_stop(self) -> str:
        breakpoint()  # refused: no terminal for an untrusted actor
        return "went on"


async def main(backend: str) -> None:
    probe = atoll.Restart(health_interval=0.1, health_timeout=0.3)
    async with atoll.open_host() as host:
        first = await host.spawn(Stopper, name="first", restart=probe)
        second = await host.spawn(Stopper, name="second", restart=probe)
        stranger = await host.spawn(Stopper, name="stranger", trusted=False)
        print("READY", backend, flush=True)
        results: dict[str, object] = {}

        async def run(name: str, call: object) -> None:
            results[name] = await call  # type: ignore[misc]

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "first", first.async_stop(20))
            tg.start_soon(run, "second", second.sync_stop(5))
        print("UNTRUSTED", await stranger.untrusted_stop(), flush=True)
        print("RESULTS", results["first"], results["second"], flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], backend=sys.argv[1])
