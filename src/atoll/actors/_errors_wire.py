"""Exceptions across the wire: raised remotely, re-raised here as their own type.

From a trusted peer an exception travels pickled, and comes back as its own
type where that type can be unpickled here. From an untrusted peer it travels
plain (never pickled): its type's name, message, traceback text and actor;
a builtin exception type is rebuilt from plain arguments, any other arrives
as :class:`~atoll.RemoteError`.
"""

from __future__ import annotations

import builtins
import os
import pickle
import traceback
from types import TracebackType

import msgspec

from .. import _errors
from .._errors import ProtocolError, RemoteError, RemoteTraceback
from ..transport._codec import dumps_main_by_value
from ..transport._plain import FIRST_BYTE, UNTRUSTED_MARKS

_ATOLL_ERRORS = frozenset({"SerializationError", "ProtocolError", "ActorClosedError"})
"""atoll's errors that an untrusted peer's plain error may be rebuilt as."""

_PlainArg = str | int | float | bool | None
_plain_error = msgspec.msgpack.Decoder(tuple[str, str, str, str, list[_PlainArg] | None])

_ATOLL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without its first frames in atoll's own code (how the call
    reached the method): the remote traceback starts in the user's code."""
    while tb is not None and tb.tb_next is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_ATOLL_DIR):
            break
        tb = tb.tb_next
    return tb


def pack_error(exc: BaseException, actor: str, *, plain: bool = False) -> bytes:
    """Serialize ``exc`` with its traceback text and the name of the actor
    (``plain``: without pickle, as an untrusted actor must)."""
    text = "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
    if plain:
        type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        args = None
        if type(exc).__module__ in ("builtins", "atoll._errors") and all(
            type(a) in (str, int, float, bool, type(None)) for a in exc.args
        ):
            args = list(exc.args)
        fields = (type_name, str(exc), text, actor, args)
        return bytes((FIRST_BYTE,)) + msgspec.msgpack.encode(fields)
    try:
        exc_bytes: bytes | None = dumps_main_by_value(exc)
    except Exception:  # not picklable: it arrives as RemoteError, with its name and text
        exc_bytes = None
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return pickle.dumps((exc_bytes, type_name, str(exc), text, actor), protocol=5)


def unpack_error(payload: bytes, src: bytes = b"") -> Exception:
    """Rebuild the exception packed by :func:`pack_error` in peer ``src``.

    It comes back as its own type when that type can be rebuilt here,
    otherwise as :class:`RemoteError`. Either way the remote traceback is the
    ``__cause__`` and a note names the actor. From an untrusted peer, only a
    plain one is read.
    """
    exc: object = None
    if payload[:1] == bytes((FIRST_BYTE,)) or src[:1] in UNTRUSTED_MARKS:
        if payload[:1] != bytes((FIRST_BYTE,)):
            return ProtocolError("an error from an untrusted peer is not plain: refused unread")
        try:
            type_name, message, text, actor, args = _plain_error.decode(payload[1:])
        except msgspec.DecodeError as exc2:
            return ProtocolError(f"a malformed error from an untrusted peer: {exc2}")
        exc = _builtin_exception(type_name, args)
        exc_bytes = None
    else:
        exc_bytes, type_name, message, text, actor = pickle.loads(payload)
    if exc_bytes is not None:
        try:
            exc = pickle.loads(exc_bytes)
        except Exception:
            exc = None
    if not isinstance(exc, Exception):
        exc = RemoteError(type_name, message, text, actor)
    exc.__cause__ = RemoteTraceback(text)
    if hasattr(exc, "add_note"):
        exc.add_note(f"(raised in actor {actor!r})")
    return exc


def _builtin_exception(type_name: str, args: list[_PlainArg] | None) -> Exception | None:
    """A builtin exception rebuilt from plain arguments, or None."""
    module, _, name = type_name.rpartition(".")
    if args is None:
        return None
    if module == "builtins":
        cls = getattr(builtins, name, None)
    elif module == "atoll._errors" and name in _ATOLL_ERRORS:
        cls = getattr(_errors, name)
    else:
        return None
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return None
    try:
        return cls(*args)
    except Exception:
        return None
