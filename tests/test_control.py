"""``atoll status``, ``atoll top`` and ``atoll stack`` attach to a running
host from another process, through its control socket; another user, or a
wrong key, gets nothing."""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import Any

import anyio
import pytest

import atoll
from helpers import Caller, Phoenix

pytestmark = pytest.mark.anyio

NOBODY = 65534


async def _cli(*args: str, user: int | None = None) -> tuple[int, str, str]:
    kwargs: dict[str, Any] = {} if user is None else {"user": user, "group": user}
    done = await anyio.run_process(
        [sys.executable, "-m", "atoll", *args, "--pid", str(os.getpid())], check=False, **kwargs
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_the_cli_shows_a_running_hosts_actors_calls_and_stacks() -> None:
    async with atoll.open_host() as host:
        phoenix = await host.spawn(Phoenix, name="phoenix")
        caller = await host.spawn(Caller, name="caller")
        started = anyio.Event()

        async def say_started() -> None:
            started.set()

        with anyio.fail_after(60):
            await caller.keep(phoenix)
            pid = await phoenix.pid()
            for _ in range(5):
                await phoenix.add(1)
            async with anyio.create_task_group() as tg:
                tg.start_soon(caller.call, "nap_telling", say_started, 60.0)
                await started.wait()
                code, out, err = await _cli("status", "--json")
                assert code == 0, err
                shown = {a["name"]: a for a in json.loads(out)["actors"]}
                assert shown["phoenix"]["pid"] == pid
                assert shown["phoenix"]["methods"]["add"]["calls"] == 5
                (call,) = shown["phoenix"]["calls"]
                assert (call["method"], call["caller"]) == ("nap_telling", "caller")
                code, out, err = await _cli("status")
                assert code == 0, err
                assert "phoenix.add" in out and "nap_telling" in out
                code, out, err = await _cli("top", "--once")
                assert code == 0, err
                assert "phoenix" in out and "nap_telling" in out
                code, out, err = await _cli("stack", "phoenix")
                assert code == 0, err
                assert "most recent call first" in out and "nap_telling" in out
                tg.cancel_scope.cancel()
            code, out, err = await _cli("stack", "nobody-here")
            assert code == 1 and "no actor called 'nobody-here'" in err


async def test_no_running_host_is_a_clear_error() -> None:
    code, _, err = await _cli("status")
    assert code == 1 and f"no atoll host of yours runs as pid {os.getpid()}" in err


_INTRUDER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    sys.exit(type(exc).__name__)
try:
    sock.sendall(sys.argv[2].encode() + b"\\n")
    got = sock.recv(1 << 20)
except (BrokenPipeError, ConnectionResetError):  # closed on it, the request unread
    got = b""
print(repr(got))
"""
# Another user runs it with the system's Python: the test's may live where
# only root can read.
_SYSTEM_PYTHON = "/usr/bin/python3"


async def _intrude(path: str, request: str, *, user: int | None = None) -> tuple[str, str]:
    kwargs: dict[str, Any] = {} if user is None else {"user": user, "group": user}
    python = sys.executable if user is None else _SYSTEM_PYTHON
    done = await anyio.run_process([python, "-c", _INTRUDER, path, request], check=False, **kwargs)
    return done.stdout.decode().strip(), done.stderr.decode().strip()


async def test_the_control_socket_answers_only_its_user_with_the_key() -> None:
    async with atoll.open_host() as host:
        await host.spawn(Phoenix, name="secret-holder")
        control = host._control
        assert control is not None
        directory = os.path.dirname(control.path)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        key = await (anyio.Path(directory) / "control.key").read_text()
        right = json.dumps({"key": key, "op": "status"})
        with anyio.fail_after(30):
            # The same user without the key: the connection closes, unanswered.
            wrong = json.dumps({"key": "0" * 64, "op": "status"})
            assert await _intrude(control.path, wrong) == ("b''", "")
            assert control.refused == 1
            if os.getuid() != 0 or not os.path.exists(_SYSTEM_PYTHON):
                pytest.skip("another user's credentials need root and a system Python")
            # Another user cannot reach the private directory at all...
            assert await _intrude(control.path, right, user=NOBODY) == ("", "PermissionError")
            # ...and where it could, the host refuses it, right key and all.
            os.chmod(directory, 0o711)
            os.chmod(control.path, 0o666)
            try:
                assert await _intrude(control.path, right, user=NOBODY) == ("b''", "")
            finally:
                os.chmod(directory, 0o700)
            assert control.refused == 2  # not a byte of the status went to it
            # The owner, with the key, is answered.
            answered, _ = await _intrude(control.path, right)
            assert "secret-holder" in answered
