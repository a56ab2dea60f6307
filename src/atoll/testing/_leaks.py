"""What a test may leave behind: child processes, descriptors, temp dirs, shm."""

from __future__ import annotations

import dataclasses
import gc
import glob
import os
import tempfile


def _children() -> set[int]:
    me = os.getpid()
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # ppid is the 2nd field after the parenthesised command name.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == me:
            kids.add(int(entry))
    return kids


def _fds() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "anon_inode:", "pipe:")) or "atoll" in target:
            found.add(f"{fd} -> {target}")
    return found


def _paths() -> set[str]:
    found = set(glob.glob(os.path.join(tempfile.gettempdir(), "atoll-*"))) | set(
        glob.glob("/dev/shm/atoll*")
    )
    # Names carry their host's pid: those of another live host (a second test
    # run on this machine) are not this process's to answer for.
    ours = {os.getpid()} | _children()
    return {path for path in found if _host_pid(path) in ours or not _alive(_host_pid(path))}


def _host_pid(path: str) -> int:
    try:
        return int(os.path.basename(path).split("-")[1])
    except (IndexError, ValueError):
        return -1


def _alive(pid: int) -> bool:
    return pid > 0 and os.path.exists(f"/proc/{pid}")


def _start_pyzmq_collector() -> None:
    """pyzmq starts a process-wide thread (with its own context and sockets)
    on the first zero-copy send and keeps it until exit. It is no leak, so it
    is started before the baseline is taken."""
    try:
        from zmq.utils.garbage import gc
    except ImportError:
        return
    if not gc.is_alive():
        gc.start()
    gc._push_socket  # noqa: B018  (made on first use, then kept: make it now)


@dataclasses.dataclass(frozen=True)
class Leaks:
    """Resources that exist now and did not at the snapshot."""

    processes: frozenset[int]
    descriptors: frozenset[str]
    paths: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.processes or self.descriptors or self.paths)

    def __str__(self) -> str:
        parts = []
        if self.processes:
            parts.append(f"child processes still running: {sorted(self.processes)}")
        if self.descriptors:
            parts.append(f"descriptors still open: {sorted(self.descriptors)}")
        if self.paths:
            parts.append(f"files left behind: {sorted(self.paths)}")
        return "; ".join(parts)


class snapshot:
    """Record what exists now; :meth:`leaks` tells what was added since."""

    def __init__(self) -> None:
        _start_pyzmq_collector()
        self._processes = _children()
        self._fds = _fds()
        self._paths = _paths()

    def leaks(self) -> Leaks:
        # Garbage not collected yet (a traceback's cycle holding an array
        # over shared memory, say) is not a leak: collect it first.
        gc.collect()
        return Leaks(
            frozenset(_children() - self._processes),
            frozenset(_fds() - self._fds),
            frozenset(_paths() - self._paths),
        )
