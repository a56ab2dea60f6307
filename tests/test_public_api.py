"""The public API is what ``atoll`` exports, and all of it is documented."""

from __future__ import annotations

import inspect

import atoll


def test_public_names_exist_and_are_documented() -> None:
    assert atoll.__all__ == sorted(atoll.__all__)
    for name in atoll.__all__:
        obj = getattr(atoll, name)
        assert inspect.getdoc(obj), f"atoll.{name} has no docstring"


def test_importing_atoll_does_not_import_trio() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import sys, atoll; print('trio' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"
