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
  flushes the backlog) on the spot, synchronously, as the reader would have;
* closing first wakes the reader (``notify_closing``) so no waiter hangs.

Sends are made directly from the calling task: ``send_multipart`` with
``NOBLOCK`` completes without yielding, so frames of different messages never
interleave, and the hot path pays no task hop. A message the socket cannot
take at once goes to a bounded backlog, flushed on ``POLLOUT``. All of this
runs on the event loop's thread.

Why a pool rather than one owner task that spawns a task per message:
measured on a 2-core machine, a task per incoming call added about 70 us to a
round trip of about 60 us. Here the reader that receives work hands the
reader role to an idle worker (an event, no new task) and runs the work
itself, so a call that does not suspend has replied before the event loop
turns once.
"""

from __future__ import annotations

import errno
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import anyio
import anyio.lowlevel
import zmq
from anyio.abc import TaskGroup

from .._errors import TransportError

# Plain ints: pyzmq's IntFlag members make every ``&`` and option lookup go
# through ``enum``, which shows on the per-call path.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)

_RECV_BATCH = 256
"""Messages handled per wake-up before yielding to other tasks."""


Job = Callable[[], Awaitable[None]]
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


class AsyncSocket:
    """Owns one ZeroMQ socket: one task reads it, any task of its thread sends."""

    def __init__(self, sock: zmq.Socket[Any], *, backlog_limit: int = 100_000) -> None:
        self._sock = sock
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._backlog: deque[Sequence[Any]] = deque()
        self._backlog_limit = backlog_limit
        self._on_message: OnMessage | None = None
        self._busy = False  # inside _catch_up: do not recurse into it
        self._jobs: deque[Job] = deque()
        self._idle: deque[anyio.Event] = deque()
        self._reading = False  # a task holds the reader's seat
        self._reader_scope: anyio.CancelScope | None = None
        self._seat_wanted = False  # a caller holds the seat or waits for it
        self._seat_free: anyio.Event | None = None
        self._seat_scope: anyio.CancelScope | None = None
        self._max_idle = 8
        self._workers: TaskGroup | None = None
        self.spin = 0.0
        """Seconds a lone caller polls for its reply before sleeping (0: never)."""
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
        if self._backlog:
            self._enqueue(frames)
        else:
            try:
                sock.send_multipart(frames, _NOBLOCK, copy=False)
            except zmq.Again:
                self._enqueue(frames)
            except zmq.ZMQError as exc:
                with map_zmq_errors("send"):
                    raise exc
        if self._on_message is not None and not self._busy:
            self._catch_up()

    def _enqueue(self, frames: Sequence[Any]) -> None:
        if len(self._backlog) >= self._backlog_limit:
            raise TransportError(
                f"send backlog is full ({self._backlog_limit} messages): the peer is not reading"
            )
        self._backlog.append(frames)

    def _flush(self) -> None:
        sock = self._sock
        backlog = self._backlog
        while backlog:
            try:
                sock.send_multipart(backlog[0], _NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                if exc.errno != errno.EHOSTUNREACH:
                    with map_zmq_errors("send"):
                        raise
                # A ROUTER's peer left while its message waited: nobody to tell.
            backlog.popleft()

    def _catch_up(self, *, reader: bool = False) -> bool:
        """Handle every event pending now; return False if input is left for
        later (a batch limit was hit).

        Called by the reader after each wake-up, and by any task after a zmq
        call that may have consumed the descriptor's edge. Jobs that handlers
        return are queued, and a worker is promoted for each, except one job
        found by the reader, which it runs itself.
        """
        sock = self._sock
        get = cast("Callable[[int], int]", sock.get)
        on_message = self._on_message
        assert on_message is not None
        jobs = self._jobs
        queued = 0
        handled = 0
        self._busy = True
        try:
            for _ in range(_RECV_BATCH):
                events = get(_EVENTS)
                if self._backlog and events & _POLLOUT:
                    self._flush()
                    continue
                if not events & _POLLIN:
                    return True
                try:
                    frames = sock.recv_multipart(_NOBLOCK, copy=False)
                except zmq.Again:
                    continue
                handled += 1
                job = on_message(frames)
                if job is not None:
                    jobs.append(job)
                    queued += 1
            return False
        finally:
            self._busy = False
            if handled and self._seat_scope is not None:
                self._seat_scope.cancel()  # we may have read the seat holder's reply
            if reader and queued:
                queued -= 1  # the reader runs one itself
            for _ in range(queued):
                self._promote()

    async def serve(self, on_message: OnMessage, *, max_idle_workers: int = 128) -> None:
        """Read until cancelled, calling ``on_message(frames)`` for each message.

        ``on_message`` runs synchronously (also from :meth:`send`, see the
        module's notes). It may return a *job*, an async callable, to be run
        in a task: a worker of this socket runs it. An exception from either
        propagates and ends the socket's service: a reader never swallows
        errors.

        Workers take turns as the reader (leader/follower): only one waits on
        the descriptor at a time. The reader that receives a job hands the
        reader role to an idle worker (waking it, without creating a task),
        then runs the job itself, so a job that does not suspend has done its
        work before the event loop turns once.
        """
        if self._on_message is not None:
            raise RuntimeError("this socket already has an owner task")
        self._on_message = on_message
        self._max_idle = max_idle_workers
        try:
            with map_zmq_errors("receive"):
                async with anyio.create_task_group() as tg:
                    self._workers = tg
                    tg.start_soon(self._worker)
        finally:
            self._on_message = None
            self._workers = None

    async def _worker(self) -> None:
        jobs = self._jobs
        idle = self._idle
        while not self._closed:
            if jobs:
                job = jobs.popleft()
                if not self._reading:
                    self._promote()
                await job()
            elif not self._reading and not self._seat_wanted:
                self._reading = True
                try:
                    await self._read_until_job()
                finally:
                    self._reading = False
                    if self._seat_free is not None:
                        self._seat_free.set()  # evicted by a caller: its turn to read
            elif len(idle) < self._max_idle:
                wake = anyio.Event()
                idle.append(wake)
                await wake.wait()
            else:
                return  # enough workers wait already

    async def _read_until_job(self) -> None:
        while not self._closed and not self._seat_wanted:
            drained = self._catch_up(reader=True)
            if self._jobs:
                return
            if drained:
                with anyio.CancelScope() as self._reader_scope:
                    await self._await_input()
                self._reader_scope = None
            else:
                await anyio.lowlevel.checkpoint()  # a full batch: let others run

    async def wait_for(self, done: anyio.Event) -> None:
        """Wait until ``done`` is set, reading the socket meanwhile if no
        other caller does.

        For a caller that expects its reply soon: rather than let a worker
        receive the reply and wake it (a task switch, on the critical path),
        the caller takes the reader's seat and receives it itself, handling
        whatever else arrives as the reader would. Evicting the worker happens
        while the peer is still working on the request.
        """
        if self._seat_wanted or self._on_message is None or self._closed:
            await done.wait()
            return
        self._seat_wanted = True
        try:
            if self._reading:
                self._seat_free = free = anyio.Event()
                if self._reader_scope is not None:
                    self._reader_scope.cancel()
                await free.wait()
            self._reading = True
            try:
                await self._read_until_set(done)
            finally:
                self._reading = False
        finally:
            self._seat_wanted = False
            self._seat_free = None
            self._promote()  # a worker reads from here on

    async def _read_until_set(self, done: anyio.Event) -> None:
        while not done.is_set():
            if self._closed:
                await done.wait()  # whoever closed the socket fails the call
                return
            drained = self._catch_up()
            if done.is_set():
                return
            if drained and self.spin and self._spin(self.spin):
                continue
            if drained:
                # Woken by input, or by wake_reader(): the call may have
                # ended without a message reaching this task.
                with anyio.CancelScope() as self._seat_scope:
                    await self._await_input()
                self._seat_scope = None
            else:
                await anyio.lowlevel.checkpoint()

    def _spin(self, budget: float) -> bool:
        """Poll for input for up to ``budget`` seconds without yielding.

        Only a lone caller waiting for its reply does this: a reply that comes
        within the budget skips an event-loop wake-up, the biggest cost left
        on the per-call path. Other tasks wait at most ``budget`` meanwhile.
        """
        get = cast("Callable[[int], int]", self._sock.get)
        deadline = time.perf_counter() + budget
        while time.perf_counter() < deadline:
            if get(_EVENTS) & _POLLIN:
                return True
        return False

    async def _await_input(self) -> None:
        """Wait for the descriptor; a close() ends the wait quietly."""
        try:
            await anyio.wait_readable(self._fd)
        except anyio.ClosedResourceError:
            if not self._closed:
                raise

    def wake_reader(self) -> None:
        """Make a caller that reads for its reply look at it again (its call
        may have ended some other way: a failure, another task's read)."""
        if self._seat_scope is not None:
            self._seat_scope.cancel()

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
