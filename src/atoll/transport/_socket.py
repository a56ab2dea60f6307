"""A ZeroMQ socket driven by AnyIO, for asyncio and trio alike.

``zmq.asyncio`` is asyncio-only, so readiness comes from the socket's file
descriptor through :func:`anyio.wait_readable`. That descriptor is
edge-triggered and shared by reads and writes, which sets the rules here:

* the socket is served by a small pool of worker tasks, all started and
  owned by :meth:`AsyncSocket.serve`; exactly one of them at a time is the
  *reader*, the only task that waits on the descriptor (a second waiter would
  raise ``BusyResourceError``);
* after every wake-up the reader reads ``zmq.EVENTS`` and drains until a recv
  returns EAGAIN, because no new edge comes before that, and wake-ups can be
  spurious (at connect, for instance);
* a ``send`` (or the ``EVENTS`` read after it) from another task can consume
  the edge while messages wait; nobody would wake the reader for them, so the
  sending task handles what it uncovered itself: it drains pending input (and
  flushes the backlog) on the spot, synchronously, as the reader would have
  (a job the reader itself runs leaves that to the reader, which is next);
* closing first wakes the reader (``notify_closing``) so no waiter hangs.

Sends are made directly from the calling task: a multipart send with
``NOBLOCK`` completes without yielding, so frames of different messages never
interleave, and the hot path pays no task hop. A message the socket cannot
take at once goes to a bounded backlog, flushed on ``POLLOUT``. All of this
runs on the event loop's thread. Any task of that thread may also *read*
synchronously (a caller polling for its reply, see :meth:`AsyncSocket.poll_for`):
it drains what it finds, so the reader waiting on the descriptor misses nothing.

Jobs run in their worker's cancel scope, which :data:`job_scope` names to
them: cancelling it cancels the job (a served call whose caller gave up).
A worker has at most one unfinished job at a time, the one it sees through,
so that cancels nothing else; a worker whose scope was cancelled leaves it
and enters a fresh one before its next job. Entering a scope once per worker
instead of once per job keeps its cost (several microseconds) off the
per-call path.

These rules hold only together, which is why this module is bigger than
the others.

Why a pool rather than one owner task that spawns a task per message:
measured on a 2-core machine, a task per incoming call added about 70 us to a
round trip of about 60 us. Here the reader runs the work it receives itself,
up to its first suspension, so a call that does not suspend has replied
before the event loop turns once; only work that suspends makes the reader
hand its role to an idle worker (an event, no new task).
"""

from __future__ import annotations

import errno
import functools
import os
import select
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.lowlevel
import zmq
from anyio.abc import TaskGroup

from .._errors import TransportError
from ._backlog import Backlog

# Plain ints: pyzmq's IntFlag members make every ``&`` and option lookup go
# through ``enum``, which shows on the per-call path.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)

# pyzmq's own methods, without the conveniences of its Socket class (type
# checks, enum flags) that cost a few microseconds per message.
_zsend = zmq.backend.Socket.send
_zrecv = zmq.backend.Socket.recv

_RECV_BATCH = 256
"""Messages handled per wake-up before yielding to other tasks."""


T = TypeVar("T")

Job = Callable[[], Coroutine[Any, Any, None]]
"""Work a message handler asks to run in a task."""

OnMessage = Callable[[list[zmq.Frame]], "Job | None"]


class PeerUnreachableError(TransportError):
    """A ROUTER was asked to send to an identity that is not connected."""


@contextmanager
def map_zmq_errors(what: str) -> Iterator[None]:
    """Turn ZeroMQ errors into :class:`TransportError` (the cause is kept)."""
    try:
        yield
    except zmq.ZMQError as exc:
        if exc.errno == errno.EHOSTUNREACH:
            raise PeerUnreachableError(f"{what}: peer is not connected") from exc
        raise TransportError(f"{what}: {exc.strerror}") from exc


def _send_frames(sock: zmq.Socket[Any], frames: Sequence[Any]) -> None:
    """Send one multipart message, all or nothing (``zmq.Again`` if the
    socket cannot take it now: a message's first frame decides)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _zsend(sock, frame, _NOBLOCK if i == last else _NOBLOCK_MORE, False, False)


class Resumed(Generic[T]):
    """The rest of a coroutine whose first step was taken by hand.

    Awaiting it passes whatever the event loop sends or throws straight to the
    coroutine, exactly as ``await coro`` would have from the start, and gives
    the coroutine's result.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, T], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, T]:
        coro = self._coro
        value = self._first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as returned:
                    return returned.value  # type: ignore[no-any-return]
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as returned:
                    return returned.value  # type: ignore[no-any-return]


class _FutureEvent:
    """A one-shot event on asyncio that is a bare future: what anyio's Event
    makes too, under two wrappers (anyio's and asyncio.Event)."""

    __slots__ = ("_future",)

    def __init__(self, loop: Any) -> None:
        self._future = loop.create_future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def wait(self) -> Any:
        return self._future


def event_maker() -> Callable[[], Any]:
    """The cheapest one-shot event of the running event loop: makes objects
    with ``set()`` and ``await .wait()``, for one waiter.

    For the waits of the per-call path, where anyio's Event (a backend lookup
    per event, and wrappers) costs 2-4 us a call on this kind of machine.
    Cancellation is the event loop's own, as with anyio's Event.
    """
    if "asyncio" in sys.modules:
        import asyncio

        try:
            return functools.partial(_FutureEvent, asyncio.get_running_loop())
        except RuntimeError:
            pass  # not asyncio's loop
    if _running_trio():
        import trio

        return trio.Event
    return anyio.Event


def _running_trio() -> bool:
    """Whether this thread runs trio's event loop (without importing trio)."""
    if "trio" not in sys.modules:
        return False
    import trio

    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def scope_maker() -> Callable[[], Any]:
    """The cheapest cancel scope of the running event loop, for the scopes
    jobs run in: trio's own CancelScope on trio (anyio's wraps it, at a
    cost), anyio's on asyncio (asyncio has no scope of its own that anyio's
    shields hold back). What it makes is a context manager with
    ``cancel()`` and ``cancel_called``."""
    if _running_trio():
        import trio

        return trio.CancelScope
    return anyio.CancelScope


job_scope: ContextVar[Any] = ContextVar("atoll_job_scope")
"""The cancel scope the running job is in; cancelling it cancels that job
and nothing else. Whoever runs jobs sets it, and runs no further job in a
scope that was cancelled."""


async def run_job(job: Job) -> None:
    """Run ``job`` as a task of its own would, in a scope of its own (for
    runners that give each job a task)."""
    with scope_maker()() as scope:
        job_scope.set(scope)
        await job()


def _start(job: Job) -> Resumed[None] | None:
    """Run ``job`` up to its first suspension: None if it finished."""
    coro = job()
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return Resumed(coro, first)


class AsyncSocket:
    """Owns one ZeroMQ socket: one task reads it, any task of its thread sends."""

    def __init__(self, sock: zmq.Socket[Any], *, backlog_limit: int = 100_000) -> None:
        self._sock = sock
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._get = cast("Callable[[int], int]", sock.get)
        self._fd_poller = select.poll()
        self._fd_poller.register(self._fd, select.POLLIN)
        self._backlog = Backlog(sock.type == zmq.ROUTER, backlog_limit)
        self._waiting = self._backlog.queues  # truthy while messages wait
        self._on_message: OnMessage | None = None
        # In _catch_up, or the reader runs jobs: a send leaves the catch-up to it.
        self._busy = False
        self._received = 0  # messages handled so far
        self._jobs: deque[Job] = deque()
        self._idle: deque[Any] = deque()  # events of idle workers
        self._new_event: Callable[[], Any] = anyio.Event
        self._new_scope: Callable[[], Any] = anyio.CancelScope
        self._reading = False  # a worker holds the reader's seat
        self._max_idle = 8
        self._workers: TaskGroup | None = None
        self.spin = 0.0
        """Seconds a lone caller polls for its reply before sleeping (0: never)."""
        self.linger = 0.0
        """Seconds the reader polls for the next message after handling some,
        before it goes back to the event loop to sleep (0: never)."""
        self._closed = False

    @property
    def zmq_socket(self) -> zmq.Socket[Any]:
        return self._sock

    def send(self, frames: Sequence[Any]) -> None:
        """Send one multipart message without waiting.

        Raises :class:`TransportError` if the socket is closed or its backlog
        is full (the peer stopped reading), and :class:`PeerUnreachableError`
        for a ROUTER whose peer is gone (``ROUTER_MANDATORY``).
        """
        if self._closed:
            raise TransportError("send on a closed socket")
        sock = self._sock
        if self._waiting and self._backlog.holds_for(frames):
            self._enqueue(frames)
        else:
            try:
                _send_frames(sock, frames)
            except zmq.Again:
                self._enqueue(frames)
            except zmq.ZMQError as exc:
                with map_zmq_errors("send"):
                    raise exc
        if self._on_message is not None and not self._busy:
            self._catch_up()

    def _enqueue(self, frames: Sequence[Any]) -> None:
        self._backlog.add(frames)

    def _flush(self) -> bool:
        sock = self._sock
        with map_zmq_errors("send"):
            return self._backlog.flush(lambda frames: _send_frames(sock, frames))

    def _catch_up(self, *, reader: bool = False) -> bool:
        """Handle every event pending now; return False if input is left for
        later (a batch limit was hit).

        Called by the reader after each wake-up, and by any task after a zmq
        call that may have consumed the descriptor's edge. Jobs that handlers
        return are queued: the reader runs them next, else a worker is woken
        for each.
        """
        sock = self._sock
        get = self._get
        on_message = self._on_message
        assert on_message is not None
        jobs = self._jobs
        queued = 0
        self._busy = True
        try:
            for _ in range(_RECV_BATCH):
                events = get(_EVENTS)
                if self._waiting and events & _POLLOUT and self._flush():
                    continue
                if not events & _POLLIN:
                    return True
                try:
                    frame = _zrecv(sock, _NOBLOCK, False, False)
                except zmq.Again:
                    continue
                frames = [frame]
                while frame.more:
                    frame = _zrecv(sock, _NOBLOCK, False, False)
                    frames.append(frame)
                self._received += 1
                job = on_message(frames)
                if job is not None:
                    jobs.append(job)
                    queued += 1
            return False
        finally:
            self._busy = False
            if not reader:
                for _ in range(queued):
                    self._promote()

    async def serve(self, on_message: OnMessage, *, max_idle_workers: int = 128) -> None:
        """Read until cancelled, calling ``on_message(frames)`` for each message.

        ``on_message`` runs synchronously (also from :meth:`send`, see the
        module's notes). It may return a *job*, an async callable, to be run
        in a task: a worker of this socket runs it. An exception from either
        propagates and ends the socket's service: a reader never swallows
        errors.

        Workers take turns as the reader: only one waits on the descriptor at
        a time. The reader runs the jobs it receives itself, each up to its
        first suspension: a job that does not suspend has replied before the
        event loop turns once, and costs no task switch. A job that does
        suspend makes its worker hand the reader's seat to an idle worker
        (waking it, without creating a task) and see the job through.
        """
        if self._on_message is not None:
            raise RuntimeError("this socket already has an owner task")
        self._on_message = on_message
        self._max_idle = max_idle_workers
        self._new_event = event_maker()
        self._new_scope = scope_maker()
        try:
            with map_zmq_errors("receive"):
                async with anyio.create_task_group() as tg:
                    self._workers = tg
                    tg.start_soon(self._worker)
        finally:
            self._on_message = None
            self._workers = None

    async def _worker(self) -> None:
        new_scope = self._new_scope
        while not self._closed:
            with new_scope() as scope:
                job_scope.set(scope)
                if not await self._work(scope):
                    return

    async def _work(self, scope: Any) -> bool:
        """Run jobs and take turns as the reader until ``scope`` is cancelled
        (True: a fresh one is wanted) or this worker is not needed (False)."""
        jobs = self._jobs
        idle = self._idle
        while not self._closed and not scope.cancel_called:
            if jobs:
                rest = _start(jobs.popleft())
                if rest is not None:
                    if not self._reading:
                        self._promote()
                    await rest
            elif not self._reading:
                self._reading = True
                try:
                    rest = await self._read_until_job_waits(scope)
                finally:
                    self._reading = False
                if rest is not None:
                    self._promote()  # the next reader
                    await rest
            elif len(idle) < self._max_idle:
                wake = self._new_event()
                idle.append(wake)
                await wake.wait()
            else:
                return False  # enough workers wait already
        return not self._closed

    async def _read_until_job_waits(self, scope: Any) -> Resumed[None] | None:
        """Read and run jobs until one suspends (returned, for this worker to
        see through), ``scope`` is cancelled or the socket closes (None)."""
        jobs = self._jobs
        while not self._closed:
            seen = self._received
            drained = self._catch_up(reader=True)
            ran = bool(jobs)
            if ran:
                # Sends made by these jobs leave the catch-up to this loop (it is
                # next anyway): one EVENTS read per batch instead of one per reply.
                self._busy = True
                try:
                    while jobs:
                        rest = _start(jobs.popleft())
                        if rest is not None:
                            return rest
                        if scope.cancel_called:
                            return None  # a job that ended was cancelled: no other in its scope
                finally:
                    self._busy = False
            if not drained:
                await anyio.lowlevel.checkpoint()  # a full batch: let others run
            elif self.linger and self._received - seen == 1:
                # Lingering pays off for a peer that sends one message, waits for
                # the answer and sends the next. Many messages at once mean more
                # are coming anyway, and the CPU is better left to their senders.
                # (_poll reads EVENTS first: it sees what the jobs' sends uncovered.)
                if not self._poll(self.linger):
                    await self._await_input()
            elif not (ran and self._get(_EVENTS) & self._wanted()):
                await self._await_input()
        return None

    async def poll_for(self, done: Callable[[], bool]) -> None:
        """Read the socket until ``done()``, for up to :attr:`spin` seconds
        of waiting; the caller then sleeps on its own event if need be.

        For a lone caller that expects its reply soon: a reply read here,
        synchronously, skips the reader's wake-up and a task switch, the two
        biggest costs of a round trip. The event loop turns once first (a
        checkpoint: other tasks run, and a cancelled caller stops here).
        """
        await anyio.lowlevel.checkpoint()
        if not self.spin or self._on_message is None or self._busy:
            return
        while not done() and not self._closed and self._poll(self.spin):
            seen = self._received
            self._catch_up()
            if self._received != seen and not done():
                return  # news for other tasks: let them run rather than hold them up

    def _poll(self, budget: float) -> bool:
        """Poll for input (or room for the backlog) for up to ``budget``
        seconds without yielding; return True as soon as there is some.

        Other tasks of this thread wait at most ``budget`` meanwhile.
        """
        get = self._get
        wanted = self._wanted()
        if get(_EVENTS) & wanted:
            return True
        # Reading EVENTS costs a few times more than asking the kernel about
        # the descriptor, which only turns readable when ZeroMQ has news. Each
        # turn gives the CPU away if another thread wants it: ZeroMQ's I/O
        # threads and the peer, which may share this core, carry the reply.
        fd_ready = self._fd_poller.poll
        give_way = os.sched_yield
        clock = time.perf_counter
        deadline = clock() + budget
        while clock() < deadline:
            if fd_ready(0) and get(_EVENTS) & wanted:
                return True
            give_way()
        return False

    def _wanted(self) -> int:
        """The EVENTS bits that mean work for a reader: input, or room to
        flush the backlog."""
        return _POLLIN | _POLLOUT if self._waiting else _POLLIN

    async def _await_input(self) -> None:
        """Wait for the descriptor; a close() ends the wait quietly."""
        try:
            await anyio.wait_readable(self._fd)
        except anyio.ClosedResourceError:
            if not self._closed:
                raise

    def submit(self, job: Job) -> None:
        """Run ``job`` in one of this socket's workers."""
        self._jobs.append(job)
        self._promote()

    def _promote(self) -> None:
        """Get one more worker going: an idle one if any, else a new one."""
        if self._idle:
            self._idle.popleft().set()
        elif self._workers is not None:
            self._workers.start_soon(self._worker)

    def close(self, linger: int = 0) -> None:
        """Close the socket; ``linger`` ms is how long unsent messages may wait."""
        if self._closed:
            return
        self._closed = True
        while self._idle:
            self._idle.popleft().set()  # idle workers see the socket closed and leave
        try:
            anyio.notify_closing(self._fd)
        except RuntimeError:
            pass  # no event loop running in this thread: nobody can be waiting
        self._sock.close(linger=linger)
