"""Dates in memories and questions: session timestamps, and the time window a question names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

MONTHS = {m: i + 1 for i, m in enumerate(
    "january february march april may june july august september october november december"
    .split())}
MONTHS.update({m[:3]: i for m, i in list(MONTHS.items())})
MONTHS["sept"] = 9
_MONTH = r"(january|february|march|april|may|june|july|august|september|october|november|" \
         r"december|jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec)"
_SESSION = re.compile(r"(\d{1,2}):(\d{2})\s*([ap]m)\s+on\s+(\d{1,2})\s+" + _MONTH +
                      r",?\s+(\d{4})", re.I)
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
            "seven": 7, "eight": 8, "nine": 9, "ten": 10, "few": 3, "couple of": 2,
            "several": 3}
_UNIT_DAYS = {"day": 1, "week": 7, "month": 30, "year": 365}
_WHEN = re.compile(r"^\s*(when|what (year|month|day|date|time)|how long (ago|has|had|have|did)|"
                   r"which (year|month|day)|in which (year|month))\b|\bhow long ago\b|"
                   r"\bwhat date\b|\bwhen\b", re.I)


@dataclass(frozen=True)
class TimeWindow:
    """A half-open interval [start, end) of UTC time."""

    start: datetime
    end: datetime

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    def distance_days(self, moment: datetime) -> float:
        """0 inside the window, else days to its nearest edge."""
        if moment < self.start:
            return (self.start - moment).total_seconds() / 86400
        if moment >= self.end:
            return (moment - self.end).total_seconds() / 86400
        return 0.0


def parse_session_date(text: str) -> datetime | None:
    """'1:56 pm on 8 May, 2023' (LoCoMo's session format) or an ISO date, as UTC; else None."""
    m = _SESSION.search(text)
    if m:
        hour, minute, half, day, month, year = m.groups()
        hour = int(hour) % 12 + (12 if half.lower() == "pm" else 0)
        return datetime(int(year), MONTHS[month.lower()], int(day), hour, int(minute),
                        tzinfo=timezone.utc)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def asks_when(question: str) -> bool:
    """Does the question ask for a time (its answer is a date, so the event turn matters)?"""
    return bool(_WHEN.search(question))


def _day(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _month_window(year: int, month: int) -> TimeWindow:
    start = datetime(year, month, 1, tzinfo=timezone.utc)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=timezone.utc)
    return TimeWindow(start, end)


def _year_window(year: int) -> TimeWindow:
    return TimeWindow(datetime(year, 1, 1, tzinfo=timezone.utc),
                      datetime(year + 1, 1, 1, tzinfo=timezone.utc))


def _relative(q: str, now: datetime) -> TimeWindow | None:
    today = _day(now)
    if re.search(r"\byesterday\b", q):
        return TimeWindow(today - timedelta(days=1), today)
    if re.search(r"\btoday\b", q):
        return TimeWindow(today, today + timedelta(days=1))
    m = re.search(r"\b(last|past|previous|this)\s+(week|month|year)\b", q)
    if m:
        return _calendar(m.group(1), m.group(2), now)
    m = re.search(r"\b(\d+|a|an|one|two|three|four|five|six|seven|eight|nine|ten|few|"
                  r"couple of|several)\s+(day|week|month|year)s?\s+ago\b", q)
    if m:
        count = int(m.group(1)) if m.group(1).isdigit() else _NUMBERS[m.group(1)]
        span = _UNIT_DAYS[m.group(2)]
        centre = today - timedelta(days=count * span)
        # "two weeks ago" is loose: a window one unit wide around the point named.
        half = timedelta(days=max(1, span // 2 + 1))
        return TimeWindow(centre - half, centre + half)
    return None


def _calendar(which: str, unit: str, now: datetime) -> TimeWindow:
    today = _day(now)
    if unit == "week":
        start = today - timedelta(days=today.weekday())
        if which != "this":
            return TimeWindow(start - timedelta(days=7), start)
        return TimeWindow(start, start + timedelta(days=7))
    if unit == "month":
        year, month = now.year, now.month
        if which != "this":
            year, month = (year - 1, 12) if month == 1 else (year, month - 1)
        return _month_window(year, month)
    return _year_window(now.year - (which != "this"))


def _absolute(q: str, now: datetime) -> TimeWindow | None:
    m = re.search(r"\b(\d{1,2})(?:st|nd|rd|th)?\s+" + _MONTH + r",?\s+(\d{4})\b", q) or \
        re.search(r"\b" + _MONTH + r"\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})\b", q)
    if m:
        a, b, year = m.groups()
        day, month = (a, b) if a.isdigit() else (b, a)
        try:
            start = datetime(int(year), MONTHS[month], int(day), tzinfo=timezone.utc)
        except ValueError:
            return None
        return TimeWindow(start, start + timedelta(days=1))
    m = re.search(r"\b" + _MONTH + r",?\s+(\d{4})\b", q)
    if m:
        return _month_window(int(m.group(2)), MONTHS[m.group(1)])
    # A bare month name; "may" is too often the verb, so it needs "in"/"of"/"during" before it.
    m = re.search(r"\b(?:in|of|during|since)\s+(?:early\s+|late\s+|mid\s+)?" + _MONTH + r"\b",
                  q) or re.search(r"\b(january|february|march|april|june|july|august|september|"
                                  r"october|november|december)\b", q)
    if m:
        month = MONTHS[m.group(1)]
        # The latest such month not after now: questions look back.
        year = now.year if month <= now.month else now.year - 1
        return _month_window(year, month)
    m = re.search(r"\b(19[5-9]\d|20\d\d)\b", q)
    if m:
        return _year_window(int(m.group(1)))
    return None


def question_window(question: str, now: datetime | None) -> TimeWindow | None:
    """The time a question is about ("last month", "in May 2023", "2022"), or None.

    Relative phrases need `now`; absolute dates are read without it (a bare month is taken
    as the latest one not after `now`)."""
    q = question.lower()
    if now is not None:
        window = _relative(q, now)
        if window is not None:
            return window
    return _absolute(q, now or datetime.now(timezone.utc))
