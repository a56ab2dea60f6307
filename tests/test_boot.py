"""An actor process loads atoll's own code from a table its host compiled once
(no per-spawn compile where Python keeps no bytecode cache), and never runs
stale code from it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import atoll
from atoll.actors import _boot, _code_table, _spawner
from helpers import Echo


@pytest.mark.anyio
async def test_an_actor_process_loads_every_atoll_module_from_the_table() -> None:
    async with atoll.open_host() as host:
        fresh = await host.spawn(Echo)  # from scratch; its fork server starts beside it
        forked = await host.spawn(Echo)
        with anyio.fail_after(10):
            assert await forked.call_sync(os.getppid) != await fresh.call_sync(os.getppid)
            by_process = [await fresh.atoll_loaders(), await forked.atoll_loaders()]
    # The fork server imported them all; each actor those it runs.
    assert set(_code_table.CHILD_MODULES) == set(by_process[1])
    for loaders in by_process:
        assert {name for name, loader in loaders.items() if loader != "_TableLoader"} == set()


@pytest.mark.anyio
async def test_an_actor_starts_without_a_table_where_none_can_be_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unwritable(path: str, *args: object) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(_spawner, "cached_table", unwritable)
    monkeypatch.setattr(_spawner, "write_table", unwritable)
    async with atoll.open_host() as host:
        echo = await host.spawn(Echo)
        with anyio.fail_after(10):
            assert await echo.echo(7) == 7
            loaders = await echo.atoll_loaders()
    assert set(loaders.values()) == {"SourceFileLoader"}


@pytest.fixture
def package(tmp_path: Path) -> Iterator[Path]:
    """A package ``boottest`` with a module ``mod``; sys.path, sys.meta_path and
    sys.modules as they were afterwards."""
    root = tmp_path / "boottest"
    root.mkdir()
    (root / "__init__.py").write_text("NAME = 'package'\n")
    (root / "mod.py").write_text("VALUE = 1\n")
    sys.path.insert(0, str(tmp_path))
    meta_path = list(sys.meta_path)
    try:
        yield root
    finally:
        sys.path.remove(str(tmp_path))
        sys.meta_path[:] = meta_path
        for name in ("boottest", "boottest.mod"):
            sys.modules.pop(name, None)


def _import_mod() -> tuple[int, str, str]:
    import boottest.mod  # type: ignore[import-not-found]

    loader = type(boottest.__spec__.loader).__name__
    return boottest.mod.VALUE, loader, boottest.mod.__file__


def test_the_table_serves_unchanged_modules(package: Path, tmp_path: Path) -> None:
    table = str(tmp_path / "table")
    _code_table.write_table(table, str(package), ("boottest", "boottest.mod"))
    # New text, same size and mtime: what the table checks is unchanged, so
    # the code that runs is the table's (this is how it shows it was used).
    stat = os.stat(package / "mod.py")
    (package / "mod.py").write_text("VALUE = 2\n")
    os.utime(package / "mod.py", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _boot.install_table(table)
    assert _import_mod() == (1, "_TableLoader", str(package / "mod.py"))


def test_a_module_edited_after_the_table_is_read_from_source(package: Path, tmp_path: Path) -> None:
    table = str(tmp_path / "table")
    _code_table.write_table(table, str(package), ("boottest", "boottest.mod"))
    (package / "mod.py").write_text("VALUE = 22\n")  # another size
    assert _boot.install_table(table)
    value, package_loader, path = _import_mod()
    assert value == 22
    assert package_loader == "_TableLoader"
    assert path == str(package / "mod.py")


def test_a_module_touched_after_the_table_is_read_from_source(
    package: Path, tmp_path: Path
) -> None:
    table = str(tmp_path / "table")
    _code_table.write_table(table, str(package), ("boottest", "boottest.mod"))
    (package / "mod.py").write_text("VALUE = 2\n")  # same size
    stat = os.stat(package / "mod.py")
    os.utime(package / "mod.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert _boot.install_table(table)
    assert _import_mod()[0] == 2


def test_a_table_from_another_interpreter_is_not_used(package: Path, tmp_path: Path) -> None:
    table = tmp_path / "table"
    _code_table.write_table(str(table), str(package), ("boottest", "boottest.mod"))
    data = table.read_bytes()
    table.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # another bytecode magic number
    assert not _boot.install_table(str(table))
    assert _import_mod()[:2] == (1, "SourceFileLoader")


def test_a_module_outside_the_package_is_refused(package: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a module of the package"):
        _code_table.write_table(str(tmp_path / "table"), str(package), ("other.mod",))


def test_a_cached_table_is_reused_until_a_source_changes(package: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    modules = ("boottest", "boottest.mod")
    first = _code_table.cached_table(str(package), str(cache), modules)
    written = os.stat(first)
    assert _code_table.cached_table(str(package), str(cache), modules) == first
    assert os.stat(first).st_ino == written.st_ino  # the same file, not written again
    (package / "mod.py").write_text("VALUE = 22\n")
    second = _code_table.cached_table(str(package), str(cache), modules)
    assert second != first
    assert _boot.install_table(second)
    assert _import_mod()[:2] == (22, "_TableLoader")


def test_cached_tables_unused_for_long_are_removed(package: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    modules = ("boottest", "boottest.mod")
    old = _code_table.cached_table(str(package), str(cache), modules)
    long_ago = os.stat(old).st_mtime - _code_table._TABLE_MAX_AGE - 60
    os.utime(old, (long_ago, long_ago))
    (package / "mod.py").write_text("VALUE = 22\n")
    new = _code_table.cached_table(str(package), str(cache), modules)
    assert sorted(os.listdir(cache)) == [os.path.basename(new)]
