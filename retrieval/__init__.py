"""Finding evidence: the SQL store, the FAISS index, BM25, and hybrid search."""

from retrieval.errors import MoeragError, RetrievalError, StoreError
from retrieval.kb import KnowledgeBase
from retrieval.search import Hit, search

__all__ = ["Hit", "KnowledgeBase", "MoeragError", "RetrievalError", "StoreError", "search"]
