"""SIGTERM: a host's process terminated by it removes what it made first.

Python's default for SIGTERM ends the process at once, without ``finally``
blocks or ``atexit``: the host's private directory (the hub's socket) and
its shared-memory segments would stay behind. (Its actors exit by
themselves: their stdin pipe from the host closes.) While a host is open,
and only if SIGTERM still has the default action, a handler removes each
open host's directory and segments, then terminates the process the default
way (the same exit status). An application that handles SIGTERM itself
keeps its own handler, and closes its hosts as it shuts down.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

_cleanups: dict[int, Callable[[], None]] = {}


def watch(key: int, cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` if SIGTERM ends this process while ``key`` is watched."""
    _cleanups[key] = cleanup
    install()


def unwatch(key: int) -> None:
    _cleanups.pop(key, None)
    if not _cleanups and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:
            pass  # not the main thread: harmless, the handler finds nothing to do


def install() -> None:
    """Take SIGTERM if nobody else has (only the main thread can)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    for cleanup in list(_cleanups.values()):
        try:
            cleanup()
        except Exception:
            pass  # the process ends now: nothing may stop that
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
