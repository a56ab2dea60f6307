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


VALUES_SCRIPT = textwrap.dedent(
    """
    import dataclasses, sys, anyio, atoll

    @dataclasses.dataclass
    class Point:
        x: float
        y: float
        def norm(self):
            return (self.x ** 2 + self.y ** 2) ** 0.5

    class Refused(Exception):
        pass

    class Keeper(atoll.Actor):
        def __init__(self):
            self.types = set()
        async def refuse(self, why):
            raise Refused(why)
        async def norm(self, p):
            self.types.add(type(p))
            return len(self.types), p.norm()
        async def mirror(self, p):
            return Point(p.y, p.x)

    async def main():
        async with atoll.open_host() as host:
            k = await host.spawn(Keeper)
            for x, y in ((3, 4), (6, 8), (5, 12)):
                print(*await k.norm(Point(x, y)))
            back = await k.mirror(Point(1, 2))
            print(type(back) is Point, back)
            try:
                await k.refuse("no")
            except Refused as exc:
                print("Refused:", exc)

    anyio.run(main, backend=sys.argv[1])
    """
)


def test_instances_of_a_class_defined_in_main_cross_as_that_class() -> None:
    # The class travels by value; the receiver rebuilds it once and keeps it,
    # and an instance sent back arrives as the sender's own class. An exception
    # class of the script raised in the actor is caught as itself.
    for backend in ("asyncio", "trio"):
        out = subprocess.run(
            [sys.executable, "-c", VALUES_SCRIPT, backend],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [
            "1 5.0",
            "1 10.0",
            "1 13.0",
            "True Point(x=2, y=1)",
            "Refused: no",
        ]
