"""The answer service: retrieval, context fitting, citation checks, conversations, and each
generator (extractive, the local engine on a tiny random checkpoint, an OpenAI-compatible
server on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.answers import ServiceError, Source
from app.citations import CitationFilter, check_citations
from app.generators import GeneratorError, condense_by_rule, split_sentences
from app.prompting import fit_prompt
from app.service import AnswerService
from app.settings import Settings
from ingest.pipeline import ingest_paths

DOCS = {
    "faiss.md": "# The FAISS index\n\nThe FAISS index is derived from the vectors in the database. "
    "It is rebuilt without re-embedding by running moerag index rebuild.\n\n## Releases\n\n"
    "The index format was introduced in version 0.3 in March 2026.\n",
    "tea.md": "# Green tea\n\nGreen tea is made from Camellia sinensis leaves that are not oxidised. "
    "Steep green tea at 80 degrees Celsius for two minutes.\n",
    "trains.md": "# Night trains\n\nThe night train from Vienna to Hamburg leaves at 21:30 and arrives at 09:10. "
    "Sleeper cabins hold up to six passengers.\n",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, embedder):
    """A small knowledge base on disk: (settings, knowledge base)."""
    from retrieval.kb import KnowledgeBase

    root = tmp_path_factory.mktemp("svc")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    settings = Settings(home=root / "home")
    kb = KnowledgeBase(settings.home)
    ingest_paths(kb, embedder, [docs], collection="default")
    return settings, kb


def make_service(corpus, embedder, **changes) -> AnswerService:
    settings, kb = corpus
    return AnswerService(settings.replace(**changes), kb=kb, embedder=embedder)


# --- the extractive generator, end to end --------------------------------------------------------


def test_extractive_answer_quotes_and_cites_its_sources(corpus, embedder):
    service = make_service(corpus, embedder)
    events = list(service.stream("At what temperature should green tea be steeped?"))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and kinds.index("sources") < kinds.index("answer") < kinds.index("timings")
    answer = events[-1].data
    assert "80 degrees" in answer.answer
    assert answer.citations and all(1 <= n <= len(answer.sources) for n in answer.citations)
    assert answer.sources[answer.citations[0] - 1].title == "Green tea"
    # Each quoted sentence really is in the source it cites.
    for sentence, n in _cited_sentences(answer.answer):
        assert sentence in " ".join(answer.sources[n - 1].text.split())
    assert any("No generator model is configured" in w for w in answer.warnings)
    streamed = "".join(e.data for e in events if e.kind == "answer")
    assert streamed.strip() == answer.answer  # what streamed is what was stored
    src = answer.to_json()["sources"][0]
    for key in ("n", "text", "snippet", "title", "source", "page", "heading", "start", "end", "score", "origin"):
        assert key in src
    assert src["source"].endswith(".md")


def _cited_sentences(text: str) -> list[tuple[str, int]]:
    import re

    return [(m.group(1).strip(), int(m.group(2))) for m in re.finditer(r"([^\[\]]+?) \[(\d+)\]", text)]


def test_unknown_collection_and_empty_question_are_clear_errors(corpus, embedder):
    from retrieval.errors import NotFoundError

    service = make_service(corpus, embedder)
    with pytest.raises(NotFoundError, match="moerag ingest"):
        service.ask("anything", collections=["nope"])
    with pytest.raises(ServiceError, match="empty"):
        service.ask("   ")


def test_split_sentences_breaks_markdown_lists_and_headings():
    text = "# Title\n\nFirst sentence here. Second one follows.\n- item one is long\n- item two\n1. step"
    assert split_sentences(text) == ["First sentence here.", "Second one follows.", "item one is long", "item two", "step"]


# --- citations -------------------------------------------------------------------------------------


def test_citations_to_sources_not_given_are_removed_even_split_across_deltas():
    f = CitationFilter(3)
    pieces = [f.feed(d) for d in ["Tea is green [", "1]. Trains run [1", "2]. Both [2, ", "9] and [a] x[3]"]]
    text = "".join(pieces) + f.close()
    assert text == "Tea is green [1]. Trains run . Both [2] and [a] x[3]"
    assert f.cited == [1, 2, 3] and f.invalid == [12, 9]
    assert check_citations("no citations [0]", 2) == ("no citations ", [], [0])


def test_invalid_citation_from_a_generator_is_reported(corpus, embedder):
    class Liar:
        name, context_window, note, counts_tokens = "liar", 4096, "", True

        def count_tokens(self, text):
            return len(text.split())

        def count_messages(self, messages):
            return sum(self.count_tokens(m["content"]) for m in messages)

        def condense(self, history, question):
            return question

        def stream(self, request):
            from app.generators import Delta

            yield Delta("reasoning", "Let me look at source 1.")
            yield Delta("answer", "Steep it at 80 degrees [1][7].")

    settings, kb = corpus
    answer = AnswerService(settings, kb=kb, embedder=embedder, generator=Liar()).ask("green tea temperature?")
    assert answer.answer == "Steep it at 80 degrees [1]."
    assert answer.citations == [1] and answer.reasoning == "Let me look at source 1."
    assert any("[7]" in w and "not among" in w for w in answer.warnings)


# --- context fitting ---------------------------------------------------------------------------------


def _source(n: int, words: int) -> Source:
    return Source(n=n, text=" ".join(f"w{n}_{i}" for i in range(words)), title=f"doc {n}", source=f"/d/{n}.md",
                  collection="c", score=1.0 / n)


def test_sources_that_do_not_fit_are_cut_or_dropped_with_warnings():
    count = lambda t: len(t.split())  # noqa: E731 -- one token per word
    candidates = [_source(i, 100) for i in range(1, 6)]
    fitted = fit_prompt("what is w1_3?", [], candidates, count=count, context_window=700, answer_tokens=200)
    kept = len(fitted.sources)
    assert 2 <= kept <= 4 and [s.n for s in fitted.sources] == list(range(1, kept + 1))  # best first, renumbered
    last = fitted.sources[-1]
    assert last.cut and 48 <= len(last.text.split()) < 100 and not any(s.cut for s in fitted.sources[:-1])
    assert any("cut" in w and f"[{kept}]" in w for w in fitted.warnings)
    assert any(w.startswith(f"{5 - kept} retrieved source(s) did not fit") and f"doc {kept + 1}" in w for w in fitted.warnings)
    assert fitted.prompt_tokens <= 700 - 200  # the answer budget stays free
    assert "[1] doc 1" in fitted.messages[-1]["content"] and f"doc {kept + 1}" not in fitted.messages[-1]["content"]


def test_old_history_turns_are_dropped_first_and_said_so():
    count = lambda t: len(t.split())  # noqa: E731
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(["x"] * 60)} for i in range(8)]
    fitted = fit_prompt("and then?", history, [_source(1, 50)], count=count, context_window=800, answer_tokens=200)
    kept = fitted.messages[1:-1]
    assert 0 < len(kept) < 8 and kept == history[-len(kept):]
    assert any("earlier message(s)" in w for w in fitted.warnings)
    with pytest.raises(ServiceError, match="too small"):
        fit_prompt(" ".join(["q"] * 900), [], [], count=count, context_window=800, answer_tokens=200)


# --- follow-ups and conversations --------------------------------------------------------------------


def test_follow_up_is_made_standalone_before_retrieval(corpus, embedder):
    history = [{"role": "user", "content": "How is the FAISS index rebuilt?"},
               {"role": "assistant", "content": "With moerag index rebuild [1]."}]
    assert condense_by_rule(history, "When was it introduced?") == "How is the FAISS index rebuilt? When was it introduced?"
    assert condense_by_rule(history, "How long should green tea steep?") == "How long should green tea steep?"
    answer = make_service(corpus, embedder).ask("When was it introduced?", history=history)
    assert "FAISS" in answer.standalone_question
    assert answer.sources[0].title == "The FAISS index" and "March 2026" in answer.answer


def test_conversations_store_turns_with_sources_and_resume(corpus, embedder):
    service = make_service(corpus, embedder)
    convs = service.conversations
    conv = convs.create()
    first = service.ask("How is the FAISS index rebuilt?", conversation_id=conv.id)
    second = service.ask("When was it introduced?", conversation_id=conv.id)
    assert "FAISS" in second.standalone_question  # history came from the store
    stored = convs.get(conv.id)
    assert [m.role for m in stored.messages] == ["user", "assistant", "user", "assistant"]
    assert stored.title == "How is the FAISS index rebuilt?"
    assert stored.messages[1].content == first.answer and stored.messages[1].citations == first.citations
    assert stored.messages[1].sources[0]["title"] == "The FAISS index"
    convs.rename(conv.id, "FAISS questions")
    assert [c.title for c in convs.list()][0] == "FAISS questions"
    convs.delete(conv.id)
    assert conv.id not in [c.id for c in convs.list()]


# --- the local engine on a tiny random checkpoint ------------------------------------------------------


def test_engine_generator_answers_within_its_context_window(corpus, embedder, chat_checkpoint):
    question = "How is the FAISS index rebuilt?"
    roomy = make_service(corpus, embedder, model=str(chat_checkpoint), context_window=4096, answer_tokens=24, temperature=0.0)
    answer = roomy.ask(question, k=3)
    assert answer.generator == "engine" and len(answer.sources) == 3
    assert not any("did not fit" in w or "was cut" in w for w in answer.warnings)
    assert not any("No generator model" in w for w in answer.warnings)
    assert answer.timings["completion_tokens"] > 0 and all(1 <= n <= len(answer.sources) for n in answer.citations)

    # A window just too small for all three sources: the last is cut or dropped, and said so.
    gen = roomy.generator
    window = answer.timings["prompt_tokens"] + 24 - 30
    tight = make_service(corpus, embedder, context_window=window, answer_tokens=24, temperature=0.0)
    tight._generator = type(gen)(tight.settings, model=gen.model)  # the same loaded model, a smaller window
    seen = {}
    real_stream = tight.generator.stream

    def spy(request):
        seen["request"] = request
        yield from real_stream(request)

    tight.generator.stream = spy
    answer = tight.ask(question, k=3)
    assert any("did not fit" in w or "was cut" in w for w in answer.warnings)
    prompt = gen.model.prompt_ids(seen["request"].messages)  # what the model really read
    assert len(prompt) + seen["request"].max_tokens <= window


# --- an OpenAI-compatible server on 127.0.0.1 ------------------------------------------------------------


class _ChatServer(BaseHTTPRequestHandler):
    """Speaks /v1/chat/completions with SSE streaming: reasoning_content deltas, then content."""

    requests: list[dict] = []
    reply = ["Steep it at 80 degrees ", "[1", "] for two minutes [5]."]

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if body.get("model") != "tiny-r1":
            self._json(404, {"error": {"message": f"model {body.get('model')} not found", "type": "not_found"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        deltas = [{"role": "assistant", "content": ""}, {"reasoning_content": "The user asks about tea. "},
                  {"reasoning_content": "Source 1 says 80 degrees."}] + [{"content": c} for c in self.reply]
        for i, d in enumerate(deltas):
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "tiny-r1",
                     "choices": [{"index": 0, "delta": d, "finish_reason": "stop" if i == len(deltas) - 1 else None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ChatServer.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_compatible_server_streams_reasoning_and_checked_citations(corpus, embedder, chat_server):
    service = make_service(corpus, embedder, openai_base_url=chat_server, openai_model="tiny-r1", openai_api_key="sk-test")
    events = list(service.stream("At what temperature should green tea be steeped?", k=3))
    answer = events[-1].data
    assert answer.generator == "openai"
    assert answer.reasoning == "The user asks about tea. Source 1 says 80 degrees."
    assert answer.answer == "Steep it at 80 degrees [1] for two minutes ."
    assert [e.data for e in events if e.kind == "reasoning"][0] == "The user asks about tea. "
    assert any("[5]" in w for w in answer.warnings)
    sent = _ChatServer.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-test" and sent["body"]["stream"] is True
    user_turn = sent["body"]["messages"][-1]["content"]
    assert "[1] Green tea" in user_turn and user_turn.endswith("Question: At what temperature should green tea be steeped?")
    assert sent["body"]["messages"][0]["role"] == "system" and "[n]" in sent["body"]["messages"][0]["content"]


def test_reasoning_effort_reaches_the_server_only_when_asked(corpus, embedder, chat_server):
    # gpt-oss behind vLLM / SGLang / Ollama takes OpenAI's reasoning_effort; other servers never see it.
    service = make_service(corpus, embedder, openai_base_url=chat_server, openai_model="tiny-r1")
    list(service.stream("At what temperature should green tea be steeped?", k=3))
    assert "reasoning_effort" not in _ChatServer.requests[-1]["body"]
    list(service.stream("At what temperature should green tea be steeped?", k=3, reasoning_effort="high"))
    assert _ChatServer.requests[-1]["body"]["reasoning_effort"] == "high"


def test_openai_server_errors_are_clear(corpus, embedder, chat_server):
    wrong_model = make_service(corpus, embedder, openai_base_url=chat_server, openai_model="nope")
    with pytest.raises(GeneratorError, match="does not serve model 'nope'"):
        wrong_model.ask("green tea?")
    down = make_service(corpus, embedder, openai_base_url="http://127.0.0.1:9/v1", openai_model="tiny-r1")
    with pytest.raises(GeneratorError, match="Cannot reach"):
        down.ask("green tea?")


# --- SQuAD 2.0 answerable questions (the bar: >= 80 %) ----------------------------------------


def test_squad_answerable_questions_are_answered_with_valid_citations(shared_eval, embedder):
    from app.qa_eval import evaluate_answers

    report = evaluate_answers(shared_eval / "squad2" / "squad2_dev_subset.json", settings=Settings(), embedder=embedder, limit=100)
    summary = report.summary()
    assert report.questions == 100
    assert summary["answered"] >= 0.80, report.failures[:5]
    assert summary["invalid_citation_answers"] == 0 and summary["with_citation"] == 1.0


def test_cli_ask_json_and_chat(cli, home, embedder, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    assert cli("ingest", str(docs)).code == 0
    res = cli("ask", "How long does green tea steep?", "--json")
    assert res.code == 0, res
    data = json.loads(res.stdout)
    assert {"answer", "reasoning", "sources", "citations", "warnings", "timings"} <= set(data)
    assert "two minutes" in data["answer"] and data["citations"][0] >= 1
    first = data["sources"][data["citations"][0] - 1]
    assert first["title"] == "Green tea" and first["source"] == str(docs / "tea.md") and "snippet" in first
    res = cli("ask", "Which train leaves at 21:30?")
    assert res.code == 0 and "Vienna" in res.stdout and "[1]" in res.stdout
    missing = cli("ask", "tea?", "--collection", "nope")
    assert missing.code == 1 and "No collection named 'nope'" in missing.stderr


def test_cli_chat_keeps_the_conversation(cli, home, tmp_path, monkeypatch):
    import io

    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    assert cli("ingest", str(docs)).code == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("How is the FAISS index rebuilt?\nWhen was it introduced?\n/exit\n"))
    res = cli("chat")
    assert res.code == 0, res
    assert "March 2026" in res.stdout and "moerag chat --resume" in res.stdout
    listed = json.loads(cli("conversations", "list", "--json").stdout)
    assert len(listed) == 1 and listed[0]["title"] == "How is the FAISS index rebuilt?"
    shown = json.loads(cli("conversations", "show", str(listed[0]["id"]), "--json").stdout)
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant"] * 2
    assert cli("conversations", "rm", str(listed[0]["id"])).code == 0
    assert json.loads(cli("conversations", "list", "--json").stdout) == []
    assert cli("conversations", "show", "999").code == 1


