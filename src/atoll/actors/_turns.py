"""Turn-taking for one actor: one call chain at a time, re-entrant along it."""

from __future__ import annotations

from collections import deque

import anyio


class TurnGate:
    """Admits calls to an actor by call chain.

    Up to ``max_concurrency`` chains hold a turn at once. A call whose chain
    already holds one enters at once (call-chain re-entrancy: A calls B, B calls
    back into A). Other calls wait in arrival order.
    """

    __slots__ = ("_active", "_max", "_waiting")

    def __init__(self, max_concurrency: int = 1) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._max = max_concurrency
        self._active: dict[int, int] = {}
        self._waiting: deque[tuple[int, anyio.Event]] = deque()

    def try_enter(self, chain: int) -> bool:
        active = self._active
        if chain in active:
            active[chain] += 1
            return True
        if len(active) < self._max and not self._waiting:
            active[chain] = 1
            return True
        return False

    async def enter(self, chain: int) -> None:
        if self.try_enter(chain):
            return
        entry = (chain, anyio.Event())
        self._waiting.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():
                self.leave(chain)  # admitted while being cancelled: give the turn back
            else:
                self._waiting.remove(entry)
                self._admit()  # a waiter behind us may now fit
            raise

    def leave(self, chain: int) -> None:
        active = self._active
        depth = active[chain] - 1
        if depth:
            active[chain] = depth
            return
        del active[chain]
        if self._waiting:
            self._admit()

    def _admit(self) -> None:
        active = self._active
        waiting = self._waiting
        i = 0
        while i < len(waiting):
            chain, event = waiting[i]
            if chain in active:
                active[chain] += 1
            elif len(active) < self._max:
                active[chain] = 1
            else:
                i += 1
                continue
            del waiting[i]
            event.set()
