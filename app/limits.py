"""The API's front door: one pure ASGI middleware that refuses what is too large, unauthenticated
or too frequent before the application reads a byte of the body.

In order: the body's size by Content-Length (413 at once), the bearer key (401; the verified
ApiKey goes into scope["state"] for the routes), the key's request rate and requests in flight
(429 with Retry-After); then the body is counted as it arrives, so a chunked body over the limit
is refused (413) without ever being held whole. Rate and concurrency are counted in this
process's memory: several replicas behind a balancer each enforce their own limits.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable

import anyio.to_thread
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.keys import ApiKey

STATE_KEY = "moerag_api_key"  # scope["state"][STATE_KEY]: the request's verified ApiKey
# Routes anyone may call: liveness, the widget's script and demo page, the API's own docs.
OPEN_PATHS = frozenset({"/healthz", "/widget.js", "/widget/demo", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
UPLOAD_PATH = re.compile(r"^/v1/collections/[^/]+/documents/?$")


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    """OpenAI's error shape, as the rest of the API answers."""
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


class _BodyTooLarge(Exception):
    """Raised into the application from `receive` when the body passes its limit."""


class TokenBuckets:
    """Requests per minute per key: a bucket of `per_minute` tokens per key, refilled continuously
    (so bursts up to the rate are allowed, and the average never exceeds it)."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.refill = per_minute / 60.0  # tokens per second
        self.clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}  # key id -> (tokens, when)

    def take(self, key_id: int) -> float:
        """0 when a request may go now (one token is spent), else the seconds until it may."""
        now = self.clock()
        tokens, then = self._buckets.get(key_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.refill)
        if tokens >= 1.0:
            self._buckets[key_id] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key_id] = (tokens, now)
        return (1.0 - tokens) / self.refill


class Guard:
    """Size, key, rate and concurrency checks for every HTTP request, before the app sees it.

    `body_limit` applies to every request but uploads (POST to a collection's documents), which
    get `upload_limit`. `per_minute` and `max_concurrent` of 0 turn those limits off.
    """

    def __init__(self, app: ASGIApp, *, verify: Callable[[str], ApiKey | None], body_limit: int, upload_limit: int,
                 per_minute: int = 0, max_concurrent: int = 0) -> None:
        self.app = app
        self.verify = verify
        self.body_limit, self.upload_limit = body_limit, upload_limit
        self.rate = TokenBuckets(per_minute) if per_minute > 0 else None
        self.max_concurrent = max_concurrent
        self.in_flight: dict[int, int] = defaultdict(int)  # key id -> requests not yet finished

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        upload = scope["method"] == "POST" and UPLOAD_PATH.match(scope["path"]) is not None
        limit = self.upload_limit if upload else self.body_limit
        setting = "MOERAG_API_MAX_UPLOAD_MB" if upload else "MOERAG_API_MAX_BODY_MB"
        too_large = (f"The request body is larger than {limit / 2**20:g} MB ({setting}).",
                     "invalid_request_error", "request_too_large")
        has_body = "content-length" in headers or "transfer-encoding" in headers
        declared = headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, *too_large, close=True)
            return

        key: ApiKey | None = None
        if scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                await _reply(send, 401, "Missing API key: send 'Authorization: Bearer <key>' (create one with: "
                             "moerag keys create --name NAME).", "invalid_request_error", "invalid_api_key", close=has_body)
                return
            key = await anyio.to_thread.run_sync(self.verify, token.strip())  # a database lookup: off the event loop
            if key is None:
                await _reply(send, 401, "Invalid or revoked API key.", "invalid_request_error", "invalid_api_key",
                             close=has_body)
                return
            wait = self.rate.take(key.id) if self.rate else 0.0
            if wait:
                await _reply(send, 429, f"Rate limit: this key may make {int(self.rate.capacity)} requests per minute "
                             "(MOERAG_API_RATE_PER_MINUTE). Retry after the time in the Retry-After header.",
                             "rate_limit_error", "rate_limit_exceeded", close=has_body,
                             headers={"retry-after": str(max(1, math.ceil(wait)))})
                return
            if self.max_concurrent and self.in_flight[key.id] >= self.max_concurrent:
                await _reply(send, 429, f"Too many requests in flight: this key may have {self.max_concurrent} at once "
                             "(MOERAG_API_MAX_CONCURRENT). Retry when one has finished.",
                             "rate_limit_error", "rate_limit_exceeded", close=has_body, headers={"retry-after": "1"})
                return
            scope.setdefault("state", {})[STATE_KEY] = key

        received = 0
        overflow = False
        started = False
        body_done = not has_body

        async def counted() -> Message:
            nonlocal received, overflow, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflow = True
                    raise _BodyTooLarge
                body_done = body_done or not message.get("more_body", False)
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if overflow:  # the app's own answer to the aborted read (a 400 or 500): ours replaces it
                return
            if message["type"] == "http.response.start" and not body_done:
                # Answered before the body was read (a 403, a 404): close rather than drain the rest.
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            started = True
            await send(message)

        if key is not None:
            self.in_flight[key.id] += 1
        try:
            await self.app(scope, counted, guarded)
        except _BodyTooLarge:
            pass
        except Exception:
            if not overflow:
                raise
        finally:
            if key is not None:  # a streamed answer counts until its body has been sent (or abandoned)
                self.in_flight[key.id] -= 1
                if not self.in_flight[key.id]:
                    del self.in_flight[key.id]
        if overflow and not started:
            await _reply(send, 413, *too_large, close=True)


async def _reply(send: Send, status: int, message: str, type: str, code: str, *, param: str | None = None,
                 close: bool = False, headers: dict[str, str] | None = None) -> None:
    """An error response sent straight from the middleware. `close` ends the connection after it,
    so that an unread request body is neither read nor drained."""
    body = error_body(message, type, code, param)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
