"""Document bytes to structured blocks: text, Markdown, HTML, PDF, CSV and JSON/JSONL records."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePosixPath

from vfmos_runtime.convert import DOCUMENT_KIND_ALIASES
from vfmos_runtime.errors import InvalidArgument
from services.data.chunking import Block

KINDS = ("text", "markdown", "html", "pdf", "csv", "json")
_ALIASES = DOCUMENT_KIND_ALIASES  # clients map them to the wire's enum the same way
_EXTENSIONS = {
    ".txt": "text", ".text": "text", ".log": "text", ".rst": "text", ".org": "text",
    ".md": "markdown", ".markdown": "markdown", ".mdx": "markdown",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".pdf": "pdf", ".csv": "csv", ".tsv": "csv",
    ".json": "json", ".jsonl": "json", ".ndjson": "json",
}
# Formats we cannot read, named so the error says what the file is.
_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
          b"PK\x03\x04": "a ZIP archive (docx/xlsx?)", b"\x1f\x8b": "gzip data",
          b"\x7fELF": "an executable", b"\xd0\xcf\x11\xe0": "an old Office document",
          b"SQLite format 3": "an SQLite database"}
# Stray control characters beyond this share mean binary, not text with a few odd bytes.
_MAX_CONTROL_SHARE = 0.01
_MAX_BAD_UTF8_SHARE = 0.005
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


@dataclass
class Document:
    """A parsed document: its kind, a title when it names one, and its blocks in order."""

    kind: str
    title: str
    blocks: list[Block]


def normalise_kind(kind: str | None) -> str | None:
    if not kind:
        return None
    kind = kind.strip().lower().lstrip(".")
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise InvalidArgument(f"unknown document kind {kind!r}; use one of {', '.join(KINDS)}")
    return kind


def detect_kind(source: str, data: bytes) -> str:
    """The kind named by the source's extension, else sniffed from the content."""
    suffix = PurePosixPath(source.split("?")[0].split("#")[0]).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    head = data[:2048].lstrip()
    if head.startswith(b"%PDF-"):
        return "pdf"
    lower = head.lower()
    if lower.startswith((b"<!doctype html", b"<html")) or b"<body" in lower:
        return "html"
    if head[:1] in (b"{", b"[") and _looks_like_json(data):
        return "json"
    if re.search(rb"(?m)^#{1,6} \S", head) or re.search(rb"(?m)^```", head):
        return "markdown"
    return "text"


def _looks_like_json(data: bytes) -> bool:
    first = data.lstrip().split(b"\n", 1)[0]
    for candidate in (first, data):
        try:
            json.loads(candidate)
            return True
        except (ValueError, UnicodeDecodeError):
            pass
    return False


def decode_text(data: bytes) -> str:
    """UTF-8 (or UTF-16 with a BOM) text, refusing binary content with a clear message."""
    for magic, what in _MAGIC.items():
        if data.startswith(magic):
            raise InvalidArgument(f"content is {what}, not a document kind we can read")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            raise InvalidArgument("content has a UTF-16 mark but does not decode") from None
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            # A few stray Latin-1 bytes in a UTF-8 file are common; more is another encoding
            # or binary, and guessing would index garbage.
            text = data.decode("utf-8", errors="replace")
            if text.count("\ufffd") > max(1, len(text) * _MAX_BAD_UTF8_SHARE):
                raise InvalidArgument("content is not UTF-8 text (binary or another encoding);"
                                      " convert it to UTF-8 first") from None
    sample = text[:200_000]
    if len(_CONTROL.findall(sample)) > max(1, len(sample) * _MAX_CONTROL_SHARE):
        raise InvalidArgument("content looks binary (control characters), not text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse(data: bytes, source: str, kind: str | None = None) -> Document:
    """Parse one document; InvalidArgument when it is empty, binary or malformed."""
    if not data or not data.strip():
        raise InvalidArgument(f"{source}: the document is empty")
    kind = normalise_kind(kind) or detect_kind(source, data)
    if kind == "pdf":
        doc = parse_pdf(data)
    else:
        text = decode_text(data)
        doc = _TEXT_PARSERS[kind](text)
    if not any(b.text.strip() for b in doc.blocks):
        raise InvalidArgument(f"{source}: no text found in this {kind} document")
    return doc


# plain text and Markdown
def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def parse_text(text: str) -> Document:
    return Document("text", "", [Block(p) for p in _paragraphs(text)])


_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


class _MarkdownState:
    """The heading path and paragraph being built while reading Markdown lines."""

    def __init__(self, joiner: str = "\n"):
        self.path: list[tuple[int, str]] = []
        self.blocks: list[Block] = []
        self.lines: list[str] = []
        self.joiner = joiner

    def flush(self) -> None:
        text = self.joiner.join(self.lines).strip()
        if text:
            self.blocks.append(Block(text, tuple(t for _, t in self.path)))
        self.lines = []

    def heading(self, level: int, title: str) -> None:
        self.flush()
        self.path = [(lv, t) for lv, t in self.path if lv < level] + [(level, title)]


def parse_markdown(text: str) -> Document:
    """Paragraphs and fenced code under their heading path (ATX and setext headings)."""
    state, fence = _MarkdownState(), None
    lines = _strip_front_matter(text).split("\n")
    for i, line in enumerate(lines):
        if fence:
            state.lines.append(line)
            if line.strip().startswith(fence):
                fence = None
                state.flush()
            continue
        if (m := _FENCE.match(line)):
            state.flush()
            fence = m.group(1)
            state.lines.append(line)
        elif (m := _ATX.match(line)):
            state.heading(len(m.group(1)), m.group(2))
        elif _SETEXT.match(line) and len(state.lines) == 1 and state.lines[0].strip():
            title, state.lines = state.lines[0].strip(), []
            state.heading(1 if line.strip()[0] == "=" else 2, title)
        elif not line.strip():
            state.flush()
        else:
            state.lines.append(line)
    state.flush()
    first = next((b.headings[0] for b in state.blocks if b.headings), "")
    return Document("markdown", first, state.blocks)


def _strip_front_matter(text: str) -> str:
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if 0 < end < 4096:
            return text[end + 4:]
    return text


# HTML
_SKIP = {"script", "style", "noscript", "template", "svg", "head"}
_BREAKS = {"p", "div", "section", "article", "li", "ul", "ol", "br", "tr", "table", "pre",
           "blockquote", "dd", "dt", "figcaption", "header", "footer", "main", "aside", "hr",
           "form", "nav"}
_HEADINGS = {f"h{i}": i for i in range(1, 7)}


class _HTMLText(HTMLParser):
    """Visible text in paragraphs under the heading path; script and style dropped."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        # Text nodes join without a space: "<b>re</b>fund" is one word.
        self.state = _MarkdownState(joiner="")
        self.title = ""
        self._skip = 0
        self._in_title = False
        self._heading: tuple[int, list[str]] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in _HEADINGS:
            self.state.flush()
            self._heading = (_HEADINGS[tag], [])
        elif tag in _BREAKS:
            self.state.flush()

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in _HEADINGS and self._heading:
            level, words = self._heading
            self._heading = None
            title = " ".join(" ".join(words).split())
            if title:
                self.state.heading(level, title)
        elif tag in _BREAKS:
            self.state.flush()

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif self._skip:
            return
        elif self._heading is not None:
            self._heading[1].append(data)
        else:
            self.state.lines.append(data)


def parse_html(text: str) -> Document:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    parser.state.flush()
    blocks = [Block(" ".join(b.text.split()), b.headings) for b in parser.state.blocks]
    return Document("html", " ".join(parser.title.split()), blocks)


# PDF
def parse_pdf(data: bytes) -> Document:
    """Text of each page (pypdf), paragraphs by blank lines, the page number on each."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise InvalidArgument("the PDF is encrypted with a password")
        title = str((reader.metadata or {}).get("/Title") or "").strip()
        blocks = []
        for number, page in enumerate(reader.pages, start=1):
            text = (page.extract_text() or "").replace("\r\n", "\n")
            blocks += [Block(_unwrap(p), page=number) for p in _paragraphs(text)]
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001
        # Malformed PDFs make pypdf raise nearly anything (KeyError, struct.error, zlib.error,
        # RecursionError...): each is the document's fault, not ours.
        raise InvalidArgument(f"cannot read the PDF: {type(exc).__name__}: {exc}") from None
    return Document("pdf", title, blocks)


def _unwrap(paragraph: str) -> str:
    # PDF text breaks at every line end; joining a hyphenated word back keeps it searchable.
    return re.sub(r"-\n(?=[a-z])", "", paragraph).replace("\n", " ")


# records
def _render(record: dict, prefix: str = "") -> list[str]:
    """`field: value` lines, nested fields dotted, so a chunk keeps its field names."""
    lines = []
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines += _render(value, name + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                lines += _render(item, f"{name}[{i}].")
        elif value is not None and value != "":
            shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            lines.append(f"{name}: {shown}")
    return lines


def _record_block(number: int, value) -> Block:
    if isinstance(value, dict):
        text = "\n".join(_render(value))
    else:
        text = str(value) if not isinstance(value, (list, tuple)) else json.dumps(value)
    return Block(text, record=number)


def parse_csv(text: str) -> Document:
    """One record per row, with the header's field names; TSV and ; too (sniffed)."""
    sample = text[:16384]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        # Ragged rows defeat the sniffer; the header line still shows the delimiter.
        header = sample.split("\n", 1)[0]
        dialect = csv.excel_tab if header.count("\t") > header.count(",") else csv.excel
    csv.field_size_limit(64 << 20)  # process-wide, but the default 128 KiB refuses real files
    rows = csv.reader(io.StringIO(text), dialect)
    try:
        header = [h.strip() or f"column{i + 1}" for i, h in enumerate(next(rows, []))]
        blocks = []
        for number, row in enumerate(rows, start=1):
            if any(cell.strip() for cell in row):
                names = header + [f"column{i + 1}" for i in range(len(header), len(row))]
                blocks.append(_record_block(number, dict(zip(names, row))))
    except csv.Error as exc:
        raise InvalidArgument(f"malformed CSV: {exc}") from None
    return Document("csv", "", blocks)


def parse_json(text: str) -> Document:
    """A JSON array (or an object holding one array of objects) or JSONL: one record each."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return _parse_jsonl(text)
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list) and v
                 and all(isinstance(x, dict) for x in v)]
        value = lists[0] if len(lists) == 1 else [value]
    if not isinstance(value, list):
        value = [value]
    return Document("json", "", [_record_block(i, v) for i, v in enumerate(value, start=1)
                                 if v not in (None, "", {}, [])])


def _parse_jsonl(text: str) -> Document:
    blocks = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            blocks.append(_record_block(number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"malformed JSON (line {number}: {exc.msg})") from None
    return Document("json", "", blocks)


_TEXT_PARSERS = {"text": parse_text, "markdown": parse_markdown, "html": parse_html,
                 "csv": parse_csv, "json": parse_json}
