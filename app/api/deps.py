"""What routes are given and what they check first: the request's API key, the application's
service, settings and metrics (kept on `app.state` by create_app), the key's permissions on a
collection, and the configured caps (MOERAG_API_MAX_*) on a request's lists and counts.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.errors import ApiError
from app.api.metrics import Metrics
from app.api.schemas import ChatRequest
from app.keys import ApiKey
from app.limits import STATE_KEY
from app.service import AnswerService
from app.settings import Settings


def authenticated(request: Request) -> ApiKey:
    """The request's bearer key, verified by the Guard middleware before the body was read."""
    key = request.scope.get("state", {}).get(STATE_KEY)
    if key is None:  # the route is not one the Guard checks: fail closed
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>' (create one with: moerag keys create --name NAME).",
                       code="invalid_api_key")
    return key


# async: reading an attribute needs no worker thread (FastAPI runs plain `def` dependencies in one).


async def answer_service(request: Request) -> AnswerService:
    return request.app.state.service


async def api_settings(request: Request) -> Settings:
    """The settings the application was made with: its caps (which a test may set apart from the service's)."""
    return request.app.state.settings


async def metrics(request: Request) -> Metrics:
    return request.app.state.metrics


Key = Annotated[ApiKey, Depends(authenticated)]
Service = Annotated[AnswerService, Depends(answer_service)]
Caps = Annotated[Settings, Depends(api_settings)]
Stats = Annotated[Metrics, Depends(metrics)]


# --- a key's permissions on a collection --------------------------------------------------------------


def readable(key: ApiKey, name: str) -> None:
    if not key.may_read(name):
        raise ApiError(403, f"This API key may not use collection '{name}'.", type="permission_error", code="forbidden")


def writable(key: ApiKey, name: str) -> None:
    readable(key, name)
    if key.read_only:
        raise ApiError(403, "This API key is read-only: it cannot upload or delete documents.",
                       type="permission_error", code="read_only")


def existing(service: AnswerService, name: str) -> None:
    if name not in service.collections():
        raise ApiError(404, f"No collection named '{name}'. GET /v1/models lists the collections.",
                       code="model_not_found", param="model")


# --- the caps on a request -----------------------------------------------------------------------------


def capped_collections(names: list[str], caps: Settings) -> list[str]:
    """Each collection once, in the order asked, and not too many."""
    unique = list(dict.fromkeys(names))
    if len(unique) > caps.api_max_collections:
        raise ApiError(400, f"At most {caps.api_max_collections} collections per request "
                       f"(MOERAG_API_MAX_COLLECTIONS); got {len(unique)}.", param="moerag.collections",
                       code="too_many_collections")
    return unique


def capped_messages(req: ChatRequest, caps: Settings) -> None:
    if len(req.messages) > caps.api_max_messages:
        raise ApiError(400, f"At most {caps.api_max_messages} messages per request (MOERAG_API_MAX_MESSAGES); "
                       f"got {len(req.messages)}.", param="messages", code="too_many_messages")
    chars = sum(len(m.text()) for m in req.messages)
    if chars > caps.api_max_chars:
        raise ApiError(400, f"The messages hold {chars} characters; at most {caps.api_max_chars} are accepted "
                       "(MOERAG_API_MAX_CHARS).", param="messages", code="too_many_characters")
    if req.max_tokens is not None and req.max_tokens > caps.api_max_tokens:
        raise ApiError(400, f"max_tokens may be at most {caps.api_max_tokens} (MOERAG_API_MAX_TOKENS).",
                       param="max_tokens", code="max_tokens_too_large")


def capped_query(query: str, caps: Settings) -> None:
    if len(query) > caps.api_max_chars:
        raise ApiError(400, f"The query has {len(query)} characters; at most {caps.api_max_chars} are accepted "
                       "(MOERAG_API_MAX_CHARS).", param="query", code="too_many_characters")


def capped_inputs(texts: list[str], caps: Settings) -> None:
    if len(texts) > caps.api_max_embed_inputs:
        raise ApiError(400, f"At most {caps.api_max_embed_inputs} inputs per request (MOERAG_API_MAX_EMBED_INPUTS); "
                       f"got {len(texts)}.", param="input", code="too_many_inputs")
    chars = sum(len(t) for t in texts)
    if chars > caps.api_max_embed_chars:
        raise ApiError(400, f"The inputs hold {chars} characters; at most {caps.api_max_embed_chars} are accepted "
                       "(MOERAG_API_MAX_EMBED_CHARS).", param="input", code="too_many_characters")
