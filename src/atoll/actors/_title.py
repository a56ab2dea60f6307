"""Process titles: what ``ps`` and ``top`` show for atoll's processes.

An actor process shows ``atoll: NAME [host PID]`` rather than the command
line of the fork server it was forked from; a fork server shows ``atoll:
fork server [host PID] PYTHON``. With ``setproctitle`` (an atoll
dependency) the whole command line changes; without it only the short
name that ``top`` shows by default (15 characters, Linux).
"""

from __future__ import annotations

import sys


def set_title(title: str, short: str) -> None:
    """Show ``title`` for this process in ``ps``, and ``short`` (15
    characters at most) where only a short name fits (``top``, ``ps -o comm``)."""
    try:
        import setproctitle
    except ImportError:
        if sys.platform.startswith("linux"):
            try:
                with open("/proc/self/comm", "w") as f:
                    f.write(short[:15])
            except OSError:
                pass
        return
    setproctitle.setproctitle(title)
    setproctitle.setthreadtitle(short[:15])


def set_actor_title(name: str, host_pid: int) -> None:
    set_title(f"atoll: {name} [host {host_pid}]", f"atoll {name}")
