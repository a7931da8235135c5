"""Prometheus metrics of one API application: requests by route and status, their latency, answers
by generator and tokens. Each application has its own registry (tests build several)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Histogram

if TYPE_CHECKING:
    from app.answers import Answer


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("moerag_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("moerag_http_request_seconds", "HTTP request latency (to the response start)",
                                 ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens = Counter("moerag_tokens", "Tokens processed by the generator", ["kind"], registry=self.registry)
        self.answers = Counter("moerag_answers", "Answers given", ["generator"], registry=self.registry)

    def count_answer(self, answer: Answer) -> None:
        self.answers.labels(answer.generator).inc()
        self.tokens.labels("prompt").inc(answer.timings.get("prompt_tokens", 0))
        self.tokens.labels("completion").inc(answer.timings.get("completion_tokens", 0))


async def count_requests(request: Request, call_next):
    """HTTP middleware: each request counted by method, route template and status, and timed."""
    metrics: Metrics = request.app.state.metrics
    start = time.perf_counter()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    metrics.requests.labels(request.method, route, str(response.status_code)).inc()
    metrics.latency.labels(route).observe(time.perf_counter() - start)
    return response
