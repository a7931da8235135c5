"""One ranking for web and knowledge-base evidence.

Web pages are chunked and embedded with the knowledge base's own chunker and embedder (passed
in as callables: retrieval does not import ingest), ranked by cosine similarity to the query,
then fused with the knowledge-base ranking by reciprocal rank. Rank fusion alone would put the
knowledge base's best chunk level with the web's best even when it is off-topic, so a third
ranking joins the fusion: every candidate, from either side, by cosine similarity to the query
(the same embedder made all the vectors, so the scores compare). Near-identical passages
(cosine >= DUPLICATE_COS) and repeated URLs keep only their best-ranked copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from retrieval.search import RRF_K
from retrieval.web.search import WebPage

T = TypeVar("T")
MAX_CHUNKS_PER_PAGE = 12  # a long page's tail rarely answers; embedding it costs time
DUPLICATE_COS = 0.95

Embed = Callable[[Sequence[str]], np.ndarray]
Chunk = Callable[[str, str], list[str]]  # (title, text) -> chunk texts


@dataclass
class WebChunk:
    page: WebPage
    text: str
    score: float = 0.0  # cosine to the query


def rank_web(query: str, pages: Sequence[WebPage], *, chunk: Chunk, embed: Embed, k: int) -> list[WebChunk]:
    """The k web chunks most similar to the query, best first."""
    chunks = [WebChunk(p, t) for p in pages for t in chunk(p.title, p.text)[:MAX_CHUNKS_PER_PAGE] if t.strip()]
    if not chunks:
        return []
    vectors = embed([query] + [c.text for c in chunks])  # [1 + C, D], L2-normalised
    sims = vectors[1:] @ vectors[0]  # [C]
    for c, s in zip(chunks, sims):
        c.score = float(s)
    return sorted(chunks, key=lambda c: -c.score)[:k]


def fuse(
    query: str,
    rankings: Sequence[Sequence[T]],
    *,
    k: int,
    embed: Embed,
    text_of: Callable[[T], str],
    url_of: Callable[[T], str | None],
) -> list[tuple[T, float]]:
    """Reciprocal-rank fusion of several rankings and of all their items by similarity to
    `query`; near-duplicates and repeated URLs removed. (item, fused score), best first."""
    items: dict[int, Any] = {id(item): item for ranking in rankings for item in ranking}
    if not items:
        return []
    ids = list(items)
    vectors = embed([query] + [text_of(items[i]) for i in ids])  # [1 + N, D], L2-normalised
    sims = vectors[1:] @ vectors[0]  # [N]
    by_similarity = [ids[j] for j in np.argsort(-sims, kind="stable")]
    scores: dict[int, float] = dict.fromkeys(ids, 0.0)
    for ranking in [[id(x) for x in r] for r in rankings] + [by_similarity]:
        for rank, i in enumerate(ranking, 1):
            scores[i] += 1.0 / (RRF_K + rank)
    ordered = sorted(ids, key=lambda i: -scores[i])
    row = {i: j for j, i in enumerate(ids)}
    vectors = vectors[1:][[row[i] for i in ordered]]  # [N, D] in fused order
    kept: list[int] = []
    urls: set[str] = set()
    for pos, i in enumerate(ordered):
        url = url_of(items[i])
        if url and url in urls:
            continue
        if kept and float(np.max(vectors[kept] @ vectors[pos])) >= DUPLICATE_COS:
            continue
        kept.append(pos)
        if url:
            urls.add(url)
        if len(kept) == k:
            break
    return [(items[ordered[pos]], scores[ordered[pos]]) for pos in kept]
