"""Logging: one JSON object per line on stderr (or plain text).

Log UIDs, AE titles, counts and reasons; never patient names, IDs or birth dates. The filter
below drops any ``extra`` field whose name looks like a patient attribute, as a safety net.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_FORBIDDEN = ("patient", "birth", "accession", "address", "phone")

#: Libraries whose INFO and DEBUG lines would drown the node's own: only their warnings and
#: errors reach the log. pynetdicom logs every PDU with dataset summaries, highdicom some 16
#: INFO lines per job as it builds the SEG, SR and key image, the JPEG decoders theirs at DEBUG.
QUIET_LIBRARIES = ("pynetdicom", "highdicom", "pylibjpeg", "openjpeg", "PIL", "apscheduler",
                   "alembic")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _RESERVED or key.startswith("_"):
                continue
            if any(word in key.lower() for word in _FORBIDDEN):
                continue
            out[key] = value if isinstance(value, (str, int, float, bool, type(None))) \
                else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", json_format: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
