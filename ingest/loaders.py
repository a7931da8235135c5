"""Turn files into `LoadedDoc`s: one loader function per format, picked by suffix from `LOADERS`.

Every loader returns the document text plus its structure (pages, heading sections, row groups)
as `Block`s, and maps every parser failure to a one-line `LoadError` the user sees next to the file.
Loaders count what they produce against the parse limits (`Budget`) so a bomb fails early; the
pipeline runs them in a worker process (ingest.isolate) that bounds their time and memory.
"""

import codecs
import csv
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import charset_normalizer
import docx
import pypdf
from bs4 import BeautifulSoup, NavigableString, Tag
from bs4.element import PreformattedString
from docx.opc.exceptions import PackageNotFoundError
from docx.table import Table
from markdown_it import MarkdownIt

from ingest.document import Block, LoadedDoc
from ingest.errors import LoadError
from ingest.limits import Budget, ParseLimits, check_zip

log = logging.getLogger(__name__)

SNIFF_BYTES = 8192  # how much of a file with an unknown suffix we look at to call it text or binary
CSV_ROWS_PER_BLOCK = 50  # row groups, so one chunk never spans a whole table
JSON_LINES_PER_BLOCK = 50
MB = 1 << 20  # "MB" in messages means MiB, matching MOERAG_MAX_FILE_MB * 2**20 bytes

CODE_SUFFIXES = frozenset(
    ".py .pyi .js .mjs .cjs .jsx .ts .tsx .java .kt .scala .c .h .cc .cpp .cxx .hpp .cs .go .rs"
    " .rb .php .pl .lua .r .jl .swift .m .sh .bash .zsh .ps1 .bat .sql .css .scss .vue .svelte"
    " .proto .graphql .cmake .mk .dockerfile .tf".split()
)
PLAIN_SUFFIXES = frozenset(
    ".txt .text .rst .adoc .org .log .yaml .yml .toml .ini .cfg .conf .properties .xml"
    " .tex .bib .srt .vtt .diff .patch".split()
)
BINARY_HINTS = {
    ".doc": "save it as .docx",
    ".xls": "export it as .csv",
    ".xlsx": "export it as .csv",
    ".ppt": "export it as PDF",
    ".pptx": "export it as PDF",
    ".odt": "save it as .docx",
}


def load_file(path: Path, *, max_bytes: int, limits: ParseLimits = ParseLimits()) -> LoadedDoc:
    """Load one file. Raises `LoadError` (never a library exception) when it cannot be used.

    Text, element and unpacked-size limits are checked here; time and memory are not (run it
    through ingest.isolate for those). MemoryError propagates, so the caller can name it.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise LoadError(f"cannot read file: {exc.strerror or exc}") from exc
    if not path.is_file():
        raise LoadError("not a regular file")
    if st.st_size > max_bytes:
        raise LoadError(
            f"too large ({st.st_size / MB:.1f} MB > limit {_num(max_bytes / MB)} MB;"
            " raise MOERAG_MAX_FILE_MB)"
        )
    if st.st_size == 0:
        raise LoadError("empty file")
    suffix = path.suffix.lower()
    loader = LOADERS.get(suffix)
    if loader is None:
        _reject_binary(path, suffix)
        loader = load_plain
    budget = Budget(limits)
    try:
        doc = loader(path, budget)
    except (LoadError, MemoryError):
        raise
    except OSError as exc:
        raise LoadError(f"cannot read file: {exc.strerror or exc}") from exc
    except Exception as exc:  # safety net: a loader must never let a parser exception escape
        raise LoadError(f"could not parse {suffix or 'file'}: {_short(exc)}") from exc
    budget.check_text(len(doc.text))
    return doc


def load_text(text: str, *, title: str, doc_type: str = "text") -> LoadedDoc:
    """An in-memory record (e.g. an evaluation corpus entry) as a document with one block."""
    return _doc(title, text, [(0, len(text), None, None)], doc_type, {})


# Plain text and source code


def load_plain(path: Path, budget: Budget) -> LoadedDoc:
    data = path.read_bytes()
    if not _looks_like_text(data[:SNIFF_BYTES]):  # e.g. a .ts that is an MPEG video, not TypeScript
        raise LoadError(f"binary content in a '{path.suffix.lower()}' file; expected text")
    text, encoding = _decode(data)
    doc_type = "code" if path.suffix.lower() in CODE_SUFFIXES else "text"
    return _doc(path.name, text, [(0, len(text), None, None)], doc_type, {"encoding": encoding})


def _reject_binary(path: Path, suffix: str) -> None:
    """Unknown suffix: look at the first bytes and refuse anything that is not text."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if not _looks_like_text(head):
        what = f"type '{suffix}'" if suffix else "(no extension)"
        hint = f"; {BINARY_HINTS[suffix]}" if suffix in BINARY_HINTS else ""
        raise LoadError(f"unsupported binary file {what}{hint}")


def _looks_like_text(head: bytes) -> bool:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        sample = head[: len(head) // 2 * 2].decode("utf-16", errors="replace")
    elif b"\x00" in head:
        return False
    else:
        sample = _sniff_decode(head)
        if sample is None:
            return False
    bad = sum(1 for ch in sample if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r\f\v\x1b"))
    return bad <= len(sample) * 0.05


def _sniff_decode(head: bytes) -> str | None:
    try:
        # incremental: the 8 KiB cut may split a multi-byte character
        return codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        best = charset_normalizer.from_bytes(head).best()
        return None if best is None else str(best)


def _decode(data: bytes) -> tuple[str, str]:
    """Bytes -> (text with "\\n" line ends, encoding name)."""
    if data.startswith(codecs.BOM_UTF8):
        text, encoding = data[3:].decode("utf-8", errors="replace"), "utf-8-sig"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text, encoding = data.decode("utf-16", errors="replace"), "utf-16"
    else:
        try:
            text, encoding = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = _detect(data)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text, encoding


def _detect(data: bytes) -> tuple[str, str]:
    results = list(charset_normalizer.from_bytes(data))
    if not results:
        raise LoadError("undecodable text (unknown encoding); convert it to UTF-8")
    best = results[0]
    # Short Western text is ambiguous between Latin code pages (cp1257 and cp1252 both "fit"
    # café); cp1252 is by far the most common legacy encoding, so it wins near-ties.
    for r in results:
        if (
            r.encoding in ("cp1252", "latin_1", "iso8859_15")
            and r.chaos <= best.chaos + 0.1
            and r.coherence >= best.coherence - 0.05
        ):
            best = r
            break
    return str(best), best.encoding


# Markdown: the raw markdown is the text; a block per heading section

_md = MarkdownIt("commonmark")
_FRONT_MATTER = re.compile(r"\A---\n.*?\n(---|\.\.\.)\n", re.S)


def load_markdown(path: Path, budget: Budget) -> LoadedDoc:
    text, encoding = _decode(path.read_bytes())
    # front matter would parse as a setext heading; blank it out (same line count) for parsing
    parse_text = text
    if m := _FRONT_MATTER.match(text):
        parse_text = "\n" * m.group(0).count("\n") + text[m.end() :]
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    headings: list[tuple[int, int, str]] = []  # (line, level, heading text)
    tokens = _md.parse(parse_text)
    for tok, inline in zip(tokens, tokens[1:]):
        # level 0 only: a "# x" inside a block quote or list is not a section of the document
        if tok.type == "heading_open" and tok.level == 0 and tok.map:
            title = _inline_plain(inline.children or [])
            if title:
                headings.append((tok.map[0], int(tok.tag[1]), title))

    spans, stack = [], []  # stack: [(level, heading text)]
    first = line_starts[headings[0][0]] if headings else len(text)
    spans.append((0, first, None, None))
    for i, (line, level, title) in enumerate(headings):
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        end = line_starts[headings[i + 1][0]] if i + 1 < len(headings) else len(text)
        spans.append((line_starts[line], end, None, " > ".join(t for _, t in stack)))

    h1 = next((t for _, level, t in headings if level == 1), None)
    return _doc(h1 or path.stem, text, spans, "markdown", {"encoding": encoding})


def _inline_plain(children: list) -> str:
    parts = []
    for child in children:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif child.children:
            parts.append(_inline_plain(child.children))
    return _squash("".join(parts))


# HTML: visible text with paragraph breaks; a block per heading section

_DROP_TAGS = ["script", "style", "noscript", "template", "nav", "footer", "head", "svg", "iframe"]
_BLOCK_TAGS = frozenset(
    "p div section article main aside header li ul ol dl dt dd blockquote figure figcaption form"
    " fieldset address table thead tbody tfoot caption details summary body html hr".split()
)
_HEADINGS = {f"h{n}": n for n in range(1, 7)}


def load_html(path: Path, budget: Budget) -> LoadedDoc:
    data = path.read_bytes()
    # Opening tags, counted in C before lxml builds a node for each: a page of a million empty
    # elements would cost gigabytes as a tree.
    budget.count(data.count(b"<") - data.count(b"</"), what="HTML elements")
    try:
        soup = BeautifulSoup(data, "lxml")
    except Exception as exc:
        raise LoadError(f"unreadable HTML: {_short(exc)}") from exc
    title = _squash(soup.title.get_text(" ")) if soup.title else ""
    for tag in soup.find_all(_DROP_TAGS):
        tag.decompose()
    for tag in soup.find_all(hidden=True):
        tag.decompose()

    pieces = _HtmlText()
    pieces.walk(soup.body or soup)
    pieces.flush()
    if not title:
        title = next((t for level, t in pieces.items if level == 1), "")

    text, spans = _sections(pieces.items)
    return _doc(title or path.stem, text, spans, "html", {})


class _HtmlText:
    """Walks a parsed page and collects (heading level or 0, text) paragraphs in order."""

    def __init__(self) -> None:
        self.items: list[tuple[int, str]] = []
        self.inline: list[str] = []

    def flush(self) -> None:
        lines = (_squash(line) for line in "".join(self.inline).split("\n"))
        para = "\n".join(line for line in lines if line)
        if para:
            self.items.append((0, para))
        self.inline = []

    def walk(self, node: Tag) -> None:
        for child in node.children:
            if isinstance(child, NavigableString):
                if not isinstance(child, PreformattedString):  # comments, doctype, CDATA
                    self.inline.append(str(child))
                continue
            if not isinstance(child, Tag):
                continue
            name = child.name
            if name in _HEADINGS:
                self.flush()
                if heading := _squash(child.get_text(" ")):
                    self.items.append((_HEADINGS[name], heading))
            elif name == "pre":
                self.flush()
                if pre := child.get_text().strip("\n"):
                    self.items.append((0, pre))
            elif name == "tr":
                self.flush()
                cells = [_squash(c.get_text(" ")) for c in child.find_all(["td", "th"])]
                if any(cells):
                    self.items.append((0, " | ".join(cells)))
            elif name == "br":
                self.inline.append("\n")
            elif name in _BLOCK_TAGS:
                self.flush()
                if name == "li":
                    self.inline.append("- ")
                self.walk(child)
                self.flush()
            else:
                self.walk(child)


# PDF: a block per page


def load_pdf(path: Path, budget: Budget) -> LoadedDoc:
    with _quiet_pypdf(), path.open("rb") as f:
        try:
            reader = pypdf.PdfReader(f)
            if reader.is_encrypted:
                _decrypt(reader)
            n_pages = len(reader.pages)
        except (LoadError, MemoryError):
            raise
        except Exception as exc:
            raise LoadError(f"corrupt PDF: {_short(exc)}") from exc

        pages: list[tuple[int, str]] = []  # (1-based page number, text)
        skipped: list[int] = []
        budget.count(n_pages, what="pages")  # before reading any: a page tree can claim millions
        for number in range(1, n_pages + 1):
            try:
                page_text = reader.pages[number - 1].extract_text() or ""
            except MemoryError:
                raise
            except Exception as exc:  # one broken page must not cost the whole file
                log.debug("%s: page %d unreadable: %s", path, number, exc)
                skipped.append(number)
                continue
            page_text = page_text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
            if page_text.strip():
                pages.append((number, page_text.strip()))
                budget.text(len(page_text))
        title = _pdf_title(reader)

    if not pages:
        if skipped:
            raise LoadError(f"corrupt PDF: no page could be read ({len(skipped)} failed)")
        raise LoadError("no text layer (image-only PDF; run OCR first)")
    text, spans = "", []
    for number, page_text in pages:
        start = len(text) + (2 if text else 0)
        text = f"{text}\n\n{page_text}" if text else page_text
        spans.append((start, len(text), number, None))
    metadata = {"pages": n_pages, "skipped_pages": skipped}
    return _doc(title or path.stem, text, spans, "pdf", metadata)


def _decrypt(reader: pypdf.PdfReader) -> None:
    try:
        ok = reader.decrypt("")  # many PDFs only carry an owner password
    except Exception as exc:  # unsupported algorithm, missing crypto backend
        raise LoadError(f"encrypted PDF (cannot decrypt: {_short(exc)})") from exc
    if not ok:
        raise LoadError("encrypted PDF (password required)")


def _pdf_title(reader: pypdf.PdfReader) -> str:
    try:  # metadata is optional decoration: unreadable metadata must not fail the file
        meta = reader.metadata
        raw = meta.title if meta else None
    except Exception:
        return ""
    if not isinstance(raw, str):
        return ""
    title = _squash(raw.replace("\x00", ""))
    title = re.sub(r"^Microsoft (Word|PowerPoint) - ", "", title)
    if not title or len(title) > 200 or title.lower() in ("untitled", "title", "document"):
        return ""
    return title


@contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """pypdf logs a warning for every recoverable oddity in real-world files; keep errors only."""
    logger = logging.getLogger("pypdf")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


# DOCX: paragraphs and tables in order; a block per heading section


def load_docx(path: Path, budget: Budget) -> LoadedDoc:
    check_zip(path, budget.limits, kind=".docx")  # before python-docx inflates every part into memory
    try:
        document = docx.Document(str(path))
        items = list(_docx_items(document, budget))
    except (LoadError, MemoryError):
        raise
    except PackageNotFoundError as exc:  # not a zip, or a zip without a Word document in it
        raise LoadError("corrupt .docx: not a Word document package") from exc
    except Exception as exc:  # zipfile.BadZipFile, lxml XMLSyntaxError, KeyError, ...
        raise LoadError(f"corrupt .docx: {_short(exc)}") from exc
    core_title = _docx_core_title(document)

    styled_title = next((t for level, t in items if level == 0), None)
    styled_title = styled_title or next((t for level, t in items if level == 1), None)
    text, spans = _sections(items)
    return _doc(core_title or styled_title or path.stem, text, spans, "docx", {})


def _docx_items(document, budget: Budget) -> Iterator[tuple[int | None, str]]:
    """(heading level, text) per paragraph or table: 0 = "Title" style, None = body text."""
    for item in document.iter_inner_content():
        if isinstance(item, Table):
            rows = []
            for row in item.rows:
                cells, seen = [], set()
                for cell in row.cells:
                    budget.count(what="paragraphs and table cells")
                    if id(cell._tc) in seen:  # a merged cell is repeated once per grid column
                        continue
                    seen.add(id(cell._tc))
                    cells.append(_squash(cell.text))
                    budget.text(len(cells[-1]))
                if any(cells):
                    rows.append(" | ".join(cells))
            if rows:
                yield None, "\n".join(rows)
            continue
        budget.count(what="paragraphs and table cells")
        para = item.text.strip()
        budget.text(len(para))
        if para:
            yield _docx_heading_level(item), para


def _docx_heading_level(paragraph) -> int | None:
    name = (paragraph.style.name if paragraph.style is not None else "") or ""
    if name == "Title":
        return 0
    if m := re.fullmatch(r"heading\s*(\d)", name.strip(), re.I):
        return max(1, int(m.group(1)))
    return None


def _docx_core_title(document) -> str:
    try:
        return _squash(document.core_properties.title or "")
    except Exception:
        return ""


# CSV / TSV: one line per row, "column: value; ...", blocks of rows


def load_csv(path: Path, budget: Budget) -> LoadedDoc:
    raw, encoding = _decode(path.read_bytes())
    delimiter = "\t" if path.suffix.lower() == ".tsv" else None
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(raw[:SNIFF_BYTES], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    reader = csv.reader(io.StringIO(raw), delimiter=delimiter)
    rows = []
    try:
        for row in reader:
            budget.count(what="rows")
            if any(cell.strip() for cell in row):
                rows.append(row)
    except csv.Error as exc:
        raise LoadError(f"malformed CSV at line {reader.line_num}: {_short(exc)}") from exc
    if not rows:
        raise LoadError("no text found")
    header = [h.strip() or f"col{i + 1}" for i, h in enumerate(rows[0])]
    if len(rows) == 1:
        raise LoadError("no data rows (only a header)")

    lines = []
    for row in rows[1:]:
        fields = []
        for i, value in enumerate(row):
            if value := _squash(value):
                name = header[i] if i < len(header) else f"col{i + 1}"
                fields.append(f"{name}: {value}")
        lines.append("; ".join(fields))
    text, spans = _grouped_lines(lines, CSV_ROWS_PER_BLOCK)
    metadata = {"encoding": encoding, "columns": header, "rows": len(lines)}
    return _doc(path.stem, text, spans, "csv", metadata)


def _grouped_lines(lines: list[str], per_block: int) -> tuple[str, list[tuple]]:
    text = "\n".join(lines)
    spans, pos = [], 0
    for i in range(0, len(lines), per_block):
        group = "\n".join(lines[i : i + per_block])
        spans.append((pos, pos + len(group), None, None))
        pos += len(group) + 1
    return text, spans


# JSON / JSONL: "path.to.key: value" lines


def load_json(path: Path, budget: Budget) -> LoadedDoc:
    raw, encoding = _decode(path.read_bytes())
    try:
        data = json.loads(raw)
        entries = _json_entries(data, budget)
    except json.JSONDecodeError as exc:
        raise LoadError(f"invalid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from exc
    except RecursionError as exc:
        raise LoadError("invalid JSON: nested too deeply") from exc

    # one block per top-level entry, small neighbours merged so chunks are not tiny
    text, spans, group, group_lines = "", [], [], 0
    for key, lines in entries:
        if group and group_lines + len(lines) > JSON_LINES_PER_BLOCK:
            text = _add_group(text, spans, group)
            group, group_lines = [], 0
        group.append((key, lines))
        group_lines += len(lines)
    if group:
        text = _add_group(text, spans, group)
    return _doc(path.stem, text, spans, "json", {"encoding": encoding})


def _add_group(text: str, spans: list, group: list[tuple[str | None, list[str]]]) -> str:
    body = "\n".join(line for _, lines in group for line in lines)
    start = len(text) + (1 if text else 0)
    heading = group[0][0] if len(group) == 1 else None
    spans.append((start, start + len(body), None, heading))
    return f"{text}\n{body}" if text else body


def _json_entries(data, budget: Budget) -> list[tuple[str | None, list[str]]]:
    """Top-level entries as (key, rendered lines)."""
    if isinstance(data, dict) and data:
        return [(str(k), _json_lines(v, str(k), budget)) for k, v in data.items()]
    if isinstance(data, list) and data:
        return [(None, _json_lines(v, f"[{i}]", budget)) for i, v in enumerate(data)]
    return [(None, _json_lines(data, "", budget))]


def _json_lines(value, prefix: str, budget: Budget) -> list[str]:
    if isinstance(value, dict) and value:
        out = []
        for k, v in value.items():
            out += _json_lines(v, f"{prefix}.{k}" if prefix else str(k), budget)
        return out
    if isinstance(value, list) and value:
        out = []
        for i, v in enumerate(value):
            out += _json_lines(v, f"{prefix}[{i}]", budget)
        return out
    budget.count(what="JSON values")
    if isinstance(value, str):
        rendered = value.strip()
    else:
        rendered = json.dumps(value, ensure_ascii=False)  # null, true, 3.5, {}, []
    return [f"{prefix}: {rendered}" if prefix else rendered]


def load_jsonl(path: Path, budget: Budget) -> LoadedDoc:
    raw, encoding = _decode(path.read_bytes())
    text, spans = "", []
    for number, line in enumerate(raw.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            body = "\n".join(_json_lines(record, "", budget))
        except json.JSONDecodeError as exc:
            raise LoadError(f"invalid JSON on line {number}: {exc.msg}") from exc
        except RecursionError as exc:
            raise LoadError(f"invalid JSON on line {number}: nested too deeply") from exc
        start = len(text) + (2 if text else 0)
        text = f"{text}\n\n{body}" if text else body
        spans.append((start, len(text), None, None))
    return _doc(path.stem, text, spans, "jsonl", {"encoding": encoding, "records": len(spans)})


# Shared helpers


def _sections(items: list[tuple[int | None, str]]) -> tuple[str, list[tuple]]:
    """Paragraphs joined by blank lines, and a span per heading section with its heading path.

    `items` are (level, text): level 1-6 starts a section; 0 or None is body text.
    """
    text, spans, stack = "", [], []
    section_start, heading = 0, None
    for level, piece in items:
        start = len(text) + (2 if text else 0)
        if level:
            spans.append((section_start, start, None, heading))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, piece))
            section_start, heading = start, " > ".join(t for _, t in stack)
        text = f"{text}\n\n{piece}" if text else piece
    spans.append((section_start, len(text), None, heading))
    return text, spans


def _doc(
    title: str,
    text: str,
    spans: list[tuple[int, int, int | None, str | None]],
    doc_type: str,
    metadata: dict,
) -> LoadedDoc:
    """Build a LoadedDoc: spans are trimmed to their non-blank content and empty ones dropped."""
    if not text.strip():
        raise LoadError("no text found")
    blocks = []
    for start, end, page, heading in spans:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start < end:
            blocks.append(Block(start, end, page=page, heading=heading))
    assert all(a.end <= b.start for a, b in zip(blocks, blocks[1:])), "blocks overlap"
    return LoadedDoc(title=title, text=text, blocks=blocks, doc_type=doc_type, metadata=metadata)


def _squash(s: str) -> str:
    return " ".join(s.split())


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    msg = lines[0] if lines else type(exc).__name__
    return msg if len(msg) <= 120 else msg[:117] + "..."


def _num(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


LOADERS: dict[str, Callable[[Path, Budget], LoadedDoc]] = {
    **{s: load_plain for s in sorted(PLAIN_SUFFIXES | CODE_SUFFIXES)},
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".html": load_html,
    ".htm": load_html,
    ".xhtml": load_html,
    ".pdf": load_pdf,
    ".docx": load_docx,
    ".csv": load_csv,
    ".tsv": load_csv,
    ".json": load_json,
    ".jsonl": load_jsonl,
    ".ndjson": load_jsonl,
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(sorted(LOADERS))
