"""Log records made in an actor process, forwarded to its host's ``logging``.

An actor process does not have to configure logging: at its start, a
handler on its root logger passes each record at or above the level the
host's ``atoll.actor`` logger has (its effective level, then) to the host,
where it is handled by the ``atoll.actor.<name>`` logger as a record of the
host's own: with the actor's name, pid, the logger it was made by, and the
call it was made in as attributes (see ``_output.LogSink``). atoll's own
records stay on the actor's stderr.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ..transport._hub import HOST
from ._node_state import current_call
from ._ref import LOG_OID


class Forwarder(logging.Handler):
    """Sends the records of this actor process to the host."""

    def __init__(self, node: Any) -> None:
        super().__init__()
        self._node = node
        self._busy = threading.local()  # a record made while one is sent is not sent

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "atoll" or record.name.startswith("atoll."):
            return
        if getattr(self._busy, "on", False):
            return
        self._busy.on = True
        try:
            call = current_call.get()
            fields = {
                "actor": self._node.name,
                "pid": os.getpid(),
                "logger": record.name,
                "level": record.levelno,
                "message": record.getMessage(),
                "exc": _FORMAT.formatException(record.exc_info) if record.exc_info else "",
                "file": record.pathname,
                "line": record.lineno,
                "function": record.funcName,
                "call": call[0] if call is not None else 0,
            }
            node = self._node
            if threading.get_ident() == node._loop_thread:
                node.notify(HOST, LOG_OID, "record", (fields,), {})
            else:
                import anyio.from_thread

                anyio.from_thread.run_sync(
                    node.notify, HOST, LOG_OID, "record", (fields,), {}, token=node._token
                )
        except Exception:  # the host is gone, the loop stopped: the record is lost
            pass
        finally:
            self._busy.on = False


def forward(node: Any, level: int) -> None:
    """Forward this process's records at ``level`` and above to the host."""
    if level <= 0:
        return
    root = logging.getLogger()
    root.addHandler(Forwarder(node))
    root.setLevel(level)


_FORMAT = logging.Formatter()
