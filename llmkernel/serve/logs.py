"""The server's log: JSON lines on stderr, one handler for llmk's and uvicorn's loggers, PII masked.

Used by `llmk serve` (server.py) and by every Ray Serve replica (ray_backend.py).
"""

from __future__ import annotations

import json
import logging
import sys

from llmkernel.serve.security import PiiMasker


class JsonLines(logging.Formatter):
    """One JSON object per line; messages that are JSON already (access log, alerts) pass through."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if message.startswith("{"):
            return message
        line = {"time": round(record.created, 3), "level": record.levelname.lower(), "message": message}
        if getattr(record, "request_id", None):
            line["request_id"] = record.request_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["error"] = record.exc_text.splitlines()[-1]
        return json.dumps(line, ensure_ascii=False)


class MaskPii(logging.Filter):
    """Masks PII in warnings and errors and their tracebacks, which might quote a request (an error message
    with a piece of the prompt); the access log masks its prompt preview itself, and info lines are the
    server's own ("Uvicorn running on http://127.0.0.1:8000" keeps its address), as are records logged with
    `extra={"own": True}` (the bind-address warning). A filter on the handler, not on loggers, so that
    records of every logger that reaches it are masked (a logger's filters do not see its children's)."""

    def __init__(self, masker: PiiMasker) -> None:
        super().__init__()
        self.masker = masker

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "own", False):
            return True
        record.msg, record.args = self.masker.mask(record.getMessage()), ()
        if record.exc_info:
            record.exc_text = self.masker.mask(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def setup_logging(pii_types: list[str]) -> logging.Handler:
    """JSON lines on stderr, PII masked, for the server's loggers and uvicorn's (one handler for all)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    handler.addFilter(MaskPii(PiiMasker(pii_types)))
    for name in ("llmkernel.serve", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return handler
