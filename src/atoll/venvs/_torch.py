"""``share_torch``: the host's torch build, made importable in an environment.

uv is given a stand-in wheel for torch that holds only its metadata (the
host's exact version, and its requirements but the CUDA runtime libraries),
pinned with a constraint. A dependency that requires torch resolves against
it, one that needs another torch version fails the resolution before
anything is installed, and nothing of torch is downloaded. Once installed,
the host's torch packages (and its CUDA libraries, when it has them) are
linked into the environment's site-packages.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

from .._errors import EnvBuildError

_LINKED_REQUIREMENTS = re.compile(r"^(nvidia[-_.]|triton\b|pytorch[-_]triton)", re.IGNORECASE)
"""Requirements of a CUDA torch that are binary runtime libraries: linked
from the host (torch finds them next to its own files), never installed."""


@dataclasses.dataclass(frozen=True)
class HostTorch:
    version: str
    site: str
    top_level: tuple[str, ...]
    requires: tuple[str, ...]
    linked: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "site": self.site}

    def uv_args(self, folder: str) -> list[str]:
        """What ``uv pip install`` needs to see this torch as installable, and
        no other: the stand-in wheel in ``folder``, a constraint, and torch."""
        os.mkdir(folder)
        self.stub_wheel(folder)
        constraint = os.path.join(folder, "constraints.txt")
        with open(constraint, "w") as f:
            f.write(f"torch=={self.version}\n")
        return ["--find-links", folder, "--constraint", constraint, "torch"]

    def stub_wheel(self, folder: str) -> str:
        """Write the metadata-only torch wheel into ``folder``; returns its path."""
        import zipfile

        dist_info = f"torch-{self.version}.dist-info"
        metadata = "Metadata-Version: 2.1\nName: torch\nVersion: " + self.version + "\n"
        metadata += "".join(f"Requires-Dist: {r}\n" for r in self.requires)
        metadata += "Summary: the host's torch, shared by atoll (share_torch=True)\n"
        wheel = "Wheel-Version: 1.0\nGenerator: atoll\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        path = os.path.join(folder, f"torch-{self.version}-py3-none-any.whl")
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{dist_info}/METADATA", metadata)
            z.writestr(f"{dist_info}/WHEEL", wheel)
            z.writestr(
                f"{dist_info}/RECORD",
                f"{dist_info}/METADATA,,\n{dist_info}/WHEEL,,\n{dist_info}/RECORD,,\n",
            )
        return path

    def link_into(self, site_packages: str) -> None:
        """Symlink torch's packages (and its CUDA libraries) into ``site_packages``."""
        for name in (*self.top_level, *self.linked):
            target = os.path.join(site_packages, name)
            if os.path.lexists(target):
                raise EnvBuildError(
                    f"share_torch=True: {target} is already there, so a dependency installed "
                    f"its own {name!r}; remove that dependency or set share_torch=False"
                )
            os.symlink(os.path.join(self.site, name), target)


@functools.cache
def host_torch() -> HostTorch:
    """The torch installed in this interpreter; EnvBuildError if there is none."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        raise EnvBuildError(
            "share_torch=True needs torch installed in the host, and it is not: install "
            "torch here, or set share_torch=False and list torch in the dependencies"
        ) from None
    site = os.path.realpath(str(dist.locate_file("")))
    top_level: set[str] = set()
    for file in dist.files or ():
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith((".dist-info", ".data")):
            continue
        top_level.add(first)
    requires, linked = [], set()
    for requirement in dist.requires or ():
        if _LINKED_REQUIREMENTS.match(requirement):
            name = re.split(r"[-_.]", requirement.split()[0], maxsplit=1)[0].lower()
            if os.path.isdir(os.path.join(site, name)):
                linked.add(name)
        else:
            requires.append(requirement)
    return HostTorch(dist.version, site, tuple(sorted(top_level)), tuple(requires), tuple(linked))
