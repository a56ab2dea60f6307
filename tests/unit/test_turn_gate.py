"""TurnGate: one chain at a time, re-entrant along it, the rest queued in order."""

from __future__ import annotations

import pytest

from atoll.actors._turns import TurnGate


def test_one_chain_holds_the_turn_and_reenters() -> None:
    gate = TurnGate()
    assert gate.try_enter(1)
    assert gate.try_enter(1)  # the same chain, re-entering
    assert not gate.try_enter(2)
    gate.leave(1)
    assert not gate.try_enter(2)  # chain 1 is still inside once
    gate.leave(1)
    assert gate.try_enter(2)


def test_queued_calls_run_in_arrival_order_as_turns_end() -> None:
    gate = TurnGate()
    assert gate.try_enter(1)
    gate.queue.extend([(2, "b"), (3, "c")])
    assert not gate.try_enter(4)  # never overtakes the queue
    assert gate.next_ready() is None  # chain 1 still holds the turn
    gate.leave(1)
    assert gate.next_ready() == "b"
    assert gate.next_ready() is None
    gate.leave(2)
    assert gate.next_ready() == "c"


def test_a_queued_call_of_the_running_chain_is_let_in() -> None:
    gate = TurnGate()
    assert gate.try_enter(1)
    gate.queue.extend([(2, "other"), (1, "same chain")])
    assert gate.next_ready() == "same chain"


def test_max_concurrency_admits_that_many_chains() -> None:
    gate = TurnGate(max_concurrency=2)
    assert gate.try_enter(1) and gate.try_enter(2)
    assert not gate.try_enter(3)
    with pytest.raises(ValueError, match="at least 1"):
        TurnGate(max_concurrency=0)
