"""Daemon logs: a stranger's requests cost one line per window, and the file stays bounded."""

from __future__ import annotations

import logging

import pytest

from vfmos_runtime.config import ConfigError
from vfmos_runtime.logs import HANDLER_NAME, RateLimitedLog, log_settings, setup_logging


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_rate_limited_log_writes_one_line_per_window_and_counts_the_rest(caplog):
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t.limited"), every_s=10, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t.limited"):
        for _ in range(500):
            limited.warning("refused %s", "garbage")
        clock.now += 11
        limited.warning("refused %s", "garbage")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused garbage", "refused garbage (and 499 more like it in the last 10s)"]


def test_log_file_rotates_at_its_size_and_keeps_its_backups(tmp_path):
    path = tmp_path / "vfmd.log"
    setup_logging("INFO", log_settings({"VFM_LOG_FILE": str(path), "VFM_LOG_MAX_MB": "0.01",
                                        "VFM_LOG_BACKUPS": "2"}))
    try:
        for i in range(2000):
            logging.getLogger("t.rotate").info("line %d %s", i, "x" * 40)
    finally:
        for handler in [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]:
            logging.getLogger().removeHandler(handler)
            handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["vfmd.log", "vfmd.log.1", "vfmd.log.2"]
    assert all((tmp_path / f).stat().st_size <= 0.01 * 2**20 + 200 for f in files)


def test_bad_log_settings_name_the_variable():
    with pytest.raises(ConfigError, match="VFM_LOG_MAX_MB"):
        log_settings({"VFM_LOG_MAX_MB": "-1"})
