"""What a host tells a new actor process about itself: its boot description.

The host writes it as one line of JSON to the process's stdin (never argv:
it carries the per-spawn secret) and keeps the pipe open; the process reads
it before anything else (``_child.main``). A warm process taken to restart
an actor gets one more line there (:class:`Become`): the identity it serves
under from then on.
"""

from __future__ import annotations

import msgspec


class BootSpec(msgspec.Struct, frozen=True, kw_only=True):
    hub: str
    """The hub's ZeroMQ endpoint."""
    identity: str
    """The process's identity on the hub."""
    secret: bytes
    """The per-spawn secret its Hello proves."""
    node: int
    """Its node number: the high bits of its call ids."""
    name: str
    """The actor's name (a warm process's placeholder until it is given an actor)."""
    host_pid: int
    sys_path: list[str]
    """Put first on ``sys.path`` (empty for an isolated environment)."""
    isolated: bool
    """It runs in an environment of its own (``atoll.Env``)."""
    imports: list[str]
    """Modules to import before anything else (a warm process)."""
    spin_us: float
    shm_prefix: str
    transfer: str
    stop_timeout: float
    device_lease_timeout: float
    trusted: bool = True
    """Not: everything it sends goes on the plain wire (``transport._plain``)."""
    sandboxed: bool = False
    """It shares memory with its host only (see ``_sandbox``)."""
    rlimits: dict[str, int] = {}
    """Resource limits it sets on itself before its actor's code runs."""
    nice: int = 0
    """How much less urgent it makes itself (see ``Limits.nice``)."""
    log_level: int = 0
    """Its records at this level and above go to the host's logging (0: none)."""
    shm_limit: int | None = None
    """Bytes its arena of shared memory may hold."""
    debug: str = ""
    """The host's debug socket, where ``breakpoint()`` goes (empty: none)."""
    tracing: bool = False
    """The host traces calls: record spans and send them to it (``_tracing``)."""
    environ: dict[str, str] | None = None
    """For a fork: the environment variables a fresh start would have had."""
    cwd: str | None = None
    """For a fork: the working directory a fresh start would have had."""


def encode_boot(spec: BootSpec) -> bytes:
    return msgspec.json.encode(spec) + b"\n"


def decode_boot(line: bytes) -> BootSpec:
    return msgspec.json.decode(line, type=BootSpec)


class Become(msgspec.Struct, frozen=True):
    """A warm process, not yet serving an actor, taken to be the new
    incarnation of one that died: it reconnects under the dead one's
    identity and proves a new secret."""

    identity: str
    secret: bytes


def encode_become(become: Become) -> bytes:
    return msgspec.json.encode(become) + b"\n"


def decode_become(line: bytes) -> Become:
    return msgspec.json.decode(line, type=Become)
