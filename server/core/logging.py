"""One log format for every line the server writes, its own and its libraries' (uvicorn's included).

`LOG_FORMAT=text`: `2026-11-24 13:10:51,060 INFO server.access [3f2a...]: POST /generate 200 12.3 ms`, the request
id in brackets on the lines written while serving a request. `LOG_FORMAT=json`: one JSON object per line with
`time` (UTC, ISO 8601), `level`, `logger`, `message`, `request_id` (null outside requests), plus `method`,
`route`, `status` and `duration_ms` on access lines and `exception` when a traceback is attached.

Everything goes through the root logger's one handler (stderr): uvicorn's loggers have no handlers of their own,
uvicorn's access log is off (`server.access` lines, written by `server.api.request_id`, replace it), and the
libraries' INFO chatter (Alembic's plugin and dialect lines, httpx's request lines) is hidden unless
`LOG_LEVEL=debug`.
"""

import json
import logging
import logging.config
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
ACCESS_FIELDS = ("method", "route", "status", "duration_ms")
TRACE = 5
LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}
CHATTY_LIBRARIES = ("alembic", "httpx", "httpcore", "filelock")

LogFormat = Literal["text", "json"]


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being served when it was written (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        entry.update({field: getattr(record, field) for field in ACCESS_FIELDS if hasattr(record, field)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII escapes keep every entry one line of valid JSON whatever a message holds (newlines, surrogates).
        return json.dumps(entry, default=str)


def log_config(level: str, log_format: LogFormat) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict, also what `uvicorn.run(log_config=...)` takes."""
    root_level = LEVELS[level]
    library_level = max(root_level, logging.WARNING) if root_level >= logging.INFO else root_level
    formatter = {"text": TextFormatter, "json": JsonFormatter}[log_format]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": {"()": formatter}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"level": root_level, "handlers": ["default"]},
        "loggers": {
            "uvicorn": {"level": root_level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": root_level},
            "uvicorn.access": {"handlers": [], "propagate": False},
            **{name: {"level": library_level} for name in CHATTY_LIBRARIES},
        },
    }


def configure(level: str, log_format: LogFormat) -> None:
    """Applies `log_config` to this process, and routes `warnings.warn` through the same handler."""
    logging.addLevelName(TRACE, "TRACE")
    logging.config.dictConfig(log_config(level, log_format))
    logging.captureWarnings(True)
