"""Structured logging: JSON lines for machines, a readable console when a person is watching.

Every event about a frame is bound to ``file``, ``sha256``, ``target`` and ``filter`` (see
:func:`frame_logger`).
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any, TextIO, cast

import structlog

get_logger = structlog.get_logger


class _CurrentStream:
    """Writes to whatever ``sys.<name>`` is at the time, so a replaced or captured stream is followed."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _stream(self) -> IO[str]:
        stream: IO[str] = getattr(sys, self.name)
        return stream

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def flush(self) -> None:
        self._stream().flush()

    def isatty(self) -> bool:
        return self._stream().isatty()


def configure(stream: IO[str] | None = None, *, level: str = "info", json: bool | None = None) -> None:
    """Route structlog events to ``stream`` (the current stdout by default).

    ``json=None`` picks JSON unless the stream is a terminal.
    """
    if stream is None or stream is sys.stdout:
        stream = _CurrentStream("stdout")  # type: ignore[assignment]
    elif stream is sys.stderr:
        stream = _CurrentStream("stderr")  # type: ignore[assignment]
    assert stream is not None
    if json is None:
        json = not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, stream)),
        cache_logger_on_first_use=False,
    )


def display_name(name: str) -> str:
    """A file name as text for logs, tables and the store: bytes that are not UTF-8 (which the file system
    allows and ``os`` gives as surrogates) shown as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def frame_logger(file: str, sha256: str, target: str | None = None, filter: str | None = None) -> Any:
    """A logger bound to one frame's identity."""
    return structlog.get_logger().bind(file=file, sha256=sha256, target=target, filter=filter)
