"""The first code an actor process runs, and the code table its host writes.

The host starts an actor as ``python .../atoll/actors/_boot.py LIB TABLE``:
LIB is a directory to put first on ``sys.path`` (or empty), TABLE a file of
compiled code for atoll's own modules (or empty). Both come before anything
of atoll is imported, which is why this file runs as a script. With
``--fork-server FD`` after them the process becomes a fork server (see
``_forks``) whose forks go on as actors.

Why a table: where Python keeps no bytecode cache (``PYTHONDONTWRITEBYTECODE=1``,
common in containers, with an editable install; a read-only tree installed
without bytecode), every actor process would compile atoll from source again,
some tens of milliseconds per spawn. The host compiles (or reads from its own
bytecode cache) each module once and writes the table into its private
directory; each actor then loads the code from it. A module whose source
changed since (size or mtime differ), or an interpreter of another version or
optimisation level, falls back to the ordinary import: a stale table never
runs old code.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import sys
import time
from importlib.machinery import ModuleSpec, SourceFileLoader
from importlib.util import MAGIC_NUMBER, spec_from_file_location
from types import CodeType
from typing import Any

# The atoll modules an actor process imports before its first call. A module
# missing here is compiled as usual (slower, still correct); a test checks
# that an actor loads every atoll module it has from the table.
CHILD_MODULES = (
    "atoll",
    "atoll._errors",
    "atoll.actors",
    "atoll.actors._actor",
    "atoll.actors._child",
    "atoll.actors._errors_wire",
    "atoll.actors._forks",
    "atoll.actors._node",
    "atoll.actors._ref",
    "atoll.actors._registry",
    "atoll.actors._runtime",
    "atoll.actors._title",
    "atoll.actors._turns",
    "atoll.tensors",
    "atoll.tensors._devices",
    "atoll.tensors._kinds",
    "atoll.tensors._plane",
    "atoll.tensors._shm",
    "atoll.transport",
    "atoll.transport._codec",
    "atoll.transport._hub",
    "atoll.transport._messages",
    "atoll.transport._socket",
)

# (source path, is a package, (st_mtime_ns, st_size) of the source, code)
_Entry = tuple[str, bool, tuple[int, int], CodeType]


def _header() -> bytes:
    return MAGIC_NUMBER + bytes([sys.flags.optimize])


def _source_of(package_dir: str, name: str) -> tuple[str, bool]:
    """The source file of module ``name`` of the package at ``package_dir``,
    and whether it is a package."""
    first, *rest = name.split(".")
    if first != os.path.basename(package_dir):
        raise ValueError(f"{name!r} is not a module of the package at {package_dir!r}")
    base = os.path.join(package_dir, *rest)
    if os.path.isdir(base):
        return os.path.join(base, "__init__.py"), True
    return base + ".py", False


def write_table(path: str, package_dir: str, modules: tuple[str, ...] = CHILD_MODULES) -> None:
    """Compile ``modules`` (of the package at ``package_dir``) into a table at ``path``."""
    entries: dict[str, _Entry] = {}
    for name in modules:
        source, is_package = _source_of(package_dir, name)
        stat = os.stat(source)  # before reading: a later edit then never matches
        code = SourceFileLoader(name, source).get_code(name)
        assert code is not None
        entries[name] = (source, is_package, (stat.st_mtime_ns, stat.st_size), code)
    with open(path, "wb") as f:
        f.write(_header() + marshal.dumps(entries))


# Tables in the cache unused this long are removed when another is written.
_TABLE_MAX_AGE = 30 * 86400


def cached_table(package_dir: str, cache_dir: str, modules: tuple[str, ...] = CHILD_MODULES) -> str:
    """The path of a table for ``modules`` in ``cache_dir``, written there
    first unless a host before wrote it for the same sources and interpreter.
    Compiling takes tens of milliseconds where no bytecode is cached; hosts
    started later (each test, each run of a script) reuse the table."""
    stamps = []
    for name in modules:
        stat = os.stat(_source_of(package_dir, name)[0])
        stamps.append((name, stat.st_mtime_ns, stat.st_size))
    key = repr((_header(), os.path.realpath(package_dir), stamps)).encode()
    path = os.path.join(cache_dir, hashlib.sha256(key).hexdigest()[:32] + ".table")
    try:
        os.utime(path)  # in use: kept by the clean-up below
        return path
    except FileNotFoundError:
        pass
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write_table(tmp, package_dir, modules)
        os.replace(tmp, path)  # whole or not at all, for hosts reading it meanwhile
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    old = time.time() - _TABLE_MAX_AGE
    for entry in os.scandir(cache_dir):
        if entry.name.endswith(".table") and entry.stat().st_mtime < old:
            os.unlink(entry.path)
    return path


def stale_table(path: str) -> str | None:
    """Why no atoll can use the code table at ``path`` any more, or None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        header = _header()
        if not data.startswith(header):
            return "written by another Python version"
        entries: dict[str, _Entry] = marshal.loads(data[len(header) :])
    except (OSError, ValueError, EOFError, TypeError):
        return "unreadable"
    for source, _, stamp, _ in entries.values():
        try:
            stat = os.stat(source)
        except OSError:
            return f"its atoll is no longer installed ({os.path.dirname(source)})"
        if (stat.st_mtime_ns, stat.st_size) != stamp:
            return "its atoll's sources have changed since"
    return None


class _TableLoader(SourceFileLoader):
    """A source loader that hands out the host's code while the source is unchanged."""

    def __init__(self, fullname: str, path: str, stamp: tuple[int, int], code: CodeType) -> None:
        super().__init__(fullname, path)
        self._stamp: tuple[int, int] | None = stamp
        self._code = code

    def get_code(self, fullname: str) -> CodeType:
        stamp, self._stamp = self._stamp, None  # once: a reload reads the source
        if fullname == self.name and stamp is not None:
            stat = os.stat(self.path)
            if (stat.st_mtime_ns, stat.st_size) == stamp:
                return self._code
        code = super().get_code(fullname)
        assert code is not None
        return code


class _TableFinder:
    """First on ``sys.meta_path``: finds the table's modules, each once."""

    def __init__(self, entries: dict[str, _Entry]) -> None:
        self._entries = entries

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        entry = self._entries.pop(fullname, None)
        if entry is None:
            return None
        if not self._entries:
            sys.meta_path.remove(self)
        source, is_package, stamp, code = entry
        loader = _TableLoader(fullname, source, stamp, code)
        return spec_from_file_location(
            fullname, source, loader=loader, submodule_search_locations=[] if is_package else None
        )


def install_table(path: str) -> bool:
    """Serve the modules in the table at ``path``; False if this interpreter can't use it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False  # pruned meanwhile (`atoll env prune`): import as usual
    header = _header()
    if not data.startswith(header):
        return False  # another Python version or -O level: import as usual
    entries: dict[str, _Entry] = marshal.loads(data[len(header) :])
    sys.meta_path.insert(0, _TableFinder(entries))
    return True


def _main() -> None:
    here = os.path.dirname(os.path.realpath(__file__))
    if sys.path and sys.path[0] == here:
        del sys.path[0]  # a script's directory; atoll's internals aren't top-level modules
    lib, table = sys.argv[1:3]
    del sys.argv[1:3]
    if lib:
        sys.path.insert(0, lib)
    if table:
        install_table(table)
    if sys.argv[1:2] == ["--fork-server"]:
        fd = int(sys.argv[2])
        del sys.argv[1:3]
        from atoll.actors._forks import serve

        if not serve(fd):
            return  # the host has gone
    from atoll.actors._child import main

    main()


if __name__ == "__main__":
    _main()
