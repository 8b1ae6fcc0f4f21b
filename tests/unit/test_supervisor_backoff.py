"""The supervisor's restart backoff: short after a run that lasted, doubling while a daemon
keeps dying young, never above the cap."""

from __future__ import annotations

from vfmctl.supervisor import FIRST_DELAY_S, MAX_DELAY_S, STABLE_S, next_delay


def test_backoff_doubles_while_a_daemon_dies_young_up_to_the_cap():
    delay, seen = 0.0, []
    for _ in range(10):
        delay = next_delay(delay, ran_s=1.0)
        seen.append(delay)
    assert seen[:4] == [FIRST_DELAY_S, 2 * FIRST_DELAY_S, 4 * FIRST_DELAY_S, 8 * FIRST_DELAY_S]
    assert max(seen) == MAX_DELAY_S == seen[-1]


def test_a_run_that_lasted_starts_the_backoff_afresh():
    assert next_delay(MAX_DELAY_S, ran_s=STABLE_S) == FIRST_DELAY_S


def test_up_shows_what_this_start_logged_not_the_last_runs_stopping(tmp_path):
    from vfmctl.daemons import _last_line, _size

    log = tmp_path / "vfmd.log"
    log.write_text("2026-12-01 vfmos INFO serving\n2026-12-01 vfmos INFO stopping\n")
    since = {log: _size(log)}                       # taken before the supervisor starts it
    assert _last_line(log, since=since) == ""       # nothing new yet: no stale line
    with open(log, "a") as f:
        f.write("2026-12-01 vfmd INFO loading\n")
    assert _last_line(log, since=since) == "2026-12-01 vfmd INFO loading"
    assert _last_line(tmp_path / "missing.log", log) == "2026-12-01 vfmd INFO loading"
