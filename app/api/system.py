"""Operations: liveness (no key needed) and Prometheus metrics."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import Key, Stats
from app.api.errors import ERRORS
from app.api.schemas import Health

router = APIRouter()


def _installed_version() -> str:
    try:
        return version("moerag")
    except PackageNotFoundError:  # a checkout that was never installed
        return "0"


VERSION = _installed_version()


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Liveness: no key needed."""
    return Health(version=VERSION)


@router.get("/metrics", response_class=PlainTextResponse, responses={**ERRORS, 200: {"content": {"text/plain": {}}}})
def prometheus(key: Key, metrics: Stats) -> Response:
    """Prometheus metrics: requests, latencies, answers and tokens."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
