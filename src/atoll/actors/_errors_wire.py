"""Exceptions across the wire: raised remotely, re-raised here as their own type."""

from __future__ import annotations

import os
import pickle
import traceback
from types import TracebackType

from .._errors import RemoteError, RemoteTraceback
from ..transport._codec import dumps_main_by_value

_ATOLL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without its first frames in atoll's own code (how the call
    reached the method): the remote traceback starts in the user's code."""
    while tb is not None and tb.tb_next is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_ATOLL_DIR):
            break
        tb = tb.tb_next
    return tb


def pack_error(exc: BaseException, actor: str) -> bytes:
    """Serialize ``exc`` with its traceback text and the name of the actor."""
    text = "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
    try:
        exc_bytes: bytes | None = dumps_main_by_value(exc)
    except Exception:  # not picklable: it arrives as RemoteError, with its name and text
        exc_bytes = None
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return pickle.dumps((exc_bytes, type_name, str(exc), text, actor), protocol=5)


def unpack_error(payload: bytes) -> Exception:
    """Rebuild the exception packed by :func:`pack_error`.

    It comes back as its own type when that type can be unpickled here,
    otherwise as :class:`RemoteError`. Either way the remote traceback is the
    ``__cause__`` and a note names the actor.
    """
    exc_bytes, type_name, message, text, actor = pickle.loads(payload)
    exc: object = None
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
