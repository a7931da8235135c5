"""HTTP responses for blocking answers whose client may leave (a closed stream, a dropped
connection, a client timeout): the answer runs in worker threads, and when the client goes its
cancel token is set and its iterator closed, so generation stops within a step and releases what
it holds (the engine's lock, an upstream connection, a conversation's rows).

Why not Starlette's own handling: StreamingResponse iterates a sync iterator in the thread pool
and, on disconnect, stops asking for items but never closes the iterator, which then stays
suspended, holding all it holds, until garbage collection. A plain endpoint runs to the end
whether anyone waits for it or not. These two responses own their answer and end it.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, TypeVar

import anyio
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
_END = object()
CLIENT_CLOSED_REQUEST = 499


async def iterate_in_thread(iterator: Generator[T, None, None], cancel: threading.Event) -> AsyncIterator[T]:
    """`iterator`'s items, each `next()` run in a worker thread. However iteration ends (exhausted,
    failed, cancelled, closed), `cancel` is set and `iterator` closed; closing runs in a thread
    too, because it runs the generator's `finally` blocks."""
    turn = threading.Lock()  # next() and close() never overlap: close() waits out the step in flight

    def step() -> Any:
        with turn:
            return next(iterator, _END)

    def close() -> None:
        with turn:
            iterator.close()

    try:
        # abandon_on_cancel: a disconnect interrupts the wait at once; the step still in flight
        # sees `cancel` below and ends after its current step, and close() waits for it.
        while (item := await anyio.to_thread.run_sync(step, abandon_on_cancel=True)) is not _END:
            yield item
    finally:
        cancel.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(close)


class CancellableStream(StreamingResponse):
    """A streamed answer: `iterator` (sync, blocking) is iterated in worker threads, and ended
    (cancel set, iterator closed) when the stream ends for any reason, the client leaving included."""

    def __init__(self, iterator: Generator[Any, None, None], cancel: threading.Event, **kwargs: Any) -> None:
        super().__init__(iterate_in_thread(iterator, cancel), **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A disconnect cancels the stream wherever it waits; when that was in `send`, the body
            # iterator is left suspended at its `yield`, and only this closes it.
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


class CancellableAnswer(Response):
    """A whole answer: `produce` (blocking; builds the Response to send) runs in a worker thread
    while the connection is watched. A client that leaves sets `cancel` (produce must stop soon
    after, and release what it holds) and is answered 499, as nginx logs a client that closed
    its request (nobody reads it; metrics and middleware see the request end). An error
    `produce` raises propagates before anything is sent, so the app's error handlers answer it."""

    def __init__(self, produce: Callable[[], Response], cancel: threading.Event) -> None:
        self.produce, self.cancel = produce, cancel
        self.background = None  # FastAPI may attach background tasks here

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = False
        outcome: list[Any] = []

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            self.cancel.set()

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch)
                try:
                    outcome.append(await anyio.to_thread.run_sync(self.produce, abandon_on_cancel=True))
                except Exception as exc:  # noqa: BLE001 -- re-raised below, outside the task group
                    outcome.append(exc)
                tasks.cancel_scope.cancel()
        finally:
            self.cancel.set()  # also when cancelled from outside (shutdown): the thread stops within a step
        if gone:
            await Response(status_code=CLIENT_CLOSED_REQUEST)(scope, receive, send)
            return
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        await outcome[0](scope, receive, send)
        if self.background is not None:
            await self.background()
