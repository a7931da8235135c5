"""Files -> documents -> chunks -> vectors, into the knowledge base."""

from ingest.embedder import Embedder, get_embedder
from ingest.errors import IngestError, LoadError
from ingest.pipeline import IngestOptions, IngestReport, ingest_paths, ingest_records

__all__ = ["Embedder", "IngestError", "IngestOptions", "IngestReport", "LoadError", "get_embedder", "ingest_paths", "ingest_records"]
