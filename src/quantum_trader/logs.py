"""Structured logging (structlog): console lines for people, JSON lines for machines (QT_LOG_JSON=1).

Services bind ``plan_id`` (and ``symbol``) to their logger for the life of a plan, so every line about one plan
can be found with one grep.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(*, json: bool = False, level: str = "info", service: str = "") -> None:
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso" if json else "%H:%M:%S", utc=True),
    ]
    if service:
        processors.insert(0, _add_service(service))
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _add_service(service: str) -> Any:
    def processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        return event

    return processor


class Log:
    """A structlog logger whose calls cannot raise: a log line is never the reason a service stops. The message
    is positional-only, so a field may be called anything (``event`` included: it is renamed ``event_``, as
    structlog keeps that name for the message); whatever goes wrong while logging (a field that cannot be
    rendered, a closed stream) is reported on stderr in one line, and the service goes on."""

    __slots__ = ("_log",)

    def __init__(self, log: Any) -> None:
        self._log = log

    def bind(self, **fields: Any) -> Log:
        return Log(self._log.bind(**_fields(fields)))

    def debug(self, message: str, /, **fields: Any) -> None:
        self._emit("debug", message, fields)

    def info(self, message: str, /, **fields: Any) -> None:
        self._emit("info", message, fields)

    def warning(self, message: str, /, **fields: Any) -> None:
        self._emit("warning", message, fields)

    def error(self, message: str, /, **fields: Any) -> None:
        self._emit("error", message, fields)

    def exception(self, message: str, /, **fields: Any) -> None:
        self._emit("exception", message, fields)

    def _emit(self, level: str, message: str, fields: dict[str, Any]) -> None:
        try:
            getattr(self._log, level)(message, **_fields(fields))
        except Exception as exc:
            with contextlib.suppress(Exception):
                sys.stderr.write(f"[log failed: {type(exc).__name__}: {exc}] {level}: {message!r}\n")


def _fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {("event_" if name == "event" else name): value for name, value in fields.items()}


def get(name: str = "qt") -> Log:
    return Log(structlog.get_logger(name))
