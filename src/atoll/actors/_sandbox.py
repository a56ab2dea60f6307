"""Sandboxes: an actor process confined with bubblewrap (Linux namespaces).

A sandboxed process sees a filesystem made for it: the system's programs and
libraries read-only, the interpreter and the packages its actor imports,
atoll, what the sandbox lists, a private ``/tmp`` and ``/dev/shm``, and
nothing else of the host's (no home directory, no other extensions, no
application files). It has its own network (none, unless ``network=True``),
process, IPC and host-name namespaces, no capabilities, and dies with its
host. It reaches the host through the hub's socket only, and it is untrusted:
what it sends is never unpickled (see ``transport._plain``).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from .._errors import ExtensionError, SandboxUnavailableError
from ..tensors import _shm
from ._limits import Cgroup, Limits

_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""Read-only system folders (those that exist; most are links into /usr)."""
_ETC = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/ssl/certs",
    "/etc/alternatives",
)
"""What of /etc programs need (the loader's cache, time zone, certificates);
not /etc itself, which holds the host's secrets."""
_GPU_DEVICES = ("/dev/nvidia*", "/dev/dri")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sandbox:
    """How to confine an actor process: ``host.spawn(..., sandbox=Sandbox())``.

    Everything is denied that is not listed: ``read_only`` and ``writable``
    are host paths the actor may read (or also write), at the same place.
    It also reads what its class needs to import: an extension's own
    environment and folder; for an actor spawned without an environment,
    the host's ``sys.path``.
    ``network=True`` shares the host's network; ``gpu=True`` passes the GPU
    device nodes through. Where the sandbox cannot be made (no bubblewrap,
    user namespaces off, not Linux), spawning fails with
    :class:`~atoll.SandboxUnavailableError`, unless ``required=False``: then
    the actor runs unconfined (still untrusted), and a warning says so.
    """

    read_only: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    network: bool = False
    gpu: bool = False
    required: bool = True

    def __post_init__(self) -> None:
        for field in ("read_only", "writable"):
            paths = getattr(self, field)
            if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
                raise TypeError(f"Sandbox({field}=...) takes a tuple of paths, got {paths!r}")
            object.__setattr__(self, field, tuple(os.path.abspath(p) for p in paths))


@functools.cache
def bwrap() -> str:
    """The bubblewrap program, checked to work here; else why it does not."""
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailableError(
            f"sandboxes need Linux namespaces; this is {sys.platform}. Run untrusted "
            "actors with Sandbox(required=False), or in a container or VM"
        )
    found = shutil.which("bwrap")
    if found is None:
        raise SandboxUnavailableError(
            "sandboxes need bubblewrap (bwrap), which is not installed: "
            "apt-get install bubblewrap (Debian, Ubuntu), dnf install bubblewrap (Fedora)"
        )
    probe = subprocess.run(
        [found, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode:
        raise SandboxUnavailableError(
            f"bubblewrap cannot make a sandbox here: {probe.stderr.strip()}. User namespaces "
            "may be off: sysctl -w kernel.unprivileged_userns_clone=1 (Debian), or "
            "user.max_user_namespaces above 0; in a container, allow namespaces (for "
            "Docker: --security-opt seccomp=unconfined, or run the host as root)"
        )
    return found


def wrap(
    argv: list[str],
    sandbox: Sandbox,
    *,
    read_only: Iterable[str],
    shm: str,
) -> list[str]:
    """``argv`` run in ``sandbox``: the bubblewrap command line. The process
    may also read ``read_only`` (its interpreter, packages, the hub's
    socket folder); ``shm`` is its /dev/shm."""
    args = [bwrap(), "--die-with-parent", "--new-session", "--unshare-all", "--cap-drop", "ALL"]
    if sandbox.network:
        args.append("--share-net")
    for path in _SYSTEM:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in _ETC:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    # Its own /dev/shm: it sees no segment of another process but those its
    # host links there for it.
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", shm, "/dev/shm"]
    if sandbox.gpu:
        for pattern in _GPU_DEVICES:
            for device in glob.glob(pattern):
                args += ["--dev-bind", device, device]
    seen: set[str] = set()
    for path in [*read_only, *sandbox.read_only]:
        if path not in seen and os.path.exists(path):
            seen.add(path)
            args += ["--ro-bind", path, path]
    for path in sandbox.writable:
        if os.path.exists(path):
            args += ["--bind", path, path]
    return [*args, "--chdir", "/tmp", *argv]


def paths_of(python: str, sys_path: Iterable[str]) -> list[str]:
    """What a process must read to run ``python`` with ``sys_path``: the
    interpreter's installation (through its links) and the path's entries."""
    found = []
    real = os.path.realpath(python)
    prefix = os.path.dirname(os.path.dirname(real))  # .../bin/python -> ...
    found += [prefix, os.path.dirname(os.path.dirname(os.path.abspath(python)))]
    found += [os.path.realpath(p) for p in sys_path if p and os.path.exists(p)]
    return found


@dataclasses.dataclass(frozen=True)
class Confined:
    """What confines a new actor process: its sandbox, the folders its class
    is imported from (which the sandbox must show), its limits."""

    sandbox: Sandbox | None = None
    folders: list[str] = dataclasses.field(default_factory=list)
    limits: Limits | None = None

    def prepare(
        self, actor: Any, shm_prefix: str, boxes: dict[bytes, str]
    ) -> tuple[str | None, Cgroup | None]:
        """Make what confines ``actor`` (an ``ActorProcess``) before its
        process starts: its sandbox's /dev/shm folder (what it makes, and
        links to what it is handed; in ``boxes`` by identity), its cgroups."""
        name = actor.identity.decode()
        box = cgroup = None
        if self.sandbox is not None:
            box = actor.box = boxes[actor.identity] = _shm.make_box(f"{shm_prefix}box-{name}")
        if self.limits is not None:
            cgroup = Cgroup.make(f"atoll-{os.getpid()}-{name}", self.limits)
            actor.cgroup, actor.limits = cgroup, self.limits
        return box, cgroup

    def argv(
        self, argv: list[str], sys_path: Iterable[str], also: Iterable[str], shm: str
    ) -> list[str]:
        """``argv`` in the sandbox, which shows its interpreter, ``sys_path``,
        the folders and ``also`` read-only, and ``shm`` as its /dev/shm."""
        assert self.sandbox is not None
        readable = [*paths_of(argv[0], [*sys_path, *self.folders]), *also]
        return wrap(argv, self.sandbox, read_only=readable, shm=shm)


def sandbox_of(env: Any) -> Sandbox | None:
    """The sandbox an environment asks for (``Env(sandbox=...)``), checked."""
    sandbox = getattr(env, "sandbox", None)
    if sandbox is not None and not isinstance(sandbox, Sandbox):
        raise TypeError(f"Env(sandbox=...) takes an atoll.Sandbox, got {sandbox!r}")
    return sandbox


def for_extension(
    asked: dict[str, Any] | None, given: Sandbox | None, manifest: str
) -> Sandbox | None:
    """The sandbox an extension runs in: the one the host gives (the call's,
    else the host's policy) or, if none, the one its manifest asks for. What
    the manifest asks beyond what the host gives is refused, by name."""
    if asked is None:
        return given
    try:
        wanted = Sandbox(**asked)
    except TypeError as exc:
        raise ExtensionError(f"{manifest}: [tool.atoll.sandbox]: {exc}") from None
    if given is None:
        return wanted
    refused = [k for k in ("network", "gpu") if getattr(wanted, k) and not getattr(given, k)]
    refused += [
        f"read {p}" for p in wanted.read_only if p not in {*given.read_only, *given.writable}
    ]
    refused += [f"write {p}" for p in wanted.writable if p not in given.writable]
    if refused:
        raise ExtensionError(
            f"{manifest}: [tool.atoll.sandbox] asks for {', '.join(refused)}, which the host's "
            "sandbox does not grant; grant it in the Sandbox given to load_extension() or "
            "open_host(sandbox=...)"
        )
    return given
