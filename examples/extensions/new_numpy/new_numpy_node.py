"""An extension that needs numpy 2.x (it uses ``np.strings``, new in 2.0)."""

from __future__ import annotations

from typing import Any

import numpy as np

import atoll


class Scaler(atoll.Actor):
    async def version(self) -> str:
        return np.__version__

    async def scale(self, values: Any, factor: float) -> Any:
        return np.asarray(values) * factor

    async def shout(self, words: list[str]) -> list[str]:
        return [str(w) for w in np.strings.upper(np.array(words))]
