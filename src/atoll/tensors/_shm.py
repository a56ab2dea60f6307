"""POSIX shared-memory segments, named so that a dead host's can be swept.

A segment is a file in ``/dev/shm`` named
``atoll-<host pid>-<host tag>-<owner pid>-<n>``: the host's pid and tag say
which host's run it belongs to (a sweeper removes the segments of hosts that
are gone), the owner's pid which process of that run created it. Segments are
opened directly, never through :mod:`multiprocessing.shared_memory`, so no
resource tracker unlinks them behind atoll's back when a process that merely
attached to one exits.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import shutil
import stat

from .._errors import AtollError, SerializationError
from ..transport._hub import pid_alive

SHM_DIR = "/dev/shm"
PREFIX = "atoll-"


class SharedMemoryError(AtollError):
    """Shared memory could not be created or attached."""


def available() -> bool:
    return os.path.isdir(SHM_DIR)


def host_prefix() -> str:
    """A new name prefix for the segments of one host's run (the calling
    process is the host); the tag keeps two hosts of one process apart."""
    return f"{PREFIX}{os.getpid()}-{os.urandom(3).hex()}-"


def owner_prefix(host: str, pid: int) -> str:
    """Name prefix of the segments process ``pid`` creates in a host's run."""
    return f"{host}{pid}-"


def address(buffer: mmap.mmap | memoryview) -> int:
    """The address of the first byte of a writable buffer."""
    probe = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


def create(name: str, size: int) -> mmap.mmap:
    """Create segment ``name`` of ``size`` bytes, its pages allocated and mapped.

    The pages are allocated up front, so a full ``/dev/shm`` is an error here
    rather than a SIGBUS on first touch, and the mapping is populated, so the
    first copy into it pays no page faults.
    """
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise SharedMemoryError(
            f"no {SHM_DIR} on this system: the shared-memory plane needs POSIX shared "
            "memory (Linux); open the host with transfer='inline' to send tensors as "
            "message frames instead"
        ) from None
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
                raise
            fs = os.statvfs(SHM_DIR)
            free = fs.f_bavail * fs.f_frsize
            raise SharedMemoryError(
                f"{SHM_DIR} has no room for {size / 2**20:.1f} MiB ({free / 2**20:.1f} MiB "
                "free). Give it more room (docker: --shm-size), send less at once, or open "
                "the host with transfer='inline'"
            ) from exc
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


_NAME = re.compile(r"atoll-[A-Za-z0-9_-]+")


def attach(name: str, folder: str | None = None) -> mmap.mmap:
    """Map an existing segment (pages are faulted in lazily, as they are read),
    of ``/dev/shm`` or of a sandbox's ``folder`` (see :func:`make_box`).

    ``name`` comes from a peer: only a plain file named as atoll names its
    segments is opened, never a path elsewhere or a link."""
    if type(name) is not str or not _NAME.fullmatch(name):
        raise SerializationError(f"{name!r} is not the name of an atoll shared-memory segment")
    path = os.path.join(folder or SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SerializationError(f"cannot open shared memory {name}: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SerializationError(f"shared memory {name} is not a plain file")
        return mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)


def unlink(name: str) -> None:
    """Remove segment ``name`` (or a sandbox's folder of that name)."""
    path = os.path.join(SHM_DIR, name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)


def make_box(name: str) -> str:
    """A folder of ``/dev/shm`` that a sandboxed process sees as its own
    ``/dev/shm``: what it creates is there, and segments it is handed are
    linked there (same file system: a link, not a copy)."""
    path = os.path.join(SHM_DIR, name)
    os.mkdir(path, 0o700)
    return path


def sweep(name_prefix: str) -> int:
    """Unlink every segment whose name starts with ``name_prefix``; return how many."""
    if not available():
        return 0
    n = 0
    for entry in os.listdir(SHM_DIR):
        if entry.startswith(name_prefix):
            unlink(entry)
            n += 1
    return n


def sweep_dead_hosts() -> None:
    """Unlink the segments of hosts that died without cleaning up."""
    if not available():
        return
    seen: dict[int, bool] = {}
    for entry in os.listdir(SHM_DIR):
        if not entry.startswith(PREFIX):
            continue
        try:
            pid = int(entry.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid not in seen:
            seen[pid] = pid_alive(pid)
        if not seen[pid]:
            unlink(entry)
