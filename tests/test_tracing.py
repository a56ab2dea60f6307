"""Calls as OpenTelemetry spans: a re-entrant chain host -> A -> B -> A is one
trace with its parent links, across three processes; errors and
cancellations are on the spans; with no tracer provider, nothing is traced."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import atoll

trace = pytest.importorskip("opentelemetry.trace")
sdk = pytest.importorskip("opentelemetry.sdk.trace")
export = pytest.importorskip("opentelemetry.sdk.trace.export")

pytestmark = pytest.mark.anyio


class Ping(atoll.Actor):
    async def start(self) -> str:
        pong = await atoll.lookup("pong")
        return str(await pong.volley())

    async def back(self) -> str:
        return "back"

    async def fail(self) -> None:
        raise ValueError("bad input")

    async def nap(self) -> None:
        await anyio.sleep(60)


class Pong(atoll.Actor):
    async def volley(self) -> str:
        ping = await atoll.lookup("ping")
        return str(await ping.back())


class _Collector(export.SpanExporter):  # type: ignore[misc]
    """Keeps finished spans; wakes a waiter."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.changed = anyio.Event()

    def export(self, spans: Any) -> Any:
        self.spans.extend(spans)
        self.changed.set()
        return export.SpanExportResult.SUCCESS

    async def wait_for(self, name: str, kind: Any) -> Any:
        while True:
            for span in self.spans:
                if span.name == name and span.kind == kind:
                    return span
            await self.changed.wait()
            self.changed = anyio.Event()


def _provider() -> tuple[Any, _Collector]:
    provider = sdk.TracerProvider()
    collector = _Collector()
    provider.add_span_processor(export.SimpleSpanProcessor(collector))
    return provider, collector


async def test_a_reentrant_chain_is_one_trace_across_three_processes() -> None:
    provider, collector = _provider()
    client, server = trace.SpanKind.CLIENT, trace.SpanKind.SERVER
    async with atoll.open_host(tracer_provider=provider) as host:
        ping = await host.spawn(Ping, name="ping")
        await host.spawn(Pong, name="pong")
        with anyio.fail_after(30):
            with provider.get_tracer("app").start_as_current_span("request") as root:
                assert await ping.start() == "back"
            chain = [
                await collector.wait_for("ping.start", client),  # in the host
                await collector.wait_for("ping.start", server),  # in A
                await collector.wait_for("pong.volley", client),  # in A
                await collector.wait_for("pong.volley", server),  # in B
                await collector.wait_for("ping.back", client),  # in B
                await collector.wait_for("ping.back", server),  # in A again, re-entered
            ]
    trace_id = root.get_span_context().trace_id
    parent = root.get_span_context().span_id
    for span in chain:
        assert span.context.trace_id == trace_id, span.name
        assert span.parent is not None and span.parent.span_id == parent, span.name
        parent = span.context.span_id
    start_server = chain[1]
    assert start_server.attributes["atoll.actor"] == "ping"
    assert start_server.attributes["rpc.method"] == "start"
    assert start_server.attributes["atoll.caller"] == "host"
    assert start_server.attributes["atoll.call_id"] > 0
    assert chain[5].attributes["atoll.caller"] == "pong"
    assert chain[5].attributes["atoll.chain"] == start_server.attributes["atoll.chain"]
    assert len({span.context.span_id for span in chain}) == 6


async def test_errors_and_cancellations_are_on_the_spans() -> None:
    provider, collector = _provider()
    client, server = trace.SpanKind.CLIENT, trace.SpanKind.SERVER
    error = trace.StatusCode.ERROR
    async with atoll.open_host(tracer_provider=provider) as host:
        ping = await host.spawn(Ping, name="ping")
        with anyio.fail_after(30):
            with pytest.raises(ValueError, match="bad input"):
                await ping.fail()
            failed = await collector.wait_for("ping.fail", server)
            assert failed.status.status_code == error
            assert "ValueError: bad input" in failed.status.description
            failed_call = await collector.wait_for("ping.fail", client)
            assert failed_call.status.status_code == error
            assert [e.name for e in failed_call.events] == ["exception"]
            with anyio.move_on_after(0.5):
                await ping.nap()
            gave_up = await collector.wait_for("ping.nap", client)
            assert gave_up.status.description == "cancelled"
            cancelled = await collector.wait_for("ping.nap", server)
            assert cancelled.status.description == "cancelled"


async def test_without_a_tracer_provider_nothing_is_traced() -> None:
    async with atoll.open_host() as host:
        ping = await host.spawn(Ping, name="ping")
        assert host._node.tracer is None
        with anyio.fail_after(30):
            assert await ping.back() == "back"
