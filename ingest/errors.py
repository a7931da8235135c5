"""Errors raised while turning files into chunks."""

from retrieval.errors import MoeragError


class IngestError(MoeragError):
    """Ingestion failed as a whole (bad path, bad settings)."""


class LoadError(IngestError):
    """One file could not be read; the message is a one-line reason shown next to the file."""


class EmbedderError(IngestError):
    """The embedding model could not be loaded or used."""


class ParseTimeout(LoadError):
    """Parsing one file took longer than allowed; the worker running it was stopped."""
