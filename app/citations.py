"""Citation checks: an answer may cite only the sources it was given, as [n].

Generators stream text in arbitrary pieces, so the check is a filter that holds back a bracket
until it is decided; a [n] outside 1..N is removed before it reaches the user and reported.
"""

from __future__ import annotations

import re

_CITE = re.compile(r"\[(\s*\d+\s*(?:[,;]\s*\d+\s*)*)\]")
_CITE_PREFIX = re.compile(r"\[[\d\s,;]*")  # what may still become a citation when more text arrives


class CitationFilter:
    """Streams answer text through, rewriting [n] groups so that only given sources are cited.

    feed(delta) -> text safe to show; close() -> the rest. A bracket that may still turn into a
    citation is held back until it is decided (at most a few characters).
    """

    def __init__(self, n_sources: int) -> None:
        self.n_sources = n_sources
        self.pending = ""
        self.cited: list[int] = []  # valid numbers, in order of first citation
        self.invalid: list[int] = []  # removed numbers, as often as they were cited

    def feed(self, delta: str) -> str:
        self.pending += delta
        out: list[str] = []
        while self.pending:
            i = self.pending.find("[")
            if i < 0:
                out.append(self.pending)
                self.pending = ""
                break
            out.append(self.pending[:i])
            rest = self.pending[i:]
            m = _CITE.match(rest)
            if m:
                out.append(self._rewrite(m.group(1)))
                self.pending = rest[m.end() :]
                continue
            if len(rest) < 40 and _CITE_PREFIX.fullmatch(rest):
                self.pending = rest  # undecided: wait for more text
                break
            out.append("[")
            self.pending = rest[1:]
        return "".join(out)

    def close(self) -> str:
        rest, self.pending = self.pending, ""
        return rest

    def warning(self) -> str | None:
        """What the user is told about removed citations, or None when there were none."""
        if not self.invalid:
            return None
        bad = ", ".join(f"[{x}]" for x in dict.fromkeys(self.invalid))
        verb = "is" if len(set(self.invalid)) == 1 else "are"
        return f"The answer cited {bad}, which {verb} not among the {self.n_sources} sources given; removed."

    def _rewrite(self, body: str) -> str:
        numbers = [int(x) for x in re.split(r"[,;]", body)]
        valid = [x for x in numbers if 1 <= x <= self.n_sources]
        self.invalid += [x for x in numbers if not 1 <= x <= self.n_sources]
        for x in valid:
            if x not in self.cited:
                self.cited.append(x)
        return "[" + ", ".join(map(str, valid)) + "]" if valid else ""


def check_citations(text: str, n_sources: int) -> tuple[str, list[int], list[int]]:
    """(text with invalid citations removed, cited source numbers, invalid numbers)."""
    f = CitationFilter(n_sources)
    cleaned = f.feed(text) + f.close()
    return cleaned, f.cited, f.invalid
