"""For type checkers a ref has its actor class's method signatures."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SNIPPET = textwrap.dedent(
    """
    import atoll

    class Counter(atoll.Actor):
        async def add(self, k: int) -> int:
            return k

    async def main() -> None:
        async with atoll.open_host() as host:
            c = await host.spawn(Counter)
            n: int = await c.add(1)
            reveal_type(n)
            await c.add("one")
            same = await atoll.lookup(Counter)
            await same.add(b"two")
    """
)


def test_spawned_ref_is_checked_against_the_class(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    src = tmp_path / "snippet.py"
    src.write_text(SNIPPET)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = out.stdout.splitlines()
    revealed = re.compile(r'Revealed type is "(builtins\.)?int"')
    assert any(revealed.search(line) for line in lines), out.stdout
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 2, out.stdout
    assert 'Argument 1 to "add" of "Counter" has incompatible type "str"' in errors[0]
    assert 'Argument 1 to "add" of "Counter" has incompatible type "bytes"' in errors[1]
