"""The leak check itself: it must see what a test leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from atoll.testing._leaks import snapshot

ORPHAN = (
    "import subprocess; "
    "print(subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL).pid, flush=True)"
)


def test_an_orphaned_grandchild_is_a_leak_until_it_ends() -> None:
    before = snapshot()
    # A child that starts a grandchild and exits at once: the grandchild is
    # orphaned, as an actor would be whose fork server exited before it.
    out = subprocess.run([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, check=True)
    orphan = int(out.stdout)
    try:
        assert before.leaks(exit_wait=0.1).processes == {orphan}
    finally:
        os.kill(orphan, signal.SIGKILL)
    assert not before.leaks()  # it ended, and its zombie was reaped
    assert not os.path.exists(f"/proc/{orphan}")
