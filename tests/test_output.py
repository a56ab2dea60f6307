"""Actors' stdout and stderr reach the host line by line, each line with its
actor (``open_host(output=...)``)."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

import atoll
from helpers import Logger, Talker

pytestmark = pytest.mark.anyio


class _Lines:
    """An ``output`` callable that keeps lines, and wakes a waiter."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, int, str, str]] = []
        self._changed = anyio.Event()

    def __call__(self, actor: str, pid: int, stream: str, line: str) -> None:
        self.lines.append((actor, pid, stream, line))
        self._changed.set()

    async def wait_for(self, n: int) -> None:
        while len(self.lines) < n:
            await self._changed.wait()
            self._changed = anyio.Event()


async def test_each_line_comes_with_its_actor_and_stream() -> None:
    out = _Lines()
    async with atoll.open_host(output=out) as host:
        one = await host.spawn(Talker, name="one")
        two = await host.spawn(Talker, name="two")
        with anyio.fail_after(20):
            pids = [await one.pid(), await two.pid()]
            await one.say(3, "tail without newline")
            await two.say(2, "")
            await out.wait_for(3 + 2 + 2)  # their lines, and a line each on stderr
    for name, pid, count in (("one", pids[0], 3), ("two", pids[1], 2)):
        mine = [(stream, line) for actor, p, stream, line in out.lines if actor == name]
        assert all(p == pid for actor, p, _, _ in out.lines if actor == name)
        said = [line for stream, line in mine if stream == "stdout"]
        assert said[:count] == [f"line {i}" for i in range(count)]
        assert ("stderr", "to stderr") in mine
    # A last line without its newline is passed on when the stream ends.
    assert ("one", pids[0], "stdout", "tail without newline") in out.lines


async def test_prefixed_lines_on_the_hosts_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    async with atoll.open_host() as host:
        talker = await host.spawn(Talker, name="talker")
        with anyio.fail_after(20):
            pid = await talker.pid()
            await talker.say(2, "")
    err = capfd.readouterr().err
    assert f"[talker {pid}] line 0\n[talker {pid}] line 1\n" in err
    assert f"[talker {pid}] to stderr\n" in err


async def test_output_as_log_records(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="atoll.actor"):
        async with atoll.open_host(output="logging") as host:
            talker = await host.spawn(Talker, name="logged")
            with anyio.fail_after(20):
                pid = await talker.pid()
                await talker.say(1, "")
    records = [r for r in caplog.records if r.name == "atoll.actor.logged"]
    said = {(r.levelno, r.getMessage(), r.stream, r.pid) for r in records}  # type: ignore[attr-defined]
    assert (logging.INFO, "line 0", "stdout", pid) in said
    assert (logging.WARNING, "to stderr", "stderr", pid) in said


async def test_a_flood_of_output_never_holds_its_actor_up() -> None:
    out = _Lines()
    lines = 30_000
    async with atoll.open_host(output=out) as host:
        talker = await host.spawn(Talker)
        output: Any = host._processes.output
        with anyio.fail_after(60):
            await talker.say(lines, "")
            assert await talker.pid() > 0  # it answers: nothing it wrote held it up
            # Every line arrives, or is counted as dropped (the queue is bounded).
            while sum(actor != "atoll" for actor, *_ in out.lines) + output.dropped < lines + 1:
                await out.wait_for(len(out.lines) + 1)
    said = [int(line.split()[1]) for actor, _, stream, line in out.lines if stream == "stdout"]
    assert said == sorted(set(said))  # in order, none torn or twice
    # What was dropped is said (in notices as it happens), never hidden.
    told = [int(line.split()[0]) for actor, *_, line in out.lines if actor == "atoll"]
    assert sum(told) == output.dropped


def test_output_takes_a_mode_or_a_callable() -> None:
    with pytest.raises(ValueError, match="prefixed"):
        atoll.HostOptions(output="loud")


class _Records(logging.Handler):
    """Keeps the records it is given; wakes a waiter on each."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self._changed = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()

    async def wait_for(self, message: str) -> logging.LogRecord:
        while True:
            for record in self.records:
                if record.getMessage() == message:
                    return record
            await self._changed.wait()
            self._changed = anyio.Event()


async def test_log_records_reach_the_hosts_logging_with_their_actor() -> None:
    records = _Records()
    actors = logging.getLogger("atoll.actor")
    actors.addHandler(records)
    actors.setLevel(logging.INFO)
    try:
        async with atoll.open_host() as host:
            logger = await host.spawn(Logger, name="plugin")
            with anyio.fail_after(20):
                await logger.log("from a method")
                await logger.log_from_a_thread("from a thread")
                record = await records.wait_for("from a method")
                failed = await records.wait_for("it failed")
                threaded = await records.wait_for("from a thread")
                pid = await logger.pid()
    finally:
        actors.removeHandler(records)
        actors.setLevel(logging.NOTSET)
    assert record.name == "atoll.actor.plugin" and record.levelno == logging.WARNING
    assert (record.actor, record.pid, record.origin) == ("plugin", pid, "plugin.part")  # type: ignore[attr-defined]
    assert record.call > 0  # type: ignore[attr-defined]  # made inside a call
    assert "ValueError: boom" in (failed.exc_text or "")
    assert threaded.levelno == logging.ERROR and threaded.origin == "plugin.thread"  # type: ignore[attr-defined]
    assert not any(r.getMessage() == "too fine to be sent" for r in records.records)


async def test_an_actors_stacks_without_stopping_it() -> None:
    out = _Lines()
    async with atoll.open_host(output=out) as host:
        talker = await host.spawn(Talker, name="talker")
        with anyio.fail_after(20):
            pid = await talker.pid()
            stacks = await host.dump_stacks(talker)
            assert "most recent call first" in stacks
            assert "_child.py" in stacks  # its main thread, in atoll's loop
            tasks = stacks.split("Tasks of its event loop:\n")[1]
            assert "task " in tasks and "_Child.run" in tasks  # the tree, from its root
            assert "    task " in tasks  # tasks the root started, indented under it
            assert await talker.pid() == pid  # still running, the same process
            await talker.say(1, "")
            await out.wait_for(2)
    assert not any("most recent call first" in line for *_, line in out.lines)
