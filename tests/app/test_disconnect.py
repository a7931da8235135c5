"""A client that goes away never stalls anyone else: a closed stream, a client timeout or Ctrl-C
in `moerag chat` stops the answer within a step and releases what it held (the engine's lock,
the upstream connection of an OpenAI-compatible server, the conversation's rows).

The engine runs in a real `moerag serve` process on a tiny random checkpoint (it writes
gibberish, slowly enough that an answer not stopped would run for many seconds); the other
generators are served by uvicorn in this process (the same app, no model to load); `moerag chat`
runs as a process on pipes. Upstream is a fake slow OpenAI-compatible server that streams a token
every 100 ms and notices when its reader leaves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.servers import REPO, MoeragServer, serve_app

pytestmark = pytest.mark.slow

QUESTION = "What does the engine answer about documents?"
LONG_TOKENS = 3000  # ~40 s of the tiny engine on this machine: far longer than any bound below


@pytest.fixture(scope="module")
def served_home(tmp_path_factory, embedder) -> tuple[Path, str]:
    """A knowledge base with one document and an API key, written before any server starts."""
    from app.keys import Keys
    from ingest.pipeline import ingest_paths
    from retrieval.kb import KnowledgeBase

    root = tmp_path_factory.mktemp("disconnect")
    docs = root / "docs"
    docs.mkdir()
    (docs / "engine.md").write_text(
        "# The engine\n\nThe engine answers questions about documents with cited sources. "
        "It runs a mixture-of-experts model on the local machine.\n"
    )
    home = root / "home"
    kb = KnowledgeBase(home)
    ingest_paths(kb, embedder, [docs], collection="default")
    return home, Keys(kb.store).create("tester")[1]


def _chat(url: str, key: str, *, stream: bool, timeout: float = 15, **body) -> httpx.Response:
    payload = {"model": "default", "messages": [{"role": "user", "content": QUESTION}], "stream": stream, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {key}"},
                      timeout=timeout)


def _read_then_close(url: str, key: str, chunks: int, **body) -> list[str]:
    """Stream an answer, read `chunks` text deltas, then hang up (the connection is closed)."""
    payload = {"model": "default", "messages": [{"role": "user", "content": QUESTION}], "stream": True, **body}
    got: list[str] = []
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/v1/chat/completions", json=payload,
                           headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"]
                text = delta.get("content") or delta.get("reasoning_content")
                if text:
                    got.append(text)
                if len(got) >= chunks:
                    break
    return got


# --- the engine -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_server(served_home, chat_checkpoint):
    home, key = served_home
    env = {"MOERAG_MODEL": str(chat_checkpoint), "MOERAG_GENERATOR": "engine", "MOERAG_ANSWER_TOKENS": str(LONG_TOKENS)}
    with MoeragServer(home, env=env) as server:
        assert _chat(server.url, key, stream=False, max_tokens=1, timeout=60).status_code == 200  # the model loads
        yield server, key


def test_a_closed_stream_frees_the_engine_for_the_next_request(engine_server):
    server, key = engine_server
    assert len(_read_then_close(server.url, key, 3)) == 3
    start = time.monotonic()
    resp = _chat(server.url, key, stream=False, max_tokens=4)
    assert resp.status_code == 200, resp.text
    # The abandoned answer had ~40 s of tokens left; the next one waits for none of them.
    assert time.monotonic() - start < 8, server.output()


def test_a_client_timeout_stops_the_answer_and_its_cpu(engine_server):
    server, key = engine_server
    with pytest.raises(httpx.ReadTimeout):
        _chat(server.url, key, stream=False, timeout=1.0)
    start = time.monotonic()
    resp = _chat(server.url, key, stream=False, max_tokens=4)
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - start < 8
    time.sleep(0.5)
    before = server.cpu_s()
    time.sleep(2)
    assert server.cpu_s() - before < 0.4, "the server still burns CPU for a client that left"


# --- an OpenAI-compatible server upstream -------------------------------------------------------------


class SlowUpstream:
    """An OpenAI-compatible chat server that streams "tok " every 100 ms (3 tokens when the last
    user message says "quick", else 600) and counts the streams still open."""

    def __init__(self) -> None:
        self.open = 0
        self.closed_early: list[float] = []  # monotonic times at which a reader hung up
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection does

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                last = body["messages"][-1]["content"]
                n = 3 if "quick" in last else 600
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                with upstream.lock:
                    upstream.open += 1
                try:
                    for _ in range(n):
                        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                 "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(0.1)
                    self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):
                    upstream.closed_early.append(time.monotonic())
                finally:
                    with upstream.lock:
                        upstream.open -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_open(self, n: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.open == n:
                return True
            time.sleep(0.02)
        return self.open == n


@pytest.fixture(scope="module")
def upstream():
    fake = SlowUpstream()
    yield fake
    fake.server.shutdown()


def _openai_env(upstream: SlowUpstream) -> dict[str, str]:
    return {"MOERAG_GENERATOR": "openai", "MOERAG_OPENAI_BASE_URL": upstream.url, "MOERAG_OPENAI_MODEL": "m"}


def _serve_here(home: Path, embedder, **settings):
    """The API app with `settings`, on uvicorn in this process: (url, stop)."""
    from app.api import create_app
    from app.service import AnswerService
    from app.settings import Settings

    s = Settings(home=home, **settings)
    return serve_app(create_app(s, service=AnswerService(s, embedder=embedder)))


def test_a_closed_stream_closes_the_upstream_connection(served_home, upstream, embedder):
    home, key = served_home
    url, stop = _serve_here(home, embedder, generator="openai", openai_base_url=upstream.url, openai_model="m")
    try:
        assert _read_then_close(url, key, 3) == ["tok "] * 3
        closed_at = time.monotonic()
        assert upstream.wait_open(0, within=1.5), "the upstream stream is still being read for nobody"
        assert upstream.closed_early and upstream.closed_early[-1] - closed_at < 1.5
        resp = _chat(url, key, stream=False, messages=[{"role": "user", "content": "quick one"}])
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "tok tok tok"
    finally:
        stop()


# --- the extractive generator ---------------------------------------------------------------------------


def test_an_extractive_stream_closed_early_leaves_nothing_stuck(served_home, embedder):
    home, key = served_home
    url, stop = _serve_here(home, embedder, generator="extractive")
    try:
        assert len(_read_then_close(url, key, 1)) == 1
        for _ in range(3):
            resp = _chat(url, key, stream=True, timeout=10)
            assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]")
            deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in resp.text.splitlines()
                      if line.startswith("data: {")]
            assert "with cited sources. [1]" in "".join(d.get("content") or "" for d in deltas)
    finally:
        stop()


# --- the conversation ---------------------------------------------------------------------------------


@pytest.fixture
def conversation_service(tmp_path, embedder):
    from app.service import AnswerService
    from app.settings import Settings
    from ingest.pipeline import ingest_paths
    from retrieval.kb import KnowledgeBase

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "tea.md").write_text(
        "# Green tea\n\nGreen tea is made from leaves that are not oxidised. Steep green tea at 80 degrees "
        "Celsius for two minutes. Green tea tastes bitter when the water is too hot.\n"
    )
    settings = Settings(home=tmp_path / "home", generator="extractive")
    kb = KnowledgeBase(settings.home)
    ingest_paths(kb, embedder, [docs], collection="default")
    return AnswerService(settings, kb=kb, embedder=embedder)


def test_a_stream_closed_mid_answer_leaves_the_conversation_consistent(conversation_service):
    service = conversation_service
    conv = service.conversations.create()
    events = service.stream("How hot should green tea be steeped?", conversation_id=conv.id)
    seen = ""
    for ev in events:
        if ev.kind == "answer":
            seen += ev.data
            break
    events.close()
    stored = service.conversations.get(conv.id).messages
    assert [m.role for m in stored] == ["user", "assistant"]
    assert stored[1].stopped and stored[1].content == seen.strip()
    assert any("stopped" in w.lower() for w in stored[1].warnings)

    answer = service.ask("Why does it taste bitter?", conversation_id=conv.id)
    assert "bitter" in answer.answer and not answer.stopped
    stored = service.conversations.get(conv.id).messages
    assert [m.role for m in stored] == ["user", "assistant", "user", "assistant"] and not stored[3].stopped


def test_a_cancelled_answer_ends_with_a_stopped_answer(conversation_service):
    service = conversation_service
    conv = service.conversations.create()
    cancel = threading.Event()
    kinds = []
    for ev in service.stream("How hot should green tea be steeped?", conversation_id=conv.id, cancel=cancel):
        kinds.append(ev.kind)
        if ev.kind == "answer":
            cancel.set()  # the extractive generator has more sentences; none of them comes
        if ev.kind == "done":
            answer = ev.data
    assert kinds.count("answer") == 1 and kinds[-1] == "done"
    assert answer.stopped and answer.to_json()["stopped"] is True
    stored = service.conversations.get(conv.id).messages
    assert [m.role for m in stored] == ["user", "assistant"] and stored[1].stopped
    assert stored[1].content == answer.answer


# --- Ctrl-C in `moerag chat` ----------------------------------------------------------------------------


class Terminal:
    """A `moerag chat` process on pipes: everything it prints, read as it comes."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "chat", "--home", str(home)], cwd=REPO,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.text = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 4096):
            self.text += chunk.decode(errors="replace")

    def wait_for(self, predicate, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while not predicate(self.text):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"`moerag chat` did not get there; it printed:\n{self.text[-3000:]}")
            time.sleep(0.02)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


def test_ctrl_c_in_chat_stops_the_answer_and_the_chat_goes_on(served_home, upstream):
    home, _ = served_home
    term = Terminal(home, _openai_env(upstream))
    try:
        term.wait_for(lambda t: t.count("you> ") == 1)
        term.send("Tell me everything about the engine.")
        term.wait_for(lambda t: t.count("tok") >= 3)
        term.proc.send_signal(signal.SIGINT)
        stopped_at = time.monotonic()
        term.wait_for(lambda t: "stopped" in t and t.count("you> ") == 2, within=5)
        assert upstream.wait_open(0, within=1.5)
        assert time.monotonic() - stopped_at < 3  # the 600-token answer had a minute to go
        term.send("quick: and then?")
        term.wait_for(lambda t: t.count("you> ") == 3, within=20)
        assert "tok tok tok" in term.text.rsplit("you> ", 2)[1]
        term.send("/exit")
        assert term.proc.wait(15) == 0, term.text
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()

    from app.history import Conversations
    from retrieval.kb import KnowledgeBase

    convs = Conversations(KnowledgeBase(home).store)
    stored = convs.get(convs.list()[0].id).messages
    assert [m.role for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1].stopped and stored[1].content.startswith("tok") and not stored[3].stopped


def test_ctrl_c_in_ask_stops_within_a_step_and_exits_130(cli, home, embedder, monkeypatch, tmp_path):
    """In-process: the generator itself presses Ctrl-C (SIGINT to this process, in the main thread)."""
    from app.cli import chat as cli_chat
    from app.generators import Delta
    from app.history import Conversations
    from app.service import AnswerService
    from ingest.pipeline import ingest_paths
    from retrieval.kb import KnowledgeBase

    class Typist:
        """Writes "word " forever, a step every 10 ms; presses Ctrl-C after its third word."""

        name, context_window, note, counts_tokens = "typist", 4096, "", True
        after_ctrl_c = 0

        def count_tokens(self, text):
            return len(text.split())

        def count_messages(self, messages):
            return sum(self.count_tokens(m["content"]) for m in messages)

        def condense(self, history, question, *, cancel=None):
            return question

        def stream(self, request):
            for i in range(10_000):
                if request.cancel.is_set():
                    return
                if i == 3:
                    os.kill(os.getpid(), signal.SIGINT)
                if i > 3:
                    self.after_ctrl_c += 1
                time.sleep(0.01)
                yield Delta("answer", "word ")

    (tmp_path / "tea.md").write_text("# Tea\n\nGreen tea steeps at 80 degrees Celsius for two minutes.\n")
    kb = KnowledgeBase(home)
    ingest_paths(kb, embedder, [tmp_path / "tea.md"], collection="default")
    conv = Conversations(kb.store).create()
    typist = Typist()
    monkeypatch.setattr(
        cli_chat, "answer_service", lambda s: AnswerService(s, kb=kb, embedder=embedder, generator=typist)
    )

    result = cli("ask", "How hot for green tea?", "--conversation", str(conv.id))
    assert result.code == 130 and "stopped" in result.stderr and "Interrupted" not in result.stderr, result
    assert typist.after_ctrl_c <= 1  # stopped within one step
    stored = Conversations(kb.store).get(conv.id).messages
    assert [m.role for m in stored] == ["user", "assistant"] and stored[1].stopped
    assert stored[1].content == "word word word" or stored[1].content == "word word word word"
