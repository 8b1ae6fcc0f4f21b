"""Where a streamed answer may be cut into checked windows: the one rule the kernel (which cuts
the windows) and vfm-trustd (which releases them) share, so that a window the kernel sends is
a window the trust service lets out.

A window ends at a sentence's end. The first window of an answer may also end after an
opening word (a closed list of words that begin sentences and are never part of a name) or
after any plain lowercase word, so the first words reach the client without waiting for a
whole sentence; a later run without a sentence end is cut the same way once `WINDOW_CHARS`
wait. A boundary counts only once the whitespace after it has arrived: until then the word
may still go on ("The" may become "Theodore", "call 555" a phone number), so a name, a
number or an address is never split.
"""

from __future__ import annotations

import re

WINDOW_CHARS = 120
_SENTENCE_END = re.compile(r"[.!?;:](?=\s)|\n")
_PLAIN_WORD = re.compile(r"(?<!\S)[a-z][a-z']*,?(?=\s)")
OPENERS = ("A", "An", "As", "At", "Certainly", "For", "Here", "Hi", "Hello", "However", "I",
           "If", "In", "It", "No", "Of", "Oh", "On", "Once", "Our", "Please", "So", "Sorry",
           "Sure", "Thank", "Thanks", "That", "The", "There", "These", "This", "To", "Unfortunately",
           "We", "Well", "What", "When", "Yes", "You", "Your")
_OPENER_WORD = r"\s*(?:%s),?" % "|".join(OPENERS)
_OPENER = re.compile(_OPENER_WORD + r"(?=\s)")
_OPENER_ONLY = re.compile(_OPENER_WORD + r"\s+")


def window_end(text: str, start: int, first: bool) -> int:
    """Where the next window of `text` ends (> start), or `start` when none is complete yet."""
    end = start
    for match in _SENTENCE_END.finditer(text, start):
        end = match.end()
    if first or len(text) - end >= WINDOW_CHARS:
        if first and end == 0 and (opener := _OPENER.match(text)):
            end = opener.end()
        for match in _PLAIN_WORD.finditer(text, end):
            end = match.end()
    return end


def opener_only(window: str) -> bool:
    """Whether a window is one opening word and the white space after it ("The ", "Sure, "):
    a word of a closed list that is never part of a name, a number or a secret, so the kernel
    may let it out before vfm-trustd has seen it (the next check reads the answer from its
    start)."""
    return _OPENER_ONLY.fullmatch(window) is not None
