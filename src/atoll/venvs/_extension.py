"""Extension folders: a ``pyproject.toml`` that names an environment and an actor.

::

    [project]
    name = "blur"
    dependencies = ["numpy<2", "pillow"]

    [project.entry-points.atoll]
    actor = "blur_node:Blur"          # module:Class, importable from the folder

    [tool.atoll]                      # optional
    share-torch = true
    python = "3.11"
    trusted = false                   # nothing it sends is ever unpickled

    [tool.atoll.sandbox]              # run it sandboxed (implies untrusted)
    network = false
    read_only = ["models"]            # relative to the folder

    [tool.atoll.limits]
    memory = "2G"
    processes = 64

    [tool.atoll.restart]              # start it again when it dies
    limit = 5
    window = 60.0
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any

from .._errors import ExtensionError
from ._env import Env

_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

_EXAMPLE = '[project.entry-points.atoll]\nactor = "your_module:YourActor"'


@dataclasses.dataclass(frozen=True)
class Extension:
    """A parsed extension folder."""

    folder: str
    manifest: str
    name: str
    env: Env
    entry_point: str
    """``module:Class``, imported in the actor process with the folder on its path."""
    trusted: bool = True
    """False: it asks to run untrusted (see ``Host.spawn(trusted=False)``)."""
    sandbox: dict[str, Any] | None = None
    """``[tool.atoll.sandbox]``: the sandbox it asks for (paths made absolute)."""
    limits: dict[str, Any] | None = None
    """``[tool.atoll.limits]``: the limits it asks for."""
    restart: dict[str, Any] | None = None
    """``[tool.atoll.restart]``: how it asks to be restarted."""

    @property
    def paths(self) -> list[str]:
        """What the actor process puts first on ``sys.path``: the folder (and its src/)."""
        src = os.path.join(self.folder, "src")
        return [self.folder, *([src] if os.path.isdir(src) else [])]


def read_extension(path: str | os.PathLike[str]) -> Extension:
    """Parse the extension folder at ``path``; :class:`ExtensionError` says what is wrong."""
    folder = os.path.abspath(os.fspath(path))
    manifest = os.path.join(folder, "pyproject.toml")
    if not os.path.isdir(folder):
        raise ExtensionError(f"extension folder {folder} does not exist")
    if not os.path.isfile(manifest):
        raise ExtensionError(
            f"{manifest} is missing: an extension folder needs a pyproject.toml with "
            f"[project] name and dependencies, and an entry point:\n{_EXAMPLE}"
        )
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(manifest, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ExtensionError(f"{manifest} is not valid TOML: {exc}") from None
    project = _table(data, "project", manifest)
    name = project.get("name") or os.path.basename(folder)
    dependencies = project.get("dependencies", [])
    if not isinstance(dependencies, list) or not all(isinstance(d, str) for d in dependencies):
        raise ExtensionError(
            f"{manifest}: [project] dependencies must be a list of requirement strings, "
            f'such as ["numpy<2"]; got {dependencies!r}'
        )
    entry_points = _table(project, "entry-points", manifest).get("atoll")
    actor = entry_points.get("actor") if isinstance(entry_points, dict) else None
    if actor is None:
        raise ExtensionError(f"{manifest} names no actor: add\n{_EXAMPLE}")
    if not isinstance(actor, str) or not _ENTRY_POINT.match(actor):
        raise ExtensionError(
            f"{manifest}: the atoll entry point {actor!r} is not of the form "
            '"module:Class" (for example "blur_node:Blur")'
        )
    tool = _table(_table(data, "tool", manifest), "atoll", manifest)
    unknown = set(tool) - {"share-torch", "python", "trusted", "sandbox", "limits", "restart"}
    if unknown:
        raise ExtensionError(
            f"{manifest}: [tool.atoll] has unknown keys {sorted(unknown)}; "
            "it takes share-torch, python, trusted, sandbox, limits and restart"
        )
    sandbox = tool.get("sandbox")
    if sandbox is not None:
        sandbox = dict(_table(tool, "sandbox", manifest))
        for key in ("read_only", "writable"):
            paths = sandbox.get(key, [])
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise ExtensionError(
                    f"{manifest}: [tool.atoll.sandbox] {key} must be a list of paths"
                )
            sandbox[key] = tuple(os.path.join(folder, p) for p in paths)
    limits = dict(_table(tool, "limits", manifest)) if "limits" in tool else None
    restart = dict(_table(tool, "restart", manifest)) if "restart" in tool else None
    trusted = tool.get("trusted", True)
    if not isinstance(trusted, bool):
        raise ExtensionError(f"{manifest}: [tool.atoll] trusted must be true or false")
    share_torch = tool.get("share-torch", False)
    python = tool.get("python")
    if not isinstance(share_torch, bool) or not (python is None or isinstance(python, str)):
        raise ExtensionError(
            f"{manifest}: [tool.atoll] share-torch must be true or false and python a string"
        )
    env = Env(dependencies, python=python, share_torch=share_torch, name=str(name))
    return Extension(folder, manifest, str(name), env, actor, trusted, sandbox, limits, restart)


def _table(data: dict[str, Any], key: str, manifest: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ExtensionError(f"{manifest}: {key} must be a table, got {value!r}")
    return value
