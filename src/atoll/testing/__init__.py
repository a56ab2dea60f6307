"""Test helpers for code that uses atoll: leak checks and hypothesis strategies.

The pytest plugin ``atoll.testing.plugin`` (enable it with
``-p atoll.testing.plugin``) adds the :func:`~atoll.testing.plugin.atoll_leak_check`
fixture; :mod:`atoll.testing.strategies` has hypothesis strategies for
payloads (import it only where hypothesis is installed).
"""

from ._leaks import Leaks as Leaks
from ._leaks import snapshot as snapshot
