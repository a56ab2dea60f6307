"""The code table: atoll's modules compiled once, for actor processes to load.

Where Python keeps no bytecode cache (``PYTHONDONTWRITEBYTECODE=1``,
common in containers, with an editable install; a read-only tree installed
without bytecode), every actor process would compile atoll from source again,
some tens of milliseconds per spawn. The host compiles (or reads from its own
bytecode cache) each module once and writes the table into the user's cache;
each actor then loads the code from it (``_boot``). A module whose source
changed since (size or mtime differ), or an interpreter of another version or
optimisation level, falls back to the ordinary import: a stale table never
runs old code.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import time
from importlib.machinery import SourceFileLoader

from ._boot import TableEntry, table_header

# The atoll modules an actor process imports before its first call. A module
# missing here is compiled as usual (slower, still correct); a test checks
# that an actor loads every atoll module it has from the table.
CHILD_MODULES = (
    "atoll",
    "atoll._errors",
    "atoll.actors",
    "atoll.actors._actor",
    "atoll.actors._boot_spec",
    "atoll.actors._breakpoint",
    "atoll.actors._call_stats",
    "atoll.actors._callbacks",
    "atoll.actors._calling",
    "atoll.actors._child",
    "atoll.actors._errors_wire",
    "atoll.actors._fork_server",
    "atoll.actors._limits",
    "atoll.actors._log_forwarding",
    "atoll.actors._node",
    "atoll.actors._node_state",
    "atoll.actors._ref",
    "atoll.actors._registry",
    "atoll.actors._runtime",
    "atoll.actors._serving",
    "atoll.actors._title",
    "atoll.actors._tracing",
    "atoll.actors._turns",
    "atoll.tensors",
    "atoll.tensors._adapters",
    "atoll.tensors._arena",
    "atoll.tensors._descriptors",
    "atoll.tensors._device_storages",
    "atoll.tensors._devices",
    "atoll.tensors._leases",
    "atoll.tensors._lifting",
    "atoll.tensors._plane",
    "atoll.tensors._receiving",
    "atoll.tensors._sending",
    "atoll.tensors._shm",
    "atoll.tensors._views",
    "atoll.transport",
    "atoll.transport._backlog",
    "atoll.transport._codec",
    "atoll.transport._hub",
    "atoll.transport._messages",
    "atoll.transport._plain",
    "atoll.transport._socket",
)


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
    entries: dict[str, TableEntry] = {}
    for name in modules:
        source, is_package = _source_of(package_dir, name)
        stat = os.stat(source)  # before reading: a later edit then never matches
        code = SourceFileLoader(name, source).get_code(name)
        assert code is not None
        entries[name] = (source, is_package, (stat.st_mtime_ns, stat.st_size), code)
    with open(path, "wb") as f:
        f.write(table_header() + marshal.dumps(entries))


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
    key = repr((table_header(), os.path.realpath(package_dir), stamps)).encode()
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
        header = table_header()
        if not data.startswith(header):
            return "written by another Python version"
        entries: dict[str, TableEntry] = marshal.loads(data[len(header) :])
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
