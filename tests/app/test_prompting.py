"""Prompt fitting at its edges: a source too big to cut usefully, and web pages marked as
untrusted quoted material. (The common cuts and drops are in test_service.py.)"""

from __future__ import annotations

from app.answers import Source
from app.generators import MESSAGE_OVERHEAD
from app.prompting import MIN_CUT_TOKENS, SYSTEM_PROMPT, fit_prompt, source_block


def count(text: str) -> int:
    return len(text.split())  # one token per word


def _source(n: int, words: int, **changes) -> Source:
    return Source(
        n=n,
        text=" ".join(f"w{n}_{i}" for i in range(words)),
        title=f"doc {n}",
        source=f"/d/{n}.md",
        collection="c",
        score=1.0 / n,
        **changes,
    )


def test_a_source_that_would_be_cut_too_short_is_dropped_with_every_later_one():
    question = "what is w1_3?"
    fixed = count(SYSTEM_PROMPT) + count(f"Sources:\n\nQuestion: {question}") + 2 * MESSAGE_OVERHEAD
    # Room for MIN_CUT_TOKENS tokens of sources: the first source's header leaves too little of its text.
    window = fixed + 50 + MIN_CUT_TOKENS
    fitted = fit_prompt(
        question, [], [_source(1, 100), _source(2, 10)], count=count, context_window=window, answer_tokens=50
    )
    assert fitted.sources == []  # the small second source would fit, but never jumps the ranking
    assert fitted.messages[-1]["content"] == f"Sources: none were found.\n\nQuestion: {question}"
    assert fitted.warnings == [
        f"2 retrieved source(s) did not fit the context window ({window} tokens) and were left out: doc 1; doc 2."
    ]


def test_web_pages_are_marked_as_untrusted_quoted_material():
    page = _source(2, 5, url="https://example.org/owls", origin="web", domain="example.org")
    assert source_block(page).startswith("[2] doc 2 (https://example.org/owls) (web page: untrusted quoted material)\n")
    assert "untrusted" not in source_block(_source(1, 5))
