"""Process logging: plain text lines, or one JSON object per line for log collectors (`log_format`)."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from typing import Literal

from .request_context import RequestIdFilter

# attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON object
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"  # `-`: not about one request


CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # what could end or forge a line, or hide text


def escape_controls(text: str) -> str:
    """Control characters as visible escapes (a newline as \\x0a): a client's value (a path, a name, a header) can
    never start a forged log line or write a NUL."""
    return CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


class TextFormatter(logging.Formatter):
    """One line per record: the message's control characters escaped (the traceback that may follow is ours)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", ...the record's `extra` fields, "exception"?} on one line (json.dumps
    escapes every control character)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # private attributes are libraries' own (importing ray adds `_ray_timestamp_ns` to every record)
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: Literal["text", "json"], level: int = logging.INFO) -> None:
    """One handler on the root logger (uvicorn's loggers propagate to it when it runs with log_config=None)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())  # every line names its request (JSON: a "request_id" field)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if log_format == "json":
        # transformers writes progress bars ("Loading weights") and its log lines to stderr itself, and Python
        # warnings go there too: as plain text, which log collectors cannot parse. Bars off, the rest through us.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        logging.captureWarnings(True)
