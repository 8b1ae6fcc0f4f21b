"""Daemon logging: stderr, or a size-bounded rotating file ($VFM_LOG_FILE), and a rate limit
for lines a stranger can cause, so nobody fills the disk by sending garbage."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
HANDLER_NAME = "vfmos"                # ours, so a second setup replaces it and nothing else


@dataclass
class LogSettings:
    """Shared by every daemon through the environment (`vfmctl up` sets them), since a log
    file is how a daemon is run, not what it does."""
    file: Path | None = None          # $VFM_LOG_FILE: rotate there; None = stderr
    max_mb: float = 16.0              # $VFM_LOG_MAX_MB: one file's size before it rotates
    backups: int = 3                  # $VFM_LOG_BACKUPS: rotated files kept (NAME.log.1 ...)

    def validate(self) -> None:
        if not 0 < self.max_mb <= 10_000:
            raise ValueError("VFM_LOG_MAX_MB must be between 0 and 10000")
        if not 0 <= self.backups <= 100:
            raise ValueError("VFM_LOG_BACKUPS must be between 0 and 100")


def log_settings(env: Mapping[str, str] | None = None) -> LogSettings:
    from vfmos_runtime.config import load_config

    return load_config(LogSettings, argparse.Namespace(), env, prefix="VFM_LOG_")


def setup_logging(level: str = "INFO", settings: LogSettings | None = None) -> None:
    settings = settings or LogSettings()
    if settings.file is None:
        handler: logging.Handler = logging.StreamHandler()
    else:
        handler = logging.handlers.RotatingFileHandler(
            settings.file, maxBytes=int(settings.max_mb * 2**20),
            backupCount=settings.backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.captureWarnings(True)  # library warnings go through the bounded file too


class RateLimitedLog:
    """At most one line per `every_s` for an event anyone can trigger; the line counts what
    was left out since the last one."""

    def __init__(self, log: logging.Logger, every_s: float = 10.0, clock=time.monotonic):
        self.log, self.every_s, self.clock = log, every_s, clock
        self._next = 0.0
        self._held = 0

    def warning(self, message: str, *args) -> None:
        now = self.clock()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self.every_s
        suffix = f" (and {held} more like it in the last {self.every_s:g}s)" if held else ""
        self.log.warning(message + suffix, *args)


__all__ = ["LogSettings", "RateLimitedLog", "log_settings", "setup_logging"]
