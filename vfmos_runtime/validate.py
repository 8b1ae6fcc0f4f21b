"""Boundary checks of request fields (numbers, times, enums): a bad one is refused by name.

Daemons check what arrives on the wire before domain code turns it into dates, counts or
enum names (where a NaN or a year-10^12 timestamp would otherwise escape as a ValueError
and read INTERNAL); clients run the same checks on their arguments before sending them.
"""

from __future__ import annotations

import math

from vfmos_runtime.errors import InvalidArgument
from vfmos_runtime.protocol import MAX_EMBED_CHARS, MAX_EMBED_TEXTS

# Times every part can turn into a date: unix seconds from 1970 up to the year 3000.
MAX_UNIX_S = 32_503_680_000
# A Duration longer than this (a year) is a mistake, not a setting.
MAX_DURATION_S = 366 * 24 * 3600
# Results one search or recall may ask for (0 = the service's default).
MAX_RESULTS = 1000


def unix_seconds(value: float, field: str) -> float:
    """`value` if it is 0 (unset) or a usable time in unix seconds."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidArgument(f"{field} must be unix seconds (a number), got {value!r}")
    if value and not (math.isfinite(value) and 0 < value <= MAX_UNIX_S):
        raise InvalidArgument(f"{field} must be unix seconds between 1970 and the year 3000 "
                              f"(0 = unset), got {value!r}")
    return float(value)


def time_field(msg, field: str, name: str = "") -> float:
    """Unix seconds of the Timestamp field `field` of `msg`; 0 when unset."""
    if not msg.HasField(field):
        return 0.0
    ts = getattr(msg, field)
    label = name or field
    if not 0 <= ts.nanos <= 999_999_999:
        raise InvalidArgument(f"{label} has nanos {ts.nanos}: they must be 0..999999999")
    if not 0 <= ts.seconds <= MAX_UNIX_S:
        raise InvalidArgument(f"{label} must be a time between 1970 and the year 3000, "
                              f"got {ts.seconds} s")
    return ts.seconds + ts.nanos / 1e9


def duration_field(msg, field: str, max_s: float = MAX_DURATION_S) -> float:
    """Seconds of the Duration field `field` of `msg`; 0 when unset; never negative."""
    if not msg.HasField(field):
        return 0.0
    d = getattr(msg, field)
    if d.seconds < 0 or d.nanos < 0 or d.nanos > 999_999_999 or d.seconds > max_s:
        raise InvalidArgument(f"{field} must be a duration of 0..{max_s:g} s, "
                              f"got {d.seconds} s {d.nanos} ns")
    return d.seconds + d.nanos / 1e9


def integer(value: int, field: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be {low}..{high}, got {value}")
    return value


def number(value: float, field: str, low: float, high: float) -> float:
    """A finite float in [low, high] (NaN and infinities are refused)."""
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(f"{field} must be a number in {low:g}..{high:g}, got {value}")
    return value


def embed_texts(texts) -> list[str]:
    """The texts of an Embed call: 1 .. MAX_EMBED_TEXTS, none blank or over MAX_EMBED_CHARS."""
    if not 1 <= len(texts) <= MAX_EMBED_TEXTS:
        raise InvalidArgument(f"texts must hold 1..{MAX_EMBED_TEXTS} texts, got {len(texts)}")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidArgument(f"texts[{i}] is empty")
        if len(text) > MAX_EMBED_CHARS:
            raise InvalidArgument(f"texts[{i}] is longer than {MAX_EMBED_CHARS} characters")
    return list(texts)


def pid(value: int, field: str = "pid") -> int:
    if value <= 0:
        raise InvalidArgument(f"{field} must be a process id (>= 1), got {value}")
    return value


def enum_field(enum, value: int, field: str) -> int:
    """`value` if it is one of `enum`'s numbers (0, unset, included)."""
    if value not in enum.DESCRIPTOR.values_by_number:
        raise InvalidArgument(f"{field} has no value {value}; use one of "
                              f"{', '.join(v.name for v in enum.DESCRIPTOR.values)}")
    return value


# A bearer token's limits (TokenLimits): beyond these a value is a mistake, not a setting.
# A key's cost is counted in billionths of the cost unit in 64 bits, hence its lower bound.
MAX_KEY_TOKENS = 10**15
MAX_KEY_COST = 10**9
MAX_KEY_REQUESTS_PER_MINUTE = 1_000_000
MAX_KEY_CONCURRENT = 100_000


def token_limits(limits):
    """`limits` (a TokenLimits) if every field is 0 (no limit) or a sane positive value."""
    for name, high in (("max_tokens", MAX_KEY_TOKENS),
                       ("requests_per_minute", MAX_KEY_REQUESTS_PER_MINUTE),
                       ("max_concurrent", MAX_KEY_CONCURRENT)):
        value = getattr(limits, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise InvalidArgument(f"{name} must be a whole number 0..{high} (0 = unlimited), "
                                  f"got {value!r}")
    cost = limits.cost_budget
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or \
            not (math.isfinite(cost) and 0 <= cost <= MAX_KEY_COST):
        raise InvalidArgument(f"cost_budget must be a number 0..{MAX_KEY_COST} (0 = unlimited), "
                              f"got {cost!r}")
    return limits
