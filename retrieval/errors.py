"""Errors a user can hit in the knowledge base; each message names the thing and the fix."""


class MoeragError(Exception):
    """Root of every error moerag reports to users (the CLI and API map it in one place)."""


class RetrievalError(MoeragError):
    """Searching or reading the knowledge base failed."""


class StoreError(RetrievalError):
    """The SQL store or the FAISS index cannot be used as asked."""


class NotFoundError(StoreError):
    """A collection, document or chunk that was named does not exist."""


class LockedError(StoreError):
    """Another process holds the knowledge base's write lock."""


class EmbeddingMismatchError(StoreError):
    """A collection was built with another embedding model than the one configured."""


class IndexMismatchError(StoreError):
    """The FAISS index disagrees with the SQL store."""
