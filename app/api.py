"""The HTTP API (`moerag serve`): OpenAI-compatible chat and embeddings, knowledge-base
endpoints, Prometheus metrics, and the embeddable chat widget. A thin shell over AnswerService.

Every endpoint but /healthz (and the widget's static script and demo page) needs a bearer API
key (`moerag keys create`). A key scoped to collections reads and writes only those; a
read-only key cannot upload or delete; only a key made with --web may ask for web results.
Size, key, rate and concurrency are checked before a request's body is read (app.limits);
every list and count in a request is capped. Errors use OpenAI's shape:
{"error": {"message", "type", "param", "code"}}; they never name a path on the server.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.disconnect import CancellableAnswer, CancellableStream
from app.generators import GeneratorError
from app.keys import ApiKey, Keys
from app.library import UploadTooLargeError, display_source
from app.limits import STATE_KEY, Guard
from app.service import AnswerService
from app.settings import Settings
from retrieval.errors import EmbeddingMismatchError, LockedError, MoeragError, NotFoundError, StoreError

log = logging.getLogger(__name__)
WIDGET_JS = Path(__file__).with_name("widget.js")


# --- errors ------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def _error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _moerag_error(exc: MoeragError) -> ApiError:
    """The library's typed errors, mapped onto HTTP statuses in this one place."""
    if isinstance(exc, NotFoundError):
        return ApiError(404, str(exc), code="not_found")
    if isinstance(exc, LockedError):  # its own message names the data directory: not for API clients
        return ApiError(409, "Another writer (an ingest, upload, delete or rebuild) is changing the knowledge base. "
                        "Try again when it has finished; searches keep working meanwhile.", type="conflict_error", code="locked")
    if isinstance(exc, EmbeddingMismatchError):
        return ApiError(409, str(exc), type="conflict_error", code="embedding_mismatch")
    if isinstance(exc, StoreError):  # names the database URL or index files: logged, not sent
        log.error("knowledge base store error: %s", exc)
        return ApiError(503, "The knowledge base's store failed; the server's log has the details.", type="server_error",
                        code="store_error")
    if isinstance(exc, UploadTooLargeError):
        return ApiError(413, str(exc), code="file_too_large", param="files")
    if isinstance(exc, GeneratorError):
        return ApiError(502, str(exc), type="server_error", code="generator_unavailable")
    return ApiError(400, str(exc))


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {400: "Bad request", 401: "Missing or invalid API key", 403: "The key may not do this",
                       404: "Not found", 409: "Conflict", 413: "The request body (or an uploaded file) is too large",
                       429: "Too many requests for this key (see the Retry-After header)", 502: "The generator failed",
                       503: "The knowledge base's store failed"}.items()
}


# --- request and response shapes --------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


# Hard ceilings in the schema, so that pydantic refuses a huge list before building its items;
# the configured caps (MOERAG_API_MAX_*), checked in the routes, are lower.
LIST_CEILING = 10_000


class MoeragOptions(BaseModel):
    collections: list[str] | None = Field(None, max_length=LIST_CEILING, description=(
        "Collections to search (repeats are searched once; at most MOERAG_API_MAX_COLLECTIONS different ones); "
        "default: the one named by `model`."))
    web: bool = Field(False, description="Also search the live web; its results are ranked with the knowledge base's. "
                                         "Needs a key created with --web.")
    k: int | None = Field(None, ge=1, le=50, description="Sources to retrieve.")
    mode: Literal["hybrid", "dense", "bm25"] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields moerag ignores (n, top_p, ...)
    model: str = Field(..., description="A collection name (GET /v1/models lists them).")
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=LIST_CEILING, description=(
        "At most MOERAG_API_MAX_MESSAGES messages of MOERAG_API_MAX_CHARS characters together."))
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=131072, description="At most MOERAG_API_MAX_TOKENS.")
    moerag: MoeragOptions | None = None


class SourceOut(BaseModel):
    n: int
    domain: str | None = None
    fetched_at: str | None = None
    text: str
    snippet: str
    title: str
    source: str
    url: str | None
    collection: str
    page: int | None
    heading: str | None
    start: int
    end: int
    score: float
    origin: str
    document_id: int | None
    chunk_id: int | None
    cut: bool


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str = "stop"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AnswerInfo(BaseModel):
    cited: list[int] = Field(description="Source numbers the answer cites (1-based indexes into `citations`).")
    warnings: list[str]
    timings: dict[str, float]
    generator: str


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    citations: list[SourceOut] = Field(description="The numbered sources given to the generator; [n] in the answer is citations[n-1].")
    moerag: AnswerInfo


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moerag"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: str | Annotated[list[str], Field(min_length=1)] = Field(
        ..., description="Text or texts to embed (at most MOERAG_API_MAX_EMBED_INPUTS of MOERAG_API_MAX_EMBED_CHARS "
                         "characters together); token-id input is not supported."
    )
    model: str = Field("", description="Any value: the knowledge base's embedder is used.")
    encoding_format: Literal["float", "base64"] = "float"


class EmbeddingOut(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingOut]
    model: str
    usage: EmbeddingUsage


class SearchRequest(BaseModel):
    query: str = Field(..., min_length=1, description="At most MOERAG_API_MAX_CHARS characters.")
    collection: str | None = Field(None, description="Default: the server's default collection.")
    k: int = Field(10, ge=1, le=100)
    mode: Literal["hybrid", "dense", "bm25"] | None = None
    source: str | None = Field(None, description="Only documents whose source starts with this.")


class DocumentRef(BaseModel):
    id: int
    source: str
    title: str


class SearchHit(BaseModel):
    rank: int
    score: float
    chunk_id: int
    text: str
    document: DocumentRef
    page: int | None
    heading: str | None
    start: int
    end: int
    ranks: dict[str, int]


class DocumentOut(BaseModel):
    id: int
    source: str
    title: str
    status: str
    error: str | None
    chunks: int


UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
                             "description": "Files to ingest (at most MOERAG_API_MAX_FILES, each at most "
                                            "MOERAG_MAX_FILE_MB)."}}}}}}}


class UploadResult(BaseModel):
    filename: str
    status: str = Field(description="added, updated, unchanged or failed")
    chunks: int
    error: str | None


class UploadResponse(BaseModel):
    collection: str
    results: list[UploadResult]


class Deleted(BaseModel):
    deleted: list[int]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


# --- the app -------------------------------------------------------------------------------------------


def authenticated(request: Request) -> ApiKey:
    """The request's bearer key, verified by the Guard middleware before the body was read."""
    key = request.scope.get("state", {}).get(STATE_KEY)
    if key is None:  # the route is not one the Guard checks: fail closed
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>' (create one with: moerag keys create --name NAME).",
                       code="invalid_api_key")
    return key


Key = Annotated[ApiKey, Depends(authenticated)]


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("moerag_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("moerag_http_request_seconds", "HTTP request latency (to the response start)",
                                 ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens = Counter("moerag_tokens", "Tokens processed by the generator", ["kind"], registry=self.registry)
        self.answers = Counter("moerag_answers", "Answers given", ["generator"], registry=self.registry)


def create_app(settings: Settings, *, service: AnswerService | None = None) -> FastAPI:
    """The FastAPI application; `service` is built from `settings` unless given (tests share one)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        app_version = version("moerag")
    except PackageNotFoundError:
        app_version = "0"
    svc = service or AnswerService(settings)
    keys = Keys(svc.kb.store)
    metrics = _Metrics()
    app = FastAPI(
        title="moerag",
        version=app_version,
        description="Self-hosted RAG: OpenAI-compatible chat over your knowledge base, with cited sources.",
    )
    app.state.keys = keys
    # Added first, so it runs inside CORS (preflights need no key; refusals carry CORS headers)
    # and inside the metrics (refusals are counted), but before any route reads a body.
    app.add_middleware(Guard, verify=keys.verify, body_limit=int(settings.api_max_body_mb * 2**20),
                       upload_limit=int(settings.api_max_upload_mb * 2**20), per_minute=settings.api_rate_per_minute,
                       max_concurrent=settings.api_max_concurrent)
    origins = [o.strip() for o in settings.api_cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return JSONResponse(_error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status)

    @app.exception_handler(MoeragError)
    async def library_error(_request: Request, exc: MoeragError):
        e = _moerag_error(exc)
        return JSONResponse(_error_body(e.message, e.type, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(_error_body(message, "invalid_request_error", "invalid_request", where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request"
        return JSONResponse(_error_body(str(exc.detail), "invalid_request_error", kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(_error_body(f"Internal error: {exc.__class__.__name__}", "server_error", "internal_error"),
                            status_code=500)


    def readable(key: ApiKey, name: str) -> None:
        if not key.may_read(name):
            raise ApiError(403, f"This API key may not use collection '{name}'.", type="permission_error", code="forbidden")

    def writable(key: ApiKey, name: str) -> None:
        readable(key, name)
        if key.read_only:
            raise ApiError(403, "This API key is read-only: it cannot upload or delete documents.",
                           type="permission_error", code="read_only")

    def existing(name: str) -> None:
        if name not in svc.collections():
            raise ApiError(404, f"No collection named '{name}'. GET /v1/models lists the collections.",
                           code="model_not_found", param="model")

    def capped_collections(names: list[str]) -> list[str]:
        """Each collection once, in the order asked, and not too many."""
        unique = list(dict.fromkeys(names))
        if len(unique) > settings.api_max_collections:
            raise ApiError(400, f"At most {settings.api_max_collections} collections per request "
                           f"(MOERAG_API_MAX_COLLECTIONS); got {len(unique)}.", param="moerag.collections",
                           code="too_many_collections")
        return unique

    def capped_messages(req: ChatRequest) -> None:
        if len(req.messages) > settings.api_max_messages:
            raise ApiError(400, f"At most {settings.api_max_messages} messages per request (MOERAG_API_MAX_MESSAGES); "
                           f"got {len(req.messages)}.", param="messages", code="too_many_messages")
        chars = sum(len(m.text()) for m in req.messages)
        if chars > settings.api_max_chars:
            raise ApiError(400, f"The messages hold {chars} characters; at most {settings.api_max_chars} are accepted "
                           "(MOERAG_API_MAX_CHARS).", param="messages", code="too_many_characters")
        if req.max_tokens is not None and req.max_tokens > settings.api_max_tokens:
            raise ApiError(400, f"max_tokens may be at most {settings.api_max_tokens} (MOERAG_API_MAX_TOKENS).",
                           param="max_tokens", code="max_tokens_too_large")

    def scrub(message: str | None, source: str) -> str | None:
        """A per-file error as an API client may see it: no path on this server."""
        if message is None:
            return None
        message = message.replace(source, display_source(svc.kb.home, source))
        return message.replace(str(svc.kb.home), "<data directory>")

    def public_sources(events: Iterator[Any]) -> Iterator[Any]:
        """The answer's events with uploads' sources shown as file names, not paths on this server."""
        try:
            for ev in events:
                sources = ev.data if ev.kind == "sources" else ev.data.sources if ev.kind == "done" else ()
                for src in sources:
                    src.source = display_source(svc.kb.home, src.source)
                yield ev
        finally:
            events.close()  # closing this generator (a client went away) closes the service's at once

    # --- chat ---------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", response_model=ChatResponse, responses={
        **ERRORS, 200: {"description": "The answer; with `stream: true`, server-sent `chat.completion.chunk` events "
                                       "then `data: [DONE]`.", "content": {"text/event-stream": {}}}})
    def chat_completions(req: ChatRequest, key: Key):
        """Answer the last user message from the knowledge base (OpenAI's chat completions)."""
        opts = req.moerag or MoeragOptions()
        names = capped_collections(opts.collections or [req.model])
        for name in names:
            readable(key, name)
            if not opts.web:  # with the web, a collection not made yet is searched as empty, with a warning
                existing(name)
        capped_messages(req)
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
                            temperature=req.temperature, max_tokens=req.max_tokens, web=opts.web, cancel=cancel))
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return CancellableStream(_sse(events, ident, created, req.model, metrics), cancel, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        def whole_answer() -> Response:
            with closing(events):
                answer = next(ev.data for ev in events if ev.kind == "done")
            _count_answer(metrics, answer)
            return JSONResponse(_chat_response(answer, ident, created, req.model).model_dump(mode="json"))

        return CancellableAnswer(whole_answer, cancel)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    def models(key: Key) -> ModelList:
        """The collections this key may use; each is a `model` for chat completions."""
        now = int(time.time())
        return ModelList(data=[ModelOut(id=name, created=now) for name in svc.collections() if key.may_read(name)])

    # --- embeddings -----------------------------------------------------------------------------------

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
    def embeddings(req: EmbeddingRequest, key: Key) -> EmbeddingResponse:
        """Embed texts with the knowledge base's embedder (L2-normalised vectors)."""
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise ApiError(400, "input is empty: pass a string or a list of strings.", param="input")
        if len(texts) > settings.api_max_embed_inputs:
            raise ApiError(400, f"At most {settings.api_max_embed_inputs} inputs per request (MOERAG_API_MAX_EMBED_INPUTS); "
                           f"got {len(texts)}.", param="input", code="too_many_inputs")
        chars = sum(len(t) for t in texts)
        if chars > settings.api_max_embed_chars:
            raise ApiError(400, f"The inputs hold {chars} characters; at most {settings.api_max_embed_chars} are accepted "
                           "(MOERAG_API_MAX_EMBED_CHARS).", param="input", code="too_many_characters")
        vectors = svc.embedder.encode(texts).astype(np.float32)  # [N, D]
        if req.encoding_format == "base64":
            data = [EmbeddingOut(index=i, embedding=base64.b64encode(v.tobytes()).decode()) for i, v in enumerate(vectors)]
        else:
            data = [EmbeddingOut(index=i, embedding=v.tolist()) for i, v in enumerate(vectors)]
        tokens = sum(len(t.split()) for t in texts)
        return EmbeddingResponse(data=data, model=svc.settings.embed_model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    # --- the knowledge base ---------------------------------------------------------------------------

    @app.post("/v1/search", response_model=list[SearchHit], responses=ERRORS)
    def search(req: SearchRequest, key: Key) -> list[dict[str, Any]]:
        """Search a collection: the same items as `moerag search --json`."""
        from retrieval.search import search as run_search

        name = req.collection or svc.settings.collection
        readable(key, name)
        existing(name)
        if len(req.query) > settings.api_max_chars:
            raise ApiError(400, f"The query has {len(req.query)} characters; at most {settings.api_max_chars} are accepted "
                           "(MOERAG_API_MAX_CHARS).", param="query", code="too_many_characters")
        mode = req.mode or svc.settings.search_mode
        embed = svc.embedder.encode if mode != "bm25" else None
        hits = [h.to_json() for h in run_search(svc.kb, req.query, embed=embed, collection=name, k=req.k, mode=mode,
                                                source=req.source)]
        for h in hits:
            h["document"]["source"] = display_source(svc.kb.home, h["document"]["source"])
        return hits

    @app.get("/v1/collections/{collection}/documents", response_model=list[DocumentOut], responses=ERRORS)
    def list_documents(collection: str, key: Key) -> list[dict[str, Any]]:
        """The documents of a collection, with status and error."""
        from app.library import list_documents as docs

        readable(key, collection)
        existing(collection)
        return [{**d, "source": display_source(svc.kb.home, d["source"])} for d in docs(svc.kb, collection)]

    @app.post("/v1/collections/{collection}/documents", response_model=UploadResponse, responses=ERRORS,
              openapi_extra=UPLOAD_BODY)
    async def upload(collection: str, request: Request, key: Key) -> UploadResponse:
        """Upload files into a collection (created if new); each is ingested and reported."""
        from app.library import ingest_uploads

        # The key may write here before a byte of the body is parsed; the form is read under
        # limits (files, fields, field size), and each file is copied to disk in blocks.
        writable(key, collection)
        most = svc.settings.api_max_files
        try:
            form = await request.form(max_files=most, max_fields=most, max_part_size=64 * 1024)
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise ApiError(400, f"At most {most} files per request (MOERAG_API_MAX_FILES).", param="files",
                               code="too_many_files") from None
            raise ApiError(400, f"Unreadable multipart body: {exc.detail}", param="files") from None
        try:
            files = [v for name, v in form.multi_items() if name == "files" and isinstance(v, StarletteUploadFile)]
            if not files:
                raise ApiError(400, "No files in the request (multipart field 'files').", param="files")
            payload = [(f.filename or "upload", f.file) for f in files]
            report = await run_in_threadpool(ingest_uploads, svc.kb, svc.embedder, payload, collection=collection,
                                             settings=svc.settings)
        finally:
            await form.close()  # Starlette's spooled temporary files go now, whatever happened
        results = [UploadResult(filename=name, status=r.status, chunks=r.chunks, error=scrub(r.error, r.source))
                   for (name, _), r in zip(payload, report.results)]
        return UploadResponse(collection=collection, results=results)

    @app.delete("/v1/collections/{collection}/documents/{document_id}", response_model=Deleted, responses=ERRORS)
    def delete_document(collection: str, document_id: int, key: Key) -> Deleted:
        """Delete a document (its chunks and vectors too)."""
        from app.library import delete_documents

        writable(key, collection)
        existing(collection)
        delete_documents(svc.kb, collection, [document_id], lock_wait=svc.settings.lock_wait)
        return Deleted(deleted=[document_id])

    # --- operations ------------------------------------------------------------------------------------

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        """Liveness: no key needed."""
        return Health(version=app_version)

    @app.get("/metrics", response_class=PlainTextResponse, responses={**ERRORS, 200: {"content": {"text/plain": {}}}})
    def prometheus(key: Key) -> Response:
        """Prometheus metrics: requests, latencies, answers and tokens."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- the widget -----------------------------------------------------------------------------------

    @app.get("/widget.js", response_class=PlainTextResponse, responses={200: {"content": {"application/javascript": {}}}})
    def widget_js() -> Response:
        """The embeddable chat box: <script src=".../widget.js" data-collection="C" data-key="K"></script>."""
        return Response(WIDGET_JS.read_text(), media_type="application/javascript")

    @app.get("/widget/demo", response_class=HTMLResponse)
    def widget_demo(
        collection: Annotated[str, Query(description="Collection the widget asks.")] = "default",
        key: Annotated[str, Query(description="An API key meant for the widget (scoped, read-only).")] = "",
    ) -> HTMLResponse:
        """A demo page with the widget on it."""
        return HTMLResponse(DEMO_PAGE.format(collection=html.escape(collection, quote=True), key=html.escape(key, quote=True)))

    return app


DEMO_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moerag widget demo</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 3rem; max-width: 46rem; color: #222 }}</style></head>
<body>
<h1>An intranet page</h1>
<p>This page embeds moerag with one script tag. Ask a question in the box at the bottom right.</p>
<pre>&lt;script src="/widget.js" data-collection="{collection}" data-key="…"&gt;&lt;/script&gt;</pre>
<script src="/widget.js" data-collection="{collection}" data-key="{key}"></script>
</body></html>
"""


def _count_answer(metrics: _Metrics, answer) -> None:
    metrics.answers.labels(answer.generator).inc()
    metrics.tokens.labels("prompt").inc(answer.timings.get("prompt_tokens", 0))
    metrics.tokens.labels("completion").inc(answer.timings.get("completion_tokens", 0))


def _usage(answer) -> Usage:
    p, c = int(answer.timings.get("prompt_tokens", 0)), int(answer.timings.get("completion_tokens", 0))
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _info(answer) -> AnswerInfo:
    return AnswerInfo(cited=answer.citations, warnings=answer.warnings, timings=answer.timings, generator=answer.generator)


def _chat_response(answer, ident: str, created: int, model: str) -> ChatResponse:
    return ChatResponse(
        id=ident, created=created, model=model,
        choices=[Choice(message=AssistantMessage(content=answer.answer, reasoning_content=answer.reasoning or None))],
        usage=_usage(answer), citations=[SourceOut(**s.to_json()) for s in answer.sources], moerag=_info(answer),
    )


def _sse(events: Iterator[Any], ident: str, created: int, model: str, metrics: _Metrics) -> Iterator[str]:
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
                _count_answer(metrics, answer)
                yield chunk({}, "stop", usage=_usage(answer).model_dump(),
                            citations=[s.to_json() for s in answer.sources], moerag=_info(answer).model_dump())
    except MoeragError as exc:  # headers are sent: the error travels as an event (clients raise it)
        e = _moerag_error(exc)
        yield f"data: {json.dumps(_error_body(e.message, e.type, e.code))}\n\n"
    except Exception as exc:  # noqa: BLE001 -- a stream must end with an event, never a torn connection
        log.exception("error while streaming an answer")
        yield f"data: {json.dumps(_error_body(f'Internal error: {exc.__class__.__name__}', 'server_error', 'internal_error'))}\n\n"
    finally:
        events.close()
    yield "data: [DONE]\n\n"

