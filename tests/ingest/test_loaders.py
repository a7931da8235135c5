"""Loaders: what text, structure and titles a user gets from each format, and the reasons shown
for files that cannot be used."""

import json
from pathlib import Path

import docx
import pypdf
import pytest

from ingest.document import LoadedDoc
from ingest.errors import LoadError
from ingest.loaders import (
    LOADERS,
    SUPPORTED_SUFFIXES,
    load_file,
    load_text,
)

MAX = 50 << 20
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
SAMPLE_PDFS = SHARED / "eval" / "messy-docs" / "py-pdf-sample-files"


def check_blocks(doc: LoadedDoc) -> None:
    """The contract every loader keeps: blocks in order, inside the text, never blank."""
    assert doc.text.strip()
    assert doc.blocks
    prev_end = 0
    for b in doc.blocks:
        assert 0 <= b.start < b.end <= len(doc.text)
        assert b.start >= prev_end
        assert doc.text[b.start : b.end].strip()
        assert b.page is None or b.page >= 1
        prev_end = b.end


def load(path: Path) -> LoadedDoc:
    doc = load_file(path, max_bytes=MAX)
    check_blocks(doc)
    return doc


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def block_text(doc: LoadedDoc, i: int) -> str:
    return doc.text[doc.blocks[i].start : doc.blocks[i].end]


# Plain text and code


def test_plain_text_is_one_block_titled_by_file_name(tmp_path):
    doc = load(write(tmp_path, "notes.txt", "\n\nFirst line.\nSecond line.\n\n"))
    assert doc.title == "notes.txt"
    assert doc.doc_type == "text"
    assert len(doc.blocks) == 1
    assert block_text(doc, 0) == "First line.\nSecond line."


def test_source_code_is_loaded_as_code(tmp_path):
    doc = load(write(tmp_path, "setup.py", "def main():\n    return 42\n"))
    assert doc.doc_type == "code"
    assert doc.title == "setup.py"
    assert "return 42" in doc.text


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1"])
def test_legacy_western_encodings_decode_correctly(tmp_path, encoding):
    text = "Le café est très bon. Ça va, merci. Größe über alles, déjà vu.\n"
    if encoding == "cp1252":
        text += "Smart “quotes” – and an en dash.\n"
    doc = load(write(tmp_path, "legacy.txt", text.encode(encoding)))
    assert doc.text == text
    assert doc.metadata["encoding"] != "utf-8"


def test_utf8_bom_and_crlf_are_normalised(tmp_path):
    doc = load(write(tmp_path, "bom.txt", b"\xef\xbb\xbfHello\r\nWorld\r\n"))
    assert doc.text == "Hello\nWorld\n"
    assert doc.metadata["encoding"] == "utf-8-sig"


def test_utf16_with_bom(tmp_path):
    doc = load(write(tmp_path, "wide.txt", "Grüße aus Köln\n".encode("utf-16")))
    assert doc.text == "Grüße aus Köln\n"


def test_unknown_suffix_text_is_loaded_as_plain_text(tmp_path):
    doc = load(write(tmp_path, "changes.weird", "Release 1.2: fixed the index.\n"))
    assert "fixed the index" in doc.text
    doc = load(write(tmp_path, "Makefile", "all:\n\tpython -m build\n"))
    assert doc.title == "Makefile"


def test_unknown_binary_file_is_refused_with_its_suffix(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4
    with pytest.raises(LoadError, match=r"^unsupported binary file type '\.png'$"):
        load_file(write(tmp_path, "photo.PNG", png), max_bytes=MAX)
    with pytest.raises(LoadError, match="save it as .docx"):
        load_file(write(tmp_path, "old.doc", b"\xd0\xcf\x11\xe0" + b"\x00" * 600), max_bytes=MAX)


def test_binary_content_under_a_text_suffix_is_refused(tmp_path):
    video = b"G\x40\x00\x10\x00\x00\xb0\x0d" + b"\x00\xff" * 500  # an MPEG-TS, not TypeScript
    with pytest.raises(LoadError, match="binary content"):
        load_file(write(tmp_path, "clip.ts", video), max_bytes=MAX)


def test_too_large_file_is_refused_without_reading_it(tmp_path, monkeypatch):
    path = write(tmp_path, "big.txt", "x" * (3 << 20))

    def no_read(*args, **kwargs):
        raise AssertionError("the file was read")

    monkeypatch.setattr(Path, "read_bytes", no_read)
    monkeypatch.setattr(Path, "open", no_read)
    with pytest.raises(LoadError) as err:
        load_file(path, max_bytes=1 << 20)
    assert str(err.value) == "too large (3.0 MB > limit 1 MB; raise MOERAG_MAX_FILE_MB)"


def test_empty_and_blank_files(tmp_path):
    with pytest.raises(LoadError, match="^empty file$"):
        load_file(write(tmp_path, "empty.md", ""), max_bytes=MAX)
    with pytest.raises(LoadError, match="^no text found$"):
        load_file(write(tmp_path, "blank.txt", " \n\t\n "), max_bytes=MAX)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LoadError, match="cannot read file"):
        load_file(tmp_path / "nope.txt", max_bytes=MAX)
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(LoadError, match="not a regular file"):
        load_file(tmp_path / "dir.txt", max_bytes=MAX)


def test_load_text_gives_one_block_over_the_record():
    doc = load_text("  The answer is 42.\n", title="q17", doc_type="eval")
    check_blocks(doc)
    assert (doc.title, doc.doc_type) == ("q17", "eval")
    assert [block_text(doc, 0)] == ["The answer is 42."]
    with pytest.raises(LoadError):
        load_text("   ", title="blank")


# Markdown

MARKDOWN = """\
---
title: front matter
---
Intro before any heading.

# Guide

Welcome.

## Install

```bash
# this is a shell comment, not a heading
pip install moerag
```

### From source

Clone it.

Usage
-----

Run it.

# Appendix

> # quoted heading is not a section

The end.
"""


def test_markdown_sections_have_heading_paths(tmp_path):
    doc = load(write(tmp_path, "guide.md", MARKDOWN))
    assert doc.text == MARKDOWN  # raw markdown is kept
    assert doc.title == "Guide"
    assert doc.doc_type == "markdown"
    assert [b.heading for b in doc.blocks] == [
        None,
        "Guide",
        "Guide > Install",
        "Guide > Install > From source",
        "Guide > Usage",
        "Appendix",
    ]
    install = block_text(doc, 2)
    assert install.startswith("## Install")
    assert "# this is a shell comment" in install and "pip install moerag" in install
    assert block_text(doc, 0).startswith("---\ntitle: front matter")
    assert "quoted heading" in block_text(doc, 5)


def test_markdown_without_h1_is_titled_by_stem(tmp_path):
    doc = load(write(tmp_path, "faq.markdown", "## Why?\n\nBecause.\n"))
    assert doc.title == "faq"
    assert [b.heading for b in doc.blocks] == ["Why?"]


# HTML

HTML = """<!DOCTYPE html>
<html><head><title> The  Handbook </title><style>body { color: red }</style>
<script>var secret = "do not index";</script></head>
<body>
<nav><a href="/">Home</a> | <a href="/x">Menu link</a></nav>
<!-- a comment nobody sees -->
<p>Lead paragraph with <b>bold</b> and <a href="#">a link</a>.</p>
<h1>Handbook</h1>
<p>First para.</p><div>Second   para.</div>
<h2>Setup <small>v2</small></h2>
<ul><li>one</li><li>two</li></ul>
<script>alert("nope")</script>
<table><tr><th>Key</th><th>Value</th></tr><tr><td>port</td><td>8080</td></tr></table>
<h3>Details</h3><pre>line 1
  line 2</pre>
<h2>Other</h2><p>Line<br>break</p>
<noscript>enable js</noscript><div hidden>invisible</div>
<footer>Copyright footer</footer>
</body></html>
"""


def test_html_visible_text_and_heading_sections(tmp_path):
    doc = load(write(tmp_path, "page.html", HTML))
    assert doc.title == "The Handbook"
    for hidden in ("secret", "alert", "color: red", "Menu link", "comment", "enable js",
                   "invisible", "Copyright"):
        assert hidden not in doc.text
    assert "Lead paragraph with bold and a link." in doc.text
    assert "First para.\n\nSecond para." in doc.text
    assert "- one\n\n- two" in doc.text
    assert "Key | Value\n\nport | 8080" in doc.text
    assert "line 1\n  line 2" in doc.text
    assert "Line\nbreak" in doc.text
    assert [b.heading for b in doc.blocks] == [
        None,
        "Handbook",
        "Handbook > Setup v2",
        "Handbook > Setup v2 > Details",
        "Handbook > Other",
    ]
    assert block_text(doc, 2).startswith("Setup v2")


def test_html_title_falls_back_to_h1_then_stem(tmp_path):
    assert load(write(tmp_path, "a.htm", "<h1>Big  Title</h1><p>x</p>")).title == "Big Title"
    assert load(write(tmp_path, "b.htm", "<p>just text</p>")).title == "b"


def test_html_in_legacy_encoding(tmp_path):
    page = '<html><head><meta charset="windows-1252"></head><p>café – naïve</p></html>'
    doc = load(write(tmp_path, "old.html", page.encode("cp1252")))
    assert "café – naïve" in doc.text


# PDF


def make_pdf(path: Path, pages: list[str], *, title: str | None = None) -> Path:
    canvas = pytest.importorskip("reportlab.pdfgen.canvas")
    c = canvas.Canvas(str(path))
    if title is not None:
        c.setTitle(title)
    for page in pages:
        if page:
            c.drawString(72, 720, page)
        c.showPage()
    c.save()
    return path


def test_pdf_blocks_are_pages(tmp_path):
    pages = ["Alpha page text", "", "Gamma page text"]
    path = make_pdf(tmp_path / "r.pdf", pages, title="Q3 Report")
    doc = load(path)
    assert doc.title == "Q3 Report"
    assert doc.doc_type == "pdf"
    assert [b.page for b in doc.blocks] == [1, 3]  # the blank page gets no block
    assert block_text(doc, 0) == "Alpha page text"
    assert block_text(doc, 1) == "Gamma page text"
    assert doc.metadata["pages"] == 3


def test_pdf_with_junk_title_uses_stem(tmp_path):
    path = make_pdf(tmp_path / "scan-001.pdf", ["Some text"], title="untitled")
    assert load(path).title == "scan-001"


def test_pdf_bad_page_is_skipped_and_recorded(tmp_path, monkeypatch):
    path = make_pdf(tmp_path / "r.pdf", ["one", "two", "three"])
    real = pypdf.PageObject.extract_text

    def flaky(self, *args, **kwargs):
        text = real(self, *args, **kwargs)
        if "two" in text:
            raise KeyError("/Font")
        return text

    monkeypatch.setattr(pypdf.PageObject, "extract_text", flaky)
    doc = load(path)
    assert [b.page for b in doc.blocks] == [1, 3]
    assert doc.metadata["skipped_pages"] == [2]


def test_pdf_with_owner_password_only_loads_but_user_password_is_refused(tmp_path):
    src = make_pdf(tmp_path / "plain.pdf", ["Secret plans"])
    for user_password, name in [("", "owner-only.pdf"), ("hunter2", "locked.pdf")]:
        writer = pypdf.PdfWriter(clone_from=src)
        writer.encrypt(user_password=user_password, owner_password="owner", algorithm="AES-128")
        writer.write(tmp_path / name)
    assert "Secret plans" in load(tmp_path / "owner-only.pdf").text
    with pytest.raises(LoadError, match=r"^encrypted PDF \(password required\)$"):
        load_file(tmp_path / "locked.pdf", max_bytes=MAX)


@pytest.mark.parametrize(
    "content", [b"%PDF-1.7\n garbage garbage", b"not a pdf at all", b"%PDF-1.4\n" + b"\x00" * 64]
)
def test_corrupt_pdf(tmp_path, content):
    with pytest.raises(LoadError, match="^corrupt PDF: "):
        load_file(write(tmp_path, "bad.pdf", content), max_bytes=MAX)


def test_truncated_pdf_never_leaks_a_library_error(tmp_path):
    data = make_pdf(tmp_path / "ok.pdf", ["hello there", "page two"]).read_bytes()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 40):
        path = write(tmp_path, f"cut{cut}.pdf", data[:cut])
        try:
            check_blocks(load_file(path, max_bytes=MAX))
        except LoadError:
            pass


# The real-world sample set (py-pdf/sample-files), when the shared eval data is present

needs_samples = pytest.mark.skipif(not SAMPLE_PDFS.is_dir(), reason="shared PDF samples absent")
SENSIBLE = ("encrypted PDF", "no text layer", "corrupt PDF")


@needs_samples
def test_every_sample_pdf_loads_or_gives_a_sensible_reason():
    pdfs = sorted(SAMPLE_PDFS.rglob("*.pdf"))
    assert len(pdfs) >= 30
    loaded = 0
    for path in pdfs:
        try:
            doc = load_file(path, max_bytes=MAX)
        except LoadError as exc:
            assert str(exc).startswith(SENSIBLE), (path.name, str(exc))
            assert "\n" not in str(exc)
            continue
        check_blocks(doc)
        assert all(b.page is not None for b in doc.blocks), path.name
        assert doc.title and "\x00" not in doc.title
        loaded += 1
    assert loaded >= 20


@needs_samples
def test_sample_encrypted_image_only_and_multipage():
    with pytest.raises(LoadError, match=r"^encrypted PDF \(password required\)$"):
        load_file(next(SAMPLE_PDFS.glob("005-*/*.pdf")), max_bytes=MAX)
    with pytest.raises(LoadError, match=r"^no text layer \(image-only PDF; run OCR first\)$"):
        load_file(SAMPLE_PDFS / "019-grayscale-image" / "grayscale-image.pdf", max_bytes=MAX)
    doc = load(SAMPLE_PDFS / "004-pdflatex-4-pages" / "pdflatex-4-pages.pdf")
    assert [b.page for b in doc.blocks] == [1, 2, 3, 4]
    geo = load(SAMPLE_PDFS / "009-pdflatex-geotopo" / "GeoTopo-komprimiert.pdf")
    assert geo.title == "Geometrie und Topologie"
    assert geo.metadata["pages"] == 117
    assert geo.blocks[-1].page == 117


# DOCX


def make_docx(path: Path, *, core_title: str = "") -> Path:
    d = docx.Document()
    d.core_properties.title = core_title
    d.add_paragraph("Annual Review", style="Title")
    d.add_paragraph("Preface text.")
    d.add_heading("Results", level=1)
    d.add_paragraph("Revenue grew.")
    d.add_heading("By region", level=2)
    table = d.add_table(rows=2, cols=2)
    for r, row in enumerate([("Region", "Growth"), ("EMEA", "12%")]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    d.add_paragraph("After the table.")
    d.add_heading("Outlook", level=1)
    d.add_paragraph("")  # empty paragraphs are dropped
    d.add_paragraph("Steady.")
    d.save(path)
    return path


def test_docx_paragraphs_tables_and_heading_sections(tmp_path):
    doc = load(make_docx(tmp_path / "review.docx"))
    assert doc.doc_type == "docx"
    assert doc.title == "Annual Review"  # no core title: the Title-styled paragraph
    assert "Revenue grew." in doc.text
    assert "Region | Growth\nEMEA | 12%" in doc.text
    assert doc.text.index("Revenue grew.") < doc.text.index("EMEA") < doc.text.index("After")
    assert [b.heading for b in doc.blocks] == [
        None,
        "Results",
        "Results > By region",
        "Outlook",
    ]
    assert "EMEA | 12%" in block_text(doc, 2)
    assert block_text(doc, 3) == "Outlook\n\nSteady."


def test_docx_core_title_wins(tmp_path):
    assert load(make_docx(tmp_path / "r.docx", core_title="FY24 Review")).title == "FY24 Review"


@pytest.mark.parametrize("content", [b"this is not a zip", b"PK\x03\x04" + b"\x00" * 100])
def test_corrupt_docx(tmp_path, content):
    with pytest.raises(LoadError, match=r"^corrupt \.docx: "):
        load_file(write(tmp_path, "bad.docx", content), max_bytes=MAX)


def test_docx_zip_without_word_document(tmp_path):
    import zipfile

    path = tmp_path / "fake.docx"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(LoadError, match=r"^corrupt \.docx: "):
        load_file(path, max_bytes=MAX)


# CSV / TSV


def test_csv_rows_become_column_value_lines_in_row_blocks(tmp_path):
    rows = ["id,name,city"] + [f"{i},person {i},{'Oslo' if i % 2 else ''}" for i in range(1, 121)]
    doc = load(write(tmp_path, "people.csv", "\n".join(rows) + "\n"))
    lines = doc.text.split("\n")
    assert lines[0] == "id: 1; name: person 1; city: Oslo"
    assert lines[1] == "id: 2; name: person 2"  # empty cells are left out
    assert len(lines) == 120
    assert len(doc.blocks) == 3  # 50 + 50 + 20 rows
    assert block_text(doc, 1).split("\n")[0] == "id: 51; name: person 51; city: Oslo"
    assert all(b.heading is None and b.page is None for b in doc.blocks)
    assert doc.title == "people"
    assert doc.metadata["columns"] == ["id", "name", "city"]


def test_csv_delimiter_is_sniffed_and_quotes_respected(tmp_path):
    doc = load(write(tmp_path, "eu.csv", 'name;note\n"Smith; J.";"says ""hi"""\nDoe;ok\n'))
    assert doc.text == 'name: Smith; J.; note: says "hi"\nname: Doe; note: ok'


def test_tsv(tmp_path):
    doc = load(write(tmp_path, "t.tsv", "a\tb\n1\t2, 3\n"))
    assert doc.text == "a: 1; b: 2, 3"


def test_csv_header_only(tmp_path):
    with pytest.raises(LoadError, match="only a header"):
        load_file(write(tmp_path, "h.csv", "a,b,c\n"), max_bytes=MAX)


# JSON / JSONL


def test_json_is_rendered_as_key_paths(tmp_path):
    data = {"name": "moerag", "server": {"port": 8080, "tls": False, "hosts": ["a", "b"]},
            "owner": None, "tags": []}
    doc = load(write(tmp_path, "config.json", json.dumps(data)))
    assert doc.text.split("\n") == [
        "name: moerag",
        "server.port: 8080",
        "server.tls: false",
        "server.hosts[0]: a",
        "server.hosts[1]: b",
        "owner: null",
        "tags: []",
    ]
    assert doc.title == "config"


def test_json_big_top_level_entries_get_their_own_blocks(tmp_path):
    data = {"small": 1, "big": {f"k{i}": i for i in range(60)}, "tail": "x"}
    doc = load(write(tmp_path, "d.json", json.dumps(data)))
    assert [b.heading for b in doc.blocks] == ["small", "big", "tail"]
    assert block_text(doc, 1).startswith("big.k0: 0")


def test_json_list_of_records(tmp_path):
    doc = load(write(tmp_path, "l.json", json.dumps([{"q": "why"}, {"q": "how"}])))
    assert doc.text == "[0].q: why\n[1].q: how"


def test_invalid_json(tmp_path):
    with pytest.raises(LoadError, match=r"^invalid JSON: .*line 2"):
        load_file(write(tmp_path, "bad.json", '{"a": 1,\n oops}'), max_bytes=MAX)


def test_jsonl_block_per_record(tmp_path):
    lines = [json.dumps({"q": f"question {i}", "meta": {"n": i}}) for i in range(3)]
    doc = load(write(tmp_path, "qa.jsonl", "\n".join(lines[:2]) + "\n\n" + lines[2] + "\n"))
    assert len(doc.blocks) == 3
    assert block_text(doc, 1) == "q: question 1\nmeta.n: 1"
    assert doc.metadata["records"] == 3


def test_jsonl_bad_line_is_named(tmp_path):
    path = write(tmp_path, "qa.jsonl", '{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(LoadError, match=r"^invalid JSON on line 3: "):
        load_file(path, max_bytes=MAX)


# Across formats


def test_registry_covers_the_documented_formats():
    for suffix in (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".csv", ".tsv",
                   ".json", ".jsonl", ".py", ".rst", ".yaml", ".tex"):
        assert suffix in LOADERS and suffix in SUPPORTED_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in LOADERS)


def test_every_loader_is_deterministic(tmp_path):
    paths = [
        write(tmp_path, "a.md", MARKDOWN),
        write(tmp_path, "a.html", HTML),
        write(tmp_path, "a.csv", "x,y\n1,2\n"),
        write(tmp_path, "a.json", '{"k": [1, 2]}'),
        write(tmp_path, "a.jsonl", '{"k": 1}\n'),
        write(tmp_path, "a.txt", "hello"),
        make_docx(tmp_path / "a.docx"),
        make_pdf(tmp_path / "a.pdf", ["page one", "page two"]),
    ]
    for path in paths:
        assert load(path) == load(path), path.name
