"""An extension pinned to numpy 1.x."""

from __future__ import annotations

from typing import Any

import numpy as np

import atoll


class Stats(atoll.Actor):
    def __init__(self) -> None:
        self.calls = 0

    async def on_start(self) -> None:
        self.started_with = np.__version__

    async def version(self) -> str:
        return np.__version__

    async def summarize(self, values: Any) -> dict[str, Any]:
        self.calls += 1
        a = np.asarray(values)
        return {"numpy": np.__version__, "mean": float(a.mean()), "norm": float(np.linalg.norm(a))}
