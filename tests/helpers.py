"""Actor classes shared by the tests (importable by actor processes)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.lowlevel

import atoll


def pid_of(host: atoll.Host, name: str) -> int:
    """The process id of the actor named ``name`` (test-only peek at the host)."""
    for actor in host._processes.actors.values():
        if actor.name == name and actor.process is not None:
            return int(actor.process.pid)
    raise LookupError(name)


class Counter(atoll.Actor):
    def __init__(self, start: int = 0) -> None:
        self.n = start

    async def add(self, k: int) -> int:
        self.n += k
        return self.n

    def add_sync(self, k: int) -> int:
        self.n += k
        return self.n

    async def get(self) -> int:
        return self.n


class Echo(atoll.Actor):
    async def echo(self, value: Any) -> Any:
        return value

    def echo_sync(self, value: Any) -> Any:
        return value

    async def pid(self) -> int:
        return os.getpid()

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return await fn(*args)

    async def loaded(self, modules: list[str]) -> list[str]:
        return [name for name in modules if name in sys.modules]

    async def atoll_loaders(self) -> dict[str, str]:
        """Each loaded atoll module's loader, by class name."""
        return {
            name: type(module.__spec__.loader).__name__
            for name, module in list(sys.modules.items())
            if name.split(".")[0] == "atoll"
        }

    def call_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    async def call_method(self, ref: Any, method: str, *args: Any) -> Any:
        return await getattr(ref, method)(*args)

    async def kill_self(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    async def write_stderr_and_die(self, text: str) -> None:
        import sys

        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class Sleeper(atoll.Actor):
    """Parks calls until cancelled, and reports what happened to them."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.started = 0

    async def park(self, on_started: Callable[[], Awaitable[None]] | None = None) -> None:
        self.started += 1
        try:
            if on_started is not None:
                await on_started()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise

    async def park_via(self, other: Any, on_started: Callable[[], Awaitable[None]]) -> None:
        """Park in ``other`` (a Sleeper): cancelling us must cancel that call too."""
        try:
            await other.park(on_started)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise

    async def stats(self) -> tuple[int, int]:
        return self.started, self.cancelled

    async def park_and_swallow(self, on_started: Callable[[], Awaitable[None]]) -> str:
        """Park until cancelled, then return anyway (a method that ignores
        its cancellation)."""
        self.started += 1
        try:
            await on_started()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
        return "swallowed"

    async def nap(self, n: int) -> int:
        """Suspend a few times (each a chance to be cancelled), then answer."""
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        return n


class Ping(atoll.Actor):
    """Recursion partner: bounce(n) calls the peer with n-1 until 0."""

    def __init__(self) -> None:
        self.peer: Any = None

    async def set_peer(self, peer: Any) -> None:
        self.peer = peer

    async def bounce(self, n: int, trail: list[str]) -> list[str]:
        trail = [*trail, f"{os.getpid()}"]
        if n == 0:
            return trail
        result: list[str] = await self.peer.bounce(n - 1, trail)
        return result


class Turns(atoll.Actor):
    """Records how many calls run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0

    async def hold(self, release: Callable[[], Awaitable[None]]) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await release()
        finally:
            self.running -= 1
        return self.peak

    async def peak_seen(self) -> int:
        return self.peak


class Wide(Turns):
    max_concurrency = 4


class Streamer(atoll.Actor):
    def __init__(self) -> None:
        self.closed = False

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def endless(self, report: Callable[[int], Awaitable[None]]) -> AsyncIterator[int]:
        i = 0
        try:
            while True:
                await report(i)
                yield i
                i += 1
        finally:
            self.closed = True

    async def fail_after_items(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise KeyError("stream broke")

    async def was_closed(self) -> bool:
        return self.closed


class Broken(atoll.Actor):
    def __init__(self) -> None:
        raise RuntimeError("constructor failed on purpose")


class LocalError(atoll.Actor):
    async def raise_local(self) -> None:
        class Unimportable(Exception):
            pass

        raise Unimportable("from a class defined inside a method")

    async def unpicklable_result(self) -> Any:
        import threading

        return threading.Lock()

    async def value_error(self) -> None:
        raise ValueError("bad value 42")


class Tally(atoll.Actor):
    """A shared service: counts hits by caller."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}

    async def hit(self, who: str) -> int:
        self.hits[who] = self.hits.get(who, 0) + 1
        return sum(self.hits.values())

    async def total(self) -> int:
        return sum(self.hits.values())

    async def pid(self) -> int:
        return os.getpid()


class Relay(atoll.Actor):
    """A service that holds refs to others and calls along a chain."""

    def __init__(self, next_name: str | None = None) -> None:
        self.next_name = next_name

    async def next_service(self) -> Any:
        return await atoll.lookup(self.next_name) if self.next_name else None

    async def relay(self, caller: Any, depth: int) -> list[str]:
        """Call back into ``caller`` (re-entrant), then into the next service."""
        trail = [f"relay:{await caller.name()}"]
        nxt = await self.next_service()
        if nxt is not None and depth > 0:
            trail += await nxt.relay(caller, depth - 1)
        return trail


class Client(atoll.Actor):
    def __init__(self, label: str = "client") -> None:
        self.label = label

    async def name(self) -> str:
        return self.label

    async def hit(self, service: str) -> int:
        tally = await atoll.lookup(service)
        return int(await tally.hit(self.label))

    async def hit_by_class(self) -> int:
        tally = await atoll.lookup(Tally)
        return int(await tally.hit(self.label))

    async def lookup_error(self, name: str) -> str:
        try:
            await atoll.lookup(name)
        except LookupError as exc:
            return str(exc)
        return "found"

    async def start_chain(self, relay: str, depth: int) -> list[str]:
        service = await atoll.lookup(relay)
        return list(await service.relay(self.ref_of_me, depth))

    async def remember_me(self, me: Any) -> None:
        self.ref_of_me = me

    async def publish(self, topic: str, values: list[Any]) -> int:
        for value in values:
            atoll.publish(topic, value)
        return len(values)

    def publish_sync(self, topic: str, value: Any) -> None:
        atoll.publish(topic, value)

    async def call_service_slowly(self, service: str, on_started: Any) -> Any:
        svc = await atoll.lookup(service)
        return await svc.park(on_started)


class Mirror(atoll.Actor):
    """Says what its arguments arrived as, and sends values back in places."""

    async def arguments(self, *args: Any, **kwargs: Any) -> list[Any]:
        return [*args, *kwargs.items()]

    async def firsts(self, *args: Any, **kwargs: Any) -> list[int]:
        """Per argument (positional, then named), the index of the first
        argument that is the same object."""
        values = [*args, *kwargs.values()]
        return [next(i for i, w in enumerate(values) if w is v) for v in values]

    async def storages(self, *args: Any) -> list[int]:
        """Per tensor argument, the index of the first that shares its storage."""
        ptrs = [t.untyped_storage().data_ptr() for t in args]
        return [ptrs.index(p) for p in ptrs]

    async def tuple_of(self, *args: Any) -> tuple[Any, ...]:
        return args

    async def list_of(self, *args: Any) -> list[Any]:
        return list(args)

    async def one(self, value: Any) -> Any:
        return value


class Holder(atoll.Actor):
    """Receives arrays and tensors, keeps them, writes into them, makes some."""

    def __init__(self) -> None:
        self.kept: dict[Any, Any] = {}

    async def keep(self, key: Any, value: Any, fill: Any = None) -> None:
        """Keep ``value``, or with a ``fill`` the pair ``(value, fill)``."""
        self.kept[key] = value if fill is None else (value, fill)

    async def drop(self, key: Any) -> None:
        del self.kept[key]

    async def keys(self) -> list[Any]:
        return list(self.kept)

    async def park(self) -> None:
        """Hold this actor's turn until cancelled."""
        await anyio.sleep_forever()

    async def damaged(self) -> list[Any]:
        """Keys of kept ``(tensor, fill)`` pairs whose values changed."""
        return [key for key, (t, fill) in self.kept.items() if not bool((t == fill).all())]

    async def fill(self, t: Any, value: Any) -> None:
        t[...] = value

    async def forward_fill(self, other: Any, t: Any, value: Any) -> None:
        await other.fill(t, value)

    async def make(self, n: int, value: float) -> Any:
        import torch

        return torch.full((n,), value)

    async def first(self, t: Any) -> float:
        return float(t[0])

    async def ptr(self, t: Any) -> int:
        return int(t.data_ptr())

    async def storages(self, ts: list[Any]) -> int:
        """How many distinct storages the tensors ``ts`` are views of."""
        return len({t.untyped_storage()._cdata for t in ts})

    async def plane_stats(self) -> dict[str, int]:
        from atoll.actors._runtime import current_plane

        return current_plane("plane_stats").stats()

    async def forget_torch(self) -> None:
        """Behave as an environment without torch."""
        import sys

        sys.modules["torch"] = None  # type: ignore[assignment]

    async def pid(self) -> int:
        return os.getpid()

    async def yield_tensors(self, n: int, size: int) -> AsyncIterator[Any]:
        import torch

        for i in range(n):
            yield torch.full((size,), float(i))


@contextmanager
def host_process(script: str, backend: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``script`` (argv: this directory, the backend) as a host in a
    process of its own, its stdout piped; it is killed on leaving."""
    here = os.path.dirname(os.path.abspath(__file__))
    host = subprocess.Popen(
        [sys.executable, "-c", script, here, backend], stdout=subprocess.PIPE, text=True
    )
    try:
        yield host
    finally:
        host.kill()
        host.wait()
        if host.stdout:
            host.stdout.close()


def kill_and_watch(host: subprocess.Popen[str], actor_pid: int, timeout: float) -> bool:
    """SIGKILL ``host``; whether its actor ``actor_pid``, and the fork server
    it came from if it did, exited within ``timeout``."""
    from atoll.testing._leaks import wait_for_exit  # not at the top: actors import this module

    pids = {actor_pid, parent_of(actor_pid)} - {host.pid}
    host.kill()
    host.wait(10)
    return not wait_for_exit(pids, timeout)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


class Quitter(atoll.Actor):
    """Ends its process from inside a method, the ways user code does."""

    async def quit(self, code: Any) -> None:
        sys.exit(code)

    def quit_sync(self, code: Any) -> None:
        sys.exit(code)

    async def interrupt(self) -> None:
        raise KeyboardInterrupt("raised by the method")

    async def ping(self) -> str:
        return "pong"


class Stubborn(atoll.Actor):
    """Ignores SIGTERM, then blocks its event loop: only SIGKILL ends it."""

    async def pid(self) -> int:
        return os.getpid()

    async def freeze(self, frozen: Callable[[], Awaitable[None]], seconds: float) -> None:
        import time

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        await frozen()
        time.sleep(seconds)  # noqa: ASYNC251  (the loop is stuck: not even Bye is read)


class SlowStart(atoll.Actor):
    """Hangs in its constructor."""

    def __init__(self, seconds: float) -> None:
        import time

        time.sleep(seconds)


class Sleepy(atoll.Actor):
    """A sync method that runs far longer than any stop waits."""

    def doze(self, started: Callable[[], None], seconds: float) -> None:
        import time

        started()  # blocks this thread until the caller has heard
        time.sleep(seconds)

    async def pid(self) -> int:
        return os.getpid()


class Bomb:
    """Unpickling it creates the file at ``marker``: proof that it ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


class BombError(Exception):
    """An exception whose unpickling creates the file at ``marker``."""

    def __init__(self, marker: str) -> None:
        super().__init__(marker)
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _pickle_anyway(pickle: bool = True) -> None:
    """Make this (untrusted) actor process send pickles, as a hostile one
    could by writing its own frames (or, not ``pickle``, stop it)."""
    from atoll.actors import _runtime

    assert _runtime.child_node is not None
    _runtime.child_node.codec.plain_only = not pickle


@atoll.wire_type
@dataclasses.dataclass
class Point3:
    x: float
    y: float
    z: float


class Hostile(atoll.Actor):
    """An untrusted extension that tries to make its host unpickle a bomb."""

    async def bomb_result(self, marker: str) -> Any:
        _pickle_anyway()
        return Bomb(marker)

    async def bomb_error(self, marker: str) -> None:
        _pickle_anyway()
        raise BombError(marker)

    async def bomb_stream(self, marker: str) -> AsyncIterator[Any]:
        _pickle_anyway()
        yield Bomb(marker)

    async def bomb_event(self, marker: str, topic: str) -> None:
        _pickle_anyway()
        atoll.publish(topic, Bomb(marker))

    async def bomb_callback(self, marker: str, callback: Callable[[Any], Awaitable[Any]]) -> Any:
        _pickle_anyway()
        return await callback(Bomb(marker))

    async def bomb_peer(self, marker: str, peer: Any) -> Any:
        _pickle_anyway()
        return await peer.echo(Bomb(marker))

    async def publish(self, topic: str, value: Any) -> None:
        _pickle_anyway(False)
        atoll.publish(topic, value)

    async def unregistered(self) -> Any:
        return object()

    async def echo(self, value: Any) -> Any:
        _pickle_anyway(False)  # this answer, and what follows, plain again
        return value

    async def double(self, t: Any) -> Any:
        return t * 2

    async def point(self, p: Point3) -> Point3:
        return Point3(p.x + 1, p.y + 1, p.z + 1)

    async def ask(self, peer: Any, value: Any) -> Any:
        return await peer.echo(value)

    async def fail(self) -> None:
        raise ValueError("plain", 7)


class Prisoner(atoll.Actor):
    """A sandboxed extension that tries to reach what it must not."""

    def read(self, path: str) -> str:
        try:
            with open(path) as f:
                return "read: " + f.read()
        except OSError as exc:
            return type(exc).__name__

    def write(self, path: str) -> str:
        try:
            with open(path, "w") as f:
                f.write("escaped")
            return "written"
        except OSError as exc:
            return type(exc).__name__

    async def connect(self, port: int) -> str:
        import socket

        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return "connected"
        except OSError as exc:
            return type(exc).__name__

    async def shm(self) -> list[str]:
        return sorted(os.listdir("/dev/shm"))

    async def ask_host(self, path: str, request: bytes) -> str:
        """Connect to a Unix socket of the host's and send ``request``."""
        import socket

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(path)
                sock.sendall(request)
                return "answered: " + sock.recv(1 << 20).decode(errors="replace")
        except OSError as exc:
            return type(exc).__name__

    async def signal(self, pid: int) -> str:
        try:
            os.kill(pid, signal.SIGTERM)
            return "signalled"
        except OSError as exc:
            return type(exc).__name__

    async def pids(self) -> list[int]:
        return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())

    async def double(self, t: Any) -> Any:
        return t * 2

    async def echo(self, value: Any) -> Any:
        return value

    async def make(self, n: int) -> Any:
        import torch

        return atoll.share(torch.full((n,), 7.0))

    async def publish(self, topic: str, value: Any) -> None:
        atoll.publish(topic, value)


class Greedy(atoll.Actor):
    """Takes more than it may: memory, processes, files, shared memory."""

    async def eat(self, megabytes: int) -> int:
        blocks = [bytearray(1 << 20) for _ in range(megabytes)]
        return len(blocks)

    async def fork_bomb(self, depth: int) -> int:
        """Fork children that fork in turn (``depth`` deep, two each), each
        holding on until all have tried; returns how many processes it got."""
        import tempfile

        with tempfile.TemporaryDirectory() as tally:
            read_end, write_end = os.pipe()
            made = _bomb(depth, tally, write_end)
            os.close(write_end)
            os.read(read_end, 1)  # EOF once every child let go of the pipe
            os.close(read_end)
            return made + len(os.listdir(tally))

    def priority(self) -> tuple[int, str]:
        """Its scheduling priority, and its autogroup's ("" where none)."""
        try:
            with open("/proc/self/autogroup") as f:
                group = f.read()
        except OSError:
            group = ""
        return os.getpriority(os.PRIO_PROCESS, 0), group

    async def open_files(self, n: int) -> int:
        files = []
        try:
            for _ in range(n):
                files.append(open(os.devnull))  # noqa: SIM115, ASYNC230
        except OSError:
            pass
        finally:
            for f in files:
                f.close()
        return len(files)

    async def share(self, megabytes: int) -> int:
        import torch

        return int(atoll.share(torch.ones(megabytes << 18)).numel())

    async def ping(self) -> str:
        return "pong"

    def spin(self, seconds: float) -> None:
        import time

        end = time.process_time() + seconds
        while time.process_time() < end:
            pass


def _bomb(depth: int, tally: str, hold: int) -> int:
    """Fork up to two children, each doing the same ``depth - 1`` deep."""
    made = 0
    for _ in range(2 if depth else 0):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            open(os.path.join(tally, str(os.getpid())), "w").close()
            _bomb(depth - 1, tally, hold)
            os._exit(0)
        made += 1
    return made


class Answerer(atoll.Actor):
    """Answers once its caller says so: the caller's calls stay pending meanwhile."""

    def __init__(self) -> None:
        self.kept: Any = None

    async def when(self, ready: Callable[[], Awaitable[None]], value: Any) -> Any:
        await ready()
        return value

    async def count_when(self, ready: Callable[[], Awaitable[None]], n: int) -> AsyncIterator[int]:
        await ready()
        for i in range(n):
            yield i

    async def keep(self, callback: Callable[[], Awaitable[Any]]) -> None:
        self.kept = callback

    async def call_kept(self) -> Any:
        return await self.kept()


class Parent(atoll.Actor):
    """Starts processes of its own: they must not outlive it."""

    def children(self, n: int) -> list[int]:
        """Start ``n`` sleeping processes, each with a sleeping child; return
        every pid."""
        pids = []
        for _ in range(n):
            shell = subprocess.Popen(
                ["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE, text=True
            )
            assert shell.stdout is not None
            pids += [shell.pid, int(shell.stdout.readline())]
        return pids

    def crash(self) -> None:
        os._exit(3)


class Phoenix(atoll.Actor):
    """Dies when told to; counts from its constructor's start again after."""

    def __init__(self, start: int = 0) -> None:
        self.n = start

    async def add(self, k: int) -> int:
        self.n += k
        return self.n

    async def pid(self) -> int:
        return os.getpid()

    async def imported(self, module: str) -> bool:
        return module in sys.modules

    async def forget(self, module: str) -> None:
        del sys.modules[module]

    def crash(self, code: int = 3) -> None:
        os._exit(code)

    @atoll.idempotent
    async def first_try_dies(self, marker: str) -> str:
        """Die the first time (``marker`` absent), answer the next."""
        return _first_try_dies(marker)

    async def first_try_dies_unmarked(self, marker: str) -> str:
        return _first_try_dies(marker)

    @atoll.idempotent
    def first_try_dies_sync(self, marker: str) -> str:
        return _first_try_dies(marker)

    async def grow(self, megabytes: int) -> None:
        """Keep ``megabytes`` of memory, touched."""
        self.kept = bytearray(megabytes << 20)
        for i in range(0, len(self.kept), 4096):
            self.kept[i] = 1

    async def nap(self, seconds: float) -> None:
        """A long call that sends nothing meanwhile."""
        await anyio.sleep(seconds)

    async def hang(self, seconds: float) -> None:
        """Block its own event loop (what a hung actor does)."""
        import time

        time.sleep(seconds)  # noqa: ASYNC251

    async def nap_telling(self, started: Any, seconds: float) -> None:
        """Say it has started (``await started()``), then nap."""
        await started()
        await anyio.sleep(seconds)

    async def hang_telling(self, started: Any, seconds: float) -> None:
        """Say it has started, then block its own event loop."""
        import time

        await started()
        time.sleep(seconds)  # noqa: ASYNC251


class Caller(atoll.Actor):
    """Calls another actor through a ref it keeps."""

    def __init__(self) -> None:
        self.ref: Any = None

    async def keep(self, ref: Any) -> None:
        self.ref = ref

    async def add(self, k: int) -> int:
        return int(await self.ref.add(k))

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.ref, method)(*args)

    async def add_by_name(self, name: str, k: int) -> int:
        return int(await (await atoll.lookup(name)).add(k))


def _first_try_dies(marker: str) -> str:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return "done"


class Talker(atoll.Actor):
    """Writes to its stdout and stderr."""

    async def say(self, n: int, tail: str) -> None:
        for i in range(n):
            print(f"line {i}")  # no flush: stdout is line-buffered in an actor
        print("to stderr", file=sys.stderr)
        if tail:
            print(tail, end="")
            sys.stdout.flush()

    async def pid(self) -> int:
        return os.getpid()


class Logger(atoll.Actor):
    """Logs, as a plugin does, without configuring logging."""

    async def log(self, message: str) -> None:
        import logging

        logger = logging.getLogger("plugin.part")
        logger.debug("too fine to be sent")
        logger.warning("%s", message)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("it failed")

    def log_from_a_thread(self, message: str) -> None:
        import logging

        logging.getLogger("plugin.thread").error("%s", message)

    async def pid(self) -> int:
        return os.getpid()
