"""What a test may leave behind: child processes, descriptors, temp dirs, shm."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import glob
import os
import select
import tempfile
import time


def _become_subreaper() -> None:
    """Processes orphaned under this one (an actor whose fork server has
    exited, say) are re-parented here rather than to init, so they are still
    found, and reaped by :func:`_descendants`. Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


_PR_SET_CHILD_SUBREAPER = 36


def _descendants(reap_except: frozenset[int] | None = None) -> set[int]:
    """This process's running descendants (zombies are not running). With
    ``reap_except``, zombie children not in it are reaped: they are processes
    re-parented here, and nothing else waits for them."""
    me = os.getpid()
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # state and ppid: the 1st and 2nd fields after the parenthesised name.
        state, ppid = stat[stat.rindex(b")") + 2 :].split()[:2]
        pid = int(entry)
        if state != b"Z":
            parents[pid] = int(ppid)
        elif int(ppid) == me and reap_except is not None and pid not in reap_except:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
    found: set[int] = set()
    frontier = {me}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def wait_for_exit(pids: set[int], timeout: float) -> set[int]:
    """Wait up to ``timeout`` seconds for ``pids`` to exit (a process a test
    has stopped may still be finishing its exit); those still running."""
    watched: dict[int, int] = {}
    for pid in pids:
        try:
            watched[os.pidfd_open(pid)] = pid  # readable once the process has exited
        except ProcessLookupError:
            pass
    try:
        deadline = time.monotonic() + timeout
        waiting = list(watched)
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(waiting, [], [], deadline - time.monotonic())
            waiting = [fd for fd in waiting if fd not in ready]
        return {watched[fd] for fd in waiting}
    finally:
        for fd in watched:
            os.close(fd)


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
    ours = {os.getpid()} | _descendants()
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
            parts.append(f"processes still running: {sorted(self.processes)}")
        if self.descriptors:
            parts.append(f"descriptors still open: {sorted(self.descriptors)}")
        if self.paths:
            parts.append(f"files left behind: {sorted(self.paths)}")
        return "; ".join(parts)


class snapshot:
    """Record what exists now; :meth:`leaks` tells what was added since."""

    def __init__(self) -> None:
        _start_pyzmq_collector()
        _become_subreaper()
        self._processes = frozenset(_descendants())
        self._fds = _fds()
        self._paths = _paths()

    def leaks(self, exit_wait: float = 5.0) -> Leaks:
        """What was added since; processes get up to ``exit_wait`` seconds to
        finish exiting first."""
        # Garbage not collected yet (a traceback's cycle holding an array
        # over shared memory, say) is not a leak: collect it first.
        gc.collect()
        processes = _descendants(self._processes) - self._processes
        if processes and hasattr(os, "pidfd_open"):
            wait_for_exit(processes, exit_wait)
            processes = _descendants(self._processes) - self._processes
        return Leaks(
            frozenset(processes),
            frozenset(_fds() - self._fds),
            frozenset(_paths() - self._paths),
        )
