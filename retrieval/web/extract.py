"""Main text from a fetched page: trafilatura for HTML (title, date, text), text as is, PDF
pages via pypdf. Bodies are decoded with the declared charset when it names a real codec,
else with charset detection."""

from __future__ import annotations

import codecs
import io
import logging
from dataclasses import dataclass

from charset_normalizer import from_bytes

from retrieval.web.fetch import Fetched

log = logging.getLogger(__name__)
MIN_CHARS = 40  # less than this is a cookie wall or a navigation stub, not content


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


def extract(page: Fetched) -> Extracted:
    if page.content_type == "application/pdf":
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError

        try:
            reader = PdfReader(io.BytesIO(page.body))
            text = "\n\n".join((p.extract_text() or "").strip() for p in reader.pages)
            title = str((reader.metadata or {}).get("/Title") or "")
        except (PdfReadError, ValueError, KeyError, OSError) as exc:
            raise ExtractError(f"unreadable PDF ({exc})") from exc
        return _checked(Extracted(title, None, text))
    text = decode(page.body, page.charset)
    if page.content_type == "text/plain":
        return _checked(Extracted("", None, text))
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
