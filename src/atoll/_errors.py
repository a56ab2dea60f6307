"""The whole atoll exception hierarchy.

Every error atoll raises derives from :class:`AtollError`. The split follows
whose fault it is: a *closed* actor or host is one your own code shut down
(:class:`ActorClosedError`); a *dead* actor is one that went away on its own
(:class:`ActorDiedError`); a *remote* error is one the actor's code raised
(:class:`RemoteError`, when its type cannot be rebuilt here).
"""

from __future__ import annotations

__all__ = [
    "ActorClosedError",
    "ActorDiedError",
    "AtollError",
    "EnvBuildError",
    "ExtensionError",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "SandboxUnavailableError",
    "SerializationError",
    "SpawnError",
    "TransportError",
]


class AtollError(Exception):
    """Base class of every error atoll raises."""


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in another process.

    It is attached as ``__cause__`` of a re-raised remote exception, so the
    remote frames print after the local ones.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


class RemoteError(AtollError):
    """An actor raised an exception whose type cannot be rebuilt in this process.

    The original type's qualified name, its message, the remote traceback text
    and the actor's name are kept as attributes.
    """

    def __init__(self, type_name: str, message: str, traceback: str, actor: str) -> None:
        super().__init__(f"{type_name}: {message} (raised in actor {actor!r})")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = traceback
        self.actor = actor

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.message, self.remote_traceback, self.actor))


class ActorDiedError(AtollError):
    """The actor's process ended without being asked to.

    ``exitcode`` is the process's exit status (negative: the signal that
    killed it) and ``stderr_tail`` the last lines it wrote to stderr.
    """

    def __init__(
        self,
        actor: str,
        exitcode: int | None = None,
        stderr_tail: str = "",
        detail: str = "",
        restarting: bool = False,
    ) -> None:
        if exitcode is None:
            how = "is gone"
        elif exitcode < 0:
            how = f"was killed by signal {-exitcode}"
        else:
            how = f"exited with code {exitcode}"
        text = f"actor {actor!r} {how}{': ' + detail if detail else ''}"
        if stderr_tail:
            text += "\nlast lines of its stderr:\n" + stderr_tail
        super().__init__(text)
        self.actor = actor
        self.exitcode = exitcode
        self.stderr_tail = stderr_tail
        self.restarting = restarting
        """A new process takes its place: later calls reach that one."""

    def __reduce__(self) -> tuple[object, ...]:
        state = (self.actor, self.exitcode, self.stderr_tail, str(self), self.restarting)
        return (_rebuild_died, state)


def _rebuild_died(
    actor: str, exitcode: int | None, tail: str, text: str, restarting: bool = False
) -> ActorDiedError:
    err = ActorDiedError(actor, exitcode, tail, restarting=restarting)
    err.args = (text,)
    return err


class ActorClosedError(AtollError):
    """The actor, or the host that owns it, was closed by this program.

    Raised for calls made after ``stop()`` or after leaving ``open_host()``, and
    for calls that were still in flight when that happened.
    """


class SpawnError(AtollError):
    """An actor could not be started: its class failed to import or its
    constructor raised. The underlying error is the ``__cause__``."""


class SerializationError(AtollError):
    """A value could not be pickled for sending, or unpickled on arrival."""


class ProtocolError(AtollError):
    """A peer broke the wire protocol (malformed frames, wrong version)."""


class TransportError(AtollError):
    """The ZeroMQ transport failed underneath atoll; details in ``__cause__``."""


class EnvBuildError(AtollError):
    """An actor's environment could not be built.

    ``dependencies`` is what was asked for and ``output`` what uv said; the
    message carries both.
    """

    def __init__(self, message: str, dependencies: tuple[str, ...] = (), output: str = "") -> None:
        super().__init__(message)
        self.dependencies = dependencies
        self.output = output

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.dependencies, self.output))


class ExtensionError(AtollError):
    """An extension folder cannot be loaded: its manifest is missing or wrong,
    or its entry point does not name an :class:`atoll.Actor`. The message
    names the file and what to change."""


class SandboxUnavailableError(SpawnError):
    """An actor asked for a sandbox that cannot be made here; the message
    says what is missing and how to get it."""
