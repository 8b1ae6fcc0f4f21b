"""Parsers: each document kind to blocks; empty, binary and malformed input refused clearly."""

from __future__ import annotations

import pytest

from libvfm.errors import InvalidArgument
from services.data.parsers import decode_text, detect_kind, parse


def make_pdf(pages: list[str], title: str = "") -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page (pypdf cannot write
    text, and a checked-in binary would hide what the test feeds in)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", ""]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents "
                       f"{len(objects)} 0 R /Resources << /Font << /F1 {{font}} >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    font = f"{len(objects)} 0 R"
    objects.append(f"<< /Title ({title}) >>")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body.replace('{font}', font)}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info {len(objects)} 0 R >>\n"
            f"startxref\n{xref}\n%%EOF\n").encode()
    return out


def test_plain_text_paragraphs():
    doc = parse(b"First paragraph\nstill first.\n\n\nSecond one.\n", "notes.txt")
    assert doc.kind == "text"
    assert [b.text for b in doc.blocks] == ["First paragraph\nstill first.", "Second one."]


def test_markdown_atx_setext_front_matter_and_fences():
    md = (b"---\ntitle: x\n---\nManual\n======\n\nHello.\n\nSetup\n-----\n\n"
          b"```sh\n# a comment, not a heading\n\nmake\n```\n\n### Deep ###\n\nDeep text.\n")
    doc = parse(md, "m.md")
    assert doc.title == "Manual"
    assert [(b.text, b.headings) for b in doc.blocks] == [
        ("Hello.", ("Manual",)),
        ("```sh\n# a comment, not a heading\n\nmake\n```", ("Manual", "Setup")),
        ("Deep text.", ("Manual", "Setup", "Deep"))]


def test_html_drops_script_and_style_and_keeps_headings():
    html = (b"<!DOCTYPE html><html><head><title>Shop &amp; Co</title><style>p{color:red}"
            b"</style></head><body><script>var secret = 1;</script><h1>Help</h1>"
            b"<p>We ship <b>fast</b>ly.</p><h2>Returns</h2><ul><li>Within 30 days</li>"
            b"<li>Unused items</li></ul><noscript>enable js</noscript></body></html>")
    doc = parse(html, "page")  # no extension: sniffed
    assert doc.kind == "html" and doc.title == "Shop & Co"
    assert [(b.text, b.headings) for b in doc.blocks] == [
        ("We ship fastly.", ("Help",)), ("Within 30 days", ("Help", "Returns")),
        ("Unused items", ("Help", "Returns"))]
    assert "secret" not in str(doc) and "color" not in str(doc)


def test_pdf_text_carries_page_numbers():
    doc = parse(make_pdf(["Alpha page text.", "Beta page text."], title="Specs"), "s.bin")
    assert doc.kind == "pdf" and doc.title == "Specs"
    assert [(b.text, b.page) for b in doc.blocks] == [("Alpha page text.", 1),
                                                      ("Beta page text.", 2)]


def test_broken_pdf_and_pdf_without_text_are_refused():
    with pytest.raises(InvalidArgument, match="PDF"):
        parse(b"%PDF-1.4\nthis is not really a pdf", "x.pdf")
    with pytest.raises(InvalidArgument, match="no text"):
        parse(make_pdf([""]), "blank.pdf")


def test_csv_rows_become_records_with_field_names():
    doc = parse(b"name;city\nAna;Oslo\n\nBen;Rome\n", "people.csv")
    assert [(b.text, b.record) for b in doc.blocks] == [("name: Ana\ncity: Oslo", 1),
                                                        ("name: Ben\ncity: Rome", 3)]
    tsv = parse(b"a\tb\n1\t2\t3\n", "t.tsv")
    assert tsv.blocks[0].text == "a: 1\nb: 2\ncolumn3: 3"


def test_json_array_object_and_jsonl_records():
    arr = parse(b'[{"id": 1, "tags": ["x", "y"], "who": {"name": "Ana"}}, {"id": 2}]', "a.json")
    assert [b.text for b in arr.blocks] == ["id: 1\ntags: x, y\nwho.name: Ana", "id: 2"]
    wrapped = parse(b'{"count": 2, "items": [{"q": "a"}, {"q": "b"}]}', "w.json")
    assert [(b.text, b.record) for b in wrapped.blocks] == [("q: a", 1), ("q: b", 2)]
    lines = parse(b'{"q": "a"}\n\n{"q": "b"}\n', "l.jsonl")
    assert [(b.text, b.record) for b in lines.blocks] == [("q: a", 1), ("q: b", 3)]
    with pytest.raises(InvalidArgument, match="line 2"):
        parse(b'{"q": "a"}\n{"q": \n', "bad.jsonl")


def test_kind_from_extension_then_content():
    assert detect_kind("https://x.org/a.MD?x=1", b"") == "markdown"
    assert detect_kind("blob", b"%PDF-1.7 ...") == "pdf"
    assert detect_kind("blob", b'  {"a": 1}') == "json"
    assert detect_kind("blob", b"[1] Introduction, not JSON") == "text"
    assert detect_kind("blob", b"intro\n\n## Usage\n") == "markdown"
    assert parse(b"# Not a heading here", "x", kind="text").kind == "text"
    with pytest.raises(InvalidArgument, match="unknown document kind"):
        parse(b"hello", "x", kind="docx")


def test_empty_and_whitespace_documents_are_refused():
    for data in (b"", b"  \n\t\n"):
        with pytest.raises(InvalidArgument, match="empty"):
            parse(data, "e.txt")
    with pytest.raises(InvalidArgument, match="no text"):
        parse(b"<html><script>x()</script></html>", "e.html")


def test_binary_garbage_is_refused_with_what_it_is():
    with pytest.raises(InvalidArgument, match="PNG"):
        parse(b"\x89PNG\r\n\x1a\n" + bytes(100), "img.txt")
    garbage = bytes((i * 37 + 11) % 256 for i in range(5000))
    with pytest.raises(InvalidArgument, match="not UTF-8|binary"):
        parse(garbage, "g.txt")
    with pytest.raises(InvalidArgument, match="binary"):
        parse(b"abc\x00\x01\x02def" * 100, "nul.txt")


def test_text_decoding_tolerates_a_stray_byte_and_utf16_with_bom():
    assert decode_text("caf\u00e9 ".encode() * 300 + b"\xe9").startswith("caf\u00e9")
    assert decode_text("hello".encode("utf-16")) == "hello"
    assert decode_text(b"a\r\nb\rc") == "a\nb\nc"
