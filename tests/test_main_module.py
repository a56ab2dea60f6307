"""Actor classes defined in ``__main__`` (a script) and the demo run as a script."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import anyio, atoll

    class Greeter(atoll.Actor):
        def __init__(self, greeting):
            self.greeting = greeting
        async def greet(self, name):
            return f"{self.greeting}, {name}"

    async def main():
        async with atoll.open_host() as host:
            g = await host.spawn(Greeter, "hello")
            print(await g.greet("world"))

    anyio.run(main, backend=sys.argv[1])
    """
)


def test_actor_class_defined_in_main_module() -> None:
    for backend in ("asyncio", "trio"):
        out = subprocess.run(
            [sys.executable, "-c", "import sys\n" + SCRIPT, backend],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["hello, world"]
        assert "Traceback" not in out.stderr
