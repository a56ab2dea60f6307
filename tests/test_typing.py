"""For type checkers a ref has its actor class's method signatures, with the
return types a ref really has (the ``atoll.mypy`` plugin), and spawn checks
the constructor's arguments."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SNIPPET = textwrap.dedent(
    """
    from collections.abc import AsyncIterator
    import atoll

    class Counter(atoll.Actor):
        def __init__(self, start: int = 0, *, step: int = 1) -> None:
            self.n = start

        async def add(self, k: int) -> int:
            return k

        def add_sync(self, k: int) -> int:
            return k

        async def count(self, n: int) -> AsyncIterator[int]:
            yield n

    async def main() -> None:
        async with atoll.open_host() as host:
            c = await host.spawn(Counter, 10, step=2, name="c")
            reveal_type(c)  # R1
            n = await c.add(1)
            reveal_type(n)  # R2
            m = await c.add_sync(1)
            reveal_type(m)  # R3
            async for i in c.count(3):
                reveal_type(i)  # R4
            await c.add("one")  # E1
            await host.spawn(Counter, "ten")  # E2
            await host.spawn(Counter, 1, steps=2)  # E3
            c.missing  # E4
            same = await atoll.lookup(Counter)
            await same.add(b"two")  # E5
            ext = await host.load_extension("folder", actor_class=Counter)
            reveal_type(ext)  # R5
            anything = await host.load_extension("folder")
            reveal_type(anything)  # R6

    def sync() -> None:
        with atoll.blocking_host() as host:
            b = host.spawn(Counter, 1)
            reveal_type(b.add(1))  # R7
            reveal_type(b.add_sync(1))  # R8
            for j in b.count(2):
                reveal_type(j)  # R9
            host.spawn(Counter, b"x")  # E6
    """
)


def _mypy(tmp_path: Path, config: str) -> dict[str, str]:
    """mypy's notes and errors on SNIPPET, by the R/E marker of their line."""
    pytest.importorskip("mypy")
    src = tmp_path / "snippet.py"
    src.write_text(SNIPPET)
    ini = tmp_path / "mypy.ini"
    ini.write_text(config)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(ini), str(src)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    lines = SNIPPET.splitlines()
    found: dict[str, str] = {}
    for line in out.stdout.splitlines():
        match = re.match(r".*snippet\.py:(\d+): (note|error): (.*)", line)
        if match is None:
            continue
        marker = re.search(r"# ([RE]\d+)", lines[int(match.group(1)) - 1])
        if marker is not None:
            found[marker.group(1)] = found.get(marker.group(1), "") + match.group(3)
    found["all"] = out.stdout
    return found


def test_refs_are_typed_as_they_behave_with_the_plugin(tmp_path: Path) -> None:
    found = _mypy(tmp_path, "[mypy]\nstrict = True\nplugins = atoll.mypy\n")
    out = found["all"]
    assert "ActorRef[snippet.Counter]" in found["R1"], out
    for marker in ("R2", "R3", "R4", "R7", "R8", "R9"):
        assert re.search(r'Revealed type is "(builtins\.)?int"', found[marker]), (marker, out)
    assert "ActorRef[snippet.Counter]" in found["R5"], out
    assert "ActorRef[Any]" in found["R6"], out
    assert 'Argument 1 to "add" of "Counter" has incompatible type "str"' in found["E1"], out
    assert 'incompatible type "str"; expected "int"' in found["E2"], out
    assert 'Unexpected keyword argument "steps"' in found["E3"], out
    assert 'Actor "Counter" has no public method "missing"' in found["E4"], out
    assert 'incompatible type "bytes"; expected "int"' in found["E5"], out
    assert 'incompatible type "bytes"; expected "int"' in found["E6"], out
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 6, out


def test_refs_keep_the_class_signatures_without_the_plugin(tmp_path: Path) -> None:
    found = _mypy(tmp_path, "[mypy]\nstrict = True\n")
    out = found["all"]
    assert re.search(r'Revealed type is "(builtins\.)?int"', found["R2"]), out
    assert 'Argument 1 to "add" of "Counter" has incompatible type "str"' in found["E1"], out
    assert 'incompatible type "bytes"; expected "int"' in found["E5"], out
