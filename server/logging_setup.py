"""Process logging: plain text lines, or one JSON object per line for log collectors (`log_format`)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Literal

from .request_context import RequestIdFilter

# attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON object
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"  # `-`: not about one request


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", ...the record's `extra` fields, "exception"?} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: Literal["text", "json"], level: int = logging.INFO) -> None:
    """One handler on the root logger (uvicorn's loggers propagate to it when it runs with log_config=None)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
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
