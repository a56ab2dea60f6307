"""Code sent by value keeps its file name and, where only this process has
it, its source text.

Classes and functions that a receiver cannot import (defined in a script's
``__main__``, a notebook cell, the application's own files sent to an
isolated environment) travel by value, through cloudpickle. cloudpickle
renames the file of every code object it sends to ``<dynamic-code>``, so an
exception raised in such code showed that instead of where it happened. The
pickler here sends each code object's real file name, and the source lines
of files that do not exist on disk (a notebook cell, an interactive
session), so tracebacks in the receiver show file, line and text.
"""

from __future__ import annotations

import io
import linecache
import os
import types
from collections import ChainMap
from typing import Any

import cloudpickle

_cloud_code_reduce = cloudpickle.Pickler._dispatch_table[types.CodeType]


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    rebuild, args = _cloud_code_reduce(code)
    filename = code.co_filename
    lines: list[str] | None = None
    if os.path.exists(filename):
        filename = os.path.abspath(filename)
    else:
        lines = linecache.getlines(filename) or None  # its source lives only here
    return (_code_at, (rebuild, args, filename, lines))


def _code_at(rebuild: Any, args: tuple[Any, ...], filename: str, lines: list[str] | None) -> Any:
    code = rebuild(*args).replace(co_filename=filename)
    if lines and filename not in linecache.cache:
        # An mtime of None: linecache never checks it against a file.
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    return code


class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's pickler, keeping where code came from."""

    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


def dumps(obj: Any) -> bytes:
    """``obj`` pickled by value where it must be, code keeping its file names."""
    with io.BytesIO() as f:
        Pickler(f, protocol=5).dump(obj)
        return f.getvalue()
