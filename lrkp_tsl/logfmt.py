"""The node's log lines: human-readable text by default, one JSON object per line on
request (`log_format = "json"`), for log shippers that index fields.

A record may carry structured fields in `extra`: a call's summary does
(`extra={"call_summary": {...}}`, traffic.py); the JSON form merges them into the object,
the text form shows only the message, which already says the same in words.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("call_summary",)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            fields = getattr(record, name, None)
            if isinstance(fields, dict):
                line.update(fields)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str, form: str) -> None:
    """Log to stderr at `level` ("info"...), as `form` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
