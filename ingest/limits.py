"""What parsing one file may cost, and the checks loaders make against it as they go.

`ParseLimits` travels from the settings (same field names) to the parsing worker. Time and
memory are enforced from outside the parser (ingest.isolate); the counts here are checked from
inside, early enough that a bomb fails before it is expanded: a zip's declared member sizes
before python-docx opens it, a PDF's page count before any page is read, rows and values as
they are produced.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

from ingest.errors import LoadError

MB = 1 << 20  # "MB" in messages means MiB, as everywhere in moerag
MAX_ZIP_MEMBERS = 10_000  # a Word document has a few dozen parts; tens of thousands is an attack


@dataclass(frozen=True)
class ParseLimits:
    """Per-file parsing limits; the fields are named as the settings (MOERAG_PARSE_TIMEOUT, ...)."""

    parse_timeout: float = 60.0  # seconds of wall time
    parse_memory_mb: int = 2048  # address space of the parsing worker (0: no limit)
    max_unpacked_mb: float = 200.0  # zip-based formats: the members' total uncompressed size
    max_text_mb: float = 20.0  # extracted text, in millions of characters x 1.048576
    max_elements: int = 1_000_000  # pages, paragraphs, table cells, rows, JSON values

    @classmethod
    def of(cls, settings: object) -> ParseLimits:
        """The limits read from any settings object that has fields of the same names."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    @property
    def max_chars(self) -> int:
        return int(self.max_text_mb * MB)


class Budget:
    """What one parse has produced so far, against its limits; LoadError when one is passed."""

    def __init__(self, limits: ParseLimits) -> None:
        self.limits = limits
        self.elements = 0
        self.chars = 0

    def count(self, n: int = 1, *, what: str = "elements") -> None:
        self.elements += n
        if self.elements > self.limits.max_elements:
            raise LoadError(
                f"too many elements (more than {self.limits.max_elements:,} {what}; raise MOERAG_MAX_ELEMENTS)"
            )

    def text(self, n: int) -> None:
        self.chars += n
        self.check_text(self.chars)

    def check_text(self, chars: int) -> None:
        if chars > self.limits.max_chars:
            raise LoadError(
                f"too much text ({_mb(chars)} MB > limit {_num(self.limits.max_text_mb)} MB;"
                " raise MOERAG_MAX_TEXT_MB)"
            )


def check_zip(path: Path, limits: ParseLimits, *, kind: str) -> None:
    """Refuse a zip whose members would inflate past the limit, before any parser opens it.
    `kind` names the format in the message for a broken container ("corrupt .docx: ...").

    The declared sizes are a real bound: zipfile stops inflating a member at its declared size
    (and fails its CRC), so a member that lies about its size cannot expand past the lie.
    """
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        raise LoadError(f"corrupt {kind}: {exc}") from exc
    if len(members) > MAX_ZIP_MEMBERS:
        raise LoadError(f"too many elements ({len(members):,} parts in the zip container > {MAX_ZIP_MEMBERS:,})")
    total = sum(m.file_size for m in members)
    if total > limits.max_unpacked_mb * MB:
        raise LoadError(
            f"too large when decompressed ({_mb(total)} MB > limit {_num(limits.max_unpacked_mb)} MB;"
            " raise MOERAG_MAX_UNPACKED_MB)"
        )


def _num(x: float) -> str:
    """A limit as the user wrote it: 200, 0.5, 2048."""
    return f"{x:g}"


def _mb(n_bytes: int) -> str:
    """A measured size in MB: 300.0, 8.2, or two significant digits below 1 MB (0.072)."""
    x = n_bytes / MB
    return f"{x:.1f}" if x >= 1 else f"{x:.2g}"
