"""The first code an actor process runs.

The host starts an actor as ``python .../atoll/actors/_boot.py LIB TABLE``:
LIB is a directory to put first on ``sys.path`` (or empty), TABLE a file of
compiled code for atoll's own modules (or empty; see ``_code_table``, which
writes it). Both come before anything of atoll is imported, which is why
this file runs as a script and loads the table itself. With
``--fork-server FD`` after them the process becomes a fork server (see
``_fork_server``) whose forks go on as actors.
"""

from __future__ import annotations

import marshal
import os
import sys
from importlib.machinery import ModuleSpec, SourceFileLoader
from importlib.util import MAGIC_NUMBER, spec_from_file_location
from types import CodeType
from typing import Any

# (source path, is a package, (st_mtime_ns, st_size) of the source, code)
TableEntry = tuple[str, bool, tuple[int, int], CodeType]


def table_header() -> bytes:
    return MAGIC_NUMBER + bytes([sys.flags.optimize])


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

    def __init__(self, entries: dict[str, TableEntry]) -> None:
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
    header = table_header()
    if not data.startswith(header):
        return False  # another Python version or -O level: import as usual
    entries: dict[str, TableEntry] = marshal.loads(data[len(header) :])
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
        from atoll.actors._fork_server import serve

        if not serve(fd):
            return  # the host has gone
    from atoll.actors._child import main

    main()


if __name__ == "__main__":
    _main()
