"""What an actor's environment is made of, and the key it is cached under."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

from ..transport._messages import WIRE_VERSION

RUNTIME_PACKAGES = ("pyzmq", "anyio", "msgspec", "cloudpickle", "setproctitle")
"""atoll's own runtime dependencies: installed in every environment at exactly
the host's versions, so both ends speak the same wire."""

CACHE_ENV_VAR = "ATOLL_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class Env:
    """An isolated virtual environment for actors, built with uv and cached.

    ``dependencies`` are requirement strings as pip and uv take them
    (``"numpy<2"``, ``"pillow==10.4.0"``). The actor process sees these and
    atoll (with its own runtime dependencies at the host's versions), never
    the host's other packages.

    ``python`` picks the interpreter (a version such as ``"3.12"`` or a path,
    as uv's ``--python`` takes it); ``None`` is the host's own.
    ``share_torch=True`` makes the host's torch build importable in the
    environment instead of installing one: no download, and a dependency
    that requires torch is satisfied by it (one that needs another torch
    version is an error before anything is installed). ``index_url``,
    ``extra_index_urls`` and ``find_links`` are passed to uv. ``name`` only
    labels progress output and ``atoll env list``.

    ``sandbox`` (an :class:`atoll.Sandbox`) confines every actor spawned in
    this environment that is not given a sandbox of its own; it is not part
    of what gets built (the cache key).
    """

    dependencies: Sequence[str] = ()
    python: str | None = None
    share_torch: bool = False
    index_url: str | None = None
    extra_index_urls: Sequence[str] = ()
    find_links: Sequence[str] = ()
    name: str | None = None
    sandbox: object = None

    def __post_init__(self) -> None:
        for field in ("dependencies", "extra_index_urls", "find_links"):
            value = getattr(self, field)
            if isinstance(value, (str, bytes)) or not all(isinstance(v, str) for v in value):
                raise TypeError(
                    f"Env({field}=...) takes a list of strings, got {value!r}"
                    + (f"; write [{value!r}]" if isinstance(value, str) else "")
                )
            object.__setattr__(self, field, tuple(v.strip() for v in value))
        if any(not d for d in self.dependencies):
            raise ValueError("Env(dependencies=...) has an empty requirement string")

    def key(self) -> str:
        """The cache key: a hash of everything that changes what gets built."""
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    def describe(self) -> dict[str, Any]:
        """Everything the key is made of (also written into the built environment)."""
        from ._torch import host_torch

        return {
            "dependencies": sorted(self.dependencies),
            "python": _python_key(self.python),
            "share_torch": host_torch().describe() if self.share_torch else None,
            "index_url": self.index_url,
            "extra_index_urls": list(self.extra_index_urls),
            "find_links": list(self.find_links),
            "runtime": runtime_pins(),
            "wire": WIRE_VERSION,
            "platform": f"{sys.platform}-{platform.machine()}",
        }


def host_python() -> str:
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base)


def _python_key(python: str | None) -> str:
    if python is None:  # the host's own: its path and its exact version
        return f"{host_python()} {platform.python_version()}"
    return python


def runtime_pins() -> list[str]:
    """``name==version`` of each of atoll's runtime dependencies, as installed here."""
    import importlib.metadata

    return [f"{name}=={importlib.metadata.version(name)}" for name in RUNTIME_PACKAGES]


def default_cache_dir() -> str:
    """Where built environments live: ``$ATOLL_CACHE_DIR``, else the user cache."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    return user_cache_dir("envs")


def user_cache_dir(name: str) -> str:
    """``name`` in atoll's directory of the user cache (``$XDG_CACHE_HOME``,
    else ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "atoll", name)
