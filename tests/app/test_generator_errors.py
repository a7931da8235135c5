"""A bad MOERAG_MODEL (no such directory, an architecture the engine lacks) reaches the user as
one line in the CLI and an OpenAI-shaped 502 naming the problem in the API; and the OpenAI
generator's path (the <think> splitter included) never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.servers import serve_app

DOC = "# Green tea\n\nGreen tea is made from Camellia sinensis leaves. Steep green tea at 80 degrees Celsius.\n"


def _bad_model(kind: str, tmp_path) -> tuple[str, str]:
    """(MOERAG_MODEL, a phrase its error must contain)."""
    if kind == "missing":
        return str(tmp_path / "no-such-model"), "No checkpoint directory"
    model = tmp_path / "gpt2-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return str(model), "model_type 'gpt2'"


@pytest.fixture
def filled(home, embedder, tmp_path):
    from ingest.pipeline import ingest_paths
    from retrieval.kb import KnowledgeBase

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "tea.md").write_text(DOC)
    kb = KnowledgeBase(home)
    ingest_paths(kb, embedder, [docs], collection="default")
    return kb


@pytest.mark.parametrize("kind", ["missing", "unsupported"])
def test_bad_model_is_one_line_in_the_cli(kind, cli, filled, tmp_path, monkeypatch):
    model, phrase = _bad_model(kind, tmp_path)
    monkeypatch.setenv("MOERAG_MODEL", model)
    result = cli("ask", "At what temperature should green tea steep?")
    assert result.code == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert phrase in result.stderr and "Error:" in result.stderr


@pytest.mark.parametrize("kind", ["missing", "unsupported"])
def test_bad_model_is_a_502_naming_the_problem_in_the_api(kind, home, filled, embedder, tmp_path):
    from app.api import create_app
    from app.keys import Keys
    from app.service import AnswerService

    model, phrase = _bad_model(kind, tmp_path)
    settings = Settings(home=home, model=model, api_max_concurrent=0, api_rate_per_minute=0)
    key = Keys(filled.store).create("admin")[1]
    url, stop = serve_app(create_app(settings, service=AnswerService(settings, kb=filled, embedder=embedder)))
    body = {"model": "default", "messages": [{"role": "user", "content": "At what temperature should green tea steep?"}]}
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            resp = http.post("/v1/chat/completions", json=body)
            assert resp.status_code == 502
            error = resp.json()["error"]
            assert error["code"] == "generator_unavailable" and phrase in error["message"]
            assert "Internal error" not in error["message"]

            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
                events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
            errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
            assert len(errors) == 1 and errors[0]["code"] == "generator_unavailable" and phrase in errors[0]["message"]
            assert events[-1] == "[DONE]"
    finally:
        stop()


def test_the_openai_generator_and_the_think_splitter_need_no_torch():
    probe = (
        "import sys\n"
        "from app.generators import OpenAIGenerator\n"
        "from app.settings import Settings\n"
        "from engine.reasoning import ReasoningSplitter\n"
        "OpenAIGenerator(Settings(openai_base_url='http://127.0.0.1:9/v1'))\n"
        "pieces = list(ReasoningSplitter().feed('<think>hm</think>yes'))\n"
        "assert pieces, pieces\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "False"
