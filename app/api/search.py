"""Searching a collection over HTTP: the service's search, as `moerag search --json` prints it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import Caps, Key, Service, capped_query, existing, readable
from app.api.errors import ERRORS
from app.api.schemas import SearchHit, SearchRequest
from app.library import display_source

router = APIRouter()


@router.post("/v1/search", response_model=list[SearchHit], responses=ERRORS)
def search(req: SearchRequest, key: Key, svc: Service, caps: Caps) -> list[dict[str, Any]]:
    """Search a collection: the same items as `moerag search --json`."""
    name = req.collection or svc.settings.collection
    readable(key, name)
    existing(svc, name)
    capped_query(req.query, caps)
    found = svc.search_items(req.query, collection=name, k=req.k, mode=req.mode or svc.settings.search_mode,
                             source=req.source)
    hits = found["results"]  # SearchHit leaves out their `origin`: all are "kb" here
    for h in hits:
        h["document"]["source"] = display_source(svc.kb.home, h["document"]["source"])
    return hits
