"""What a process has served: calls counted per method, their latencies,
and the calls running now, for ``host.status()`` and ``atoll status``.

Kept on the serving path at the cost of a clock read and a few dict and
deque operations per call; read only when somebody asks (the report an
actor process sends its host, see ``_child``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

LATENCIES_KEPT = 512
"""Latencies kept per method: its percentiles are those of its last calls."""


class MethodStats:
    """One method's calls so far."""

    __slots__ = ("count", "errors", "latencies")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=LATENCIES_KEPT)

    def summary(self) -> list[float]:
        """``[count, errors, p50, p90, p99, max]``, latencies in seconds."""
        ordered = sorted(self.latencies)
        if not ordered:
            return [self.count, self.errors, 0.0, 0.0, 0.0, 0.0]
        last = len(ordered) - 1
        return [
            self.count,
            self.errors,
            ordered[round(0.5 * last)],
            ordered[round(0.9 * last)],
            ordered[round(0.99 * last)],
            ordered[last],
        ]


class CallStats:
    """The calls a process served and serves, by method."""

    def __init__(self) -> None:
        self.methods: dict[str, MethodStats] = {}
        self.now: dict[tuple[bytes, int], tuple[str, float, int]] = {}
        """Calls being served: (caller, call id) -> (method, start, chain)."""

    def started(self, key: tuple[bytes, int], method: str, chain: int) -> float:
        start = time.perf_counter()
        self.now[key] = (method, start, chain)
        return start

    def ended(self, key: tuple[bytes, int], method: str, start: float, failed: bool) -> None:
        took = time.perf_counter() - start
        del self.now[key]
        stats = self.methods.get(method)
        if stats is None:
            stats = self.methods[method] = MethodStats()
        stats.count += 1
        stats.latencies.append(took)
        if failed:
            stats.errors += 1

    def report(self) -> dict[str, Any]:
        """Plain data (it may travel on the plain wire): the calls running
        now, oldest first, as ``[method, seconds, chain, caller]``, and
        each method's :meth:`MethodStats.summary`."""
        clock = time.perf_counter()
        running = sorted(self.now.items(), key=lambda item: item[1][1])
        return {
            "calls": [
                [method, clock - start, chain, caller.decode(errors="replace")]
                for (caller, _), (method, start, chain) in running
            ],
            "methods": {name: stats.summary() for name, stats in self.methods.items()},
        }
