"""OpenAI's chat completions over the knowledge base, plain or streamed (server-sent events), and
the models they may name: each collection is a model."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app.api.deps import Caps, Key, Service, Stats, capped_collections, capped_messages, existing, readable
from app.api.errors import ERRORS, ApiError, error_body, moerag_error
from app.api.metrics import Metrics
from app.api.schemas import (
    AnswerInfo,
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    ModelList,
    ModelOut,
    MoeragOptions,
    SourceOut,
    Usage,
)
from app.disconnect import CancellableAnswer, CancellableStream
from app.library import display_source
from retrieval.errors import MoeragError

if TYPE_CHECKING:
    from app.answers import Answer

log = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatResponse, responses={
    **ERRORS, 200: {"description": "The answer; with `stream: true`, server-sent `chat.completion.chunk` events "
                                   "then `data: [DONE]`.", "content": {"text/event-stream": {}}}})
def chat_completions(req: ChatRequest, key: Key, svc: Service, caps: Caps, metrics: Stats):
    """Answer the last user message from the knowledge base (OpenAI's chat completions)."""
    opts = req.moerag or MoeragOptions()
    names = capped_collections(opts.collections or [req.model], caps)
    for name in names:
        readable(key, name)
        if not opts.web:  # with the web, a collection not made yet is searched as empty, with a warning
            existing(svc, name)
    capped_messages(req, caps)
    if opts.web and not key.web:
        raise ApiError(403, "This API key may not search the web (the 'web' permission; create a key with: "
                       "moerag keys create --name NAME --web).", type="permission_error", code="web_not_allowed",
                       param="moerag.web")
    turns = [m for m in req.messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user" or not turns[-1].text().strip():
        raise ApiError(400, "The last message must be a non-empty user message: the question.", param="messages")
    history = [{"role": m.role, "content": m.text()} for m in turns[:-1]]
    cancel = threading.Event()  # set when the client goes away: the answer stops within a step
    events = public_sources(svc.stream(turns[-1].text(), history=history, collections=names, k=opts.k, mode=opts.mode,
                                       temperature=req.temperature, max_tokens=req.max_tokens,
                                       reasoning_effort=req.reasoning_effort, web=opts.web, cancel=cancel), svc.kb.home)
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        return CancellableStream(sse(events, ident, created, req.model, metrics), cancel, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def whole_answer() -> Response:
        with closing(events):
            answer = next(ev.data for ev in events if ev.kind == "done")
        metrics.count_answer(answer)
        return JSONResponse(chat_response(answer, ident, created, req.model).model_dump(mode="json"))

    return CancellableAnswer(whole_answer, cancel)


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
def models(key: Key, svc: Service) -> ModelList:
    """The collections this key may use; each is a `model` for chat completions."""
    now = int(time.time())
    return ModelList(data=[ModelOut(id=name, created=now) for name in svc.collections() if key.may_read(name)])


def public_sources(events: Iterator[Any], home: Path) -> Iterator[Any]:
    """The answer's events with uploads' sources shown as file names, not paths on this server."""
    try:
        for ev in events:
            sources = ev.data if ev.kind == "sources" else ev.data.sources if ev.kind == "done" else ()
            for src in sources:
                src.source = display_source(home, src.source)
            yield ev
    finally:
        events.close()  # closing this generator (a client went away) closes the service's at once


def usage(answer: Answer) -> Usage:
    p, c = int(answer.timings.get("prompt_tokens", 0)), int(answer.timings.get("completion_tokens", 0))
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def info(answer: Answer) -> AnswerInfo:
    return AnswerInfo(cited=answer.citations, warnings=answer.warnings, timings=answer.timings, generator=answer.generator)


def chat_response(answer: Answer, ident: str, created: int, model: str) -> ChatResponse:
    return ChatResponse(
        id=ident, created=created, model=model,
        choices=[Choice(message=AssistantMessage(content=answer.answer, reasoning_content=answer.reasoning or None))],
        usage=usage(answer), citations=[SourceOut(**s.to_json()) for s in answer.sources], moerag=info(answer),
    )


def sse(events: Iterator[Any], ident: str, created: int, model: str, metrics: Metrics) -> Iterator[str]:
    """OpenAI's streaming format: chunks with deltas, the sources on the last one, then [DONE].
    Closing it (the client went away) closes `events` at once."""
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        for ev in events:
            if ev.kind == "reasoning":
                yield chunk({"reasoning_content": ev.data})
            elif ev.kind == "answer":
                yield chunk({"content": ev.data})
            elif ev.kind == "done":
                answer = ev.data
                metrics.count_answer(answer)
                yield chunk({}, "stop", usage=usage(answer).model_dump(),
                            citations=[s.to_json() for s in answer.sources], moerag=info(answer).model_dump())
    except MoeragError as exc:  # headers are sent: the error travels as an event (clients raise it)
        e = moerag_error(exc)
        yield f"data: {json.dumps(error_body(e.message, e.type, e.code))}\n\n"
    except Exception as exc:  # a stream must end with an event, never a torn connection
        log.exception("error while streaming an answer")
        yield f"data: {json.dumps(error_body(f'Internal error: {exc.__class__.__name__}', 'server_error', 'internal_error'))}\n\n"
    finally:
        events.close()
    yield "data: [DONE]\n\n"
