"""Building environments with uv: cached by key, atomic, once per key.

An environment is built in ``<cache>/.tmp-<key>-...`` and renamed to
``<cache>/<key>`` only when complete, so a directory named by its key is
always whole; a crash or a cancellation leaves at most a temporary directory,
which nothing trusts and the next builder removes. Builders of one key take
``<cache>/<key>.lock`` (``flock``: across tasks, threads and processes), so
the first builds and the others wait and reuse its work.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from .._errors import EnvBuildError
from ._env import Env, default_cache_dir, host_python, runtime_pins
from ._torch import host_torch

MANIFEST = "atoll-env.json"
"""Written into an environment last, before the rename that publishes it."""

Progress = bool | Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class BuiltEnv:
    """A built environment in the cache."""

    key: str
    path: str
    built: bool
    """True if this call built it, False if it was already in the cache."""
    seconds: float

    @property
    def python(self) -> str:
        return os.path.join(self.path, "bin", "python")

    @property
    def site_packages(self) -> str:
        return site_packages(self.path)


def site_packages(venv: str) -> str:
    lib = os.path.join(venv, "lib")
    for entry in sorted(os.listdir(lib)):
        if entry.startswith(("python", "pypy")):
            return os.path.join(lib, entry, "site-packages")
    raise EnvBuildError(f"{venv} has no lib/python*/site-packages: is it a virtual environment?")


def find_uv() -> str:
    """The uv executable: next to this interpreter, from the ``uv`` package, or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "uv")
    if os.access(beside, os.X_OK):
        return beside
    try:
        import uv  # type: ignore[import-not-found,unused-ignore]

        found: str = uv.find_uv_bin()
        return found
    except (ImportError, FileNotFoundError):
        pass
    on_path = shutil.which("uv")
    if on_path is None:
        raise EnvBuildError(
            "building environments needs uv, which is not installed: "
            "pip install uv (or install atoll with its 'envs' extra)"
        )
    return on_path


def _say(progress: Progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:

        def to_stderr(line: str) -> None:
            sys.stderr.write(line + "\n")  # the documented place for progress
            sys.stderr.flush()

        return to_stderr
    return lambda line: None


async def build(env: Env, *, cache_dir: str | None = None, progress: Progress = True) -> BuiltEnv:
    """Build ``env`` into the cache unless it is there already; return where it is.

    Concurrent builders of one environment (tasks, threads or processes) build
    it once. ``progress`` (True: to stderr, or a callable taking each line)
    reports what is installed and how long it took; False is silent. Raises
    :class:`atoll.EnvBuildError` with uv's own message when the build fails.
    """
    started = time.monotonic()
    say = _say(progress)
    cache, key = _cache_dir(cache_dir), env.key()
    final = os.path.join(cache, key)
    if _is_built(final):
        return BuiltEnv(key, final, False, time.monotonic() - started)
    async with _file_lock(os.path.join(cache, key + ".lock")):
        if _is_built(final):
            return BuiltEnv(key, final, False, time.monotonic() - started)
        remove_partial(cache, key)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache)
        try:
            await _build_into(tmp, env, key, say)
            _publish(tmp, final, env, key, time.monotonic() - started)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    seconds = time.monotonic() - started
    say(f"atoll: environment {_label(env, key)} ready in {seconds:.1f} s")
    return BuiltEnv(key, final, True, seconds)


def _cache_dir(cache_dir: str | None) -> str:
    cache = os.path.abspath(cache_dir or default_cache_dir())
    os.makedirs(cache, exist_ok=True)
    return cache


def _is_built(path: str) -> bool:
    return os.path.exists(os.path.join(path, MANIFEST))


def _publish(tmp: str, final: str, env: Env, key: str, seconds: float) -> None:
    """Write the manifest into a complete build and rename it into place."""
    manifest = {
        "key": key,
        "name": env.name,
        "env": env.describe(),
        "built_at": time.time(),
        "seconds": round(seconds, 3),
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_built(final):
            raise
        # Built meanwhile by a builder whose lock file `atoll env prune` had
        # removed: the same key is the same environment, so use that one.
        shutil.rmtree(tmp, ignore_errors=True)


def remove_partial(cache: str, key: str) -> None:
    """Remove what an interrupted build of ``key`` left (the caller holds its lock)."""
    for entry in os.listdir(cache):
        if entry.startswith(f".tmp-{key}-"):
            shutil.rmtree(os.path.join(cache, entry), ignore_errors=True)


def _label(env: Env, key: str) -> str:
    deps = ", ".join(env.dependencies) or "no dependencies"
    return f"{env.name + ' ' if env.name else ''}[{deps}] ({key[:8]})"


async def _build_into(tmp: str, env: Env, key: str, say: Callable[[str], None]) -> None:
    uv = find_uv()
    say(f"atoll: building environment {_label(env, key)} with uv")
    python = env.python or host_python()
    await _uv(uv, ["venv", "--relocatable", "--quiet", "--python", python, tmp], env, say, tmp)
    args = ["pip", "install", "--python", os.path.join(tmp, "bin", "python")]
    if env.index_url:
        args += ["--index-url", env.index_url]
    for url in env.extra_index_urls:
        args += ["--extra-index-url", url]
    for link in env.find_links:
        args += ["--find-links", link]
    torch = host_torch() if env.share_torch else None
    if torch is not None:
        args += torch.uv_args(os.path.join(tmp, ".atoll-torch"))
    await _uv(uv, [*args, *runtime_pins(), *env.dependencies], env, say, tmp)
    if torch is not None:
        shutil.rmtree(os.path.join(tmp, ".atoll-torch"))
        torch.link_into(site_packages(tmp))


async def _uv(uv: str, args: Sequence[str], env: Env, say: Callable[[str], None], cwd: str) -> None:
    environ = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    environ["UV_NO_PROGRESS"] = "1"
    output: list[str] = []
    process = await anyio.open_process(
        [uv, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=environ,
        start_new_session=True,  # so a cancellation can stop uv and whatever it started
    )
    try:
        assert process.stdout is not None
        partial = b""
        async for chunk in process.stdout:
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").rstrip()
                output.append(text)
                say("  " + text)
        code = await process.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await process.wait()
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
    if code != 0:
        said = "\n".join(output).strip()
        hint = ""
        if "Failed to fetch" in said or "error sending request" in said:
            hint = (
                f"\nthe package index ({env.index_url or 'uv default: PyPI'}) could not be "
                "reached: check the network, or give Env(index_url=..., find_links=...) "
                "a reachable index"
            )
        elif env.share_torch and "torch" in said:
            hint = (
                f"\nshare_torch=True provides the host's torch {host_torch().version}; "
                "a dependency that needs another torch cannot be installed beside it"
            )
        raise EnvBuildError(
            f"uv could not build the environment for {list(env.dependencies)} "
            f"(uv {args[0]} exited with {code}):\n{said}{hint}",
            tuple(env.dependencies),
            said,
        )


def try_lock(path: str) -> int | None:
    """The descriptor of ``path`` locked now, or None if someone holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class _file_lock:
    """``flock`` on a file, waited for in a worker thread; cancellable."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    async def __aenter__(self) -> None:
        fd = try_lock(self.path)
        if fd is None:
            fd = os.open(self.path, os.O_RDWR)
            await _wait_for_lock(fd)
        self.fd = fd

    async def __aexit__(self, *exc: Any) -> None:
        os.close(self.fd)  # releases the lock


async def _wait_for_lock(fd: int) -> None:
    # On cancellation the thread is abandoned: whichever of it and us comes
    # second closes the descriptor, so an abandoned lock is released at once.
    guard = threading.Lock()
    state = {"done": False, "abandoned": False}

    def wait() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with guard:
            state["done"] = True
            if state["abandoned"]:
                os.close(fd)

    try:
        await anyio.to_thread.run_sync(wait, abandon_on_cancel=True)
    except BaseException:
        with guard:
            state["abandoned"] = True
            if state["done"]:
                os.close(fd)
        raise
