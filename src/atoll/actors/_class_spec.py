"""How an actor class travels to its process: by reference when the process
can import it (atoll's own, an installed package), else by value (its code
travels), as for an isolated environment that lacks the application's files.
"""

from __future__ import annotations

import os
import pickle
import sys
import sysconfig
from typing import Any


class ByValue:
    """Pickles a class by value (its code travels), for an actor process that
    cannot import the module the class lives in."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __reduce__(self) -> tuple[Any, ...]:
        import cloudpickle

        from ..transport import _by_value

        module = sys.modules[self.cls.__module__]
        by_value = module.__name__ != "__main__"
        if by_value:
            cloudpickle.register_pickle_by_value(module)
        try:
            data = _by_value.dumps(self.cls)
        finally:
            if by_value:
                cloudpickle.unregister_pickle_by_value(module)
        return (pickle.loads, (data,))


def installed(cls: type) -> bool:
    """Whether ``cls`` comes from atoll or an installed package (by reference
    then), rather than from the application's own files (by value)."""
    if cls.__module__ == "atoll" or cls.__module__.startswith("atoll."):
        return True
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if file is None:
        return False
    real = os.path.realpath(file)
    return any(real.startswith(d + os.sep) for d in _install_dirs())


def _install_dirs() -> set[str]:
    paths = sysconfig.get_paths()
    return {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
