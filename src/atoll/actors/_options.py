"""HostOptions: how a host behaves; the keyword arguments of ``open_host()``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from ..tensors import check_transfer
from ..transport._plain import PlainLimits
from ..venvs import Progress
from ._output import OutputTo, check_output
from ._sandbox import Sandbox

P = ParamSpec("P")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostOptions:
    """How a host behaves. :func:`atoll.open_host`, :func:`atoll.start_host`
    and :func:`atoll.blocking_host` take these as keyword arguments; a value
    out of range is a ``ValueError`` naming the option."""

    stop_timeout: float = 2.0
    """Seconds an actor gets to stop (its ``on_stop`` included) before it is
    terminated; then SIGTERM, and a second later SIGKILL. Host-side sync
    callbacks still running when the host closes are waited for as long."""

    spawn_timeout: float = 60.0
    """Seconds a spawn may take, from the process's start to ``on_start``'s
    end (building an environment is not counted)."""

    spin_us: float = 150
    """A caller with the only call in flight polls for its reply this many
    microseconds before sleeping, and an actor that has just answered a lone
    call polls as long for the next one. That saves event-loop wake-ups (the
    largest cost of a round trip) when replies and calls come fast; the
    polling gives the CPU away at each turn, and other tasks of the loop wait
    at most ``spin_us`` meanwhile. 0 turns it off: every wait sleeps in the
    event loop."""

    transfer: str = "shared_memory"
    """How numpy arrays, CPU tensors and byte buffers of 64 KiB or more
    travel, for the host and every actor it spawns: ``"shared_memory"`` (as
    descriptors of shared memory, no copy of data already there) or
    ``"inline"`` (copied into the messages, for systems with a small or no
    ``/dev/shm``)."""

    env_cache: str | None = None
    """Where environments (:class:`atoll.Env`, extensions) are built and
    kept: by default ``$ATOLL_CACHE_DIR``, else ``~/.cache/atoll/envs``."""

    build_progress: Progress = True
    """How builds of environments are reported: True prints what uv installs
    and how long it took to stderr, a callable gets each line, False is
    silent."""

    fork_server: bool = True
    """Actor processes are forked from a process per environment that has
    atoll and its dependencies imported already, so a spawn skips the
    interpreter's start and those imports: about 15 ms instead of 150 ms or
    more. The first spawn for an environment starts from scratch and starts
    that environment's fork server beside it (about 16 MB of its own, kept
    until the host closes); spawns after it are forks. Each fork takes on the
    host's environment variables and working directory at its spawn; a spawn
    whose ``PYTHON*``, ``LD_*`` or ``MALLOC_*`` variables differ from the fork
    server's starts from scratch. False starts every actor process from
    scratch. Linux only (pidfds); elsewhere every process starts from
    scratch."""

    device_lease_timeout: float = 10.0
    """Device memory (CUDA) dies with the process that allocated it, so an
    actor that stops while peers (the host included) still hold views of its
    device tensors first waits this many seconds for them to be dropped,
    saying so on stderr, and the host's grace stretches to match; views
    still held then are no longer valid memory, and each holder logs a
    warning."""

    plain_limits: PlainLimits = dataclasses.field(default_factory=PlainLimits)
    """Bounds on reading one plain payload, what untrusted actors send (see
    ``spawn(trusted=False)``): its bytes, nesting depth and items. Past them
    the payload is a :class:`~atoll.ProtocolError` for its call alone."""

    output: str | OutputTo = "prefixed"
    """Where actors' stdout and stderr go, line by line: ``"prefixed"`` (the
    host's stderr, each line after ``[name pid]``), ``"inherit"`` (the
    host's stdout and stderr, unchanged), ``"logging"`` (records of the
    ``atoll.actor.<name>`` logger), or a callable ``output(actor, pid,
    stream, line)``. See ``atoll.actors._output``."""

    control: bool = True
    """Serve ``atoll status``, ``atoll top`` and ``atoll stack`` on a control
    socket in the host's private directory: owner-only, keyed, and checked
    to be the same user (see ``atoll.actors._control``)."""

    tracer_provider: Any = None
    """An OpenTelemetry SDK ``TracerProvider`` to trace every call with (see
    ``atoll.actors._tracing``); None: the global one, if the application has
    set the SDK's (``trace.set_tracer_provider``) before opening the host."""

    sandbox: Sandbox | None = None
    """The sandbox every extension loads in (:meth:`Host.load_extension`),
    unless its call gives another. A manifest may ask for more than it
    grants (``[tool.atoll.sandbox]``): refused, naming what it asked."""

    def __post_init__(self) -> None:
        if not self.spin_us >= 0:
            raise ValueError(f"spin_us must be 0 (no polling) or more, got {self.spin_us!r}")
        for name in ("stop_timeout", "device_lease_timeout"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be a number of seconds, 0 or more, got {value!r}")
        if not self.spawn_timeout > 0:
            raise ValueError(
                f"spawn_timeout must be a number of seconds above 0, got {self.spawn_timeout!r}"
            )
        check_transfer(self.transfer)
        check_output(self.output)
        if not isinstance(self.plain_limits, PlainLimits):
            raise TypeError(f"plain_limits takes an atoll.PlainLimits, got {self.plain_limits!r}")


def keywords_of(
    options: Callable[P, HostOptions],
) -> Callable[[Callable[[HostOptions], R]], Callable[P, R]]:
    """Give a function of one :class:`HostOptions` the options' keyword
    arguments instead, for callers, type checkers and documentation alike:
    the options are listed once, on :class:`HostOptions`."""

    def decorate(fn: Callable[[HostOptions], R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            return fn(options(*args, **kwargs))

        keywords = list(inspect.signature(options).parameters.values())
        returns = inspect.signature(fn).return_annotation
        call.__signature__ = inspect.Signature(keywords, return_annotation=returns)  # type: ignore[attr-defined]
        return call

    return decorate
