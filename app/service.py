"""The answer service: a question -> prepare -> retrieve -> fit -> generate -> persist, as a
stream of events.

The CLI, the UI and the API all call `AnswerService.stream` (or `ask`, which drains it).
Events, in order: "status" (a phase, in words), "warning" (any time), "sources" (the numbered
list given to the generator, once), "reasoning" and "answer" (text deltas), "timings", and
last "done" carrying the Answer. Answer deltas are already citation-checked: a [n] that names
no given source never reaches the user, and is reported as a warning.

The steps' parts live beside it: the types in app/answers.py, prompt fitting in
app/prompting.py, citation checks in app/citations.py, the web in app/websources.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.answers import Answer, Event, ServiceError, Source
from app.citations import CitationFilter
from app.generators import Generator, GeneratorError, Request, make_generator
from app.prompting import Fitted, fit_prompt
from app.settings import Settings

if TYPE_CHECKING:
    from retrieval.web import WebResults

log = logging.getLogger(__name__)

STOPPED_NOTE = "Stopped before the answer was complete."


@dataclass
class _Turn:
    """One question being answered: its options resolved against the settings, and what the
    steps add to it (the standalone form, the warnings so far)."""

    question: str
    history: list[dict[str, str]]  # earlier turns, oldest first
    collections: list[str]
    k: int
    mode: str  # hybrid | dense | bm25
    answer_tokens: int
    temperature: float
    reasoning_effort: str | None  # gpt-oss's (low, medium, high); None: the model's default
    web: bool
    cancel: threading.Event
    conversation_id: int | None
    standalone: str = ""
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> Event:
        """The warning as an event; the Answer carries it too."""
        self.warnings.append(text)
        return Event("warning", text)


@dataclass
class _Clock:
    """When each phase of one answer ended (time.perf_counter seconds), for its timings."""

    start: float = field(default_factory=time.perf_counter)
    retrieved: float = 0.0
    first: float | None = None  # the first delta, reasoning or answer
    first_answer: float | None = None
    end: float = 0.0

    def timings(self, prompt_tokens: int, completion_tokens: int) -> dict[str, float]:
        def ms(t: float) -> float:
            return round((t - self.start) * 1000, 1)

        first = self.first or self.end
        generating_s = self.end - first
        measurable = completion_tokens > 1 and generating_s > 0
        return {
            "retrieval_ms": ms(self.retrieved),
            "first_token_ms": ms(first),
            "first_answer_token_ms": ms(self.first_answer or self.end),
            "total_ms": ms(self.end),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "tokens_per_s": round(completion_tokens / generating_s, 2) if measurable else 0.0,
        }


@dataclass
class _Written:
    """What the generator wrote, citation-checked."""

    answer: str
    reasoning: str
    cite: CitationFilter  # the citations kept and removed
    stopped: bool  # `cancel` was set before the generator finished


class AnswerService:
    """Holds what answering needs (knowledge base, embedder, generator, conversations), loaded
    on first use and shared across questions. Safe to share between threads for retrieval;
    the engine generator serialises its own generations."""

    def __init__(
        self,
        settings: Settings,
        *,
        kb: Any | None = None,
        embedder: Any | None = None,
        generator: Generator | None = None,
    ) -> None:
        self.settings = settings
        self._kb = kb
        self._embedder = embedder
        self._generator = generator
        self._conversations = None
        # Concurrent first requests (the API's threads) must build each part once, not race to load it.
        self._building = threading.RLock()

    # Lazily built parts: the UI shows the page before the embedder or a model has loaded.

    @property
    def kb(self):
        if self._kb is not None:
            return self._kb
        with self._building:
            if self._kb is None:
                from retrieval.index import IndexParams
                from retrieval.kb import KnowledgeBase

                s = self.settings
                params = IndexParams(exact_max=s.exact_index_max, nprobe=s.nprobe)
                self._kb = KnowledgeBase(s.home, database_url=s.database_url or None, index_params=params)
        return self._kb

    @property
    def embedder(self):
        if self._embedder is not None:
            return self._embedder
        with self._building:
            if self._embedder is None:
                from ingest.embedder import get_embedder

                self._embedder = get_embedder(self.settings.embed_model)
        return self._embedder

    @property
    def generator(self) -> Generator:
        if self._generator is not None:
            return self._generator
        with self._building:
            if self._generator is None:
                self._generator = make_generator(self.settings)
        return self._generator

    @property
    def conversations(self):
        if self._conversations is not None:
            return self._conversations
        with self._building:
            if self._conversations is None:
                from app.history import Conversations

                self._conversations = Conversations(self.kb.store)
        return self._conversations

    def collections(self) -> list[str]:
        with self.kb.store.session() as session:
            return self.kb.store.collection_names(session)

    def ask(self, question: str, **options: Any) -> Answer:
        """The whole Answer at once (see `stream` for the options)."""
        for event in self.stream(question, **options):
            if event.kind == "done":
                return event.data
        raise AssertionError("stream() ended without a 'done' event")

    def stream(
        self,
        question: str,
        *,
        history: Sequence[dict[str, str]] | None = None,
        conversation_id: int | None = None,
        collections: Sequence[str] | None = None,
        k: int | None = None,
        mode: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        reasoning_effort: str | None = None,
        web: bool = False,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        """Answer `question` as a stream of events (module docstring); the last is ("done", Answer).

        history: earlier turns as chat messages ({"role", "content"}), oldest first. With
        `conversation_id` the history is read from that stored conversation, and the question
        and its answer are appended to it. `temperature` and `max_tokens` override the settings
        for this answer; `reasoning_effort` asks a model that has the switch (gpt-oss) to reason less
        or more. `web` adds live web results, ranked together with the knowledge base's;
        when the web is unavailable the answer goes on from the knowledge base, with a warning.

        Stopping: once `cancel` is set (a client that left, Ctrl-C) the generator stops after its
        current step and the stream ends with a "done" Answer marked `stopped`. Closing the stream
        (`.close()`, from the thread that iterates it: another thread sets `cancel` instead) stops
        it at once and releases all it holds (the engine, an upstream connection). Either way a
        stored conversation gets the partial answer, marked stopped, so its turns stay paired and
        the next question in it works.
        """
        turn = self._prepare(
            question,
            history=history,
            conversation_id=conversation_id,
            collections=collections,
            k=k,
            mode=mode,
            temperature=temperature,
            max_tokens=max_tokens,
            reasoning_effort=reasoning_effort,
            web=web,
            cancel=cancel,
        )
        events = self._answer(turn)
        if conversation_id is None:
            yield from events
        else:
            yield from self._persisted(conversation_id, turn.question, events)

    def _prepare(
        self,
        question: str,
        *,
        history: Sequence[dict[str, str]] | None,
        conversation_id: int | None,
        collections: Sequence[str] | None,
        k: int | None,
        mode: str | None,
        temperature: float | None,
        max_tokens: int | None,
        reasoning_effort: str | None,
        web: bool,
        cancel: threading.Event | None,
    ) -> _Turn:
        """The question checked, its conversation's history and collections read, and every
        option left out taken from the settings."""
        question = question.strip()
        if not question:
            raise ServiceError("The question is empty.")
        if conversation_id is not None:
            conv = self.conversations.get(conversation_id)
            if history is None:
                history = conv.history()
            collections = collections or conv.collections or None
        s = self.settings
        return _Turn(
            question=question,
            history=list(history or []),
            collections=list(collections or [s.collection]),
            k=k or s.answer_k,
            mode=mode or s.search_mode,
            answer_tokens=max_tokens or s.answer_tokens,
            temperature=s.temperature if temperature is None else temperature,
            reasoning_effort=reasoning_effort,
            web=web,
            cancel=threading.Event() if cancel is None else cancel,
            conversation_id=conversation_id,
        )

    def _answer(self, turn: _Turn) -> Iterator[Event]:
        """The events of one answer (see `stream`), conversations aside."""
        gen = self.generator
        yield from self._load_embedder(turn.mode)
        clock = _Clock()
        turn.standalone = yield from self._standalone(turn, gen)
        candidates = yield from self._candidates(turn)
        clock.retrieved = time.perf_counter()
        fitted = yield from self._fit(turn, gen, candidates)
        written = yield from self._generate(turn, gen, fitted, clock)
        yield from self._report(turn, gen, written)
        completion_tokens = gen.count_tokens(written.answer + written.reasoning) if gen.counts_tokens else 0
        timings = clock.timings(fitted.prompt_tokens, completion_tokens)
        yield Event("timings", timings)
        yield Event(
            "done",
            Answer(
                question=turn.question,
                answer=written.answer,
                reasoning=written.reasoning,
                sources=fitted.sources,
                citations=written.cite.cited,
                warnings=turn.warnings,
                timings=timings,
                standalone_question=turn.standalone,
                generator=gen.name,
                conversation_id=turn.conversation_id,
                stopped=written.stopped,
            ),
        )

    def _load_embedder(self, mode: str) -> Iterator[Event]:
        """The embedder, loaded before the clock starts: a one-off, not part of any answer's time."""
        if self._embedder is None and mode != "bm25":
            yield Event("status", "loading the embedding model")
            self.embedder  # noqa: B018

    def _standalone(self, turn: _Turn, gen: Generator) -> abc.Generator[Event, None, str]:
        """The question as the search needs it: a follow-up rewritten to stand on its own."""
        if not turn.history:
            return turn.question
        yield Event("status", "making the question standalone")
        try:
            return gen.condense(turn.history, turn.question, cancel=turn.cancel)
        except GeneratorError as exc:
            yield turn.warn(f"Could not rephrase the follow-up question ({exc}); searching with it as asked.")
            return turn.question

    def _candidates(self, turn: _Turn) -> abc.Generator[Event, None, list[Source]]:
        """The candidate sources, best first: the collections' best chunks, and with the web on
        the web's, in one ranking."""
        yield Event("status", "searching")
        present, notes = self.searchable(turn.collections, web=turn.web)
        for note in notes:
            yield turn.warn(note)
        candidates = self.retrieve(turn.standalone, collections=present, k=turn.k, mode=turn.mode)
        if turn.web and not turn.cancel.is_set():
            yield Event("status", "searching the web")
            candidates, found = self.with_web(turn.standalone, candidates, k=turn.k)
            for w in found.warnings:
                yield turn.warn(w)
        if not candidates:
            yield turn.warn(f"Nothing in {', '.join(repr(n) for n in turn.collections)} matched the question.")
        return candidates

    def _fit(self, turn: _Turn, gen: Generator, candidates: list[Source]) -> abc.Generator[Event, None, Fitted]:
        """The prompt: as many candidates as the generator's context window holds (app/prompting.py)."""
        fitted = fit_prompt(
            turn.question,
            turn.history,
            candidates,
            count=gen.count_tokens,
            context_window=gen.context_window,
            answer_tokens=turn.answer_tokens,
            count_messages=gen.count_messages,
        )
        for w in fitted.warnings:
            yield turn.warn(w)
        yield Event("sources", fitted.sources)
        return fitted

    def _generate(
        self, turn: _Turn, gen: Generator, fitted: Fitted, clock: _Clock
    ) -> abc.Generator[Event, None, _Written]:
        """The generator's reasoning and answer deltas, streamed as they come; the answer's pass
        through the citation filter first."""
        yield Event("status", "generating")
        request = Request(
            messages=fitted.messages,
            question=turn.standalone,
            sources=fitted.sources,
            max_tokens=min(turn.answer_tokens, gen.context_window - fitted.prompt_tokens),
            temperature=turn.temperature,
            reasoning_effort=turn.reasoning_effort,
            cancel=turn.cancel,
        )
        cite = CitationFilter(len(fitted.sources))
        answer: list[str] = []
        reasoning: list[str] = []
        deltas = iter(()) if turn.cancel.is_set() else gen.stream(request)
        try:
            for delta in deltas:
                clock.first = clock.first or time.perf_counter()
                if delta.kind == "reasoning":
                    reasoning.append(delta.text)
                    yield Event("reasoning", delta.text)
                    continue
                clock.first_answer = clock.first_answer or time.perf_counter()
                text = cite.feed(delta.text)
                if text:
                    answer.append(text)
                    yield Event("answer", text)
        finally:
            # Closed now, not at garbage collection: this releases the engine or the upstream connection.
            close = getattr(deltas, "close", None)
            if close is not None:
                close()
        stopped = turn.cancel.is_set()
        rest = cite.close()
        if rest:
            answer.append(rest)
            yield Event("answer", rest)
        clock.end = time.perf_counter()
        return _Written("".join(answer).strip(), "".join(reasoning).strip(), cite, stopped)

    def _report(self, turn: _Turn, gen: Generator, written: _Written) -> Iterator[Event]:
        """What the user is told about the answer once written: stopped, citations removed, the
        generator's own note."""
        if written.stopped:
            yield turn.warn(STOPPED_NOTE)
        removed = written.cite.warning()
        if removed:
            yield turn.warn(removed)
        if gen.note:
            yield turn.warn(gen.note)

    def _persisted(self, conversation_id: int, question: str, events: Iterator[Event]) -> Iterator[Event]:
        """`events`, passed through while the question and its answer are stored in the conversation.

        The question is stored first, so it is kept whatever happens to its answer; every way
        out from here (done, stopped, closed, failed) stores an answer row after it.
        """
        self.conversations.add(conversation_id, "user", question)
        so_far: dict[str, Any] | None = {"answer": [], "reasoning": [], "sources": []}
        note = STOPPED_NOTE
        try:
            for ev in events:
                if ev.kind in ("answer", "reasoning"):
                    so_far[ev.kind].append(ev.data)
                elif ev.kind == "sources":
                    so_far["sources"] = ev.data
                elif ev.kind == "done":
                    so_far = None
                    self._store_answer(conversation_id, ev.data)
                yield ev
        except Exception as exc:
            note = f"The answer failed: {exc}"
            raise
        finally:
            events.close()
            if so_far is not None:
                self._store_partial(conversation_id, so_far, note)

    def _store_answer(self, conversation_id: int, answer: Answer) -> None:
        self.conversations.add(
            conversation_id,
            "assistant",
            answer.answer,
            reasoning=answer.reasoning,
            sources=[x.to_json() for x in answer.sources],
            citations=answer.citations,
            warnings=answer.warnings,
            timings=answer.timings,
            stopped=answer.stopped,
        )

    def _store_partial(self, conversation_id: int, so_far: dict[str, Any], note: str) -> None:
        """What was streamed of an answer that never finished, marked stopped (never raises: it
        runs while another exception, or the stream's closing, is under way)."""
        try:
            self.conversations.add(
                conversation_id,
                "assistant",
                "".join(so_far["answer"]).strip(),
                reasoning="".join(so_far["reasoning"]).strip(),
                sources=[x.to_json() for x in so_far["sources"]],
                warnings=[note],
                stopped=True,
            )
        except Exception:  # logged: the original reason for stopping matters more
            log.exception("could not store the stopped answer of conversation %s", conversation_id)

    # The web part lives in app/websources.py, imported on first use: it brings in the web stack
    # and the parsers, which a service that never searches the web does not need.

    def search_web(self, query: str, *, k: int) -> tuple[list[Source], WebResults]:
        """(web chunks ranked for `query`, best first, as Sources; the WebResults with skipped pages)."""
        from app import websources

        return websources.search_web(query, k=k, settings=self.settings, store=self.kb.store, embedder=self.embedder)

    def with_web(self, query: str, kb_sources: list[Source], *, k: int) -> tuple[list[Source], WebResults]:
        """The knowledge base's sources and the web's, in one ranking; the WebResults of the search."""
        from app import websources

        web_sources, found = self.search_web(query, k=k)
        return websources.fuse_with_web(query, kb_sources, web_sources, k=k, embed=self.embedder.encode), found

    def searchable(
        self, names: Sequence[str], *, web: bool, doing: str = "answering from"
    ) -> tuple[list[str], list[str]]:
        """(the collections to search, notes). With the web on, a collection that does not exist
        yet (a fresh install) is searched as empty, with a note, so web-only questions work; with
        it off, the search itself fails with the clear "No collection" error. Creates nothing."""
        if not web or self.settings.web_provider == "none":
            return list(names), []
        have = set(self.collections())
        present = [n for n in names if n in have]
        missing = [n for n in names if n not in have]
        if not missing:
            return present, []
        flag = "" if missing[0] == self.settings.collection else f" --collection {missing[0]}"
        which = ", ".join(repr(n) for n in missing)
        rest = f"{doing} the web alone" if not present else f"{doing} the web and {', '.join(repr(n) for n in present)}"
        return present, [
            f"No knowledge base collection {which} yet; {rest} (add documents with: moerag ingest PATH{flag})."
        ]

    def search_items(
        self, query: str, *, collection: str, k: int, mode: str, source: str | None = None, web: bool = False
    ) -> dict[str, Any]:
        """What `moerag search --json` prints: {"results": [...]} (the items of Hit.to_json, plus
        `origin`; web items also carry `url`, `domain`, `fetched_at`), and with `web` the
        "skipped" results ({url, reason}) and "warnings". With `web`, a collection that does not
        exist yet is searched as empty, with a warning (see `searchable`)."""
        from retrieval.search import search

        embed = self.embedder.encode if mode != "bm25" else None
        present, notes = self.searchable([collection], web=web, doing="searching")
        hits = (
            search(self.kb, query, embed=embed, collection=collection, k=k, mode=mode, source=source) if present else []
        )
        if not web:
            return {"results": [{**h.to_json(), "origin": "kb"} for h in hits], "skipped": [], "warnings": []}
        from app import websources

        web_sources, found = self.search_web(query, k=k)
        found.warnings[:0] = notes
        results = websources.fused_items(query, hits, web_sources, k=k, embed=self.embedder.encode)
        return {"results": results, "skipped": found.skipped, "warnings": found.warnings}

    def retrieve(self, query: str, *, collections: Sequence[str], k: int, mode: str) -> list[Source]:
        """Hybrid (by default) search of each collection; several collections are fused by rank."""
        from retrieval.search import rrf, search

        embed = self.embedder.encode if mode != "bm25" else None
        per_collection: dict[str, list] = {}
        for name in collections:
            per_collection[name] = search(self.kb, query, embed=embed, collection=name, k=k, mode=mode)
        if len(collections) == 1:
            ordered = [(collections[0], h) for h in per_collection[collections[0]]]
        else:
            by_key = {(name, h.chunk_id): (name, h) for name, hits in per_collection.items() for h in hits}
            fused = rrf([[((name, h.chunk_id), h.score) for h in hits] for name, hits in per_collection.items()])
            ordered = [by_key[key] for key, _ in fused[:k]]
        return [
            Source(
                n=i,
                text=h.text,
                title=h.title,
                source=h.source,
                collection=name,
                score=float(h.score),
                page=h.page,
                heading=h.heading,
                start=h.start,
                end=h.end,
                document_id=h.document_id,
                chunk_id=h.chunk_id,
            )
            for i, (name, h) in enumerate(ordered, 1)
        ]
