"""Shared fixtures: the real embedder (loaded once), a temporary knowledge base, the CLI in-process,
and the evaluation data beside the repository (../shared/eval)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before the
# kernels are imported (Triton decides when a kernel is decorated).
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_EVAL = REPO.parent / "shared" / "eval"


@pytest.fixture(scope="session")
def shared_eval() -> Path:
    if not SHARED_EVAL.is_dir():
        pytest.skip("../shared/eval is not beside the repository")
    return SHARED_EVAL


@pytest.fixture(scope="session")
def embedder():
    from ingest.embedder import get_embedder

    return get_embedder()


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def kb(home):
    from retrieval.kb import KnowledgeBase

    return KnowledgeBase(home)


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-2000:]!r})"


@pytest.fixture
def cli(capsys, home, monkeypatch):
    """Run `moerag ARGS...` in this process (the model stays loaded); --home points at a temp dir."""
    from app import cli as cli_module
    from app.cli.common import out

    monkeypatch.setattr(out, "width", 200, raising=False)

    def run(*args: str, with_home: bool = True) -> CliResult:
        argv = ["moerag", *args] + (["--home", str(home)] if with_home else [])
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", argv)
        code = 0
        try:
            cli_module.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """name -> (transformers reference model, checkpoint directory): tiny random checkpoints on
    disk, built once per session with transformers; cached per session."""
    import torch

    from tests.engine.cases import CASES
    from tests.engine.checkpoints import save

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(sum(map(ord, name)))  # a fixed seed per case, independent of test order
            model = CASES[name].build()
            cache[name] = (model, save(model, tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def chat_checkpoint(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3-MoE checkpoint plus a byte-level BPE tokenizer trained here (never downloaded)."""
    import shutil

    from tests.engine.checkpoints import add_tokenizer

    _, path = tiny_checkpoint("qwen3_moe")
    directory = Path(shutil.copytree(path, tmp_path_factory.mktemp("chat") / "ckpt"))
    return add_tokenizer(directory)
