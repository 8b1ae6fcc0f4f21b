"""Cutting parsed documents into retrieval chunks that follow their structure and sentences."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

# MiniLM reads at most 256 word pieces and English runs ~1.3 pieces a word, so ~180 words
# (~240 tokens) is as much of a chunk as the embedder actually sees.
TARGET_WORDS = 180
# A paragraph up to this long stays whole even past the target: splitting it costs context.
MAX_WORDS = 240
# Bounds on characters too, for text with few spaces (URLs, base64, minified code).
MAX_CHARS = 2400
MAX_WORD_CHARS = 200
# Records are usually short; more than a few per chunk and a hit no longer points at one.
MAX_RECORDS = 6

# A sentence ends at . ! ? (plus closing quotes/brackets) before a space and what looks like
# a new sentence's start, so "e.g. this" and "3.5 kg" do not end one.
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9])")


@dataclass(frozen=True)
class Block:
    """One structural unit from a parser: a paragraph, a code block or a record."""

    text: str
    headings: tuple[str, ...] = ()   # the heading path above it, outermost first
    page: int | None = None          # 1-based PDF page
    record: int | None = None        # 1-based record number (CSV row, JSON item)


@dataclass(frozen=True)
class Chunk:
    """A piece of a document to index, with where it came from."""

    index: int
    text: str
    headings: tuple[str, ...] = ()
    page: int | None = None
    records: tuple[int, int] | None = None  # first and last record number in the chunk

    @property
    def words(self) -> int:
        return len(self.text.split())


def sentences(text: str) -> list[str]:
    """The sentences of a paragraph, each stripped; the text itself if it has no ends."""
    out, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        piece = text[start:match.end()].strip()
        if piece:
            out.append(piece)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _word_windows(text: str, max_words: int, max_chars: int) -> Iterator[str]:
    """Consecutive runs of whole words (words longer than MAX_WORD_CHARS are cut first),
    each within both limits: the last resort for a sentence that is too long."""
    window: list[str] = []
    chars = 0
    for match in re.finditer(r"\S+", text):
        word = match.group()
        for cut in range(0, len(word), MAX_WORD_CHARS):
            piece = word[cut:cut + MAX_WORD_CHARS]
            if window and (len(window) >= max_words or chars + len(piece) + 1 > max_chars):
                yield " ".join(window)
                window, chars = [], 0
            window.append(piece)
            chars += len(piece) + 1
    if window:
        yield " ".join(window)


def _fits(text: str, max_words: int) -> bool:
    # Counting words of a 5 MB line would be wasted work once its length rules it out.
    return len(text) <= MAX_CHARS and len(text.split()) <= max_words


def units(text: str, target: int = TARGET_WORDS, limit: int = MAX_WORDS) -> Iterator[str]:
    """The atomic pieces a block packs as: the block itself when small enough, else its
    sentences, and only a sentence too long on its own is cut between words."""
    if _fits(text, limit):
        yield text.strip()
        return
    for sentence in sentences(text):
        if _fits(sentence, limit):
            yield sentence
        else:
            yield from _word_windows(sentence, target, MAX_CHARS)


class _Packer:
    """Greedy packing of units into chunks that share a heading path and page."""

    def __init__(self, target: int):
        self.target = target
        self.chunks: list[Chunk] = []
        self._parts: list[str] = []
        self._words = 0
        self._chars = 0
        self._key: tuple = ()
        self._records: list[int] = []

    def add(self, text: str, key: tuple, record: int | None, same_block: bool) -> None:
        words = len(text.split())
        full = (self._words + words > self.target or self._chars + len(text) > MAX_CHARS
                or (record is not None and len(self._records) >= MAX_RECORDS))
        if self._parts and (key != self._key or full):
            self.flush()
        self._key = key
        if self._parts:
            # Sentences of one paragraph stay one paragraph; blocks stay apart.
            self._parts.append(" " if same_block else "\n\n")
        self._parts.append(text)
        self._words += words
        self._chars += len(text) + 2
        if record is not None:
            self._records.append(record)

    def flush(self) -> None:
        if not self._parts:
            return
        headings, page, _ = self._key
        records = (self._records[0], self._records[-1]) if self._records else None
        self.chunks.append(Chunk(index=len(self.chunks), text="".join(self._parts),
                                 headings=headings, page=page, records=records))
        self._parts, self._words, self._chars, self._records = [], 0, 0, []


def chunk_blocks(blocks: list[Block], target: int = TARGET_WORDS,
                 limit: int = MAX_WORDS) -> list[Chunk]:
    """Pack blocks into chunks of about `target` words. A chunk never spans two heading
    paths or pages; records are joined only with records, a few at most."""
    packer = _Packer(target)
    for block in blocks:
        if not block.text.strip():
            continue
        is_record = block.record is not None
        key = (block.headings, block.page, is_record)
        # A record that must be split keeps its number on every piece.
        for n, piece in enumerate(units(block.text, target, limit)):
            if piece:
                packer.add(piece, key, block.record, same_block=n > 0)
        if is_record and not _fits(block.text, limit):
            packer.flush()  # the pieces of one big record are not mixed with the next record
    packer.flush()
    return packer.chunks
