"""The RPC engine on its own: nodes joined in memory (see ``harness``)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from harness import wire

import atoll
from atoll.actors._calling import STREAM_WINDOW
from atoll.actors._node_state import Pending
from atoll.transport import _messages as m
from atoll.transport._socket import run_job

pytestmark = pytest.mark.anyio

ACTOR = 0


class Service(atoll.Actor):
    def __init__(self) -> None:
        self.log: list[str] = []
        self.produced = 0
        self.entered = anyio.Event()
        self.cancelled = anyio.Event()

    async def double(self, n: int) -> int:
        return 2 * n

    async def fail(self) -> None:
        raise KeyError("missing")

    async def call_back(self, fn: Callable[[str], Awaitable[str]], word: str) -> str:
        self.log.append(f"in {word}")
        result = await fn(word)
        self.log.append(f"out {word}")
        return result

    async def park(self) -> None:
        self.entered.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise

    async def record(self, word: str) -> None:
        self.log.append(word)

    async def scoped(self) -> str:
        # A scope and a task group entered before the first suspension.
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.sleep, 0)
        return "done"

    async def count(self) -> AsyncIterator[int]:
        while True:
            self.produced += 1
            yield self.produced


def _caller_and_service(w: Any) -> tuple[Any, Any, Service]:
    """Two nodes: ``a`` calls, ``b`` serves a Service as its actor."""
    a, b = w.node("a"), w.node("b")
    service = Service()
    b.export(service, "svc", oid=ACTOR, actor=True)
    return a, b, service


async def test_a_call_returns_its_result_and_leaves_no_record() -> None:
    async with wire() as w:
        a, b, _ = _caller_and_service(w)
        with anyio.fail_after(5):
            assert await a.call(b.identity, ACTOR, "double", (21,), {}) == 42
        assert a._pending == {} and b._running == {}


async def test_a_method_may_enter_cancel_scopes_before_it_first_suspends() -> None:
    async with wire() as w:
        a, b, _ = _caller_and_service(w)
        with anyio.fail_after(5):
            assert await a.call(b.identity, ACTOR, "scoped", (), {}) == "done"


async def test_a_remote_exception_keeps_its_type_and_traceback() -> None:
    async with wire() as w:
        a, b, _ = _caller_and_service(w)
        with anyio.fail_after(5), pytest.raises(KeyError, match="missing") as caught:
            await a.call(b.identity, ACTOR, "fail", (), {})
        assert isinstance(caught.value.__cause__, atoll.RemoteTraceback)
        assert "raise KeyError" in caught.value.__cause__.text


async def test_a_callback_along_the_chain_reenters_while_others_wait_their_turn() -> None:
    """a calls b; b calls back into a (re-entrant: it runs at once); a call
    of another chain to b waits until b's turn ends."""
    async with wire() as w:
        a, b, service = _caller_and_service(w)
        back_in = anyio.Event()
        release = anyio.Event()

        async def callback(word: str) -> str:
            back_in.set()
            await release.wait()
            return word.upper()

        async def other_chain() -> None:
            await a.call(b.identity, ACTOR, "record", ("other",), {})

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                result: list[str] = []

                async def first() -> None:
                    result.append(await a.call(b.identity, ACTOR, "call_back", (callback, "x"), {}))

                tg.start_soon(first)
                await back_in.wait()
                tg.start_soon(other_chain)
                await anyio.wait_all_tasks_blocked()
                assert service.log == ["in x"]  # the other chain waits for the turn
                release.set()
            assert result == ["X"]
            assert service.log == ["in x", "out x", "other"]


async def test_a_cancelled_caller_cancels_the_call_in_its_callee() -> None:
    async with wire() as w:
        a, b, service = _caller_and_service(w)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def park() -> None:
                    await a.call(b.identity, ACTOR, "park", (), {})

                tg.start_soon(park)
                await service.entered.wait()
                tg.cancel_scope.cancel()
            await service.cancelled.wait()
            await anyio.wait_all_tasks_blocked()
        assert a._pending == {} and b._running == {}
        assert any(m.decode(header).__class__ is m.Cancel for _, _, header in w.sent)


async def test_a_call_given_up_while_queued_never_runs() -> None:
    async with wire() as w:
        a, b, service = _caller_and_service(w)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.call, b.identity, ACTOR, "park", (), {})
                await service.entered.wait()
                with anyio.move_on_after(0):  # gives up at its first wait: in the queue
                    await a.call(b.identity, ACTOR, "record", ("never",), {})
                await anyio.wait_all_tasks_blocked()
                assert not b._exports[ACTOR].gate.queue  # type: ignore[union-attr]
                tg.cancel_scope.cancel()
        assert "never" not in service.log


async def test_a_call_given_up_before_its_job_starts_never_runs() -> None:
    # A slow process reads a call, then its Cancel, before the call's job
    # has started: the Cancel must not be lost (the job would then run, and
    # hold the actor's turn, for a caller long gone).
    async with wire() as w:
        a, b, service = _caller_and_service(w)
        call_id, frames = a._encode_call(b.identity, ACTOR, "record", ("never",), {})
        job = b.on_message(a.identity, list(frames))
        assert job is not None  # its turn is taken; its job not started
        assert b.on_message(a.identity, [m.encode(m.Cancel(call_id))]) is None
        with anyio.fail_after(5):
            await run_job(job)
            assert await a.call(b.identity, ACTOR, "double", (2,), {}) == 4  # turn let go
        assert "never" not in service.log and b._running == {}


async def test_a_peer_gone_fails_what_waits_on_it() -> None:
    async with wire() as w:
        a, b, service = _caller_and_service(w)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                failed: list[BaseException] = []

                async def park() -> None:
                    try:
                        await a.call(b.identity, ACTOR, "park", (), {})
                    except atoll.ActorDiedError as exc:
                        failed.append(exc)

                tg.start_soon(park)
                await service.entered.wait()
                a.peer_gone(b.identity, lambda: atoll.ActorDiedError("b", -9))
            assert "signal 9" in str(failed[0])
            with pytest.raises(atoll.ActorDiedError):
                await a.call(b.identity, ACTOR, "double", (1,), {})  # later calls too
        assert a._pending == {}


async def test_a_stream_runs_at_most_its_window_ahead_of_its_consumer() -> None:
    async with wire() as w:
        a, b, _ = _caller_and_service(w)
        with anyio.fail_after(5):
            stream = a.stream(b.identity, ACTOR, "count", (), {})
            assert await stream.__anext__() == 1
            await anyio.wait_all_tasks_blocked()
            assert _items_sent(w) == STREAM_WINDOW  # no credit for more
            for expected in range(2, STREAM_WINDOW + 2):
                assert await stream.__anext__() == expected
            await anyio.wait_all_tasks_blocked()
            # credit comes back as items are taken: never more than a window ahead
            assert _items_sent(w) - STREAM_WINDOW - 1 <= STREAM_WINDOW
            await stream.aclose()
            await anyio.wait_all_tasks_blocked()
        assert b._streams_out == {} and a._pending == {}


def _items_sent(w: Any) -> int:
    return sum(type(m.decode(header)) is m.StreamItem for _, _, header in w.sent)


async def test_a_callback_is_released_by_its_owner_once_no_proxy_is_left() -> None:
    async with wire() as w:
        a, b, _ = _caller_and_service(w)

        async def shout(word: str) -> str:
            return word.upper()

        with anyio.fail_after(5):
            assert await a.call(b.identity, ACTOR, "call_back", (shout, "hi"), {}) == "HI"
            exported = len(a._exports)
            gc.collect()  # b's proxy of the callback dies: a Release waits for b's next message
            assert await a.call(b.identity, ACTOR, "double", (1,), {}) == 2
            await anyio.wait_all_tasks_blocked()
        assert len(a._exports) == exported - 1


async def test_leases_given_back_wait_until_the_result_before_them_is_read() -> None:
    """A result may carry a storage of ours back (a device tensor returned to
    its owner); the peer's Unlease right behind it must not free it before
    the caller has loaded the result."""
    async with wire() as w:
        a, b = w.node("a"), w.node("b")
        let_go: list[tuple[int, ...]] = []
        a.plane.unlease = lambda src, leases: let_go.append(tuple(leases))  # type: ignore[method-assign]
        pending = Pending(b.identity)
        a._pending[7] = pending
        a.on_message(b.identity, [m.encode(m.Result(7, a.codec.dumps(None)[0], (4,)))])
        a.on_message(b.identity, [m.encode(m.Unlease((5,)))])
        assert let_go == []  # the result is not read yet
        assert pending.header is not None
        a._settle(b.identity, pending.header)  # what the caller does once it has loaded it
        assert sorted(lease for group in let_go for lease in group) == [4, 5]
        a.on_message(b.identity, [m.encode(m.Unlease((6,)))])
        assert let_go[-1] == (6,)  # nothing unread: at once
