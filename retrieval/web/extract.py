"""Main text from a fetched page: trafilatura for HTML (title, date, text), text as is, PDF
pages via pypdf. Bodies are decoded with the declared charset when it names a real codec,
else with charset detection.

`extract` bounds pages and text but not time or memory: a caller that must contain it runs it
in a worker process (the service does, through ingest.isolate; see web_search's `extract`).
"""

from __future__ import annotations

import codecs
import io
import logging
from dataclasses import dataclass

from charset_normalizer import from_bytes

from retrieval.web.fetch import Fetched

log = logging.getLogger(__name__)
MIN_CHARS = 40  # less than this is a cookie wall or a navigation stub, not content
MAX_PAGES = 1_000_000  # PDF pages (the service passes MOERAG_MAX_ELEMENTS)
MAX_CHARS = 20 * 2**20  # extracted characters (the service passes MOERAG_MAX_TEXT_MB)


@dataclass
class Extracted:
    title: str
    date: str | None
    text: str


class ExtractError(ValueError):
    """No usable text in the page (the message says why)."""


def decode(body: bytes, declared: str | None) -> str:
    if declared:
        try:
            codec = codecs.lookup(declared).name
            return body.decode(codec, errors="replace")
        except LookupError:
            log.debug("unknown declared charset %r; detecting instead", declared)
    best = from_bytes(body).best()
    return str(best) if best is not None else body.decode("utf-8", errors="replace")


def extract(page: Fetched, *, max_pages: int = MAX_PAGES, max_chars: int = MAX_CHARS) -> Extracted:
    """The page's title, date and main text; ExtractError when there is none or it is too big."""
    if page.content_type == "application/pdf":
        from pypdf import PdfReader

        try:
            reader = PdfReader(io.BytesIO(page.body))
            if len(reader.pages) > max_pages:  # before reading any: a page tree can claim millions
                raise ExtractError(f"too many elements (a PDF of {len(reader.pages):,} pages > {max_pages:,})")
            texts, chars = [], 0
            for p in reader.pages:
                texts.append((p.extract_text() or "").strip())
                chars += len(texts[-1])
                if chars > max_chars:
                    raise ExtractError(f"too much text (more than {max_chars:,} characters)")
            text = "\n\n".join(texts)
            title = str((reader.metadata or {}).get("/Title") or "")
        except ExtractError:
            raise
        except Exception as exc:  # PdfReadError, pypdf's LimitReachedError, ...: a hostile PDF fails alone
            raise ExtractError(f"unreadable PDF ({exc})") from exc
        return _checked(Extracted(title, None, text))
    text = decode(page.body, page.charset)
    if page.content_type == "text/plain":
        return _checked(Extracted("", None, text[:max_chars]))
    import trafilatura

    doc = trafilatura.bare_extraction(text, url=page.final_url, with_metadata=True, include_tables=True)
    if doc is None:
        raise ExtractError("no main text found in the HTML")
    data = doc.as_dict() if hasattr(doc, "as_dict") else dict(doc)
    return _checked(Extracted(data.get("title") or "", data.get("date"), data.get("text") or ""))


def _checked(e: Extracted) -> Extracted:
    e.text = e.text.strip()
    if len(e.text) < MIN_CHARS:
        raise ExtractError("no main text found (the page is nearly empty)")
    return e
