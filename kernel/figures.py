"""Resource figures of a daemon process (RSS, CPU, uptime) read with psutil."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

ZEROS = {"rss_mb": 0.0, "cpu_percent": 0.0, "uptime_s": 0.0}


@dataclass
class _Sample:
    create_time: float    # tells a reused pid from the process we sampled
    cpu_s: float          # user + system seconds so far
    at: float             # monotonic time of the sample
    percent: float        # the figure this sample gave


class DaemonFigures:
    """Figures of the daemons `vfmctl status` lists. CPU percent needs two looks at the
    same process, so the last look at each pid is kept: the figure is the CPU used between
    two calls (at least `min_window_s` apart), and on the first call the average since the
    process started. (A fresh psutil.Process per call always reads 0%.)"""

    def __init__(self, min_window_s: float = 0.5, clock=time.monotonic, keep: int = 256):
        self.min_window_s, self.clock, self.keep = min_window_s, clock, keep
        self._last: dict[int, _Sample] = {}

    def read(self, pid: int) -> dict[str, float]:
        """RSS in MB, CPU percent and uptime; zeros when the pid is gone."""
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                times, created = proc.cpu_times(), proc.create_time()
                rss = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            self._last.pop(pid, None)
            return dict(ZEROS)
        now, cpu_s = self.clock(), times.user + times.system
        return {"rss_mb": rss / 2**20, "cpu_percent": self._percent(pid, created, cpu_s, now),
                "uptime_s": max(0.0, time.time() - created)}

    def _percent(self, pid: int, created: float, cpu_s: float, now: float) -> float:
        last = self._last.get(pid)
        if last is not None and last.create_time == created:
            if now - last.at < self.min_window_s:
                return last.percent  # too short a window to say anything new
            percent = 100 * (cpu_s - last.cpu_s) / (now - last.at)
        else:
            percent = 100 * cpu_s / max(time.time() - created, 1e-3)
        self._last.pop(pid, None)
        self._last[pid] = _Sample(created, cpu_s, now, max(0.0, percent))
        while len(self._last) > self.keep:  # pids of services long gone
            del self._last[next(iter(self._last))]
        return self._last[pid].percent
