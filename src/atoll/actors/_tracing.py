"""Calls as OpenTelemetry spans, one trace across processes.

When the application has configured an OpenTelemetry tracer provider (the
SDK's) before it opens a host, every call is a span: a client span where
it is made, a server span where it is served, with the actor, method and
call id as attributes, errors and cancellations recorded. The caller's
span context travels in the call (``Call.trace``: trace id, span id,
flags), so a chain host -> A -> B -> back into A is one trace with its
parent links.

Actor processes need no OpenTelemetry of their own (an isolated environment
may not have it): a :class:`Recorder` there records their spans with the
ids the wire gave, and sends them, a batch at a time, to the host, which
emits them through its provider (:class:`OtelTracer`) with those very ids:
the application's exporters see one trace. Nothing of this runs unless the
host traces: then ``node.tracer`` is None, and a call pays one test of it.
"""

from __future__ import annotations

import contextvars
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec

WIRE = struct.Struct("16s8sB")
"""A span context on the wire: trace id, span id, trace flags."""
FLUSH_EVERY = 0.05
"""Seconds an actor process keeps finished spans before sending them."""
FLUSH_AT = 256
"""Finished spans an actor process sends at once, without waiting."""

# The span an actor process's code runs in (trace id, span id, flags).
_current: contextvars.ContextVar[tuple[bytes, bytes, int] | None] = contextvars.ContextVar(
    "atoll_span", default=None
)


class Span(msgspec.Struct, array_like=True):
    """A finished span, as an actor process sends it to its host."""

    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    """Empty: a root span."""
    flags: int
    server: bool
    """Served here (else: a call made from here)."""
    start_ns: int
    end_ns: int
    attributes: dict[str, str | int]
    error: str = ""
    """Empty, ``cancelled``, or the exception's type and message."""


Spans = list[Span]


def host_provider() -> Any:
    """The application's tracer provider if it has configured the
    OpenTelemetry SDK's (else None: the host does not trace)."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, TracerProvider) else None


def _attributes(callee: str, method: str) -> dict[str, str | int]:
    return {
        "rpc.system": "atoll",
        "rpc.service": callee,
        "rpc.method": method,
        "atoll.actor": callee,
    }


def _error(exc: BaseException) -> str:
    if isinstance(exc, Exception):
        return f"{type(exc).__name__}: {exc}"
    return "cancelled"


class _Served:
    """A server span opened in an actor process, until its call ends."""

    __slots__ = ("parent_id", "span", "start", "token")

    def __init__(self, span: tuple[bytes, bytes, int], parent_id: bytes) -> None:
        self.span = span
        self.parent_id = parent_id
        self.start = time.time_ns()
        self.token = _current.set(span)


class Recorder:
    """An actor process's tracer: spans recorded here, sent to the host."""

    def __init__(self, send: Callable[[Spans], None]) -> None:
        self._send = send
        self._done: Spans = []
        self.kept = anyio.Event()
        """Set when the first of a batch of finished spans is kept."""

    def wire(self) -> bytes:
        """The current span context, for a call that opens no span of its own."""
        span = _current.get()
        return WIRE.pack(*span) if span is not None else b""

    async def client(
        self, call: Callable[..., Awaitable[Any]], callee: str, method: str, *args: Any
    ) -> Any:
        """Make ``call(*args, trace)`` inside a client span."""
        parent = _current.get()
        trace_id, parent_id, flags = parent or (os.urandom(16), b"", 1)
        span_id = os.urandom(8)
        start = time.time_ns()
        error = ""
        try:
            return await call(*args, WIRE.pack(trace_id, span_id, flags))
        except BaseException as exc:
            error = _error(exc)
            raise
        finally:
            self._finish(
                Span(f"{callee}.{method}", trace_id, span_id, parent_id, flags, False, start,
                     time.time_ns(), _attributes(callee, method), error)
            )  # fmt: skip

    def server_start(self, trace: bytes) -> _Served | None:
        """Enter a server span for a call that came with ``trace``."""
        try:
            trace_id, parent_id, flags = WIRE.unpack(trace)
        except struct.error:
            return None  # not a span context: served untraced
        return _Served((trace_id, os.urandom(8), flags), parent_id)

    def server_end(
        self, served: _Served, name: str, attributes: dict[str, str | int], error: str
    ) -> None:
        _current.reset(served.token)
        trace_id, span_id, flags = served.span
        self._finish(
            Span(name, trace_id, span_id, served.parent_id, flags, True, served.start,
                 time.time_ns(), attributes, error)
        )  # fmt: skip

    def _finish(self, span: Span) -> None:
        self._done.append(span)
        if len(self._done) >= FLUSH_AT:
            self.flush()
        elif len(self._done) == 1:
            self.kept.set()

    async def serve(self) -> None:
        """Send what was kept, ``FLUSH_EVERY`` seconds after the first of it."""
        while True:
            await self.kept.wait()
            await anyio.sleep(FLUSH_EVERY)
            self.kept = anyio.Event()
            self.flush()

    def flush(self) -> None:
        if self._done:
            done, self._done = self._done, []
            self._send(done)


class OtelTracer:
    """The host's tracer: real OpenTelemetry spans, and those its actors
    recorded, emitted with their own ids."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._tracer = provider.get_tracer("atoll")
        # The actors' spans keep the ids they were made with: this tracer
        # takes its ids from what it is given.
        self._given = _GivenIds()
        self._relay = provider.get_tracer("atoll.actor")
        self._relay.id_generator = self._given

    def wire(self) -> bytes:
        ctx = self._trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return b""
        return WIRE.pack(
            ctx.trace_id.to_bytes(16, "big"), ctx.span_id.to_bytes(8, "big"), int(ctx.trace_flags)
        )

    async def client(
        self, call: Callable[..., Awaitable[Any]], callee: str, method: str, *args: Any
    ) -> Any:
        trace = self._trace
        span = self._tracer.start_span(
            f"{callee}.{method}",
            kind=trace.SpanKind.CLIENT,
            attributes=_attributes(callee, method),
        )
        ctx = span.get_span_context()
        wire = WIRE.pack(
            ctx.trace_id.to_bytes(16, "big"), ctx.span_id.to_bytes(8, "big"), int(ctx.trace_flags)
        )
        try:
            return await call(*args, wire)
        except BaseException as exc:
            _record(trace, span, exc)
            raise
        finally:
            span.end()

    def server_start(self, trace: bytes) -> Any:
        from opentelemetry import context

        try:
            trace_id, parent_id, flags = WIRE.unpack(trace)
        except struct.error:
            return None
        api = self._trace
        parent = api.set_span_in_context(
            api.NonRecordingSpan(_remote(api, trace_id, parent_id, flags))
        )
        span = self._tracer.start_span("call", context=parent, kind=api.SpanKind.SERVER)
        return span, context.attach(api.set_span_in_context(span))

    def server_end(
        self, entered: Any, name: str, attributes: dict[str, str | int], error: str
    ) -> None:
        from opentelemetry import context

        span, token = entered
        context.detach(token)
        span.update_name(name)
        span.set_attributes(attributes)
        if error:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end()

    def relay(self, spans: Spans, actor: str) -> None:
        """Emit spans an actor process recorded, with their ids."""
        api = self._trace
        for s in spans:
            parent = None
            if s.parent_id:
                remote = _remote(api, s.trace_id, s.parent_id, s.flags)
                parent = api.set_span_in_context(api.NonRecordingSpan(remote))
            self._given.trace_id = int.from_bytes(s.trace_id, "big")
            self._given.span_id = int.from_bytes(s.span_id, "big")
            kind = api.SpanKind.SERVER if s.server else api.SpanKind.CLIENT
            span = self._relay.start_span(
                s.name, context=parent, kind=kind, attributes=s.attributes, start_time=s.start_ns
            )
            span.set_attribute("atoll.process", actor)
            if s.error:
                span.set_status(api.Status(api.StatusCode.ERROR, s.error))
                if s.error != "cancelled":
                    span.add_event("exception", {"exception.message": s.error})
                else:
                    span.add_event("cancelled")
            span.end(end_time=s.end_ns)


def _remote(api: Any, trace_id: bytes, span_id: bytes, flags: int) -> Any:
    return api.SpanContext(
        int.from_bytes(trace_id, "big"),
        int.from_bytes(span_id, "big"),
        is_remote=True,
        trace_flags=api.TraceFlags(flags & 0xFF),
    )


def _record(api: Any, span: Any, exc: BaseException) -> None:
    if isinstance(exc, Exception):
        span.record_exception(exc)
        span.set_status(api.Status(api.StatusCode.ERROR, _error(exc)))
    else:
        span.add_event("cancelled")
        span.set_status(api.Status(api.StatusCode.ERROR, "cancelled"))


class _GivenIds:
    """Ids as given (see :meth:`OtelTracer.relay`), never invented."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self.span_id

    def is_trace_id_random(self) -> bool:
        return True


def call_attributes(callee: str, method: str, call_id: int, caller: str) -> dict[str, str | int]:
    """A server span's attributes."""
    attributes = _attributes(callee, method)
    attributes["atoll.call_id"] = call_id
    attributes["atoll.caller"] = caller
    return attributes


class SpanSink:
    """Takes the spans actors recorded (at ``SPAN_OID`` in the host)."""

    dropped = 0
    """Batches that were not what an actor's recorder makes."""

    def __init__(self, tracer: OtelTracer) -> None:
        self._tracer = tracer

    async def spans(self, actor: Any, data: Any) -> None:
        try:
            spans = msgspec.msgpack.decode(data, type=Spans)
        except (msgspec.DecodeError, TypeError):
            SpanSink.dropped += 1  # a hostile or broken actor
            return
        self._tracer.relay(spans, str(actor))


def trace_host(node: Any, oid: int, provider: Any = None) -> None:
    """Trace ``node``'s calls (the host's) with ``provider``, or the global
    one if the application has configured it; take its actors' spans at ``oid``."""
    provider = provider or host_provider()
    if provider is not None:
        node.tracer = OtelTracer(provider)
        node.export(SpanSink(node.tracer), "spans", oid=oid, actor=True)
