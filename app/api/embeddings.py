"""OpenAI's embeddings endpoint, served by the knowledge base's own embedder."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter

from app.api.deps import Caps, Key, Service, capped_inputs
from app.api.errors import ERRORS, ApiError
from app.api.schemas import EmbeddingOut, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
def embeddings(req: EmbeddingRequest, key: Key, svc: Service, caps: Caps) -> EmbeddingResponse:
    """Embed texts with the knowledge base's embedder (L2-normalised vectors)."""
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
        raise ApiError(400, "input is empty: pass a string or a list of strings.", param="input")
    capped_inputs(texts, caps)
    vectors = svc.embedder.encode(texts).astype(np.float32)  # [N, D]
    if req.encoding_format == "base64":
        data = [EmbeddingOut(index=i, embedding=base64.b64encode(v.tobytes()).decode()) for i, v in enumerate(vectors)]
    else:
        data = [EmbeddingOut(index=i, embedding=v.tolist()) for i, v in enumerate(vectors)]
    tokens = sum(len(t.split()) for t in texts)
    return EmbeddingResponse(data=data, model=svc.settings.embed_model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
