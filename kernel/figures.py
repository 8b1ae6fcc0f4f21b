"""Resource figures of a daemon process (RSS, CPU, uptime) read with psutil."""

from __future__ import annotations

import time

import psutil


def daemon_figures(pid: int) -> dict[str, float]:
    """RSS in MB, CPU percent since the last call and uptime; zeros when the pid is gone."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return {"rss_mb": proc.memory_info().rss / 2**20,
                    "cpu_percent": proc.cpu_percent(interval=None),
                    "uptime_s": time.time() - proc.create_time()}
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return {"rss_mb": 0.0, "cpu_percent": 0.0, "uptime_s": 0.0}
