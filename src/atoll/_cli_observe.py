"""``atoll status``, ``atoll top`` and ``atoll stack NAME``: a running host,
seen from another terminal through its control socket (``actors._control``)."""

from __future__ import annotations

import sys
import time
from typing import Any

from .actors._control import ask, pick_host


def _bytes(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError


def _seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        return f"{s * 1e3:.1f}ms"
    if s < 120:
        return f"{s:.1f}s"
    return f"{s / 60:.0f}m"


def tables(status: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """What a status shows: (title, header, rows) for each table."""
    actors = []
    methods = []
    calls = []
    for a in status["actors"]:
        trust = "sandboxed" if a["sandboxed"] else "trusted" if a["trusted"] else "untrusted"
        answering = "" if a["answering"] or a["state"] != "running" else " (not answering)"
        actors.append(
            [
                a["name"],
                str(a["pid"] or "-"),
                a["state"] + answering,
                trust,
                str(a["incarnation"]),
                _seconds(a["uptime"]),
                _bytes(a["resident_bytes"]),
                _bytes(a["shared_memory_bytes"]),
                str(a["leases"]),
                str(len(a["calls"])),
                a["environment"],
            ]
        )
        for method, m in sorted(a["methods"].items()):
            methods.append(
                [
                    f"{a['name']}.{method}",
                    str(m["calls"]),
                    str(m["errors"]),
                    *(_seconds(m[k]) for k in ("p50", "p90", "p99", "max")),
                ]
            )
        for c in a["calls"]:
            calls.append(
                [a["name"], c["method"], _seconds(c["age"]), c["caller"], f"{c['chain']:x}"]
            )
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(status["dropped"].items()) if v) or "none"
    return [
        (
            "actors",
            ["NAME", "PID", "STATE", "TRUST", "INC", "UP", "RSS", "SHM", "LEASES", "CALLS", "ENV"],
            actors,
        ),
        ("methods", ["METHOD", "CALLS", "ERRORS", "P50", "P90", "P99", "MAX"], methods),
        ("calls in flight", ["ACTOR", "METHOD", "AGE", "CALLER", "CHAIN"], calls),
        (f"dropped messages: {dropped}", [], []),
    ]


def cmd_status(pid: int | None, as_json: bool) -> int:
    status = ask(pick_host(pid), "status")
    if as_json:
        import json

        print(json.dumps(status, indent=2))
        return 0
    for title, header, rows in tables(status):
        print(title)
        if not header:
            continue
        widths = [max(len(x) for x in column) for column in zip(header, *rows, strict=True)]
        for row in (header, *rows):
            print(
                "  "
                + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
        print()
    return 0


def cmd_stack(pid: int | None, name: str) -> int:
    print(ask(pick_host(pid), "stack", name=name))
    return 0


def cmd_top(pid: int | None, interval: float, once: bool) -> int:
    try:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.table import Table
    except ImportError:
        print("atoll top needs rich: pip install 'atoll[top]'", file=sys.stderr)
        return 1
    directory = pick_host(pid)

    def render() -> Any:
        parts = []
        for title, header, rows in tables(ask(directory, "status")):
            table = Table(title=title, title_justify="left", expand=False)
            for column in header:
                table.add_column(column)
            for row in rows:
                table.add_row(*row)
            parts.append(table)
        return Group(*parts)

    console = Console()
    if once:
        console.print(render())
        return 0
    try:
        with Live(render(), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(), refresh=True)
    except KeyboardInterrupt:
        return 0
