"""Chunking: heading paths kept, records grouped, sentences whole, huge lines cut safely."""

from __future__ import annotations

import re
import time

from services.data.chunking import (MAX_CHARS, MAX_RECORDS, MAX_WORDS, TARGET_WORDS, Block,
                                    chunk_blocks, sentences)
from services.data.parsers import parse


def _prose(n_sentences: int, words: int = 12, start: int = 0) -> str:
    return " ".join(f"Sentence {i} " + " ".join(f"w{i}x{j}" for j in range(words - 3)) + " end."
                    for i in range(start, start + n_sentences))


def test_sentences_split_at_ends_but_not_at_abbreviations_or_decimals():
    text = "We weigh 3.5 kg, e.g. flour. Then we bake! Is it done? \"Yes.\" Next step"
    assert sentences(text) == ["We weigh 3.5 kg, e.g. flour.", "Then we bake!", "Is it done?",
                               "\"Yes.\"", "Next step"]


def test_markdown_heading_path_is_kept_and_chunks_never_span_two_sections():
    md = ("# Guide\n\nIntro paragraph.\n\n## Refunds\n\nRefunds take 30 days.\n\n"
          "### Exceptions\n\nSale items are final.\n\n## Shipping\n\nParcels take a week.\n")
    chunks = chunk_blocks(parse(md.encode(), "g.md").blocks)
    by_text = {c.text: c.headings for c in chunks}
    assert by_text == {"Intro paragraph.": ("Guide",),
                       "Refunds take 30 days.": ("Guide", "Refunds"),
                       "Sale items are final.": ("Guide", "Refunds", "Exceptions"),
                       "Parcels take a week.": ("Guide", "Shipping")}
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_small_paragraphs_pack_together_up_to_the_target():
    blocks = [Block(_prose(2, start=2 * i)) for i in range(40)]  # 24 words each
    chunks = chunk_blocks(blocks)
    assert len(chunks) < len(blocks) / 3
    assert all(c.words <= TARGET_WORDS for c in chunks)
    assert sum(c.words for c in chunks) == sum(len(b.text.split()) for b in blocks)


def test_long_paragraph_splits_only_at_sentence_ends():
    text = _prose(100)  # 1200 words in one paragraph
    chunks = chunk_blocks([Block(text)])
    assert len(chunks) >= 1200 // MAX_WORDS
    for c in chunks:
        assert c.words <= MAX_WORDS and c.text.endswith("end.")
        assert re.match(r"Sentence \d+ ", c.text)
    assert " ".join(c.text for c in chunks) == text


def test_a_sentence_too_long_alone_is_cut_between_words():
    text = "word " * 1000 + "end."
    chunks = chunk_blocks([Block(text.strip())])
    assert all(c.words <= TARGET_WORDS for c in chunks)
    assert sum(c.words for c in chunks) == 1001


def test_records_group_a_few_per_chunk_with_field_names():
    rows = "\n".join(f"{i},Person {i},{20 + i}" for i in range(1, 21))
    chunks = chunk_blocks(parse(("id,name,age\n" + rows).encode(), "people.csv").blocks)
    assert len(chunks) == -(-20 // MAX_RECORDS)
    assert chunks[0].records == (1, MAX_RECORDS)
    assert chunks[-1].records[1] == 20
    assert "name: Person 1\nage: 21" in chunks[0].text


def test_a_big_record_keeps_its_number_and_is_not_mixed_with_the_next():
    blocks = [Block(_prose(60), record=1), Block("name: small", record=2)]
    chunks = chunk_blocks(blocks)
    assert [c.records for c in chunks[:-1]] == [(1, 1)] * (len(chunks) - 1)
    assert chunks[-1].records == (2, 2) and chunks[-1].text == "name: small"


def test_pages_are_never_mixed():
    chunks = chunk_blocks([Block("one.", page=1), Block("two.", page=2)])
    assert [(c.text, c.page) for c in chunks] == [("one.", 1), ("two.", 2)]


def test_five_megabyte_single_lines_are_split_safely_and_fast():
    spaced = " ".join(f"tok{i % 9973}" for i in range(700_000))  # ~5.5 MB, no sentence end
    solid = "A" * (5 << 20)                                        # 5 MB, not even a space
    for line in (spaced, solid):
        start = time.perf_counter()
        chunks = chunk_blocks(parse(line.encode(), "huge.txt").blocks)
        assert time.perf_counter() - start < 10
        assert all(len(c.text) <= MAX_CHARS and c.words <= MAX_WORDS for c in chunks)
        assert "".join(c.text.replace(" ", "") for c in chunks) == line.replace(" ", "")
