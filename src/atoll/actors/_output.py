"""Where actors' stdout and stderr go: line by line, to one place.

Each actor process's stdout and stderr are pipes the host reads; each line
goes where ``open_host(output=...)`` says:

``"prefixed"`` (the default)
    to the host's stderr, after ``[name pid]``;
``"inherit"``
    to the host's stdout and stderr, unchanged;
``"logging"``
    as a record of the ``atoll.actor.<name>`` logger (stdout at INFO,
    stderr at WARNING), with ``actor``, ``pid`` and ``stream`` attributes;
a callable
    ``output(actor, pid, stream, line)``, on the host's event loop.

Reading never waits for the destination: lines wait in a bounded queue that
one task of the host empties, so an actor that writes a lot is never held
up; past the bound, lines are dropped and counted, and the count is said
once the queue has room again. A partial last line is passed on when the
stream ends, a very long line in pieces, bytes that are not UTF-8 replaced.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream

OutputTo = Callable[[str, int, str, str], Any]
"""``output(actor, pid, stream, line)``: what a callable ``output`` is given."""

MODES = ("prefixed", "inherit", "logging")

QUEUE_LINES = 10_000
"""Lines waiting for their destination, all actors together, at most."""

LONGEST = 64 * 1024
"""Characters of one line passed on in one piece."""


def check_output(output: Any) -> None:
    if not (callable(output) or output in MODES):
        raise ValueError(
            f"output takes 'prefixed', 'inherit', 'logging' or a callable, got {output!r}"
        )


class Output:
    """The host's queue of actors' output lines, and their destination."""

    def __init__(self, output: str | OutputTo) -> None:
        check_output(output)
        self._output = output
        self._lines: deque[tuple[str, int, str, str]] = deque()
        self._waiting = anyio.Event()
        self.dropped = 0
        """Lines dropped so far because the destination was too slow."""
        self._dropped_told = 0

    async def read(
        self,
        stream: ByteReceiveStream,
        which: str,
        source: Callable[[], tuple[str, int]],
        keep: Callable[[str], bool] | None = None,
    ) -> None:
        """Read ``stream`` (an actor's stdout or stderr) to its end; each
        line is given to ``keep``, then, unless it kept it for itself
        (True), queued with ``source()`` (the actor's name and pid then)."""
        partial = b""
        try:
            async for chunk in stream:
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                if len(partial) > LONGEST:
                    lines.append(partial)
                    partial = b""
                for line in lines:
                    self._queue(which, source, line.decode(errors="replace"), keep)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            if partial:
                self._queue(which, source, partial.decode(errors="replace"), keep)

    def _queue(
        self,
        which: str,
        source: Callable[[], tuple[str, int]],
        text: str,
        keep: Callable[[str], bool] | None,
    ) -> None:
        if keep is not None and keep(text):
            return
        name, pid = source()
        for start in range(0, max(len(text), 1), LONGEST):
            if len(self._lines) >= QUEUE_LINES:
                self.dropped += 1
                continue
            self._lines.append((name, pid, which, text[start : start + LONGEST]))
        self._waiting.set()

    async def serve(self) -> None:
        """Pass queued lines on, until cancelled."""
        while True:
            await self._waiting.wait()
            self._waiting = anyio.Event()
            self.flush()
            await anyio.lowlevel.checkpoint()

    def flush(self) -> None:
        """Pass on every line queued now."""
        lines = self._lines
        while lines:
            self._emit(*lines.popleft())
        if self.dropped != self._dropped_told:
            lost = self.dropped - self._dropped_told
            self._dropped_told = self.dropped
            self._emit(
                "atoll",
                0,
                "stderr",
                f"{lost} lines of actors' output dropped: their destination was too slow",
            )

    def _emit(self, name: str, pid: int, which: str, line: str) -> None:
        output = self._output
        if output == "prefixed":
            sys.stderr.write(f"[{name} {pid}] {line}\n")
        elif output == "inherit":
            (sys.stdout if which == "stdout" else sys.stderr).write(line + "\n")
        elif output == "logging":
            level = logging.INFO if which == "stdout" else logging.WARNING
            extra = {"actor": name, "pid": pid, "stream": which}
            logging.getLogger(f"atoll.actor.{name}").log(level, "%s", line, extra=extra)
        else:
            assert callable(output)
            output(name, pid, which, line)


class LogSink:
    """Takes the log records actors forward (see ``_log_forwarding``) and
    hands each to the host's ``atoll.actor.<name>`` logger."""

    dropped = 0
    """Records that were not what an actor's forwarder makes."""

    async def record(self, fields: Any) -> None:
        try:
            actor, level, message = fields["actor"], fields["level"], fields["message"]
            if not (type(actor) is str and type(level) is int and type(message) is str):
                raise TypeError(fields)
            logger = logging.getLogger(f"atoll.actor.{actor}")
            if not logger.isEnabledFor(level):
                return
            record = logger.makeRecord(
                logger.name,
                level,
                str(fields.get("file", "")),
                int(fields.get("line", 0)),
                message,
                (),
                None,
                str(fields.get("function", "")),
            )
        except (KeyError, TypeError, ValueError):
            LogSink.dropped += 1  # not from atoll's forwarder: a hostile or broken actor
            return
        record.actor = actor
        record.pid = fields.get("pid")
        record.origin = fields.get("logger")
        record.call = fields.get("call")
        if fields.get("exc"):
            record.exc_text = str(fields["exc"])
        logger.handle(record)
