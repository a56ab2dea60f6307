"""``atoll env list | prune | build PATH``: see and manage the caches of
environments (``atoll.venvs``) and of compiled code (``atoll.actors._code_table``);
``atoll status | top | stack NAME``: see into a running host (``_cli_observe``)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import anyio

from ._errors import AtollError
from .actors._code_table import stale_table
from .venvs._build import MANIFEST, build, try_lock
from .venvs._env import CACHE_ENV_VAR, default_cache_dir, runtime_pins, user_cache_dir
from .venvs._extension import read_extension


def _entries(cache: str) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """Every environment directory in ``cache`` with its manifest (None: partial)."""
    if not os.path.isdir(cache):
        return
    for entry in sorted(os.listdir(cache)):
        path = os.path.join(cache, entry)
        if not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                yield path, json.load(f)
        except (OSError, ValueError):
            yield path, None


def _size(path: str) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _stale(manifest: dict[str, Any]) -> str | None:
    """Why this atoll cannot use an environment any more, or None."""
    described = manifest.get("env", {})
    if described.get("runtime") != runtime_pins():
        return "built for other versions of atoll's dependencies"
    python = described.get("python", "").split(" ")[0]
    if os.path.isabs(python) and not os.path.exists(python):
        return f"its interpreter {python} is gone"
    return None


def cmd_list(cache: str) -> int:
    rows: list[tuple[str, ...]] = []
    total = 0
    for path, manifest in _entries(cache):
        size = _size(path)
        total += size
        if manifest is None:
            rows.append((os.path.basename(path)[:24], "(partial build)", "", _human(size), ""))
            continue
        described = manifest.get("env", {})
        deps = ", ".join(described.get("dependencies", [])) or "-"
        if described.get("share_torch"):
            deps += " + host torch"
        used = time.strftime("%Y-%m-%d", time.localtime(os.path.getmtime(path)))
        note = _stale(manifest)
        rows.append(
            (manifest["key"][:12], manifest.get("name") or "-", deps, _human(size), used)
            + ((f"unusable: {note}",) if note else ())
        )
    if not rows:
        print(f"no environments in {cache}")
        return 0
    header = ("KEY", "NAME", "DEPENDENCIES", "SIZE", "LAST USED")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row[:4], widths, strict=True)] + list(row[4:])
        print("  ".join(cells).rstrip())
    print(f"{len(rows)} environment(s), {_human(total)} in {cache}")
    return 0


def cmd_prune(cache: str, everything: bool, unused_days: float | None) -> int:
    removed = 0
    for path, manifest in _entries(cache):
        name = os.path.basename(path)
        key = name.split("-")[1] if name.startswith(".tmp-") else name
        lock = try_lock(os.path.join(cache, key + ".lock"))
        if lock is None:
            print(f"kept {name[:24]}: being built now")
            continue
        try:
            removed += _prune_one(path, manifest, everything, unused_days)
        finally:
            os.close(lock)
    for entry in os.listdir(cache) if os.path.isdir(cache) else ():
        if entry.endswith(".lock") and not os.path.isdir(os.path.join(cache, entry[:-5])):
            os.unlink(os.path.join(cache, entry))
    removed += _prune_code_tables(user_cache_dir("code"), everything)
    if not removed:
        print(f"nothing to remove in {cache}")
    return 0


def _prune_code_tables(directory: str, everything: bool) -> int:
    """Remove code tables (see ``atoll.actors._boot``) that no installed atoll
    can use: their sources are gone or changed, or another Python wrote them."""
    removed = 0
    for entry in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
        path = os.path.join(directory, entry)
        if not entry.endswith(".table"):
            continue
        why = "--all" if everything else stale_table(path)
        if why is None:
            continue
        size = os.path.getsize(path)
        os.unlink(path)
        print(f"removed code table {entry[:12]} ({_human(size)}): {why}")
        removed += 1
    return removed


def _prune_one(
    path: str, manifest: dict[str, Any] | None, everything: bool, unused_days: float | None
) -> int:
    if manifest is None:
        why: str | None = "partial build"
    elif everything:
        why = "--all"
    elif unused_days is not None and time.time() - os.path.getmtime(path) > unused_days * 86400:
        why = f"unused for over {unused_days:g} days"
    else:
        why = _stale(manifest)
    if why is None:
        return 0
    size = _size(path)
    shutil.rmtree(path, ignore_errors=True)
    print(f"removed {os.path.basename(path)[:24]} ({_human(size)}): {why}")
    return 1


def cmd_build(cache: str, path: str, quiet: bool) -> int:
    extension = read_extension(path)
    built = anyio.run(lambda: build(extension.env, cache_dir=cache, progress=not quiet))
    print(f"{extension.name}: {built.path} ({'built' if built.built else 'already built'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    default_cache = default_cache_dir()
    origin = f"${CACHE_ENV_VAR}" if os.environ.get(CACHE_ENV_VAR) else "the user cache"
    # --cache-dir goes before or after the action (`atoll env list --cache-dir X`).
    cache_option = argparse.ArgumentParser(add_help=False)
    cache_option.add_argument(
        "--cache-dir",
        default=argparse.SUPPRESS,
        help=f"the cache of environments (default: {default_cache}, from {origin})",
    )
    parser = argparse.ArgumentParser(prog="atoll", description="atoll's command line")
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="the cache of built environments", parents=[cache_option])
    actions = env.add_subparsers(dest="action", required=True)
    actions.add_parser(
        "list", help="list built environments with their sizes", parents=[cache_option]
    )
    prune = actions.add_parser(
        "prune",
        help="remove partial builds, environments and code tables this atoll cannot use",
        parents=[cache_option],
    )
    prune.add_argument("--all", action="store_true", help="remove every environment and code table")
    prune.add_argument(
        "--unused-days",
        type=float,
        default=None,
        metavar="N",
        help="also remove environments unused for N days (default: none is removed for that)",
    )
    build_cmd = actions.add_parser(
        "build", help="build an extension folder's environment", parents=[cache_option]
    )
    build_cmd.add_argument("path", help="an extension folder (with a pyproject.toml)")
    build_cmd.add_argument(
        "--quiet", action="store_true", help="print only the result (default: show uv's progress)"
    )
    pid_option = argparse.ArgumentParser(add_help=False)
    pid_option.add_argument(
        "--pid", type=int, default=None, help="the host's pid (needed when several run)"
    )
    status = commands.add_parser(
        "status", help="what a running host runs: actors, calls, methods", parents=[pid_option]
    )
    status.add_argument("--json", action="store_true", help="the status as JSON")
    top = commands.add_parser("top", help="a live view of a running host", parents=[pid_option])
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="show it once and exit")
    stack = commands.add_parser(
        "stack", help="an actor's thread stacks and task tree", parents=[pid_option]
    )
    stack.add_argument("name", help="the actor's name")
    args = parser.parse_args(argv)
    if args.command != "env":
        return _observe(args)
    cache = os.path.abspath(getattr(args, "cache_dir", None) or default_cache)
    try:
        if args.action == "list":
            return cmd_list(cache)
        if args.action == "prune":
            return cmd_prune(cache, args.all, args.unused_days)
        return cmd_build(cache, args.path, args.quiet)
    except AtollError as exc:
        print(f"atoll: {exc}", file=sys.stderr)
        return 1


def _observe(args: argparse.Namespace) -> int:
    from . import _cli_observe as observe
    from .actors._control import ControlError

    try:
        if args.command == "status":
            return observe.cmd_status(args.pid, args.json)
        if args.command == "top":
            return observe.cmd_top(args.pid, args.interval, args.once)
        return observe.cmd_stack(args.pid, args.name)
    except ControlError as exc:
        print(f"atoll {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
