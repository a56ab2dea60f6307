"""Environments: real uv builds (small packages, cached for the run), strict
isolation, share_torch, concurrent and cancelled builds, extensions, the CLI."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import atoll
from atoll.venvs import Env, build

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "extensions"
HOST_SITE = os.path.realpath(os.path.dirname(os.path.dirname(pytest.__file__)))


@pytest.fixture(scope="session")
def env_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One environment cache for the whole run: each environment is built once."""
    path = tmp_path_factory.mktemp("envs")
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)


def open_host(env_cache: str) -> Any:
    return atoll.open_host(env_cache=env_cache, build_progress=False)


class Probe(atoll.Actor):
    """Reports what its process can see. Defined here: travels by value."""

    async def version_of(self, module: str) -> str:
        try:
            mod = __import__(module)
        except ImportError as exc:
            return f"ImportError: {exc}"
        return str(getattr(mod, "__version__", "?"))

    async def dist_version(self, dist: str) -> str:
        return importlib.metadata.version(dist)

    async def sys_path(self) -> list[str]:
        return list(sys.path)

    async def file_of(self, module: str) -> str:
        return os.path.realpath(__import__(module).__file__)

    async def imported(self, module: str) -> bool:
        return module in sys.modules

    async def tensor_sum(self, t: Any) -> float:
        return float(t.sum())

    async def pid(self) -> int:
        return os.getpid()


# -- isolation -------------------------------------------------------------


async def test_child_sees_its_own_versions_and_none_of_the_hosts(env_cache: str) -> None:
    host_attrs = importlib.metadata.version("attrs")
    wanted = "23.1.0" if host_attrs != "23.1.0" else "23.2.0"
    with anyio.fail_after(120):
        async with open_host(env_cache) as host:
            probe = await host.spawn(Probe, env=Env([f"attrs=={wanted}"]))
            # declared dependency: the child's version, not the host's
            assert await probe.version_of("attrs") == wanted
            # the host has these; the child must not see them
            for only_in_host in ("hypothesis", "pytest", "trio"):
                assert (await probe.version_of(only_in_host)).startswith("ImportError")
            # atoll's runtime dependencies: exactly the host's versions
            for dist in ("pyzmq", "anyio", "msgspec", "cloudpickle"):
                assert await probe.dist_version(dist) == importlib.metadata.version(dist)
            # nothing of the host's site-packages on its path
            for entry in await probe.sys_path():
                assert not os.path.realpath(entry).startswith(HOST_SITE), entry


async def test_cached_environment_is_reused(env_cache: str) -> None:
    env = Env(["attrs==23.1.0"])
    with anyio.fail_after(120):
        first = await build(env, cache_dir=env_cache, progress=False)
        again = await build(env, cache_dir=env_cache, progress=False)
    assert again.path == first.path
    assert not again.built


class NeedsPytest(atoll.Actor):
    """Its method uses a module the host has and its environment does not."""

    async def version(self) -> str:
        return pytest.__version__


async def test_class_needing_a_missing_module_says_to_add_it(env_cache: str) -> None:
    with anyio.fail_after(60):
        async with open_host(env_cache) as host:
            with pytest.raises(atoll.SpawnError) as caught:
                await host.spawn(NeedsPytest, env=Env([]))
    cause = caught.value.__cause__
    assert isinstance(cause, ModuleNotFoundError)
    assert "No module named 'pytest': it is not installed in the actor's environment" in str(cause)


# -- share_torch -------------------------------------------------------------


async def test_share_torch_uses_the_hosts_build(env_cache: str) -> None:
    torch = pytest.importorskip("torch")
    with anyio.fail_after(120):
        async with open_host(env_cache) as host:
            # torchmetrics requires torch: the host's build satisfies it, nothing
            # of torch is downloaded
            probe = await host.spawn(Probe, env=Env(["torchmetrics"], share_torch=True))
            assert await probe.version_of("torch") == torch.__version__
            assert await probe.file_of("torch") == os.path.realpath(torch.__file__)
            assert await probe.dist_version("torch") == torch.__version__
            assert not (await probe.version_of("torchmetrics")).startswith("ImportError")
            assert await probe.tensor_sum(torch.arange(10.0)) == 45.0
            # the host's other packages stay the host's
            assert (await probe.version_of("hypothesis")).startswith("ImportError")


async def test_share_torch_refuses_another_torch_before_installing(env_cache: str) -> None:
    torch = pytest.importorskip("torch")
    with anyio.fail_after(60), pytest.raises(atoll.EnvBuildError) as caught:
        await build(Env(["torch>=99"], share_torch=True), cache_dir=env_cache, progress=False)
    message = str(caught.value)
    assert "torch>=99" in message
    assert torch.__version__ in message  # says which torch it had to offer
    assert not [e for e in os.listdir(env_cache) if e.startswith(".tmp-")]


# -- failures, concurrency, cancellation -------------------------------------


async def test_failed_build_carries_uvs_message(env_cache: str) -> None:
    env = Env(["atoll-test-no-such-package-zz==1.0"])
    with anyio.fail_after(60), pytest.raises(atoll.EnvBuildError) as caught:
        await build(env, cache_dir=env_cache, progress=False)
    error = caught.value
    assert error.dependencies == ("atoll-test-no-such-package-zz==1.0",)
    assert "atoll-test-no-such-package-zz" in error.output  # uv's own words
    assert "atoll-test-no-such-package-zz" in str(error)
    assert not os.path.exists(os.path.join(env_cache, env.key()))
    assert not [e for e in os.listdir(env_cache) if e.startswith(f".tmp-{env.key()}")]


async def test_unsatisfiable_versions_are_uvs_error(env_cache: str) -> None:
    env = Env(["six==1.16.0", "six==1.15.0"])
    with anyio.fail_after(60), pytest.raises(atoll.EnvBuildError) as caught:
        await build(env, cache_dir=env_cache, progress=False)
    assert "unsatisfiable" in caught.value.output
    assert "'six==1.16.0', 'six==1.15.0'" in str(caught.value)


async def test_unreachable_index_fails_fast_with_a_hint(
    env_cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")  # uv retries thrice by default: 7 s here
    env = Env(["six==1.16.0"], index_url="http://127.0.0.1:9/simple")
    with anyio.fail_after(30), pytest.raises(atoll.EnvBuildError) as caught:
        await build(env, cache_dir=env_cache, progress=False)
    assert "127.0.0.1:9" in caught.value.output  # uv's own account
    assert "could not be reached" in str(caught.value)
    assert not os.path.exists(os.path.join(env_cache, env.key()))


async def test_spawn_reports_a_failed_build(env_cache: str) -> None:
    with anyio.fail_after(60):
        async with open_host(env_cache) as host:
            with pytest.raises(atoll.EnvBuildError, match="no-such-package"):
                await host.spawn(Probe, env=Env(["atoll-test-no-such-package-zz"]))
            assert await (await host.spawn(Probe)).imported("sys")  # the host carries on


_BUILD_IN_SUBPROCESS = """
import json, sys, anyio
from atoll.venvs import Env, build
built = anyio.run(lambda: build(Env(["six==1.16.0"]), cache_dir=sys.argv[1], progress=False))
print(json.dumps({"path": built.path, "built": built.built}))
"""


async def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    env = Env(["six==1.16.0"])
    results: list[tuple[str, bool]] = []

    async def in_task() -> None:
        built = await build(env, cache_dir=cache, progress=False)
        results.append((built.path, built.built))

    async def in_process() -> None:
        code = [sys.executable, "-c", _BUILD_IN_SUBPROCESS, cache]
        done = await anyio.run_process(code, env={**os.environ, "PYTHONPATH": _src()})
        out = json.loads(done.stdout)
        results.append((out["path"], out["built"]))

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(in_process)
            tg.start_soon(in_task)
            tg.start_soon(in_task)
    assert len({path for path, _ in results}) == 1
    assert sorted(built for _, built in results) == [False, False, True]
    assert not [e for e in os.listdir(cache) if e.startswith(".tmp-")]


async def test_cancelled_build_leaves_nothing_to_trust(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    env = Env(["six==1.16.0"])
    uv_started = anyio.Event()

    def progress(line: str) -> None:
        if line.startswith("  "):  # uv is running and talking
            uv_started.set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:

            async def building() -> None:
                await build(env, cache_dir=cache, progress=progress)
                pytest.fail("the build finished before it was cancelled")

            tg.start_soon(building)
            await uv_started.wait()
            tg.cancel_scope.cancel()
    assert sorted(os.listdir(cache)) == [env.key() + ".lock"]  # no env, no temp dir
    with anyio.fail_after(120):
        again = await build(env, cache_dir=cache, progress=False)
    assert again.built


async def test_partial_build_left_by_a_crash_is_removed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = Env(["six==1.16.0"])
    crashed = cache / f".tmp-{env.key()}-crashed"
    (crashed / "bin").mkdir(parents=True)  # as if a builder died halfway
    with anyio.fail_after(120):
        built = await build(env, cache_dir=str(cache), progress=False)
    assert built.built
    assert not crashed.exists()


async def test_progress_says_what_is_installed_and_how_long(tmp_path: Path) -> None:
    lines: list[str] = []
    with anyio.fail_after(120):
        await build(
            Env(["six==1.16.0"], name="tiny"), cache_dir=str(tmp_path), progress=lines.append
        )
    text = "\n".join(lines)
    assert "building environment tiny [six==1.16.0]" in text
    assert "+ six==1.16.0" in text  # uv's own account of what it installed
    assert "ready in" in text


def test_env_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match=r"write \['numpy'\]"):
        Env("numpy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty requirement"):
        Env([" "])


async def test_spawn_rejects_something_else_as_env() -> None:
    async with atoll.open_host() as host:
        with pytest.raises(TypeError, match=r"atoll\.Env"):
            await host.spawn(Probe, env=["numpy"])  # type: ignore[arg-type]


# -- warm pool ---------------------------------------------------------------


async def test_prewarmed_process_is_taken_and_replaced(env_cache: str) -> None:
    env = Env(["attrs==23.1.0"])
    with anyio.fail_after(120):
        async with open_host(env_cache) as host:
            await host.prewarm(env, count=1, imports=["colorsys"])
            first = await host.spawn(Probe, env=env)
            assert await first.imported("colorsys")  # the pre-started process
            second = await host.spawn(Probe, env=env)  # the replacement, started since
            assert await second.imported("colorsys")
            cold = await host.spawn(Probe)  # another environment: a cold start
            assert not await cold.imported("colorsys")


async def test_closing_while_the_pool_refills_leaves_nothing(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # Each spawn from the pool starts a replacement; the host closes while it
    # starts. The leak check fails the test if any process outlives the host.
    for _ in range(3):
        with anyio.fail_after(30):
            async with atoll.open_host() as host:
                await host.prewarm()
                probe = await host.spawn(Probe)
                assert await probe.imported("sys")
    assert "could not start a warm" not in capfd.readouterr().err


async def test_prewarm_with_a_failing_import_is_a_spawn_error(env_cache: str) -> None:
    with anyio.fail_after(60):
        async with open_host(env_cache) as host:
            with pytest.raises(atoll.SpawnError, match="no_such_module_zz"):
                await host.prewarm(imports=["no_such_module_zz"])


# -- extensions ----------------------------------------------------------------


async def test_numpy_one_and_two_side_by_side(env_cache: str) -> None:
    np = pytest.importorskip("numpy")
    with anyio.fail_after(180):
        async with open_host(env_cache) as host:
            old = await host.load_extension(EXAMPLES / "old_numpy")
            new = await host.load_extension(EXAMPLES / "new_numpy")
            assert (await old.version()).startswith("1.")
            assert (await new.version()).startswith("2.")
            data = np.arange(200_000, dtype=np.float64)  # big enough for shared memory
            summary = await old.summarize(data)
            assert summary["numpy"].startswith("1.")
            assert summary["mean"] == pytest.approx(data.mean())
            scaled = await new.scale(data, 2.0)
            assert np.array_equal(scaled, data * 2.0)
            assert await new.shout(["a", "b"]) == ["A", "B"]
            assert await atoll.lookup("old-numpy") is not None  # registered by name
            # an extension's environment can be prewarmed too
            await host.prewarm(EXAMPLES / "old_numpy", imports=["numpy"])
            again = await host.load_extension(EXAMPLES / "old_numpy", name="old-2")
            assert (await again.summarize(data))["numpy"].startswith("1.")


def _extension(folder: Path, manifest: str | None, code: str = "") -> Path:
    folder.mkdir()
    if manifest is not None:
        (folder / "pyproject.toml").write_text(textwrap.dedent(manifest))
    if code:
        (folder / "ext_module.py").write_text(textwrap.dedent(code))
    return folder


_NO_DEPS = """
[project]
name = "{name}"
dependencies = []
[project.entry-points.atoll]
actor = "{entry}"
"""


async def test_bad_manifests_name_the_file_and_the_fix(tmp_path: Path, env_cache: str) -> None:
    async with open_host(env_cache) as host:
        with pytest.raises(atoll.ExtensionError, match=r"pyproject\.toml is missing"):
            await host.load_extension(_extension(tmp_path / "empty", None))
        with pytest.raises(atoll.ExtensionError, match=r"names no actor: add"):
            await host.load_extension(_extension(tmp_path / "noentry", "[project]\nname='x'\n"))
        with pytest.raises(atoll.ExtensionError, match=r'form "module:Class"'):
            bad = _NO_DEPS.format(name="bad", entry="not an entry point")
            await host.load_extension(_extension(tmp_path / "badform", bad))
        with pytest.raises(atoll.ExtensionError, match="dependencies must be a list"):
            text = "[project]\ndependencies = 'numpy'\n[project.entry-points.atoll]\nactor='m:A'\n"
            await host.load_extension(_extension(tmp_path / "baddeps", text))
        not_actor = _extension(
            tmp_path / "notactor",
            _NO_DEPS.format(name="notactor", entry="ext_module:Thing"),
            "class Thing:\n    pass\n",
        )
        with anyio.fail_after(120), pytest.raises(atoll.ExtensionError) as caught:
            await host.load_extension(not_actor)
        assert str(not_actor / "pyproject.toml") in str(caught.value)
        assert "not a subclass of atoll.Actor" in str(caught.value)
        missing = _extension(
            tmp_path / "nomodule", _NO_DEPS.format(name="nomodule", entry="nowhere:Thing")
        )
        with anyio.fail_after(60), pytest.raises(atoll.ExtensionError, match="fix the module"):
            await host.load_extension(missing)


async def test_build_and_spawn_errors_of_an_extension_name_its_manifest(
    tmp_path: Path, env_cache: str
) -> None:
    unbuildable = _extension(
        tmp_path / "unbuildable",
        '[project]\nname = "unbuildable"\ndependencies = ["atoll-test-no-such-package-zz"]\n'
        '[project.entry-points.atoll]\nactor = "m:A"\n',
    )
    failing = _extension(
        tmp_path / "failing",
        _NO_DEPS.format(name="failing", entry="ext_module:Failing"),
        "import atoll\nclass Failing(atoll.Actor):\n    def __init__(self):\n"
        "        raise RuntimeError('refused to start')\n",
    )
    with anyio.fail_after(120):
        async with open_host(env_cache) as host:
            with pytest.raises(atoll.EnvBuildError) as built:
                await host.load_extension(unbuildable)
            assert str(unbuildable / "pyproject.toml") in str(built.value)
            assert "atoll-test-no-such-package-zz" in built.value.output
            with pytest.raises(atoll.SpawnError) as spawned:
                await host.load_extension(failing)
            assert str(failing / "pyproject.toml") in str(spawned.value)
            assert "refused to start" in str(spawned.value)


async def test_load_extension_checks_the_actor_class_it_is_told(
    tmp_path: Path, env_cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _extension(
        tmp_path / "typed_ext", _NO_DEPS.format(name="typed-ext", entry="typed_ext_module:Named")
    )
    (folder / "typed_ext_module.py").write_text(
        "import atoll\n\nclass Named(atoll.Actor):\n    async def hello(self):\n"
        "        return 'hi'\n"
    )
    monkeypatch.syspath_prepend(str(folder))  # what an application typing the ref imports
    from typed_ext_module import Named  # type: ignore[import-not-found]

    with anyio.fail_after(120):
        async with open_host(env_cache) as host:
            ref = await host.load_extension(folder, actor_class=Named)
            assert await ref.hello() == "hi"
            with pytest.raises(atoll.ExtensionError, match=r"typed_ext_module.Named, not .*Probe"):
                await host.load_extension(folder, name="other", actor_class=Probe)
            assert "other" not in host._registry._entries  # stopped again


async def test_lifecycle_hooks_run_in_the_child_and_report_errors(
    tmp_path: Path, env_cache: str, capfd: pytest.CaptureFixture[str]
) -> None:
    code = """
    import os
    import atoll

    class Hooked(atoll.Actor):
        def __init__(self, fail_start: bool) -> None:
            self.fail_start = fail_start
            self.started_in = None

        async def on_start(self) -> None:
            if self.fail_start:
                raise RuntimeError("on_start refused")
            self.started_in = os.getpid()

        async def on_stop(self) -> None:
            raise RuntimeError("on_stop went wrong")

        async def started_in_pid(self) -> int:
            return self.started_in
    """
    folder = _extension(
        tmp_path / "hooked", _NO_DEPS.format(name="hooked", entry="ext_module:Hooked"), code
    )
    with anyio.fail_after(120):
        async with open_host(env_cache) as host:
            with pytest.raises(atoll.SpawnError, match="on_start refused") as caught:
                await host.load_extension(folder, True)
            assert isinstance(caught.value.__cause__, RuntimeError)
            hooked = await host.load_extension(folder, False)
            assert await hooked.started_in_pid() != os.getpid()
            await host.stop(hooked)
    err = capfd.readouterr().err
    assert "on_stop went wrong" in err
    assert "actor 'hooked': on_stop() raised" in err


# -- the command line -----------------------------------------------------------


def _cli(*args: str, cache_home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``atoll env ARGS``; code tables in ``cache_home`` (never the user's own cache)."""
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    env = {
        **os.environ,
        "PYTHONPATH": _src(),
        "XDG_CACHE_HOME": str(cache_home) if cache_home is not None else os.devnull,
        # uv keeps its own (warm) download cache
        "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR") or os.path.join(user_cache, "uv"),
    }
    return subprocess.run(
        [sys.executable, "-m", "atoll", "env", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_cli_options_after_the_action_and_real_defaults(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    listed = _cli("list", "--cache-dir", cache)
    assert listed.returncode == 0, listed.stderr
    assert f"no environments in {cache}" in listed.stdout
    helped = _cli("prune", "--help", cache_home=tmp_path)
    assert "--cache-dir" in helped.stdout and "default:" in helped.stdout
    default = os.environ.get("ATOLL_CACHE_DIR") or str(tmp_path / "atoll" / "envs")
    assert default in "".join(helped.stdout.split())  # argparse wraps long paths
    nothing = _cli("prune", "--cache-dir", cache, cache_home=tmp_path)
    assert nothing.returncode == 0 and f"nothing to remove in {cache}" in nothing.stdout


def test_cli_prune_removes_code_tables_of_atoll_versions_gone(tmp_path: Path) -> None:
    from atoll.actors._code_table import write_table

    package = tmp_path / "old" / "atoll"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VERSION = 'old'\n")
    tables = tmp_path / "home" / "atoll" / "code"
    tables.mkdir(parents=True)
    write_table(str(tables / "old.table"), str(package), ("atoll",))
    write_table(str(tables / "kept.table"), str(package), ("atoll",))
    pruned = _cli("prune", "--cache-dir", str(tmp_path / "cache"), cache_home=tmp_path / "home")
    assert "removed" not in pruned.stdout  # both still match their sources
    shutil.rmtree(package.parent)  # that atoll is uninstalled
    pruned = _cli("prune", "--cache-dir", str(tmp_path / "cache"), cache_home=tmp_path / "home")
    assert pruned.returncode == 0, pruned.stderr
    assert "removed code table kept.table" in pruned.stdout
    assert "no longer installed" in pruned.stdout
    assert os.listdir(tables) == []


def test_cli_builds_lists_and_prunes(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    ext = _extension(
        tmp_path / "tiny",
        '[project]\nname = "tiny"\ndependencies = ["six==1.16.0"]\n'
        '[project.entry-points.atoll]\nactor = "m:A"\n',
    )
    built = _cli("--cache-dir", cache, "build", str(ext))
    assert built.returncode == 0, built.stderr
    assert "+ six==1.16.0" in built.stderr and "tiny:" in built.stdout
    listed = _cli("--cache-dir", cache, "list")
    assert "tiny" in listed.stdout and "six==1.16.0" in listed.stdout and "MB" in listed.stdout
    # an environment built for other versions of atoll's dependencies, and a partial build
    stale = Path(cache) / "0123456789abcdef0123"
    stale.mkdir()
    (stale / "atoll-env.json").write_text(json.dumps({"key": stale.name, "env": {"runtime": []}}))
    (Path(cache) / ".tmp-0123456789abcdef0124-x").mkdir()
    pruned = _cli("--cache-dir", cache, "prune")
    assert "removed 0123456789abcdef0123" in pruned.stdout
    assert "partial build" in pruned.stdout
    assert sorted(os.listdir(cache)) == sorted(
        e for e in os.listdir(cache) if not e.startswith(("0123", ".tmp"))
    )
    assert "tiny" in _cli("--cache-dir", cache, "list").stdout  # the usable one stays
    assert _cli("--cache-dir", cache, "prune", "--all").returncode == 0
    assert [e for e in os.listdir(cache) if not e.endswith(".lock")] == []
    bad = _cli("--cache-dir", cache, "build", str(tmp_path))
    assert bad.returncode == 1 and "pyproject.toml is missing" in bad.stderr


def _src() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(atoll.__file__)))


_CONFINED = (
    _NO_DEPS
    + """
[tool.atoll.sandbox]
network = {network}
[tool.atoll.limits]
open_files = 64
"""
)

_CONFINED_CODE = """
import os, resource
import atoll

class Confined(atoll.Actor):
    async def where(self):
        return os.getpid(), resource.getrlimit(resource.RLIMIT_NOFILE)[0]
"""


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (bwrap)")
async def test_a_manifest_asks_for_its_sandbox_and_limits(tmp_path: Path, env_cache: str) -> None:
    manifest = _CONFINED.format(name="confined", entry="ext_module:Confined", network="false")
    folder = _extension(tmp_path / "confined", manifest, _CONFINED_CODE)
    with anyio.fail_after(120):
        async with open_host(env_cache) as host:
            confined = await host.load_extension(folder)
            assert confined._id[:1] == b"s"  # sandboxed, hence untrusted
            pid, open_files = await confined.where()
            assert pid == 2  # its own process namespace: bubblewrap's init is 1
            assert open_files == 64


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (bwrap)")
async def test_a_manifest_cannot_widen_the_hosts_sandbox(tmp_path: Path, env_cache: str) -> None:
    manifest = _CONFINED.format(name="greedy", entry="ext_module:Confined", network="true")
    folder = _extension(tmp_path / "greedy", manifest, _CONFINED_CODE)
    with anyio.fail_after(120):
        async with atoll.open_host(
            env_cache=env_cache, build_progress=False, sandbox=atoll.Sandbox()
        ) as host:
            with pytest.raises(atoll.ExtensionError, match="asks for network"):
                await host.load_extension(folder)
            granted = await host.load_extension(folder, sandbox=atoll.Sandbox(network=True))
            assert (await granted.where())[0] == 2


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (bwrap)")
async def test_an_environments_sandbox_confines_its_actors(env_cache: str) -> None:
    env = Env(["attrs==23.1.0"], sandbox=atoll.Sandbox())
    assert env.key() == Env(["attrs==23.1.0"]).key()  # the same build, cached once
    with anyio.fail_after(120):
        async with open_host(env_cache) as host:
            probe = await host.spawn(Probe, env=env)
            assert probe._id[:1] == b"s"  # sandboxed, hence untrusted
            assert await probe.pid() == 2  # its own process namespace
            assert await probe.version_of("attrs") == "23.1.0"
            own = await host.spawn(Probe, env=env, sandbox=atoll.Sandbox(network=True))
            assert await own.pid() == 2
            with pytest.raises(TypeError, match=r"takes an atoll\.Sandbox"):
                await host.spawn(Probe, env=Env(["attrs==23.1.0"], sandbox="yes"))


_VERSIONED_CODE = """
import atoll

class Versioned(atoll.Actor):
    async def version(self):
        return {version}
"""


async def test_a_watched_extension_reloads_when_its_files_change(
    tmp_path: Path, env_cache: str
) -> None:
    manifest = _NO_DEPS.format(name="watched", entry="ext_module:Versioned")
    folder = _extension(tmp_path / "watched", manifest, _VERSIONED_CODE.format(version=1))
    with anyio.fail_after(120):
        async with open_host(env_cache) as host:
            events = host.subscribe("atoll.lifecycle")
            ext = await host.load_extension(folder, watch=True)
            assert await ext.version() == 1
            (folder / "ext_module.py").write_text(_VERSIONED_CODE.format(version=2))
            async for event in events:
                if event.event == "reloaded":
                    break
            assert await ext.version() == 2
            events.close()


_CRASH = """
    def crash(self):
        import os

        os._exit(3)
"""


async def test_a_manifest_asks_to_be_restarted(tmp_path: Path, env_cache: str) -> None:
    code = (
        _VERSIONED_CODE.format(version=1)
        + "\n    def crash(self):\n        import os; os._exit(3)\n"
    )
    manifest = _NO_DEPS.format(name="phoenix", entry="ext_module:Versioned")
    folder = _extension(
        tmp_path / "phoenix", manifest + "[tool.atoll.restart]\nbackoff = 0.0\n", code
    )
    bad = _extension(tmp_path / "bad", manifest + "[tool.atoll.restart]\nlimit = -1\n", code)
    with anyio.fail_after(120):
        async with open_host(env_cache) as host:
            with pytest.raises(atoll.ExtensionError, match=r"\[tool\.atoll\.restart\]: .*limit"):
                await host.load_extension(bad)
            ext = await host.load_extension(folder)
            with pytest.raises(atoll.ActorDiedError, match="being restarted"):
                await ext.crash()
            assert await ext.version() == 1
