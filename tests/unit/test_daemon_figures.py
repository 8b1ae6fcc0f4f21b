"""The CPU figure `vfmctl status` shows: measured between two looks at the same process."""

from __future__ import annotations

import subprocess
import sys
import time

from kernel.figures import DaemonFigures


def test_a_busy_process_shows_cpu_between_two_looks_and_from_the_first():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        figures = DaemonFigures(min_window_s=0.2)
        first = figures.read(busy.pid)
        time.sleep(0.5)
        second = figures.read(busy.pid)
    finally:
        busy.kill()
        busy.wait()
    assert first["cpu_percent"] > 5 and second["cpu_percent"] > 5
    assert first["rss_mb"] > 0 and second["uptime_s"] >= first["uptime_s"] > 0


def test_a_gone_process_reads_zeros():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert DaemonFigures().read(gone.pid) == {"rss_mb": 0.0, "cpu_percent": 0.0, "uptime_s": 0.0}
