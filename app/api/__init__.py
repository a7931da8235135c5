"""The HTTP API (`moerag serve`): OpenAI-compatible chat and embeddings, knowledge-base
endpoints, Prometheus metrics, and the embeddable chat widget. A thin shell over AnswerService.

Every endpoint but /healthz (and the widget's static script and demo page) needs a bearer API
key (`moerag keys create`). A key scoped to collections reads and writes only those; a
read-only key cannot upload or delete; only a key made with --web may ask for web results.
Size, key, rate and concurrency are checked before a request's body is read (app.limits);
every list and count in a request is capped. Errors use OpenAI's shape:
{"error": {"message", "type", "param", "code"}}; they never name a path on the server.

One router per resource (chat, embeddings, search, documents, system, widget), each route
given its key, service, settings and metrics by the dependencies in deps.py, which read them
from `app.state`; request and response shapes in schemas.py, errors and their HTTP statuses in
errors.py.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.api import chat, documents, embeddings, search, system, widget
from app.api.errors import HANDLERS
from app.api.metrics import Metrics, count_requests
from app.keys import Keys
from app.limits import Guard
from app.service import AnswerService
from app.settings import Settings

__all__ = ["create_app"]


def create_app(settings: Settings, *, service: AnswerService | None = None) -> FastAPI:
    """The FastAPI application; `service` is built from `settings` unless given (tests share one)."""
    svc = service or AnswerService(settings)
    keys = Keys(svc.kb.store)
    app = FastAPI(
        title="moerag",
        version=system.VERSION,
        description="Self-hosted RAG: OpenAI-compatible chat over your knowledge base, with cited sources.",
        exception_handlers=HANDLERS,
    )
    app.state.settings, app.state.service, app.state.keys, app.state.metrics = settings, svc, keys, Metrics()
    # Added first, so it runs inside CORS (preflights need no key; refusals carry CORS headers)
    # and inside the metrics (refusals are counted), but before any route reads a body.
    app.add_middleware(Guard, verify=keys.verify, body_limit=int(settings.api_max_body_mb * 2**20),
                       upload_limit=int(settings.api_max_upload_mb * 2**20), per_minute=settings.api_rate_per_minute,
                       max_concurrent=settings.api_max_concurrent)
    origins = [o.strip() for o in settings.api_cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.middleware("http")(count_requests)
    for module in (chat, embeddings, search, documents, system, widget):
        app.include_router(module.router)
    return app
