"""Generators: numbered sources + question -> streamed reasoning and answer deltas.

A registry from name to class; each class has one job, `stream(request)`, plus what the
service needs to fit a prompt (`context_window`, `count_tokens`, `count_messages`), to make a
follow-up question standalone (`condense`) and to report on the answer (`note`,
`counts_tokens`): the `Generator` protocol. `extractive` needs no model and is the default; `engine`
runs the local MoE engine; `openai` talks to any OpenAI-compatible server.

Stopping: a generator checks `request.cancel` between steps (a decode step, an upstream chunk,
a sentence) and ends early when it is set; closing the iterator `stream` returned releases
whatever it holds (the engine's lock, the upstream connection) at once, not at garbage collection.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.settings import Settings
from retrieval.errors import MoeragError
from retrieval.search import STOPWORDS

log = logging.getLogger(__name__)


class GeneratorError(MoeragError):
    """The generator cannot run: no model, a server that does not answer, a bad reply."""


MESSAGE_OVERHEAD = 8  # tokens a chat template adds around each message (role markers, separators)


@dataclass(frozen=True)
class Delta:
    kind: str  # "reasoning" | "answer"
    text: str


@dataclass
class Request:
    """What a generator is asked: chat messages for a model, and the pieces they were built from."""

    messages: list[dict[str, str]]  # system, history turns, then the user turn with the sources
    question: str  # standalone form, used by the extractive generator
    sources: list[Any]  # answers.Source, numbered from 1
    max_tokens: int = 2048
    temperature: float = 0.6
    reasoning_effort: str | None = None  # gpt-oss's switch (low, medium, high); None: the model's default
    cancel: threading.Event = field(default_factory=threading.Event)  # set: stop after the current step


@dataclass
class Status:
    name: str
    model: str  # what runs, in words
    ready: bool  # False when loading would be needed or the server is unknown
    note: str = ""  # e.g. how to configure a real model


class Generator(Protocol):
    """What the service asks of a generator; every class in GENERATORS has all of it."""

    name: str
    note: str  # a warning every answer carries (why it is only quoted), or ""
    counts_tokens: bool  # False: nothing is generated, so no completion tokens are reported

    @property
    def context_window(self) -> int: ...

    def status(self) -> Status: ...

    def count_tokens(self, text: str) -> int: ...

    def count_messages(self, messages: list[dict[str, str]]) -> int:
        """The whole prompt's length as the model will read it, chat template included."""
        ...

    def condense(self, history: Sequence[dict[str, str]], question: str, *,
                 cancel: threading.Event | None = None) -> str: ...

    def stream(self, request: Request) -> Iterator[Delta]: ...


def estimate_messages(messages: Sequence[dict[str, str]], count: Callable[[str], int]) -> int:
    """A prompt's length without its chat template at hand: each message plus a fixed overhead."""
    return sum(count(m["content"]) + MESSAGE_OVERHEAD for m in messages)


# --- the extractive fallback ----------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])|\n\s*\n")
_TOKEN = re.compile(r"\w+", re.UNICODE)
# The query's stop words, and pronouns and fillers that say nothing about which sentence answers.
_STOP = STOPWORDS | frozenset("i you he she we me my your his her our us them been being had also than so".split())
MIN_WORDS = 4  # shorter "sentences" are headings and labels, not answers
NO_MODEL_NOTE = (
    "No generator model is configured, so this answer quotes the most relevant sentences of the sources. "
    "For written answers set MOERAG_MODEL to a checkpoint directory or hub id (the local engine), or "
    "MOERAG_OPENAI_BASE_URL and MOERAG_OPENAI_MODEL for an OpenAI-compatible server."
)


_HEADING = re.compile(r"^\s*#{1,6}\s")
_BLOCK_START = re.compile(r"^\s*(?:[-*+•]\s+|\d+[.)]\s+|#{1,6}\s+|\|)")


def split_sentences(text: str) -> list[str]:
    """Sentences of a passage, whitespace-normalised. Markdown list items and table rows end a
    sentence too (their markers dropped); headings are left out."""
    blocks: list[str] = []
    for line in text.splitlines():
        if not line.strip() or _HEADING.match(line):
            blocks.append("")  # headings are labels, not statements
        elif _BLOCK_START.match(line) or not blocks:
            blocks.append(_BLOCK_START.sub("", line, count=1))
        else:
            blocks[-1] += " " + line
    out = []
    for block in blocks:
        out += [" ".join(p.split()) for p in _SENTENCE_END.split(block) if p and p.strip()]
    return out


def content_words(text: str) -> list[str]:
    return [w for w in (m.lower() for m in _TOKEN.findall(text)) if w not in _STOP]


def _stem(word: str) -> str:
    """A crude suffix stripper: enough for 'invaded' ~ 'invasion'-free matching of plurals and tenses."""
    for suffix in ("ations", "ation", "ings", "ing", "ies", "ied", "ed", "es", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


class ExtractiveGenerator:
    """Answers with the question's best-matching sentences from the sources, each cited [n].

    A sentence's score is the IDF-weighted share of the question's content words it contains
    (IDF over the given sources' sentences), plus a small bonus for its source's rank, so ties
    go to the passage retrieval liked best. No model, so a fresh install answers at once.
    """

    name = "extractive"
    context_window = 8192
    note = NO_MODEL_NOTE
    counts_tokens = False  # quoted sentences are not generated tokens

    def __init__(self, settings: Settings, *, max_sentences: int = 3, max_words: int = 90) -> None:
        self.max_sentences = max_sentences
        self.max_words = max_words

    def status(self) -> Status:
        return Status(self.name, "extractive (no model)", True, NO_MODEL_NOTE)

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text) / 4)  # only budgets sources; nothing is tokenised

    def count_messages(self, messages: list[dict[str, str]]) -> int:
        return estimate_messages(messages, self.count_tokens)

    def condense(self, history: Sequence[dict[str, str]], question: str, *, cancel: threading.Event | None = None) -> str:
        return condense_by_rule(history, question)

    def stream(self, request: Request) -> Iterator[Delta]:
        picked = self.pick(request.question, request.sources)
        if not picked:
            yield Delta("answer", "The sources do not seem to answer this question.")
            return
        for i, (n, sentence) in enumerate(picked):
            if request.cancel.is_set():
                return
            yield Delta("answer", ("" if i == 0 else " ") + f"{sentence} [{n}]")

    def pick(self, question: str, sources: Sequence[Any]) -> list[tuple[int, str]]:
        """(source number, sentence) for the best sentences, best first."""
        q_terms = {_stem(w) for w in content_words(question)}
        if not q_terms:
            return []
        sentences = [(s.n, sent) for s in sources for sent in split_sentences(s.text) if len(sent.split()) >= MIN_WORDS]
        bags = [{_stem(w) for w in content_words(sent)} for _, sent in sentences]
        df: dict[str, int] = {}
        for bag in bags:
            for t in bag & q_terms:
                df[t] = df.get(t, 0) + 1
        n_sent = max(len(sentences), 1)
        idf = {t: math.log(1 + n_sent / (1 + df.get(t, 0))) for t in q_terms}
        total = sum(idf.values())
        scored = []
        for (n, sent), bag in zip(sentences, bags):
            overlap = sum(idf[t] for t in bag & q_terms) / total
            if overlap <= 0:
                continue
            scored.append((overlap + 0.15 / (n + 1), n, sent))
        scored.sort(key=lambda x: -x[0])
        picked: list[tuple[int, str]] = []
        words = 0
        for _, n, sent in scored:
            if len(picked) >= self.max_sentences or (picked and words + len(sent.split()) > self.max_words):
                break
            picked.append((n, sent))
            words += len(sent.split())
        return picked


_FOLLOW_UP = frozenset(
    "it its it's they them their theirs this that these those he him his she her hers there one ones "
    "former latter same such also else".split()
)


def condense_by_rule(history: Sequence[dict[str, str]], question: str) -> str:
    """A follow-up that leans on the conversation (pronouns, or barely any words of its own) gets
    the previous question's words added, so retrieval sees what it is about."""
    previous = next((m["content"] for m in reversed(history) if m.get("role") == "user"), None)
    if not previous:
        return question
    words = [w.lower() for w in _TOKEN.findall(question)]
    leans = any(w in _FOLLOW_UP for w in words) or len(content_words(question)) <= 2
    return f"{previous.strip()} {question.strip()}" if leans else question


CONDENSE_PROMPT = (
    "Rewrite the user's last question so that it can be understood without the conversation: "
    "replace pronouns and references with what they refer to. Reply with the rewritten question only."
)


def _condense_messages(history: Sequence[dict[str, str]], question: str) -> list[dict[str, str]]:
    turns = "\n".join(f"{m['role']}: {m['content']}" for m in history[-6:])
    return [
        {"role": "system", "content": CONDENSE_PROMPT},
        {"role": "user", "content": f"Conversation:\n{turns}\n\nLast question: {question}"},
    ]


def _clean_condensed(text: str, question: str) -> str:
    text = re.sub(r"<think>.*?(</think>|$)", "", text, flags=re.S).strip().strip('"').strip()
    first = text.splitlines()[0].strip() if text else ""
    return first if 3 <= len(first) <= 4 * len(question) + 200 else question


# --- the local engine -----------------------------------------------------------------------------

ENGINE_WAIT_S = 600.0  # longest wait for the engine behind other answers before giving up with an error


class EngineGenerator:
    """The local MoE engine (engine.load_model), loaded on first use and kept."""

    name = "engine"
    note = ""
    counts_tokens = True

    def __init__(self, settings: Settings, *, model: Any | None = None) -> None:
        if not settings.model and model is None:
            raise GeneratorError("The engine generator needs a model: set MOERAG_MODEL to a checkpoint directory or hub id.")
        self.settings = settings
        self._model = model
        self._lock = threading.Lock()  # one generation at a time: the model is not re-entrant
        self._loading = threading.Lock()  # the first questions arriving together load the model once

    @property
    def model(self) -> Any:
        if self._model is not None:
            return self._model
        with self._loading:
            if self._model is not None:
                return self._model
            import torch

            from engine import load_model
            from engine.errors import EngineError

            s = self.settings
            # The int8/int4 CPU kernels are fast with bfloat16 activations; GPUs prefer bf16 too.
            dtype = torch.bfloat16 if (s.quantize or s.device.startswith("cuda")) else torch.float32
            try:
                self._model = load_model(s.model, dtype=dtype, quantize=s.quantize or None, device=s.device)
            except EngineError as exc:  # the message names MOERAG_MODEL's path and the fix
                raise GeneratorError(str(exc)) from exc
        return self._model

    @property
    def context_window(self) -> int:
        return self.settings.context_window or self.model.context_length

    def status(self) -> Status:
        label = self.settings.model or str(getattr(self._model, "directory", "model"))
        if self.settings.quantize:
            label += f" ({self.settings.quantize})"
        return Status(self.name, label, self._model is not None, "" if self._model else "loads on the first question")

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer.encode(text, add_special_tokens=False))

    def count_messages(self, messages: list[dict[str, str]]) -> int:
        """The prompt's exact length: the chat template applied, as generation will see it."""
        return len(self.model.prompt_ids(messages))

    def condense(self, history: Sequence[dict[str, str]], question: str, *, cancel: threading.Event | None = None) -> str:
        steps = self._run(_condense_messages(history, question), 64, 0.0, thinking=False, effort="low",
                          cancel=cancel or threading.Event())
        text = "".join(d.text for d in steps)
        return _clean_condensed(text, question)

    def stream(self, request: Request) -> Iterator[Delta]:
        yield from self._run(request.messages, request.max_tokens, request.temperature, thinking=None,
                             effort=request.reasoning_effort, cancel=request.cancel)

    def _acquire(self, cancel: threading.Event) -> bool:
        """Wait for the engine behind other answers; False when cancelled while waiting, so a
        request whose client left never runs at all."""
        deadline = time.monotonic() + ENGINE_WAIT_S
        while not self._lock.acquire(timeout=0.05):
            if cancel.is_set():
                return False
            if time.monotonic() > deadline:
                raise GeneratorError(
                    f"The engine has been busy with other answers for {ENGINE_WAIT_S:.0f} s; try again later, or move "
                    "generation to a server that batches requests (MOERAG_OPENAI_BASE_URL)."
                )
        return True

    def _run(self, messages: list[dict[str, str]], max_tokens: int, temperature: float, *, thinking: bool | None,
             effort: str | None, cancel: threading.Event) -> Iterator[Delta]:
        from engine import SamplingParams
        from engine.errors import EngineError
        from engine.reasoning import reply_splitter

        model = self.model
        if not self._acquire(cancel):
            return
        # try/finally rather than `with`: the lock must be released when this generator is closed
        # or abandoned mid-answer, and the token loop closed with it (its KV cache freed).
        try:
            ids = model.prompt_ids(messages, enable_thinking=thinking, reasoning_effort=effort)
            splitter = reply_splitter(model.tokenizer, model.tokenizer.decode(ids))
            steps = model.stream_tokens(ids, SamplingParams(temperature=temperature, max_new_tokens=max_tokens))
            try:
                for _, delta in steps:  # one item per decode step
                    if cancel.is_set():
                        break
                    for piece in splitter.feed(delta):
                        yield Delta(piece.kind, piece.text)
            finally:
                steps.close()
            for piece in splitter.close():
                yield Delta(piece.kind, piece.text)
        except EngineError as exc:  # e.g. a prompt longer than the model's context window
            raise GeneratorError(str(exc)) from exc
        finally:
            self._lock.release()


# --- an OpenAI-compatible server ------------------------------------------------------------------


class OpenAIGenerator:
    """Any server that speaks OpenAI's chat completions (vLLM, SGLang, llama.cpp, Ollama).

    Reasoning comes from the delta's `reasoning_content` (DeepSeek, vLLM) or `reasoning`
    (Ollama) field, or from <think> tags inside the content.
    """

    name = "openai"
    note = ""
    counts_tokens = True

    def __init__(self, settings: Settings) -> None:
        if not settings.openai_base_url:
            raise GeneratorError("The openai generator needs MOERAG_OPENAI_BASE_URL, e.g. http://gpu1:8000/v1")
        import openai

        self.settings = settings
        self.model = settings.openai_model or "default"
        self.client = openai.OpenAI(
            base_url=settings.openai_base_url, api_key=settings.openai_api_key or "none", timeout=120.0, max_retries=1
        )
        self.context_window = settings.context_window or 8192

    def status(self) -> Status:
        return Status(self.name, f"{self.model} at {self.settings.openai_base_url}", True)

    def count_tokens(self, text: str) -> int:
        # The server's tokenizer is not here; ~3 characters a token errs on the safe side for
        # English and code (real BPE vocabularies average about 4).
        return math.ceil(len(text) / 3)

    def count_messages(self, messages: list[dict[str, str]]) -> int:
        return estimate_messages(messages, self.count_tokens)

    def condense(self, history: Sequence[dict[str, str]], question: str, *, cancel: threading.Event | None = None) -> str:
        try:
            steps = self._run(_condense_messages(history, question), 64, 0.0, effort=None,  # a server may refuse it
                              cancel=cancel or threading.Event())
            text = "".join(d.text for d in steps if d.kind == "answer")
        except GeneratorError as exc:
            log.warning("condensing the follow-up question failed (%s); using a rule instead", exc)
            return condense_by_rule(history, question)
        return _clean_condensed(text, question)

    def stream(self, request: Request) -> Iterator[Delta]:
        yield from self._run(request.messages, request.max_tokens, request.temperature,
                             effort=request.reasoning_effort, cancel=request.cancel)

    def _run(self, messages: list[dict[str, str]], max_tokens: int, temperature: float, *, effort: str | None,
             cancel: threading.Event) -> Iterator[Delta]:
        import openai

        from engine.reasoning import ReasoningSplitter

        url = self.settings.openai_base_url
        stream = None
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True,
                **({"reasoning_effort": effort} if effort else {}),  # gpt-oss on vLLM / SGLang / Ollama
            )
            splitter = ReasoningSplitter()
            for chunk in stream:  # one item per upstream chunk
                if cancel.is_set():
                    break
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                extra = delta.model_extra or {}
                reasoning = extra.get("reasoning_content") or extra.get("reasoning")
                if reasoning:
                    yield Delta("reasoning", reasoning)
                if delta.content:
                    for piece in splitter.feed(delta.content):
                        yield Delta(piece.kind, piece.text)
            for piece in splitter.close():
                yield Delta(piece.kind, piece.text)
        except openai.APIConnectionError as exc:
            raise GeneratorError(f"Cannot reach the OpenAI-compatible server at {url}: {exc}. Is it running?") from exc
        except openai.AuthenticationError as exc:
            raise GeneratorError(f"The server at {url} refused the API key (MOERAG_OPENAI_API_KEY): {exc.message}") from exc
        except openai.NotFoundError as exc:
            raise GeneratorError(
                f"The server at {url} does not serve model '{self.model}' (MOERAG_OPENAI_MODEL): {exc.message}"
            ) from exc
        except openai.APIError as exc:
            raise GeneratorError(f"The server at {url} failed: {exc}") from exc
        finally:
            if stream is not None:
                stream.close()  # hang up on the server: it stops generating for nobody


GENERATORS: dict[str, Callable[..., Generator]] = {
    "extractive": ExtractiveGenerator,
    "engine": EngineGenerator,
    "openai": OpenAIGenerator,
}


def generator_name(settings: Settings) -> str:
    """The configured generator; unset, the engine when a model is named, a server when a URL is."""
    if settings.generator:
        return settings.generator
    if settings.model:
        return "engine"
    if settings.openai_base_url:
        return "openai"
    return "extractive"


def make_generator(settings: Settings) -> Generator:
    name = generator_name(settings)
    if name not in GENERATORS:
        raise GeneratorError(f"Unknown generator '{name}'; choose one of: {', '.join(GENERATORS)}")
    return GENERATORS[name](settings)


__all__ = [
    "Delta",
    "GENERATORS",
    "Generator",
    "GeneratorError",
    "MESSAGE_OVERHEAD",
    "Request",
    "Status",
    "condense_by_rule",
    "generator_name",
    "make_generator",
    "split_sentences",
]
