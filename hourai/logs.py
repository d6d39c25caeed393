"""Logging: the daemon's own log (text or JSON lines) and per-function log files.

Each function's stdout/stderr lines go to ``<state>/logs/<function>.log``, rotated by size
(one ``.1`` kept), which ``hourai logs`` reads through the control API.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import IO

from hourai.daemon import Observer

MAX_LOG_BYTES = 10 * 1024 * 1024


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_daemon_logging(log_format: str = "text", verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


class FunctionLogs(Observer):
    """Appends each function's output lines to its own file, rotating by size."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        self._files: dict[str, IO[str]] = {}

    def path(self, function: str) -> Path:
        return self.directory / f"{function}.log"

    def function_output(self, function: str, tag: str, line: str) -> None:
        f = self._files.get(function)
        if f is None:
            f = self._files[function] = open(self.path(function), "a", buffering=1)  # noqa: SIM115
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{tag}] {line}\n")
        if f.tell() > MAX_LOG_BYTES:
            f.close()
            del self._files[function]
            self.path(function).replace(self.path(function).with_suffix(".log.1"))

    def read(self, function: str, offset: int = 0, limit: int = 1 << 20) -> tuple[str, int]:
        """Text from `offset` (bytes) on, and the offset to continue from."""
        try:
            with open(self.path(function), "rb") as f:
                size = f.seek(0, 2)
                if offset > size:  # rotated under the reader: start again
                    offset = 0
                f.seek(offset)
                data = f.read(limit)
        except FileNotFoundError:
            return "", 0
        return data.decode("utf-8", "replace"), offset + len(data)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
