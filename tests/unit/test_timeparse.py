"""Session timestamps and the time windows questions name."""

from datetime import datetime, timezone

import pytest

from services.data.timeparse import asks_when, parse_session_date, question_window

NOW = datetime(2023, 10, 20, 15, 0, tzinfo=timezone.utc)  # a Friday


def utc(*args):
    return datetime(*args, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, expected", [
    ("1:56 pm on 8 May, 2023", utc(2023, 5, 8, 13, 56)),
    ("12:09 am on 13 September, 2023", utc(2023, 9, 13, 0, 9)),
    ("12:30 pm on 1 Jan, 2024", utc(2024, 1, 1, 12, 30)),
    ("2023-05-08T10:00:00", utc(2023, 5, 8, 10, 0)),
    ("not a date", None),
])
def test_session_dates(text, expected):
    assert parse_session_date(text) == expected


@pytest.mark.parametrize("question, start, end", [
    ("What did she do yesterday?", utc(2023, 10, 19), utc(2023, 10, 20)),
    ("What happened last month?", utc(2023, 9, 1), utc(2023, 10, 1)),
    ("What happened last week?", utc(2023, 10, 9), utc(2023, 10, 16)),
    ("Where did he go this year?", utc(2023, 1, 1), utc(2024, 1, 1)),
    ("What did Maria do in May 2023?", utc(2023, 5, 1), utc(2023, 6, 1)),
    ("What did Gina find on 1 February, 2023?", utc(2023, 2, 1), utc(2023, 2, 2)),
    ("Where was James on July 12, 2022?", utc(2022, 7, 12), utc(2022, 7, 13)),
    ("What did Melanie paint in 2022?", utc(2022, 1, 1), utc(2023, 1, 1)),
    # A bare month looks back: November is after now, so it is last year's.
    ("When did Melanie go camping in June?", utc(2023, 6, 1), utc(2023, 7, 1)),
    ("What did they do in November?", utc(2022, 11, 1), utc(2022, 12, 1)),
])
def test_question_windows(question, start, end):
    window = question_window(question, NOW)
    assert (window.start, window.end) == (start, end)


def test_ago_is_a_loose_window_around_the_point_named():
    window = question_window("What did he buy two weeks ago?", NOW)
    assert window.contains(utc(2023, 10, 6, 12))
    assert not window.contains(utc(2023, 9, 20))
    assert window.distance_days(utc(2023, 10, 25)) > 0


def test_no_window_where_none_is_named():
    assert question_window("What may Caroline research?", NOW) is None
    assert question_window("What is Caroline's identity?", NOW) is None


def test_asks_when():
    assert asks_when("When did Caroline go to the support group?")
    assert asks_when("How long ago was Caroline's 18th birthday?")
    assert not asks_when("What did Caroline research?")
