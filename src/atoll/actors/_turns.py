"""Turn-taking for one actor: one call chain at a time, re-entrant along it."""

from __future__ import annotations

from collections import deque
from typing import Any


class TurnGate:
    """Admits calls to an actor by call chain, and queues the rest.

    Up to ``max_concurrency`` chains hold a turn at once. A call whose chain
    already holds one enters at once (call-chain re-entrancy: A calls B, B
    calls back into A). Other calls wait in :attr:`queue`, in arrival order, as
    plain data rather than as parked tasks: the task that ends a turn takes the
    next call and runs it, so a busy actor works through its mailbox without a
    task switch between calls.
    """

    __slots__ = ("_active", "_max", "queue")

    def __init__(self, max_concurrency: int = 1) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._max = max_concurrency
        self._active: dict[int, int] = {}
        self.queue: deque[tuple[int, Any]] = deque()

    def try_enter(self, chain: int) -> bool:
        """Take a turn for ``chain`` if it may run now (never overtaking the queue)."""
        active = self._active
        if chain in active:
            active[chain] += 1
            return True
        if len(active) < self._max and not self.queue:
            active[chain] = 1
            return True
        return False

    def leave(self, chain: int) -> None:
        active = self._active
        depth = active[chain] - 1
        if depth:
            active[chain] = depth
        else:
            del active[chain]

    def next_ready(self) -> Any:
        """Pop the first queued call that may run now, taking its turn; else None."""
        queue = self.queue
        active = self._active
        for i, (chain, item) in enumerate(queue):
            if chain in active:
                active[chain] += 1
            elif len(active) < self._max:
                active[chain] = 1
            else:
                continue
            del queue[i]
            return item
        return None
