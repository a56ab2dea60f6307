"""Limits the kernel enforces on an actor process: memory, processes, open
files, CPU time, shared memory.

Which mechanism backs each limit:

=================  =========================================================
limit              mechanism
=================  =========================================================
``memory``         a cgroup of its own (v2 ``memory.max``, v1
                   ``memory.limit_in_bytes``): past it the kernel kills the
                   process, and its callers are told it went over its limit.
                   Without a cgroup the host may write to: ``RLIMIT_DATA``
                   (allocations past it fail: ``MemoryError``).
``processes``      the cgroup's ``pids.max`` (a fork bomb stays inside it);
                   without one, ``RLIMIT_NPROC`` (per user, and not
                   enforced for root: a warning says so).
``open_files``     ``RLIMIT_NOFILE``
``cpu_seconds``    ``RLIMIT_CPU``: past it, SIGXCPU ends the process
``shared_memory``  the process's arena counts its segments:
                   :class:`~atoll.SharedMemoryError` past it
``nice``           its scheduling priority (``setpriority``, and its
                   autogroup's where the kernel groups sessions): a limited
                   actor yields the CPU to the host and to other actors
=================  =========================================================

The host makes the cgroups (under the cgroup it runs in) before the actor's
code runs, and removes them when the process is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
from collections.abc import Callable
from typing import Any, TypeVar

from .._errors import ExtensionError

_log = logging.getLogger(__name__)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)


def parse_size(value: int | str, what: str, owner: str = "Limits") -> int:
    """Bytes from ``2G``, ``512M``, ``1.5GiB`` or an int (``owner(what=...)``
    names it in errors)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{owner}({what}=...) takes bytes or a size such as '2G', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        found = _SIZE.fullmatch(value.strip())
        if found is None:
            raise ValueError(f"{owner}({what}={value!r}): not a size such as '2G' or '512M'")
        n = int(float(found[1]) * _UNITS[found[2].upper()])
    if n <= 0:
        raise ValueError(f"{owner}({what}=...) must be above 0, got {value!r}")
    return n


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """What an actor process may take: ``host.spawn(..., limits=Limits(...))``.

    ``memory`` and ``shared_memory`` are bytes or sizes (``"2G"``); None is
    no limit. ``nice`` (0 to 19, by default 10) lowers its CPU priority, so
    that a runaway actor cannot starve the host or its neighbours; 0 keeps
    the host's. See the module ``atoll.actors._limits`` for the mechanism
    behind each.
    """

    memory: int | str | None = None
    processes: int | None = None
    open_files: int | None = None
    cpu_seconds: float | None = None
    shared_memory: int | str | None = None
    nice: int = 10

    def __post_init__(self) -> None:
        for name in ("memory", "shared_memory"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_size(value, name))
        for name in ("processes", "open_files", "cpu_seconds"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ValueError(f"Limits({name}=...) must be above 0, got {value!r}")
        if type(self.nice) is not int or not 0 <= self.nice <= 19:
            raise ValueError(f"Limits(nice=...) must be an int from 0 to 19, got {self.nice!r}")

    @property
    def memory_bytes(self) -> int | None:
        return self.memory  # type: ignore[return-value]  # bytes after __post_init__

    @property
    def shared_memory_bytes(self) -> int | None:
        return self.shared_memory  # type: ignore[return-value]


def limits_for_extension(asked: dict[str, Any] | None, manifest: str) -> Limits | None:
    """``[tool.atoll.limits]`` of an extension's manifest, checked."""
    return from_manifest(Limits, asked, manifest, "limits")


T = TypeVar("T")


def from_manifest(
    cls: Callable[..., T], asked: dict[str, Any] | None, manifest: str, table: str
) -> T | None:
    """``cls(**asked)``, ``asked`` being a manifest's ``[tool.atoll.<table>]``;
    a wrong key or value is an :class:`ExtensionError` naming the table."""
    if asked is None:
        return None
    try:
        return cls(**asked)
    except (TypeError, ValueError) as exc:
        raise ExtensionError(f"{manifest}: [tool.atoll.{table}]: {exc}") from None


def _own_cgroup(controller: str) -> str | None:
    """Where this process's cgroup for ``controller`` is mounted (v1), or
    its unified cgroup (v2, ``controller`` empty), if the host can write there."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller and controller in controllers.split(","):
            root = f"/sys/fs/cgroup/{controller}"
        elif not controller and controllers == "":
            root = "/sys/fs/cgroup"
            if not os.path.exists(os.path.join(root, "cgroup.controllers")):
                return None  # v2 is not what is mounted there
        else:
            continue
        where = os.path.join(root, path.lstrip("/"))
        return where if os.access(where, os.W_OK) else None
    return None


class Cgroup:
    """The cgroups of one actor process: made, joined, asked, removed."""

    def __init__(self, paths: dict[str, str], limits: Limits) -> None:
        self.paths = paths  # by controller: "memory", "pids" (v1), or "" (v2)
        self.limits = limits

    @classmethod
    def make(cls, name: str, limits: Limits) -> Cgroup | None:
        """Cgroups named ``name`` with ``limits``' memory and processes, or
        None where this host cannot make any (rlimits stand in)."""
        wanted = {"memory": limits.memory_bytes, "pids": limits.processes}
        wanted = {k: v for k, v in wanted.items() if v is not None}
        if not wanted:
            return None
        paths: dict[str, str] = {}
        try:
            unified = _own_cgroup("")
            if unified is not None:
                paths[""] = _mkdir(unified, name)
                for controller, value in wanted.items():
                    _write(paths[""], f"{controller}.max", value)
            else:
                for controller, value in wanted.items():
                    parent = _own_cgroup(controller)
                    if parent is None:
                        raise OSError(f"no writable {controller} cgroup")
                    paths[controller] = _mkdir(parent, name)
                    key = "memory.limit_in_bytes" if controller == "memory" else "pids.max"
                    _write(paths[controller], key, value)
        except OSError as exc:
            _log.info("atoll: no cgroup for %s (%s): rlimits stand in", name, exc)
            for path in paths.values():
                _rmdir(path)
            return None
        return cls(paths, limits)

    def join(self, pid: int) -> None:
        for path in self.paths.values():
            _write(path, "cgroup.procs", pid)

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of it for its memory limit."""
        path = self.paths.get("") or self.paths.get("memory")
        if path is None:
            return False
        name = "memory.events" if "" in self.paths else "memory.oom_control"
        try:
            with open(os.path.join(path, name)) as f:
                fields = dict(line.split() for line in f if line.strip())
        except OSError:
            return False
        return int(fields.get("oom_kill", "0")) > 0

    def remove(self) -> None:
        for path in self.paths.values():
            _rmdir(path)


def limit_hit(limits: Limits, cgroup: Cgroup | None, exitcode: int | None) -> str:
    """Which limit the kernel ended a process for, in words (or ""); its
    cgroups go."""
    said = ""
    if cgroup is not None:
        if cgroup.oom_killed():
            said = (
                f"it went over its memory limit ({(limits.memory_bytes or 0) / (1 << 20):.0f} "
                "MiB, Limits(memory=...)) and the kernel killed it"
            )
        cgroup.remove()
    if not said and limits.cpu_seconds is not None and exitcode == -signal.SIGXCPU:
        said = f"it used up its CPU time (Limits(cpu_seconds={limits.cpu_seconds:g}))"
    return said


def _mkdir(parent: str, name: str) -> str:
    path = os.path.join(parent, name)
    os.makedirs(path, exist_ok=True)
    return path


def _write(path: str, key: str, value: Any) -> None:
    with open(os.path.join(path, key), "w") as f:
        f.write(str(value))


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # gone already, or a process of it still exits


def rlimits(limits: Limits, cgroup: Cgroup | None) -> dict[str, int]:
    """The rlimits an actor process sets on itself, by name: those no
    cgroup backs."""
    out: dict[str, int] = {}
    if limits.open_files is not None:
        out["RLIMIT_NOFILE"] = limits.open_files
    if limits.cpu_seconds is not None:
        out["RLIMIT_CPU"] = max(1, int(limits.cpu_seconds))
    in_cgroup = (
        set()
        if cgroup is None
        else set(cgroup.paths) | ({"memory", "pids"} if "" in cgroup.paths else set())
    )
    if limits.memory_bytes is not None and "memory" not in in_cgroup:
        out["RLIMIT_DATA"] = limits.memory_bytes
    if limits.processes is not None and "pids" not in in_cgroup:
        if os.geteuid() == 0:
            _log.warning(
                "atoll: processes=%d is an RLIMIT_NPROC here (no pids cgroup), which the "
                "kernel does not enforce for root",
                limits.processes,
            )
        out["RLIMIT_NPROC"] = limits.processes
    return out


def lower_priority(nice: int) -> None:
    """Make this process (an actor process, before its code runs) ``nice``
    steps less urgent, and its autogroup too: where the kernel schedules
    sessions as groups, an actor (a session of its own) competes as a group."""
    if nice <= 0:
        return
    os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass  # no autogroups here: the process's own priority is what counts


def apply_rlimits(values: dict[str, int]) -> None:
    """Set rlimits on this process (an actor process, before its code runs)."""
    import resource

    for name, value in values.items():
        which = getattr(resource, name)
        _, hard = resource.getrlimit(which)
        soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # CPU: SIGXCPU at the soft limit ends it (and says why); the kernel's
        # SIGKILL at the hard one only if it ignored that.
        new_hard = soft + 1 if name == "RLIMIT_CPU" else soft
        if hard != resource.RLIM_INFINITY:
            new_hard = min(new_hard, hard)
        resource.setrlimit(which, (soft, new_hard))
