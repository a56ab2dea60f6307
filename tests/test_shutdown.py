"""Closing while calls are in flight ends them clearly: no hang, no noise."""

from __future__ import annotations

import anyio
import pytest

import atoll
from helpers import Echo, Sleeper

pytestmark = pytest.mark.anyio


async def test_leaving_host_fails_calls_in_flight(capfd: pytest.CaptureFixture[str]) -> None:
    failures: list[BaseException] = []
    started = anyio.Event()

    async def on_started() -> None:
        started.set()

    async def park(sleeper: object) -> None:
        try:
            await sleeper.park(on_started)  # type: ignore[attr-defined]
        except atoll.ActorClosedError as exc:
            failures.append(exc)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg, atoll.open_host() as host:
            sleeper = await host.spawn(Sleeper)
            tg.start_soon(park, sleeper)
            await started.wait()
    assert len(failures) == 1
    assert "stopped" in str(failures[0]) or "closed" in str(failures[0])
    assert "Traceback" not in capfd.readouterr().err


async def test_stop_with_callback_in_flight(capfd: pytest.CaptureFixture[str]) -> None:
    entered = anyio.Event()

    async def slow_callback() -> None:
        entered.set()
        await anyio.sleep_forever()

    failures: list[BaseException] = []

    async def call(echo: object) -> None:
        try:
            await echo.call(slow_callback)  # type: ignore[attr-defined]
        except atoll.ActorClosedError as exc:
            failures.append(exc)

    with anyio.fail_after(20):
        async with atoll.open_host() as host:
            echo = await host.spawn(Echo)
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, echo)
                await entered.wait()
                await host.stop(echo)
    assert len(failures) == 1
    assert "Traceback" not in capfd.readouterr().err


async def test_exception_in_host_body_propagates_unwrapped() -> None:
    with pytest.raises(KeyError, match="body"):
        async with atoll.open_host() as host:
            await host.spawn(Echo)
            raise KeyError("body")


async def test_cancelling_the_host_body_stops_everything() -> None:
    with anyio.move_on_after(0.5) as scope:
        async with atoll.open_host() as host:
            sleeper = await host.spawn(Sleeper)
            await sleeper.park()
    assert scope.cancelled_caught
